"""What every lmladder trainer shares, and a plain transformers ``Trainer`` run for the rungs
that train outside training/sft.py (encoder: a classification / tagging head;
continued-pretraining: packed raw-text blocks).

Shared by the SFT engine, the TRL trainers (training/trl_train.py) and ``train`` here: the
step count (``total_steps``), the arguments (``common_args``: AdamW schedule from the config,
seeds, bf16 on CUDA devices that support it, fp32 on CPU, ``--report-to`` tracking) and the
loop itself (``run_trainer``: progress bar or lines, the tracked run, the time it took).
``train`` adds what the plain run needs: no checkpoints, a scratch folder, its stats."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from lmladder import progress, tracking


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


def run_trainer(trainer, run: str | None, label: str | None, tokens_per_step: float | None = None,
                resume: str | None = None) -> tuple[Any, float]:
    """The training loop every lmladder trainer runs: progress on the main process (a bar on
    a terminal, lines elsewhere; ``tokens_per_step`` for tok/s), ``trainer.train()`` resumed
    from ``resume`` inside the ``--report-to`` run ``run`` (``tracking.training``).
    Returns (Trainer's TrainOutput, seconds)."""
    progress.quiet_progress(trainer, label, tokens_per_step)
    t0 = time.perf_counter()
    with tracking.training(trainer, run):
        out = trainer.train(resume_from_checkpoint=resume)
    return out, time.perf_counter() - t0


def train(model, cfg, rows: list[dict], collator, work_dir: Path, seed: int, **extra) -> dict[str, Any]:
    """Train ``model`` on ``rows`` with ``cfg``'s lr / epochs / max_steps / batch_size /
    grad_accum / warmup_ratio / weight_decay; ``work_dir`` is scratch (removed after);
    ``extra``: more TrainingArguments. Returns train_seconds, steps, train_loss, loss_curve."""
    from transformers import Trainer

    name = Path(work_dir).parent.name
    run = tracking.run_name(work_dir, name)
    args = _plain_args(cfg, total_steps(cfg, len(rows)), work_dir, seed, run, extra)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    out, seconds = run_trainer(trainer, run, tracking.label(work_dir, name), _tokens_per_step(cfg, rows))
    shutil.rmtree(work_dir, ignore_errors=True)
    model.eval()
    return {
        "train_seconds": seconds,
        "steps": out.global_step,
        "train_loss": float(out.training_loss),
        "loss_curve": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def _plain_args(cfg, steps: int, work_dir: Path, seed: int, run: str | None, extra: dict[str, Any]):
    """TrainingArguments of the plain run: linear decay, a loss ~20 times per run, no
    checkpoints, quiet logs; ``extra`` on top."""
    from transformers import TrainingArguments

    return TrainingArguments(
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


def _tokens_per_step(cfg, rows: list) -> float | None:
    """Mean ``input_ids`` length x the rows of one optimizer step (progress tok/s); None
    when the rows carry no ``input_ids``."""
    lens = [len(r["input_ids"]) for r in rows if isinstance(r, dict) and "input_ids" in r]
    return sum(lens) / len(lens) * cfg.batch_size * getattr(cfg, "grad_accum", 1) if lens else None
