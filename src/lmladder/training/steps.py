"""Steps the supervised weight-update rungs share, as plain functions a rung calls in its
own ``validate`` / ``prepare`` / ``fit`` (rungs/lora.py reads top to bottom with them):

    check_step_plan   validate: the step plan from the counts alone (training/sft.step_plan)
    sft_features      prepare: prompt-masked features of the train split (training/sft.build_feature)
    dev_metric        fit: the task metric on the dev split, for checkpoint selection (select_on)
    trainer_dirs      fit: where the trainer works and checkpoints, per rank

Saving / reusing the trained weights and handing the shared base back are
training/weights.py; the forgetting check is training/forgetting.py.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

from lmladder.run import distributed

log = logging.getLogger(__name__)

# prompt- and prefix-tuning train unpacked (training/sft.py logs this and reports it)
VIRTUAL_TOKENS_NO_PACKING = (
    "the learned virtual tokens must precede every sequence, which a packed row "
    "cannot give each of its sequences"
)


def check_step_plan(cfg, dataset, name: str) -> None:
    """The step plan (training/sft.step_plan) of rung ``name`` from the counts alone: a
    checkpoint interval that cannot hold the best evaluated step is an error before anything
    is written."""
    from lmladder.training import sft

    if dataset is None:
        return
    rc = cfg.rung_config(name)
    world = distributed.dist_env()[1]
    _, dev = sft.carve_dev(len(dataset.train), rc.dev_fraction, rc.dev_max, cfg.seed)
    sft.step_plan(rc, len(dataset.train) - len(dev), len(dev), rc.batch_size * rc.grad_accum, name,
                  checkpoints=rc.checkpoints and world == 1)


def sft_features(ctx, cfg, name: str, answers: list[str] | None = None):
    """(features, answers, truncated): one training sequence per train example of ``ctx``
    (masked chat-template prompt + answer + end of turn), with ``answers`` as the answer texts
    (default: the gold answers; distill passes its teacher's), and how many had their prompt
    cut to ``cfg.max_length`` (logged)."""
    from lmladder import prompts
    from lmladder.training import sft

    task, fmt = ctx.task, ctx.fmt()
    model, tok = ctx.base()
    eos = prompts.eos_token_ids(tok, model)
    train = ctx.data.train
    answers = [task.answer(e) for e in train] if answers is None else list(answers)
    features = [
        sft.build_feature(fmt, task.train_message(e), a, cfg.max_length, e.source, eos, truncation=cfg.truncation)
        for e, a in zip(train, answers)
    ]
    truncated = sum(1 for f in features if f.truncated)
    if truncated:
        log.warning("%s: %d training sequence(s) longer than max_length=%d: prompt cut from the left",
                    name, truncated, cfg.max_length)
    return features, answers, truncated


def dev_metric(ctx, cfg, name: str, scorer=None):
    """``select_on`` (auto: label-scoring tasks, classification and multiple-choice): a
    function scoring the model being trained on the dev examples (train indices) with the
    task's own prediction, or None (select on the dev loss). ``scorer(model)``: the model as
    the task scorer calls it (prompt learning serves its virtual tokens through one)."""
    task = ctx.task
    if getattr(cfg, "select_on", "loss") == "loss" or task.kind not in ("classification", "multiple-choice"):
        return None
    train, fmt, metric = ctx.data.train, ctx.fmt(), ctx.cfg.primary_metric

    def score(model, idx) -> float:
        exs = [train[i] for i in idx]
        preds, _ = task.predict(scorer(model) if scorer else model, fmt, [task.user_message(e) for e in exs], exs,
                                desc=f"{name}: dev {metric}")
        return task.score([task.gold(e) for e in exs], [p["pred"] for p in preds])[metric]["value"]

    return score


@contextlib.contextmanager
def trainer_dirs(out_dir: Path):
    """(work, checkpoints) for one training run: rank 0 works in ``rungs/<rung>/.trainer`` and
    checkpoints in ``rungs/<rung>/checkpoints``; other ranks work in a private temporary folder
    and write no checkpoints. The work folder goes once training has finished."""
    main = distributed.is_main()
    work = Path(out_dir) / ".trainer" if main else Path(tempfile.mkdtemp(prefix="lmladder-trainer-"))
    yield work, (Path(out_dir) / "checkpoints" if main else None)
    shutil.rmtree(work, ignore_errors=True)
