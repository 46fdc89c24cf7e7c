"""Task kinds: how a target is rendered, how predictions are made from a model and a
prompt, and how they are scored. A task never knows which rung built the prompts.
The interface is tasks/base.py. ``KINDS`` is the one list of task kinds: the config, the
CLI's help and the docs read it."""

from __future__ import annotations

from lmladder.tasks.classification import ClassificationTask
from lmladder.tasks.extraction import ExtractionTask
from lmladder.tasks.generation import GenerationTask
from lmladder.tasks.math import MathTask
from lmladder.tasks.multiple_choice import MultipleChoiceTask
from lmladder.tasks.qa import QATask
from lmladder.tasks.preference import PreferenceTask
from lmladder.tasks.tagging import TaggingTask

KINDS = {t.kind: t for t in (ClassificationTask, MathTask, QATask, ExtractionTask, MultipleChoiceTask, GenerationTask,
                             TaggingTask, PreferenceTask)}


# the kinds a rung handles unless it says otherwise: all but tagging (a token-classification
# head, the encoder rung) and preference (pairs to score, not one answer to give)
ANSWER_KINDS = tuple(k for k in KINDS if k not in ("tagging", "preference"))


def kinds_help() -> str:
    """Every kind with what its answer is: the --help / docs text of task.kind."""
    return "; ".join(f"{k}: {t.summary}" for k, t in KINDS.items())


def make_task(cfg, labels, eval_cfg, seed: int, dataset=None):
    """Build the task for ``cfg.kind``; with the loaded dataset, let it learn from and
    check the data (Task.setup). Config errors (a bad schema, a metric_fn that does not
    import) are LadderErrors raised here, before any model work."""
    task = KINDS[cfg.kind](cfg, labels, eval_cfg, seed)
    if dataset is not None:
        task.setup(dataset)
    return task
