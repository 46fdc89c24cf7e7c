"""Question answering: a short answer, scored as SQuAD does (normalised exact match and
token F1, the best over the gold answers). The passage, when there is one, comes from
the rung (rag retrieves it); a closed-book zero-shot sees the question alone."""

from __future__ import annotations

import json

from lmladder import metrics
from lmladder.tasks.base import ANSWER_RE, Grammar, Task


def gold_answers(target) -> list[str]:
    """The gold answers as a list of strings: a list as is, a JSON list written as text
    parsed, any other text as one answer."""
    if isinstance(target, str):
        t = target.strip()
        if t.startswith("["):
            try:
                v = json.loads(t)
            except ValueError:
                v = None
            if isinstance(v, list) and v:
                return [str(x) for x in v]
        return [t]
    if isinstance(target, (list, tuple)):
        return [str(x) for x in target]
    return [str(target)]


class TextAnswerTask(Task):
    """Free-text answers compared with reference texts (qa, generation)."""

    def gold(self, example) -> list[str]:
        return gold_answers(example.target)

    def answer(self, example) -> str:
        return self.gold(example)[0]

    def parse(self, text, example=None):
        t = text.strip()
        m = ANSWER_RE.match(t)  # "Answer: Paris" -> "Paris"
        if m:
            t = t[m.end():].strip()
        return (t, None) if t else (None, "empty output")

    def vote_key(self, pred):
        return metrics.normalize_answer(pred) if isinstance(pred, str) else pred

    def correct(self, pred, gold) -> bool:
        return metrics.exact_match(pred, gold) == 1.0

    def per_example(self, golds, preds) -> dict[str, list[float]]:
        """Each metric's per-example scores (the means with CIs are the run's metrics)."""
        return {
            self.metric_names[0]: [metrics.exact_match(p, g) for p, g in zip(preds, golds)],
            self.metric_names[1]: [metrics.token_f1(p, g) for p, g in zip(preds, golds)],
        }

    def score(self, golds, preds):
        return self.mean_metrics(self.per_example(golds, preds))

    def example_values(self, golds, preds):
        return self.per_example(golds, preds)


class QATask(TextAnswerTask):
    kind = "qa"
    summary = 'a short answer (SQuAD exact match and token F1)'
    metric_names = ("exact_match", "f1")

    def default_instruction(self) -> str:
        return "Answer the question."

    def hints(self) -> list[str]:
        return ["Answer with a short phrase only (a few words), not a sentence."]

    def parse(self, text, example=None):
        t, err = super().parse(text, example)
        if t is None:
            return t, err
        first = next(line for line in t.splitlines() if line.strip()).strip()
        return first.strip("\"'`*").strip() or first, None

    def grammar(self, example=None):
        return Grammar("regex", r"[^\n]{1,200}")  # one line
