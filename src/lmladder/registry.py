"""The rung registry: name -> class, in ladder order. Adding a rung is a file in rungs/, a
line here and a test (docs/architecture.md). Nothing under rungs/ imports this module: a
rung that needs another rung's predictions asks the run's context (``ctx.predict_with``).
A test checks that this table, RunConfig's rung sections and docs/rungs.md agree."""

from __future__ import annotations

from lmladder.rungs.best_of_n import BestOfN
from lmladder.rungs.calibrated import Calibrated
from lmladder.rungs.constrained import Constrained
from lmladder.rungs.continued_pretraining import ContinuedPretraining
from lmladder.rungs.cot import Cot
from lmladder.rungs.distill import Distill
from lmladder.rungs.dpo import Dpo
from lmladder.rungs.encoder import Encoder
from lmladder.rungs.few_shot import FewShot
from lmladder.rungs.full import Full
from lmladder.rungs.grpo import Grpo
from lmladder.rungs.ia3 import Ia3
from lmladder.rungs.lora import Lora
from lmladder.rungs.prefix_tuning import PrefixTuning
from lmladder.rungs.prompt_search import PromptSearch
from lmladder.rungs.prompt_tuning import PromptTuning
from lmladder.rungs.qlora import Qlora
from lmladder.rungs.rag import Rag
from lmladder.rungs.reward_model import RewardModel
from lmladder.rungs.self_consistency import SelfConsistency
from lmladder.rungs.tools import Tools
from lmladder.rungs.zero_shot import ZeroShot

RUNGS = {r.name: r for r in (
    ZeroShot, Calibrated, FewShot, Lora, PromptTuning, PrefixTuning, Ia3, Qlora, Full, Encoder,
    ContinuedPretraining, Rag, Tools, PromptSearch, Constrained, Cot, SelfConsistency, BestOfN, Dpo,
    RewardModel, Distill, Grpo,
)}


def get(name: str):
    return RUNGS[name]


def rung_class(name: str):
    """The rung class behind a rung name (``lora@cpt``, a named copy, is a ``lora``)."""
    return RUNGS[name.partition("@")[0]]
