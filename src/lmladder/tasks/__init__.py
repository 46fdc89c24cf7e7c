"""Task kinds: how a target is rendered, how predictions are made from a model and a
prompt, and how they are scored. A task never knows which rung built the prompts.
The interface is tasks/base.py."""

from __future__ import annotations

from lmladder.tasks.classification import ClassificationTask

KINDS = {"classification": ClassificationTask}


def make_task(cfg, labels, eval_cfg, seed: int):
    return KINDS[cfg.kind](cfg, labels, eval_cfg, seed)
