"""Task kinds: how a target is rendered, how predictions are made from a model and a
prompt, and how they are scored. A task never knows which rung built the prompts.
The interface is tasks/base.py."""

from __future__ import annotations

from lmladder.tasks.classification import ClassificationTask
from lmladder.tasks.extraction import ExtractionTask
from lmladder.tasks.generation import GenerationTask
from lmladder.tasks.math import MathTask
from lmladder.tasks.multiple_choice import MultipleChoiceTask
from lmladder.tasks.qa import QATask
from lmladder.tasks.tagging import TaggingTask

KINDS = {t.kind: t for t in (ClassificationTask, MathTask, QATask, ExtractionTask, MultipleChoiceTask, GenerationTask)}
KINDS[TaggingTask.kind] = TaggingTask
from lmladder.tasks.preference import PreferenceTask  # noqa: E402

KINDS[PreferenceTask.kind] = PreferenceTask


def make_task(cfg, labels, eval_cfg, seed: int, dataset=None):
    """Build the task for ``cfg.kind``; with the loaded dataset, let it learn from and
    check the data (Task.setup). Config errors (a bad schema, a metric_fn that does not
    import) are LadderErrors raised here, before any model work."""
    task = KINDS[cfg.kind](cfg, labels, eval_cfg, seed)
    if dataset is not None:
        task.setup(dataset)
    return task
