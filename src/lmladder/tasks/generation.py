"""Free-text generation: normalised exact match and token F1 against the reference(s),
plus an optional metric of your own, ``task.metric_fn: 'module:function'`` (or
``'path/to/file.py:function'``), called as ``function(pred: str, gold: str) -> float``,
the best over the references, and reported under the function's name."""

from __future__ import annotations

from typing import Callable

from lmladder.errors import LadderError
from lmladder.tasks.qa import TextAnswerTask


def load_metric_fn(spec: str) -> tuple[str, Callable[[str, str], float]]:
    """Import ``module:function`` / ``file.py:function``; (name, function) or LadderError."""
    from lmladder.plugins import load_callable

    return spec.rpartition(":")[2], load_callable(spec, "task.metric_fn")


class GenerationTask(TextAnswerTask):
    kind = "generation"
    summary = 'free text (exact match, token F1, your metric_fn)'
    metric_names = ("exact_match", "token_f1")

    def __init__(self, cfg, labels, eval_cfg, seed):
        super().__init__(cfg, labels, eval_cfg, seed)
        self.metric_fn = None
        if cfg.metric_fn and cfg.metric_fn.rpartition(":")[2] in self.metric_names:
            raise LadderError(
                f"task.metric_fn: '{cfg.metric_fn.rpartition(':')[2]}' is a built-in metric name; rename the function"
            )

    def setup(self, dataset) -> None:
        """The user's metric function is imported here (a run, before any model work), not
        when a task is only built to render prompts (export and serve never import it)."""
        super().setup(dataset)
        self._load_metric_fn()

    def _load_metric_fn(self) -> None:
        if self.cfg.metric_fn and self.metric_fn is None:
            self.metric_fn_name, self.metric_fn = load_metric_fn(self.cfg.metric_fn)

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
        self._load_metric_fn()
        if self.metric_fn is not None:
            per[self.metric_fn_name] = [self._custom(p, g) for p, g in zip(preds, golds)]
        return per
