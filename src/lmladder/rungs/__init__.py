"""Rung registry: name -> class. Add a rung by adding a module and a line here."""

from __future__ import annotations

from lmladder.rungs.few_shot import FewShot
from lmladder.rungs.lora import Lora
from lmladder.rungs.full import Full
from lmladder.rungs.ia3 import Ia3
from lmladder.rungs.prefix_tuning import PrefixTuning
from lmladder.rungs.prompt_tuning import PromptTuning
from lmladder.rungs.qlora import Qlora
from lmladder.rungs.zero_shot import ZeroShot
from lmladder.rungs.calibrated import Calibrated

RUNGS = {r.name: r for r in (ZeroShot, Calibrated, FewShot, Lora)}
RUNGS.update({r.name: r for r in (PromptTuning, PrefixTuning, Ia3, Qlora, Full)})
from lmladder.rungs.continued_pretraining import ContinuedPretraining  # noqa: E402
from lmladder.rungs.encoder import Encoder  # noqa: E402

RUNGS.update({r.name: r for r in (Encoder, ContinuedPretraining)})

from lmladder.rungs.prompt_search import PromptSearch  # noqa: E402
from lmladder.rungs.rag import Rag  # noqa: E402
from lmladder.rungs.tools import Tools  # noqa: E402

RUNGS.update({r.name: r for r in (Rag, Tools, PromptSearch)})
from lmladder.rungs.best_of_n import BestOfN  # noqa: E402
from lmladder.rungs.constrained import Constrained  # noqa: E402
from lmladder.rungs.cot import Cot  # noqa: E402
from lmladder.rungs.self_consistency import SelfConsistency  # noqa: E402

RUNGS.update({r.name: r for r in (Constrained, Cot, SelfConsistency, BestOfN)})
from lmladder.rungs.dpo import Dpo  # noqa: E402

RUNGS[Dpo.name] = Dpo
from lmladder.rungs.reward_model import RewardModel  # noqa: E402

RUNGS[RewardModel.name] = RewardModel
from lmladder.rungs.distill import Distill  # noqa: E402

RUNGS[Distill.name] = Distill

from lmladder.rungs.grpo import Grpo  # noqa: E402

RUNGS[Grpo.name] = Grpo


def get(name: str):
    return RUNGS[name]
