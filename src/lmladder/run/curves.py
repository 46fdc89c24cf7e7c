"""Would more data help? A training rung retrained on nested subsets of train
(``learning_curve: [0.25, 0.5]``), or few-shot with fewer examples (``k_curve``), each
scored on the same test split; the full rung is the last point. Its seconds are the
ladder's own evaluation overhead, not the rung's cost. Single-process runs only.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from lmladder.cost import Meter
from lmladder.registry import rung_class

log = logging.getLogger(__name__)


def curve_subset(train: list, fraction: float, seed: int) -> list:
    """A seeded subset of ``fraction`` of train; subsets for growing fractions are nested
    (one seeded order, cut at each size)."""
    order = list(range(len(train)))
    random.Random(f"learning-curve:{seed}").shuffle(order)
    n = max(1, round(fraction * len(train)))
    return [train[i] for i in sorted(order[:n])]


def measure(ctx, name: str, rdir: Path, golds, full_score: dict, full_preds, details: dict) -> list[dict]:
    rc = ctx.cfg.rung_config(name)
    if getattr(rc, "k_curve", None):
        return _k_curve(ctx, name, rdir, golds, full_preds, details)
    return _learning_curve(ctx, name, rdir, golds, full_score, full_preds)


def _point(task, golds, preds, primary, **extra) -> dict:
    sc = task.score(golds, [p["pred"] for p in preds])[primary]
    return {**extra, "score": sc["value"], "ci": sc["ci"],
            "per_example": task.paired_data(golds, [p["pred"] for p in preds], primary)}


def _k_curve(ctx, name: str, rdir: Path, golds, full_preds, details: dict) -> list[dict]:
    """few-shot: the same rung with fewer examples in the prompt (its chosen format)."""
    task, primary = ctx.task, ctx.cfg.primary_metric
    rc = ctx.cfg.rung_config(name)
    k_full = len(ctx.data.train) if rc.k == "max" else rc.k
    points = []
    for k in [k for k in rc.k_curve if k < k_full] + [k_full]:
        if k == k_full:
            preds = full_preds
        else:
            chosen = (details.get("prompt_format") or {}).get("chosen") or rc.prompt_format
            rung = rung_class(name)(ctx, rc.model_copy(update={"k": k, "k_curve": None, "prompt_format": chosen}),
                                    rdir / f"k-{k}")
            rung.name = name
            with ctx.closing(rung):
                rung.prepare()
                preds, _ = rung.predict()
        points.append(_point(task, golds, preds, primary, k=k, fraction=k / k_full, n_train=k))
    return points


def _learning_curve(ctx, name: str, rdir: Path, golds, full_score: dict, full_preds) -> list[dict]:
    """The rung trained on nested subsets; each subset's weights have their own fingerprint."""
    cfg, task, primary = ctx.cfg, ctx.task, ctx.cfg.primary_metric
    parent = cfg.parent_of(name)
    points = []
    for f in cfg.rung_config(name).learning_curve:
        if f >= 1.0:
            points.append({"fraction": 1.0, "n_train": len(ctx.data.train), "score": full_score["value"],
                           "ci": full_score["ci"],
                           "per_example": task.paired_data(golds, [p["pred"] for p in full_preds], primary)})
            continue
        sub = ctx.with_data(train=curve_subset(ctx.data.train, f, cfg.seed), salt=f"curve:{f}")
        if parent:
            ctx.push_base(parent)  # (the view shares the model cache)
        rung = rung_class(name)(sub, cfg.rung_config(name), rdir / f"curve-{f:g}")
        rung.name = name
        log.info("%s: learning curve, %d of %d train examples (%.0f%%)", name, len(sub.data.train),
                 len(ctx.data.train), 100 * f)
        with Meter() as m, ctx.closing(rung, parent):
            rung.prepare()
            rung.fit()
            preds, _ = rung.predict()
        p = _point(task, golds, preds, primary, fraction=f, n_train=len(sub.data.train))
        points.append({**{k: p[k] for k in ("fraction", "n_train", "score", "ci")}, "seconds": round(m.seconds, 1),
                       "per_example": p["per_example"]})
        log.info("%s: learning curve at %.0f%%: %s %.3f [%.3f, %.3f]", name, 100 * f, primary, p["score"], *p["ci"])
    return points
