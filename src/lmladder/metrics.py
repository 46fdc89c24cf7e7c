"""Metrics on known predictions with 95% CIs: classification (accuracy, macro-F1),
SQuAD-style exact match / token F1, micro precision / recall / F1, and paired comparisons.

Intervals: a proportion (every per-example value 0 or 1: accuracy, exact match, valid-JSON
rate, reward accuracy) gets the Wilson score interval, which keeps its coverage at small n
and near 0 or 1 (10 of 10 right is [0.72, 1], not the percentile bootstrap's [1, 1]);
any other mean (F1, token F1, margins) a seeded percentile bootstrap over examples. Each
metric dict says which: ``{"value", "ci", "interval": "wilson" | "bootstrap"}``.

Paired comparisons of two systems on the same examples: :func:`paired_bootstrap` (the
mean per-example difference with a seeded percentile-bootstrap CI over examples),
:func:`mcnemar_exact` (the exact two-sided McNemar p from the discordant pairs) and
:func:`paired` combining them."""

from __future__ import annotations

import math
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


# --------------------------------------------------------------------------- intervals

Z95 = 1.959964  # the standard normal's 97.5% quantile


def wilson(k: float, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval [lo, hi] for k successes in n trials (n = 0: [0, 1])."""
    if n <= 0:
        return [0.0, 1.0]
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    lo = 0.0 if k <= 0 else max(0.0, center - half)
    hi = 1.0 if k >= n else min(1.0, center + half)
    return [float(lo), float(hi)]


def is_binary(values) -> bool:
    """Every value is 0 or 1 (an empty list counts as binary)."""
    v = np.asarray(values, dtype=float)
    return bool(np.all((v == 0.0) | (v == 1.0)))


def _percentile_ci(b: np.ndarray) -> list[float]:
    return [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]


def proportion_ci(values, z: float = Z95) -> dict:
    """{'value', 'ci', 'interval': 'wilson'} for per-example 0/1 values (none: value 0,
    ci [0, 1], nothing is known)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return {"value": 0.0, "ci": [0.0, 1.0], "interval": "wilson"}
    return {"value": float(v.mean()), "ci": wilson(float(v.sum()), len(v), z), "interval": "wilson"}


def bootstrap_ci(values, n_boot: int, seed: int) -> dict:
    """{'value', 'ci', 'interval': 'bootstrap'}: the mean with a seeded 95% percentile
    bootstrap over examples."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return {"value": 0.0, "ci": [0.0, 0.0], "interval": "bootstrap"}
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    return {"value": float(v.mean()), "ci": _percentile_ci(v[idx].mean(1)), "interval": "bootstrap"}


def mean_ci(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """The mean of per-example values with a 95% CI: Wilson when every value is 0 or 1
    (a proportion), else the seeded percentile bootstrap. No values: Wilson's [0, 1]."""
    return proportion_ci(values) if is_binary(values) else bootstrap_ci(values, n_boot, seed)


# --------------------------------------------------------------------------- paired comparisons


def _pair_arrays(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {len(a)} vs {len(b)} values")
    return a, b


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """{'diff': mean(a - b), 'ci': [lo, hi]}: per-example scores of two systems on the same
    examples; a seeded 95% percentile bootstrap over example indices of the mean difference
    (no examples: diff 0, ci [0, 0])."""
    a, b = _pair_arrays(a, b)
    n = len(a)
    if n == 0:
        return {"diff": 0.0, "ci": [0.0, 0.0]}
    d = a - b
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return {"diff": float(d.mean()), "ci": _percentile_ci(d[idx].mean(1))}


def mcnemar_p(b01: int, b10: int) -> float:
    """Exact two-sided McNemar p from the discordant counts: min(1, 2 P[X <= min(b01, b10)])
    with X ~ Binomial(b01 + b10, 1/2); no discordant pairs: 1."""
    m = int(b01) + int(b10)
    if m == 0:
        return 1.0
    k = min(int(b01), int(b10))
    tail = sum(math.comb(m, i) for i in range(k + 1))
    return float(min(1.0, 2 * tail / 2 ** m))


def mcnemar_exact(a_correct, b_correct) -> float:
    """Exact two-sided McNemar p for two systems' per-example correctness on the same
    examples; discordant pairs b01 = a right & b wrong, b10 = a wrong & b right."""
    a, b = _pair_arrays(a_correct, b_correct)
    a, b = a != 0, b != 0
    return mcnemar_p(int(np.sum(a & ~b)), int(np.sum(~a & b)))


def sign_flip_p(a, b, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided paired randomisation (sign-flip) p for mean(a - b) = 0: each example's
    difference has its sign flipped at random, seeded; (1 + #|mean*| >= |mean|) / (1 + n_perm)."""
    a, b = _pair_arrays(a, b)
    d = a - b
    if len(d) == 0 or not np.any(d != 0):
        return 1.0
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, len(d)))
    obs = abs(d.mean())
    hits = int(np.sum(np.abs((signs * d).mean(1)) >= obs - 1e-12))
    return float((1 + hits) / (1 + n_perm))


def paired(a, b, binary: bool | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """{'diff', 'ci', 'p', 'test'}: a minus b on the same examples. diff and ci from
    :func:`paired_bootstrap`; p the exact McNemar p when the scores are 0/1 (``binary``;
    None: detected), else the seeded sign-flip randomisation p (``test`` says which)."""
    out = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    if binary is None:
        binary = is_binary(a) and is_binary(b)
    if binary:
        out.update(p=mcnemar_exact(a, b), test="mcnemar")
    else:
        out.update(p=sign_flip_p(a, b, n_perm=n_boot, seed=seed), test="sign-flip")
    return out


# --------------------------------------------------------------------------- classification


def accuracy(pred: Sequence[str], gold: Sequence[str]) -> float:
    return float(np.mean([a == b for a, b in zip(pred, gold)])) if gold else 0.0


def macro_f1(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> float:
    p, g = _encode(pred, gold, labels)
    return float(_macro_f1_batch(p[None], g[None], len(labels))[0])


def classification_metrics(
    pred: Sequence[str], gold: Sequence[str], labels: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """{'accuracy': {'value', 'ci', 'interval'}, 'macro_f1': {...}}: accuracy with the Wilson
    interval, macro-F1 with a seeded 95% percentile bootstrap over examples."""
    p, g = _encode(pred, gold, labels)
    n = len(g)
    correct = (p == g).astype(float)
    if n == 0:
        return {"accuracy": proportion_ci(correct),
                "macro_f1": {"value": 0.0, "ci": [0.0, 0.0], "interval": "bootstrap"}}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    f1_b = _macro_f1_batch(p[idx], g[idx], len(labels))
    return {
        "accuracy": proportion_ci(correct),
        "macro_f1": {"value": macro_f1(pred, gold, labels), "ci": _percentile_ci(f1_b), "interval": "bootstrap"},
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
        return {k: {"value": 0.0, "ci": [0.0, 0.0], "interval": "bootstrap"} for k in ("precision", "recall", "f1")}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = prf(*(c[:, idx].sum(2)))
    return {
        k: {"value": float(point[k]), "ci": _percentile_ci(boot[k]), "interval": "bootstrap"}
        for k in ("precision", "recall", "f1")
    }
