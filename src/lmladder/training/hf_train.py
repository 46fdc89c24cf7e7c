"""A plain transformers ``Trainer`` run for the rungs that train outside training/sft.py
(encoder: a classification / tagging head; continued-pretraining: packed raw-text blocks).

One place for the arguments both use (AdamW, linear decay after warmup, no checkpoints,
bf16 on CUDA devices that support it, fp32 on CPU, ``--report-to`` tracking) and for the
stats they report."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any


AUTO_MIN_STEPS, AUTO_MAX_EPOCHS = 150, 3


def total_steps(cfg, n_rows: int, rows_per_step: int | None = None) -> int:
    """Optimizer steps: ``cfg.max_steps``, else ceil(epochs x steps per epoch), a step taking
    ``rows_per_step`` rows (default batch_size x grad_accum). With ``epochs`` unset (SFT
    rungs' default) the count comes from the data: at least AUTO_MIN_STEPS steps but at
    most AUTO_MAX_EPOCHS epochs, and one epoch when that alone is longer (a 270-example set
    at batch 8 gets 3 epochs = 102 steps instead of one of 34; 500 examples get 150 steps;
    10,000 get one epoch)."""
    G = rows_per_step or cfg.batch_size * getattr(cfg, "grad_accum", 1)
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(n_rows / G)
    if getattr(cfg, "epochs", None) is None:
        return max(1, min(AUTO_MAX_EPOCHS * per_epoch, max(AUTO_MIN_STEPS, per_epoch)))
    return max(1, math.ceil(per_epoch * cfg.epochs))


def common_args(cfg, seed: int, run: str | None = None) -> dict[str, Any]:
    """TrainingArguments every lmladder trainer shares (SFT engine, this module, TRL
    trainers): optimizer schedule from ``cfg``, seeds, bf16 on CUDA devices that support
    it, fp32 on CPU, no dataloader workers; reporting to the ``--report-to`` backends as
    run ``run`` (``tracking.run_name``), none when ``run`` is None."""
    import torch

    from lmladder import tracking

    cuda = torch.cuda.is_available()
    return dict(
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs or 1.0,  # (max_steps, always set, governs)
        warmup_steps=cfg.warmup_ratio,  # < 1: a share of the steps
        weight_decay=cfg.weight_decay,
        **tracking.trainer_args(run),
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
    )


def train(model, cfg, rows: list[dict], collator, work_dir: Path, seed: int, **extra) -> dict[str, Any]:
    """Train ``model`` on ``rows`` with ``cfg``'s lr / epochs / max_steps / batch_size /
    grad_accum / warmup_ratio / weight_decay; ``work_dir`` is scratch (removed after).
    Returns train_seconds, steps, train_loss, loss_curve."""
    from transformers import Trainer, TrainingArguments

    from lmladder import tracking

    steps = total_steps(cfg, len(rows))
    run = tracking.run_name(work_dir, Path(work_dir).parent.name)
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=getattr(cfg, "grad_accum", 1),
        max_steps=steps,
        lr_scheduler_type="linear",
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        log_level="error",
        **common_args(cfg, seed, run),
        **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    from lmladder.progress import quiet_progress

    lens = [len(r["input_ids"]) for r in rows if isinstance(r, dict) and "input_ids" in r]
    per_step = sum(lens) / len(lens) * cfg.batch_size * getattr(cfg, "grad_accum", 1) if lens else None
    quiet_progress(trainer, tracking.label(work_dir, Path(work_dir).parent.name), per_step)
    t0 = time.perf_counter()
    with tracking.training(trainer, run):
        out = trainer.train()
    seconds = time.perf_counter() - t0
    shutil.rmtree(work_dir, ignore_errors=True)
    model.eval()
    return {
        "train_seconds": seconds,
        "steps": out.global_step,
        "train_loss": float(out.training_loss),
        "loss_curve": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
