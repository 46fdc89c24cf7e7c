"""Run a TRL trainer (DPO, reward, GRPO, ...) with lmladder's training guarantees.

TRL does the method (losses, reference handling, generation for GRPO); this module adds
what every lmladder weight-update rung promises (docs/training.md):

* **atomic checkpoints scoped by fingerprint, and resume**: checkpoints go to
  ``rungs/<rung>/checkpoints`` through :class:`training.checkpoints.AtomicCheckpoints` (staged, then
  renamed into place); a rerun with the same fingerprint resumes from the newest complete
  one, a changed config discards them;
* the same optimizer arguments as the SFT engine (AdamW, warmup + decay, grad
  accumulation, bf16 on CUDA, fp32 on CPU, seeded);
* **curves**: every numeric value TRL logs (loss, rewards/chosen, rewards/margins,
  reward, ...) comes back as ``curves[name] = [[step, value], ...]`` for the report.

Use::

    stats = trl_train.run(DPOTrainer, DPOConfig, model=m, cfg=cfg, train_dataset=ds,
                          processing_class=tok, checkpoint_dir=..., fingerprint=fp,
                          seed=0, name="dpo", method_args={"beta": 0.1})
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmladder import tracking
from lmladder.run import distributed
from lmladder.training.checkpoints import AtomicCheckpoints, checkpoint_step, prepare_checkpoint_dir
from lmladder.training.hf_train import common_args, run_trainer, total_steps

log = logging.getLogger(__name__)

# log-history keys that are bookkeeping, not curves
_NOT_CURVES = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second",
               "train_steps_per_second", "train_loss", "num_tokens"}


def training_args(cfg, out_dir: Path, seed: int, steps: int, save: bool, run: str | None = None) -> dict[str, Any]:
    """Keyword arguments shared by every TRL ``*Config`` (they subclass TrainingArguments);
    ``run``: the ``--report-to`` run name (``tracking.run_name``), None: no reporting."""
    save_steps = cfg.save_steps or max(1, steps // 5)
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=steps,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps or max(1, steps // 20),
        save_strategy="steps" if save else "no",
        save_steps=save_steps,
        save_total_limit=2 if save else None,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        log_level="passive",
        **common_args(cfg, seed, run),
    )


def curves(log_history: list[dict]) -> dict[str, list[list[float]]]:
    """Every numeric value logged during training, as ``name -> [[step, value], ...]``."""
    out: dict[str, list[list[float]]] = {}
    for h in log_history:
        step = h.get("step")
        for k, v in h.items():
            if k in _NOT_CURVES or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out.setdefault(k, []).append([step, float(v)])
    return out


def run(
    trainer_cls,
    config_cls,
    *,
    model,
    cfg,
    train_dataset,
    processing_class,
    seed: int,
    name: str,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    work_dir: Path | None = None,
    method_args: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    rows_per_step: int | None = None,
    row_tokens: list[int] | None = None,
    micro_batching: bool = True,
) -> dict[str, Any]:
    """Train ``model`` with ``trainer_cls`` (a TRL trainer) and ``config_cls(**shared args,
    **method_args)``. Checkpoints (atomic, resumable) when ``checkpoint_dir`` is given and
    ``cfg.checkpoints``; else ``work_dir`` is scratch. Returns the stats the report shows.

    ``row_tokens``: the tokens one train row puts through the model (DPO: chosen and rejected,
    each padded to the longer). With it, ``cfg.memory_budget_mb`` is honoured
    (training/memory.py): the micro-batch (``micro_batching``; the global batch unchanged) and,
    for micro-batches longer than the budget holds, layers checkpointed (training/lean.py),
    with LoRA dropout fused; the plan is reported as ``memory_plan``."""
    from transformers import set_seed

    from lmladder.training import lean, memory

    set_seed(seed)
    steps = total_steps(cfg, len(train_dataset), rows_per_step)
    save, resume, out_dir = _output_dir(cfg, checkpoint_dir, fingerprint, work_dir, name)
    run_name = tracking.run_name(out_dir, name)  # --report-to: this rung's own tracked run
    shared = training_args(cfg, out_dir, seed, steps, save, run_name)
    mem = None
    if row_tokens:
        micro, accum = shared["per_device_train_batch_size"], shared["gradient_accumulation_steps"]
        mem = memory.plan(model, row_tokens, micro, 1 if not micro_batching else accum,
                          getattr(cfg, "memory_budget_mb", None), full_checkpointing=bool(cfg.gradient_checkpointing),
                          **({} if micro_batching else {"cap_tokens": 10**9}))
        if micro_batching:
            shared["per_device_train_batch_size"], shared["gradient_accumulation_steps"] = mem.micro, mem.accum
        log.info("%s: memory budget %d MB%s: micro-batch %d x grad_accum %d, micro-batches over %d tokens "
                 "checkpoint layers (planned peak ~%d MB)", name, mem.budget_mb, " (auto)" if mem.auto_budget else "",
                 shared["per_device_train_batch_size"], shared["gradient_accumulation_steps"], mem.fit_tokens,
                 mem.estimate_mb)
    args = config_cls(**{**shared, **(method_args or {})})
    trainer = _atomic(trainer_cls)(model=model, args=args, train_dataset=train_dataset,
                                   processing_class=processing_class, **(trainer_kwargs or {}))
    if resume:
        log.info("%s: resuming from %s", name, resume)
    # bar / lines, not a dict per step: curves keep them; the lean pieces are undone on the way out
    with lean.fused_lora_dropout(model) if mem else contextlib.nullcontext(0) as n_fused, \
            lean.large_blocks_returned() if mem and mem.checkpoint_layers else contextlib.nullcontext(False), \
            lean.small_logprob_tiles(model) if mem else contextlib.nullcontext(None), \
            lean.checkpoint_layers(model, mem.layers_for if mem and mem.checkpoint_layers else 0) as ck:
        out, seconds = run_trainer(trainer, run_name, tracking.label(out_dir, name), resume=resume)
    if not save:
        shutil.rmtree(out_dir, ignore_errors=True)
    model.eval()
    stats = _stats(trainer_cls, out, seconds, trainer.state.log_history, resume, len(train_dataset))
    if mem:
        stats["memory_plan"] = memory.report(mem, ck, n_fused)
        stats["per_device_batch"] = args.per_device_train_batch_size
        stats["grad_accum_per_device"] = args.gradient_accumulation_steps
    return stats


def _atomic(trainer_cls):
    """``trainer_cls`` with atomic checkpoints (training/checkpoints.py)."""
    return type(f"Atomic{trainer_cls.__name__}", (AtomicCheckpoints, trainer_cls), {})


def _output_dir(cfg, checkpoint_dir, fingerprint: str, work_dir, name: str) -> tuple[bool, str | None, Path]:
    """(save, resume, out_dir): checkpoints only from ``checkpoint_dir`` with ``cfg.checkpoints``
    in one process, the folder made ready for ``fingerprint`` (the checkpoint to resume from);
    else a scratch folder (``work_dir`` or a new temporary one)."""
    save = checkpoint_dir is not None and cfg.checkpoints and not distributed.is_distributed()
    resume = prepare_checkpoint_dir(checkpoint_dir, fingerprint) if save else None
    out_dir = Path(checkpoint_dir) if save else Path(work_dir or tempfile.mkdtemp(prefix=f"lmladder-{name}-"))
    return save, resume, out_dir


def _stats(trainer_cls, out, seconds: float, hist: list[dict], resume: str | None, n_train: int) -> dict[str, Any]:
    """What ``run`` returns: time and speed of this run's own steps, losses, every curve."""
    done = out.global_step - ((checkpoint_step(resume) or 0) if resume else 0)
    c = curves(hist)
    losses = [v for _, v in c.get("loss", [])]
    return {
        "train_seconds": seconds,
        "steps": out.global_step,
        "steps_per_second": done / seconds if seconds and done else None,
        "train_loss": float(out.training_loss),
        "final_train_loss": losses[-1] if losses else None,
        "loss_curve": losses,
        "curves": c,
        "train_examples": n_train,
        "resumed_from": checkpoint_step(resume) if resume else None,
        "trainer": f"trl.{trainer_cls.__name__}",
    }
