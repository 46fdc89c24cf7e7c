"""Trained weights, reused by fingerprint: the one place that decides "train or load".

A rung's trained weights live in ``rungs/<rung>/<folder>`` with ``lmladder_fingerprint.txt``
(the rung's *training* fingerprint: run/fingerprint.py with ``training=True``) and
``lmladder_cost.json`` (what training them cost, saving included). A later run whose
training fingerprint matches loads them instead of training again: a run stopped after
training, or one that changed only evaluation settings (``eval:``, ``judge:``). The
result then reports the weights' original training seconds, not their load time.

Under ``torchrun`` rank 0 alone decides and broadcasts the decision (the run folder need
not be on a shared filesystem), saves, and loads (it alone evaluates); the other ranks
train with it or skip.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from lmladder.io import atomic_dir, atomic_write_json
from lmladder.run import distributed

log = logging.getLogger(__name__)

STAMP = "lmladder_fingerprint.txt"
COST = "lmladder_cost.json"


def stamped(folder: Path, fingerprint: str) -> bool:
    """``folder`` holds weights saved under ``fingerprint``."""
    stamp = Path(folder) / STAMP
    return stamp.is_file() and stamp.read_text().strip() == fingerprint


def stamp_of(folder: Path) -> str | None:
    stamp = Path(folder) / STAMP
    return stamp.read_text().strip() if stamp.is_file() else None


def reuse_or_train(folder: Path, fingerprint: str, *, train: Callable[[], dict[str, Any]],
                   save: Callable[[Path], None], load: Callable[[Path], None], name: str,
                   flag: str = "reused_adapter") -> dict[str, Any]:
    """Load the weights in ``folder`` when they carry ``fingerprint`` (``load(folder)``), else
    ``train()`` and save them (``save(tmp)`` into a temp folder renamed over ``folder`` once
    complete, with the stamp and the cost). Returns the training stats, or ``{flag: True,
    "original_train_seconds": ...}`` for reused weights."""
    folder = Path(folder)
    main = distributed.is_main()
    reuse = distributed.broadcast(main and stamped(folder, fingerprint))  # rank 0 decides for all
    if reuse:
        if not main:
            return {flag: True}
        log.info("%s: reusing the trained weights in %s", name, folder)
        load(folder)
        stats: dict[str, Any] = {flag: True}
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
        atomic_write_json(folder / COST, {"train_seconds": round(time.perf_counter() - t0, 3)})
    return stats
