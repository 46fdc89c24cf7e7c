"""Trained weights: reused by fingerprint, counted, merged for scoring, and the shared base
handed back. Plain functions every weight-update rung calls in its own steps.

**Reuse by fingerprint** (:func:`reuse_or_train`, the one place that decides "train or
load"). A rung's trained weights live in ``rungs/<rung>/<folder>`` with
``lmladder_fingerprint.txt`` (the rung's *training* fingerprint: run/fingerprint.py with
``training=True``) and ``lmladder_cost.json`` (what training them cost, saving included, the
forgetting check not). A later run whose training fingerprint matches loads them instead of
training again: a run stopped after training, or one that changed only evaluation settings
(``eval:``, ``judge:``). The result then reports the weights' original training seconds, not
their load time. Under ``torchrun`` rank 0 alone decides and broadcasts the decision (the
run folder need not be on a shared filesystem), saves, and loads (it alone evaluates); the
other ranks train with it or skip.

**The shared base** (:func:`restore_base`, :func:`merged`). Rungs share one loaded base
model; an adapter rung injects its modules into it and must hand it back exactly as it
found it: eval mode, frozen, no activation checkpointing, the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from lmladder.io import atomic_dir, atomic_write_json
from lmladder.run import distributed

log = logging.getLogger(__name__)

STAMP = "lmladder_fingerprint.txt"
COST = "lmladder_cost.json"


# --------------------------------------------------------------------------- reuse by fingerprint


def stamped(folder: Path, fingerprint: str) -> bool:
    """``folder`` holds weights saved under ``fingerprint``."""
    return stamp_of(folder) == fingerprint


def stamp_of(folder: Path) -> str | None:
    """The training fingerprint the weights in ``folder`` were saved under (None: no stamp)."""
    stamp = Path(folder) / STAMP
    return stamp.read_text().strip() if stamp.is_file() else None


def reuse_or_train(folder: Path, fingerprint: str, *, train: Callable[[], dict[str, Any]],
                   save: Callable[[Path], None], load: Callable[[Path], dict[str, Any] | None], name: str,
                   flag: str = "reused_adapter", spent: float = 0.0,
                   checkpoints: Path | None = None) -> dict[str, Any]:
    """The weights in ``folder`` when they carry ``fingerprint``, else new ones.

    Reuse (rank 0 decides for every rank): ``load(folder)`` on rank 0 (it may return stats
    for the result); returns ``{flag: True, **those, "original_train_seconds": ...}`` (other
    ranks: ``{flag: True}``). Otherwise ``train()`` on every rank returns the training stats;
    rank 0 then saves: ``save(tmp)`` into a temporary folder renamed over ``folder`` once
    complete, with the stamp, then the cost: ``spent`` (seconds of work for these weights
    before ``train()``, e.g. loading a 4-bit start model) plus ``train()`` and the save. The
    trained weights saved, the ``checkpoints`` folder is no longer needed and goes."""
    folder = Path(folder)
    main = distributed.is_main()
    reuse = distributed.broadcast(main and stamped(folder, fingerprint))  # rank 0 decides for all
    if reuse:
        if not main:
            return {flag: True}
        log.info("%s: reusing the trained weights in %s", name, folder)
        stats: dict[str, Any] = {flag: True, **(load(folder) or {})}
        try:  # what the weights cost when they were made, not their load time
            stats["original_train_seconds"] = float(json.loads((folder / COST).read_text())["train_seconds"])
        except (OSError, ValueError, KeyError):
            pass
        return stats
    t0 = time.perf_counter()
    stats = train()
    if main:
        with atomic_dir(folder) as tmp:
            save(tmp)
            (tmp / STAMP).write_text(fingerprint + "\n")
        atomic_write_json(folder / COST, {"train_seconds": round(spent + time.perf_counter() - t0, 3)})
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
    return stats


# --------------------------------------------------------------------------- counting


def count_trainable(model, loaded: bool = False) -> int:
    """Trainable parameters: those requiring grad; for saved PEFT weights loaded for
    inference (frozen), the size of the adapter's own state."""
    if loaded and hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return sum(v.numel() for v in get_peft_model_state_dict(model).values())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def share_of_base(ctx, n: int, model=None) -> float:
    """``n`` trainable parameters as a share of the base model's (``model``'s own count when
    the run has none on record)."""
    total = ctx.model_info.get("parameters")
    if not total and model is not None:
        total = sum(p.numel() for p in model.parameters())
    return n / max(total or 0, 1)


# --------------------------------------------------------------------------- the shared base


def restore_base(ctx, base) -> None:
    """Put the shared base back as the other rungs expect it: eval mode, frozen, no
    activation checkpointing; ``ctx.set_base``."""
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    ctx.set_base(base)


@contextlib.contextmanager
def merged(model, ctx=None):
    """Evaluate at deployment speed: yields the model under the mergeable adapter ``model``
    (lora, ia3) with the adapter merged into its weights and its wrapper modules taken out
    (an unmerged PEFT forward costs up to 2x per call, and even a merged one still pays the
    wrappers' Python overhead; a deployed adapter is merged). Afterwards the merged layers'
    weights are restored exactly from copies (no rounding drift for the next rung) and, with
    ``ctx``, the model is handed back as the shared base (:func:`restore_base`). ``model`` is
    used up: the adapter is no longer attached (it is on disk; a later predict or ``from:``
    loads it from there)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    saved = []
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            w = getattr(m.get_base_layer(), "weight", None)
            if w is not None:
                saved.append((w, w.detach().clone()))
    base = model.merge_and_unload()
    try:
        yield base
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig)
        saved.clear()
        if ctx is not None:
            restore_base(ctx, base)
