"""Training checkpoints: atomic, scoped by the rung's fingerprint, resumable.

Every trainer lmladder runs (the SFT engine, training/sft.py; the TRL trainers,
training/trl_train.py) writes its checkpoints here:

* **atomic**: :class:`AtomicCheckpoints` makes Trainer write each ``checkpoint-N`` into a
  ``.tmp-*`` staging folder that is renamed into place only once complete, so a kill
  mid-save never leaves a half checkpoint (:func:`latest_checkpoint` sees whole ones only);
* **scoped by fingerprint**: the folder carries ``CKPT_STAMP``; :func:`prepare_checkpoint_dir`
  discards checkpoints written under another fingerprint (other config / data) and returns
  the newest complete one to resume from.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from lmladder.io import atomic_write_text

log = logging.getLogger(__name__)

CKPT_STAMP = "lmladder_fingerprint.txt"


def checkpoint_step(path) -> int | None:
    """N of a ``checkpoint-N`` folder; None for any other name."""
    name = Path(path).name
    if not name.startswith("checkpoint-"):
        return None
    tail = name[len("checkpoint-"):]
    return int(tail) if tail.isdigit() else None


def latest_checkpoint(ckpt_dir) -> str | None:
    """The newest complete checkpoint in ``ckpt_dir``: a ``checkpoint-N`` folder (they
    appear by an atomic rename, only once fully written) with its trainer state."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    done = [p for p in d.iterdir() if p.is_dir() and checkpoint_step(p) is not None
            and (p / "trainer_state.json").is_file()]
    return str(max(done, key=checkpoint_step)) if done else None


def prepare_checkpoint_dir(ckpt_dir, fingerprint: str) -> str | None:
    """Make ``ckpt_dir`` ready for this run and return the checkpoint to resume from.
    Leftover staging folders (a save killed half-way) are removed; checkpoints written
    under another fingerprint (other config / data) are discarded."""
    d = Path(ckpt_dir)
    stamp = d / CKPT_STAMP
    if d.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        log.info("%s: checkpoints from another configuration, starting afresh", d)
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
    atomic_write_text(stamp, fingerprint + "\n")
    return latest_checkpoint(d)


class AtomicCheckpoints:
    """Mixin for a transformers ``Trainer`` (or a TRL trainer): each checkpoint is written
    into a staging folder and renamed into place only once complete, so a kill mid-save
    leaves no half ``checkpoint-N`` behind (``latest_checkpoint`` only sees whole ones)."""

    def _save_checkpoint(self, model, trial):
        # Atomic: Trainer writes into a staging folder, which is renamed into place
        # only once complete; a kill mid-save leaves no half checkpoint-N behind.
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = self.args.output_dir
        folder = f"checkpoint-{self.state.global_step}"
        stage = tempfile.mkdtemp(prefix=".tmp-", dir=run_dir)
        self._get_output_dir = lambda trial=None: stage
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        final = os.path.join(run_dir, folder)
        b = self.state.best_global_step
        if b and (b == self.state.global_step or os.path.isdir(os.path.join(run_dir, f"checkpoint-{b}"))):
            self.state.best_model_checkpoint = os.path.join(run_dir, f"checkpoint-{b}")
        if self.args.should_save:
            self.state.save_to_json(os.path.join(stage, folder, "trainer_state.json"))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(os.path.join(stage, folder), final)
        shutil.rmtree(stage, ignore_errors=True)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
