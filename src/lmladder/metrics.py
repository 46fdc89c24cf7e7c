"""Metrics on known predictions, with seeded percentile-bootstrap 95% CIs: classification
(accuracy, macro-F1), SQuAD-style exact match / token F1, micro precision / recall / F1."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import numpy as np


def _encode(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str]):
    index = {l: i for i, l in enumerate(labels)}
    extra = len(labels)  # predictions outside the label set (never from label scoring)
    p = np.array([index.get(x, extra) for x in pred])
    g = np.array([index[x] for x in gold])
    return p, g


def _macro_f1_batch(p: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """Macro-F1 for each row of index arrays p, g of shape (R, N) with k classes.

    Averaged over the classes present in gold or prediction of that row (as
    scikit-learn's default), so an absent class neither helps nor hurts.
    """
    R = p.shape[0]
    kk = k + 1
    flat = (np.arange(R)[:, None] * kk * kk + g * kk + p).ravel()
    conf = np.bincount(flat, minlength=R * kk * kk).reshape(R, kk, kk)  # [r, gold, pred]
    tp = np.einsum("rii->ri", conf)[:, :k]
    gold_n = conf.sum(2)[:, :k]
    pred_n = conf.sum(1)[:, :k]
    denom = gold_n + pred_n
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    present = denom > 0
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def accuracy(pred: Sequence[str], gold: Sequence[str]) -> float:
    return float(np.mean([a == b for a, b in zip(pred, gold)])) if gold else 0.0


def macro_f1(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> float:
    p, g = _encode(pred, gold, labels)
    return float(_macro_f1_batch(p[None], g[None], len(labels))[0])


def classification_metrics(
    pred: Sequence[str], gold: Sequence[str], labels: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """{'accuracy': {'value', 'ci'}, 'macro_f1': {'value', 'ci'}} with 95% bootstrap CIs."""
    p, g = _encode(pred, gold, labels)
    n = len(g)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    correct = (p == g).astype(float)
    acc_b = correct[idx].mean(1)
    f1_b = _macro_f1_batch(p[idx], g[idx], len(labels))
    ci = lambda a: [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))]  # noqa: E731
    return {
        "accuracy": {"value": float(correct.mean()), "ci": ci(acc_b)},
        "macro_f1": {"value": macro_f1(pred, gold, labels), "ci": ci(f1_b)},
    }


# --------------------------------------------------------------------------- text answers
# SQuAD v1.1's official normalisation and scores (evaluate-v1.1.py), max over gold answers.

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in str(s).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _golds(golds) -> list[str]:
    return [golds] if isinstance(golds, str) else [str(g) for g in golds]


def exact_match(pred: str | None, golds) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def _f1_one(pred_toks: list[str], gold_toks: list[str]) -> float:
    if not pred_toks or not gold_toks:  # SQuAD v2: both empty = 1, one empty = 0
        return float(pred_toks == gold_toks)
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred_toks), same / len(gold_toks)
    return 2 * p * r / (p + r)


def token_f1(pred: str | None, golds) -> float:
    """Bag-of-tokens F1 of the normalised texts, the best over the gold answers."""
    if pred is None:
        return 0.0
    pt = normalize_answer(pred).split()
    return max(_f1_one(pt, normalize_answer(g).split()) for g in _golds(golds))


# --------------------------------------------------------------------------- set matching


def micro_prf(tp: Sequence[int], n_pred: Sequence[int], n_gold: Sequence[int],
              n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Micro precision / recall / F1 from per-example counts (true positives, predicted
    items, gold items), each with a 95% bootstrap CI over examples."""
    c = np.array([tp, n_pred, n_gold], dtype=float).reshape(3, -1)

    def prf(t, p, g):
        prec = np.where(p > 0, t / np.maximum(p, 1), np.where(g > 0, 0.0, 1.0))
        rec = np.where(g > 0, t / np.maximum(g, 1), np.where(p > 0, 0.0, 1.0))
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
        return {"precision": prec, "recall": rec, "f1": f1}

    point = prf(*c.sum(1))
    n = c.shape[1]
    if n == 0:
        return {k: {"value": 0.0, "ci": [0.0, 0.0]} for k in ("precision", "recall", "f1")}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = prf(*(c[:, idx].sum(2)))
    return {
        k: {"value": float(point[k]), "ci": [float(np.percentile(boot[k], 2.5)), float(np.percentile(boot[k], 97.5))]}
        for k in ("precision", "recall", "f1")
    }
