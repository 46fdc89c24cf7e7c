"""Progress for training and evaluation, on a terminal and off it.

On a terminal (stderr is a TTY) the tqdm bars stay. Elsewhere (CI, ``nohup``, a notebook,
a log file) tqdm disables itself and a run would say nothing for minutes, so the same
progress comes as one log line every ``LMLADDER_PROGRESS_SECONDS`` seconds (default 30;
0 logs every update), through the ``lmladder.progress`` logger at INFO (``-q`` hides it):

    lmladder: lora: step 40/150, loss 0.8123, 2,310 tok/s, ETA 1m52s
    lmladder: zero-shot: 96/400 examples, 3.1 ex/s, ETA 1m38s

A long task ends with one line saying it is done (nothing for a task shorter than the
interval).
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("lmladder.progress")

DEFAULT_SECONDS = 30.0


def interval() -> float:
    """Seconds between two progress lines (``LMLADDER_PROGRESS_SECONDS``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("LMLADDER_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def on_terminal() -> bool:
    """True when stderr is a terminal: tqdm bars; else progress lines."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Lines:
    """A tqdm-like counter (``update``, ``close``, ``set_postfix``) that logs a line every
    :func:`interval` seconds: ``<desc>: done/total <unit>, rate, ETA``."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "ex", unit_name: str = "examples"):
        self.total, self.desc, self.unit, self.unit_name = total, desc or "progress", unit, unit_name
        self.n = 0
        self.every = interval()
        self.t0 = self.last = time.perf_counter()
        self.printed = False

    def rate(self) -> float | None:
        dt = time.perf_counter() - self.t0
        return self.n / dt if dt > 0 and self.n else None

    def line(self) -> str:
        r = self.rate()
        eta = (self.total - self.n) / r if r and self.total is not None else None
        total = f"/{self.total}" if self.total is not None else ""
        rate = f"{r:.1f} {self.unit}/s" if r else f"? {self.unit}/s"
        return f"{self.desc}: {self.n}{total} {self.unit_name}, {rate}, ETA {duration(eta)}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.printed = True
            log.info("%s", self.line())

    def set_postfix(self, *args, **kwargs) -> None:  # tqdm compatibility
        pass

    def close(self) -> None:
        if self.printed:  # a long task says when it is done
            self.printed = False
            dt = time.perf_counter() - self.t0
            r = self.rate()
            log.info("%s: done, %d %s in %s%s", self.desc, self.n, self.unit_name, duration(dt),
                     f" ({r:.1f} {self.unit}/s)" if r else "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str = "", unit: str = "ex", enabled: bool = True, leave: bool = False):
    """Evaluation progress over ``total`` items: a tqdm bar on a terminal, :class:`Lines`
    elsewhere, nothing when ``enabled`` is False."""
    if not enabled:
        return _Off()
    if not on_terminal():
        return Lines(total, desc, unit, "examples" if unit == "ex" else unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=None)


def training_callback(name: str, tokens_per_step: float | None = None):
    """A transformers ``TrainerCallback`` logging ``<name>: step s/total, loss, tok/s, ETA``
    every :func:`interval` seconds (on the main process). Tokens per second come from
    ``tokens_per_step`` (the engine's count of a step's tokens), else from a trainer's own
    ``num_tokens`` / ``num_input_tokens_seen`` log, else show as ``?``."""
    from transformers import TrainerCallback

    class TrainingLines(TrainerCallback):
        def __init__(self):
            self.every = interval()
            self.loss = None
            self.tokens = None  # (count, at perf_counter) from the trainer's logs
            self.printed = self.pending = False

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last = time.perf_counter()
            self.start_step = state.global_step  # a resumed run counts its own steps
            self.tokens0 = (0.0, self.t0) if state.global_step == 0 else None  # fresh: from zero

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs:
                return
            if isinstance(logs.get("loss"), (int, float)):
                self.loss = float(logs["loss"])
            for key in ("num_tokens", "num_input_tokens_seen"):
                if isinstance(logs.get(key), (int, float)):
                    if self.tokens0 is None:
                        self.tokens0 = (float(logs[key]), time.perf_counter())
                    self.tokens = (float(logs[key]), time.perf_counter())
                    break
            if self.pending and state.is_world_process_zero:  # the step's line, with its loss
                self.pending = False
                self._emit(state)

        def _tok_s(self, steps_per_s: float | None) -> float | None:
            if tokens_per_step and steps_per_s:
                return tokens_per_step * steps_per_s
            if self.tokens0 is not None and self.tokens is not None and self.tokens[1] > self.tokens0[1]:
                return (self.tokens[0] - self.tokens0[0]) / (self.tokens[1] - self.tokens0[1])
            return None

        def line(self, state) -> str:
            done = state.global_step - self.start_step
            dt = time.perf_counter() - self.t0
            sps = done / dt if dt > 0 and done else None
            eta = (state.max_steps - state.global_step) / sps if sps else None
            tok = self._tok_s(sps)
            loss = f"{self.loss:.4f}" if self.loss is not None else "?"
            toks = f"{tok:,.0f} tok/s" if tok else "? tok/s"
            return f"{name}: step {state.global_step}/{state.max_steps}, loss {loss}, {toks}, ETA {duration(eta)}"

        def _emit(self, state):
            self.last = time.perf_counter()
            self.printed = True
            log.info("%s", self.line(state))

        def on_step_end(self, args, state, control, **kw):
            if not state.is_world_process_zero or time.perf_counter() - self.last < self.every:
                return
            every = getattr(state, "logging_steps", 0) or 0
            if every and state.global_step % every == 0 and getattr(args.logging_strategy, "value", None) == "steps":
                self.pending = True  # Trainer logs this step's loss next: the line waits for it
            else:
                self._emit(state)

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero and self.printed:
                loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
                log.info("%s: done, %d steps in %s%s", name, state.global_step - self.start_step,
                         duration(time.perf_counter() - self.t0), loss)

    return TrainingLines()


def quiet_progress(trainer, name: str = "train", tokens_per_step: float | None = None) -> None:
    """Training progress on the main process, instead of transformers' printed dict per
    logging step (the returned curves keep every value): on a terminal, transformers' bar
    with the logged values (loss, reward, margin) on it; elsewhere (CI, nohup, a notebook)
    a line every ``LMLADDER_PROGRESS_SECONDS`` (30) seconds: ``<name>: step s/total, loss,
    tok/s, ETA`` (lmladder/progress.py). Whatever transformers' verbosity."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class QuietProgress(ProgressCallback):
        KEYS = ("loss", "eval_loss", "reward", "rewards/margins", "rewards/accuracies", "accuracy")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k.split("/")[-1]: f"{logs[k]:.3g}" for k in self.KEYS
                         if isinstance(logs.get(k), (int, float))}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    for cb in list(trainer.callback_handler.callbacks):  # the notebook bar too (a ProgressCallback kin)
        if isinstance(cb, (PrinterCallback, ProgressCallback)) or type(cb).__name__ == "NotebookProgressCallback":
            trainer.remove_callback(cb)
    if not trainer.is_world_process_zero():
        return
    if on_terminal():
        trainer.add_callback(QuietProgress)
    else:
        trainer.add_callback(training_callback(name, tokens_per_step))
