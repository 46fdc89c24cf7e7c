"""Tagging: one BIO tag per input token (named-entity recognition and the like).

The input is a list of tokens (``data.input_field``, e.g. WNUT's ``tokens``; data.py joins
it with spaces into ``Example.input`` and keeps the list in ``Example.fields``), the gold
is the list of tags (``data.label_field``, e.g. ``tags``): ``O``, ``B-<type>``,
``I-<type>``. A prediction is a list of tags of the same length.

Scored like seqeval's default (conlleval) mode at the entity level: tags are turned into
spans ``(type, start, end)``; an ``I-X`` that does not continue an ``X`` span (after ``O``,
at the start, or after another type) starts a new span; a predicted span counts only when
type and boundaries both match a gold span. Micro precision / recall / F1 over all
entities, with 95% bootstrap CIs over sentences (metrics.micro_prf), plus token accuracy.

Only rungs with a token-classification head (``encoder``) support this kind: the LM rungs
would need a text rendering of tags.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from lmladder import metrics
from lmladder.errors import LadderError, where
from lmladder.tasks.base import Task

TAG_RE = re.compile(r"^(O|[BI]-\S.*)$")


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, first, last)`` (inclusive token indices) in a BIO sequence,
    as conlleval / seqeval's default mode read it."""
    out: list[tuple[str, int, int]] = []
    start, typ = None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, _, ty = (t or "O").partition("-")
        if prefix not in ("B", "I"):
            prefix, ty = "O", ""
        if start is not None and (prefix in ("O", "B") or ty != typ):
            out.append((typ, start, i - 1))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, typ = i, ty
    return out


def entity_counts(pred: Sequence[str] | None, gold: Sequence[str]) -> tuple[int, int, int]:
    """(true positives, predicted entities, gold entities) of one sentence."""
    g = set(spans(gold))
    p = set(spans(pred)) if pred is not None else set()
    return len(p & g), len(p), len(g)


def entity_prf(preds: Sequence[Sequence[str] | None], golds: Sequence[Sequence[str]],
               n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Entity-level micro precision / recall / F1 (+ bootstrap CIs over sentences)."""
    counts = [entity_counts(p, g) for p, g in zip(preds, golds)]
    tp, n_pred, n_gold = (list(c) for c in zip(*counts)) if counts else ([], [], [])
    return metrics.micro_prf(tp, n_pred, n_gold, n_boot=n_boot, seed=seed)


def check_rows(dataset, data_cfg) -> None:
    """Every row: tokens and tags are lists of strings of the same length, tags BIO.
    Called by the rungs that support tagging, before any model work."""
    fld, lab = data_cfg.input_field, data_cfg.label_field
    for e in dataset.train + dataset.test:
        path, _, line = e.source.rpartition(":")
        toks = e.fields.get(fld)
        if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
            raise LadderError(f"{where(path, line, fld)} must be a list of tokens for task kind tagging")
        tags = e.target
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise LadderError(f"{where(path, line, lab)} must be a list of tags (BIO) for task kind tagging")
        if len(tags) != len(toks):
            raise LadderError(f"{where(path, line, lab)} has {len(tags)} tags for {len(toks)} tokens")
        bad = next((t for t in tags if not TAG_RE.match(t)), None)
        if bad is not None:
            raise LadderError(f"{where(path, line, lab)}: tag {bad!r} is not O, B-<type> or I-<type>")


def tag_set(examples) -> list[str]:
    """Every tag seen in the examples' golds: ``O`` first, then by type and B before I."""
    tags = {t for e in examples for t in e.target}
    rest = sorted(tags - {"O"}, key=lambda t: (t[2:], t[:1]))
    return ["O"] + rest


class TaggingTask(Task):
    kind = "tagging"
    summary = 'BIO tags per token (encoder rung only)'
    metric_names = ("f1", "precision", "recall", "token_accuracy")
    generative = False

    def predict(self, model, fmt, messages, examples=None, desc="", constrained=False, engine="xgrammar"):
        raise LadderError("task kind tagging needs a token-classification head (rung encoder)")

    def correct(self, pred, gold) -> bool:
        return pred is not None and list(pred) == list(gold)

    def score(self, golds: list, preds: list) -> dict[str, dict]:
        out = entity_prf(preds, golds, n_boot=self.eval_cfg.bootstrap, seed=self.seed)
        per_sentence = [
            (sum(a == b for a, b in zip(p or [], g)), len(g)) for p, g in zip(preds, golds)
        ]
        right = np.array([r for r, _ in per_sentence], dtype=float)
        total = np.array([n for _, n in per_sentence], dtype=float)
        value = float(right.sum() / max(total.sum(), 1))
        if len(right):
            idx = np.random.default_rng(self.seed).integers(0, len(right), size=(self.eval_cfg.bootstrap, len(right)))
            b = right[idx].sum(1) / np.maximum(total[idx].sum(1), 1)
            ci = [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]
        else:
            ci = [0.0, 0.0]
        out["token_accuracy"] = {"value": value, "ci": ci}
        return out
