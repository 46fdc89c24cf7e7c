"""Metrics on known predictions, with seeded percentile-bootstrap 95% CIs."""

from __future__ import annotations

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
