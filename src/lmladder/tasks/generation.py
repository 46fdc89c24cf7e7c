"""Free-text generation: normalised exact match and token F1 against the reference(s),
plus an optional metric of your own, ``task.metric_fn: 'module:function'`` (or
``'path/to/file.py:function'``), called as ``function(pred: str, gold: str) -> float``,
the best over the references, and reported under the function's name."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

from lmladder.errors import LadderError
from lmladder.tasks.qa import TextAnswerTask


def load_metric_fn(spec: str) -> tuple[str, Callable[[str, str], float]]:
    """Import ``module:function`` / ``file.py:function``; (name, function) or LadderError."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise LadderError(f"task.metric_fn: '{spec}' is not 'module:function'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser().resolve()
            if not path.is_file():
                raise LadderError(f"task.metric_fn: {path}: file not found")
            s = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError:
                if os.getcwd() in sys.path:
                    raise
                sys.path.insert(0, os.getcwd())  # a metrics module next to the user's data
                module = importlib.import_module(mod_name)
    except LadderError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise LadderError(f"task.metric_fn: cannot import '{mod_name}' ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LadderError(f"task.metric_fn: '{mod_name}' has no function '{fn_name}'")
    return fn_name, fn


class GenerationTask(TextAnswerTask):
    kind = "generation"
    metric_names = ("exact_match", "token_f1")

    def __init__(self, cfg, labels, eval_cfg, seed):
        super().__init__(cfg, labels, eval_cfg, seed)
        self.metric_fn = None
        if cfg.metric_fn:
            self.metric_fn_name, self.metric_fn = load_metric_fn(cfg.metric_fn)
            if self.metric_fn_name in self.metric_names:
                raise LadderError(
                    f"task.metric_fn: '{self.metric_fn_name}' is a built-in metric name; rename the function"
                )

    @classmethod
    def metrics_for(cls, task_cfg):
        if task_cfg.metric_fn:
            return cls.metric_names + (task_cfg.metric_fn.rpartition(":")[2],)
        return cls.metric_names

    def default_instruction(self) -> str:
        return "Respond to the input."

    def _custom(self, pred, golds) -> float:
        if pred is None:
            return 0.0
        try:
            return max(float(self.metric_fn(pred, g)) for g in golds)
        except Exception as e:  # noqa: BLE001
            raise LadderError(f"task.metric_fn {self.cfg.metric_fn} failed on a prediction ({type(e).__name__}: {e})") from None

    def per_example(self, golds, preds):
        per = super().per_example(golds, preds)
        if self.metric_fn is not None:
            per[self.metric_fn_name] = [self._custom(p, g) for p, g in zip(preds, golds)]
        return per
