"""The verdict: which rung to ship, from current results only, with paired evidence.

Inputs are the rows report.collect keeps (results whose fingerprint matches the run's
config and data), the rungs that were asked for and have no current result (failed /
not run / stale), the majority baseline and the decision rule. Steps, in order:

1. **Candidates**: current rungs that are policies (a reward model scores answers; it
   is shown, never shipped).
2. **Meets the target** under ``decision.rule``: ``point`` (score >= target) or
   ``lower-bound`` (the 95% interval's low end >= target).
3. **Cheapest**: ladder order (``rank``, stacked rungs rank above what they build on),
   ties broken on measured cost (per-call seconds, then one-time seconds), never on the
   order rungs were listed in.
4. **Paired evidence** for every row against the recommended rung (or the best one when
   none meets the target) on the same test examples: the mean paired difference with a
   seeded paired-bootstrap 95% interval, and the exact McNemar p for 0/1 metrics. A
   cheaper rung "falls short" only when that interval excludes zero (and, for 0/1
   metrics, McNemar's p < 0.05); otherwise the two "cannot be told apart".
5. **Against chance**: when the chosen rung cannot be told apart from the majority
   baseline (most frequent train label for every input), there is no recommendation
   (``rung: null``) and the reason names the baseline and the paired difference.
6. **Unknowns**: a cheaper rung without a current result makes the verdict "among
   finished rungs"; ``meets_target`` is then ``null``, never ``true``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

BASELINE = "majority"
SMALL_TEST = 50  # below this many test examples the reason warns that intervals are wide
RULES = {"point": "score >= target", "lower-bound": "95% interval's lower bound >= target"}


def zero_cost() -> dict:
    return {"one_time_s": 0.0, "per_call_s": 0.0, "forgetting_s": 0.0, "prompt_tokens_per_call": 0.0,
            "generated_tokens_per_call": 0.0, "peak_rss_mb": 0.0, "trainable_params": 0, "trainable_share": 0.0,
            "train_seconds": 0.0, "prompt_tokens_per_example": 0.0, "eval_seconds": 0.0,
            "eval_examples_per_second": None}


def majority_predictions(task, data) -> list[dict] | None:
    """The most frequent train label predicted for every test example (classification),
    or the most frequent gold position (multiple-choice); None for other kinds."""
    if not data.train or not data.test:
        return None
    if task.kind == "classification":
        counts = Counter(e.label for e in data.train)
        label = max(sorted(counts), key=lambda l: counts[l])  # ties: the first label by name
        return [{"pred": label, "answer": label} for _ in data.test]
    if task.kind == "multiple-choice":
        counts = Counter(int(e.target) for e in data.train)
        i = max(sorted(counts), key=lambda j: counts[j])
        out = []
        for e in data.test:
            j = i if i < len(e.choices or []) else 0
            labels = getattr(e, "choice_labels", None) or None
            name = labels[i] if labels and i < len(labels) else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[i]
            out.append({"pred": {"choice": j, "choice_norm": j}, "answer": name})
        return out
    return None


# --------------------------------------------------------------------------- paired statistics

def _stat(pe: dict, idx: np.ndarray) -> np.ndarray:
    """The metric on each resample (rows of example indices) of one rung's per-example data."""
    kind = pe["kind"]
    if kind == "mean":
        return np.asarray(pe["values"], dtype=float)[idx].mean(-1)
    if kind == "macro_f1":
        from lmladder.metrics import _macro_f1_batch

        return _macro_f1_batch(np.asarray(pe["pred"])[idx], np.asarray(pe["gold"])[idx], int(pe["k"]))
    if kind == "micro":
        c = np.asarray(pe["counts"], dtype=float)[idx].sum(-2)  # (..., 3): tp, n_pred, n_gold
        t, p, g = c[..., 0], c[..., 1], c[..., 2]
        prec = np.where(p > 0, t / np.maximum(p, 1), np.where(g > 0, 0.0, 1.0))
        rec = np.where(g > 0, t / np.maximum(g, 1), np.where(p > 0, 0.0, 1.0))
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
        return {"precision": prec, "recall": rec, "f1": f1}[pe.get("which", "f1")]
    raise ValueError(f"unknown per-example kind {kind!r}")


def _n(pe: dict) -> int:
    return len(pe["values"] if pe["kind"] == "mean" else pe["pred"] if pe["kind"] == "macro_f1" else pe["counts"])


def paired(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Row ``a`` minus row ``b`` on the same examples: ``{diff, ci, p}`` (None when either has
    no per-example data or they were scored on different examples)."""
    if not a or not b or a["kind"] != b["kind"] or _n(a) != _n(b) or _n(a) == 0:
        return None
    n = _n(a)
    full = np.arange(n)[None]
    diff = float(_stat(a, full)[0] - _stat(b, full)[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    d = _stat(a, idx) - _stat(b, idx)
    ci = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
    p = None
    if a["kind"] == "mean" and a.get("binary") and b.get("binary"):
        from lmladder.metrics import mcnemar_exact

        p = mcnemar_exact(a["values"], b["values"])
    return {"diff": round(diff, 6), "ci": [round(ci[0], 6), round(ci[1], 6)], "p": p}


def distinct(pr: dict | None) -> bool:
    """Two rungs can be told apart: the paired interval excludes zero and, for 0/1 metrics,
    the exact McNemar test agrees (p < 0.05). The percentile bootstrap alone is
    anti-conservative when the discordant pairs are few (5 of 200 all one way: its interval
    excludes 0, McNemar p = 0.0625)."""
    if pr is None or not (pr["ci"][0] > 0 or pr["ci"][1] < 0):
        return False
    return pr.get("p") is None or pr["p"] < 0.05


# --------------------------------------------------------------------------- learning curves

FLAT = 0.02  # a last-doubling gain whose whole interval lies within +-FLAT reads as flat


def curve_reading(points: list[dict], target: float | None, rule: str = "point", seed: int = 0) -> dict | None:
    """Would more data help? The gain over the last doubling (the point at half the largest
    fraction, or the previous point) with its paired interval, a plain reading, and the
    smallest fraction that already meets the target."""
    pts = sorted(points, key=lambda p: p["fraction"])
    if len(pts) < 2:
        return None
    last = pts[-1]
    half = min(pts[:-1], key=lambda p: abs(p["fraction"] - last["fraction"] / 2))
    pr = paired(last.get("per_example"), half.get("per_example"), seed=seed)
    if pr is None:
        reading = "cannot tell"
    elif distinct(pr) and pr["diff"] > 0:
        reading = "more data is likely to help"
    elif -FLAT <= pr["ci"][0] and pr["ci"][1] <= FLAT:
        reading = "flat"
    elif distinct(pr) and pr["diff"] < 0:
        reading = "more data made it worse (check the training settings)"
    else:
        reading = "cannot tell"
    best = max(pts[:-1], key=lambda p: p["score"])
    pb = paired(best.get("per_example"), last.get("per_example"), seed=seed)
    better_smaller = None
    if pb is not None and distinct(pb) and pb["diff"] > 0:  # a smaller point beats the full one
        what = f"k={best['k']}" if "k" in best else f"{best['fraction']:.0%} of train"
        better_smaller = {"fraction": best["fraction"], **({"k": best["k"]} if "k" in best else {}),
                          "score": best["score"], "vs_full": pb}
        reading += f"; but {what} scores higher than the full rung ({best['score']:.3f}, paired {pb['diff']:+.3f}), " \
                   "so the curve is not monotone: more is not simply better"
    meets_at = next((p["fraction"] for p in pts if target is not None and meets(p, target, rule)), None)
    return {"from_fraction": half["fraction"], "to_fraction": last["fraction"],
            "gain": pr, "reading": reading, "smallest_fraction_meeting_target": meets_at,
            "better_smaller": better_smaller}


# --------------------------------------------------------------------------- the decision

def label(r: dict) -> str:
    """A row's name in the verdict: its rung, or in a grid of models its cell ``model/rung``."""
    return r.get("cell") or r["name"]


def _cost_key(r: dict) -> tuple:
    """Cheapest first: total cost in money at the call volume (when priced), then the
    ladder order, then measured per-call and one-time seconds, then the name."""
    c = r.get("cost") or {}
    total = c.get("total_usd")
    return (float(total) if total is not None else 0.0, r["rank"], float(c.get("per_call_s") or 0.0),
            float(c.get("one_time_s") or 0.0), label(r))


# --------------------------------------------------------------------------- money

def price(cost_cfg: dict, model: dict | None) -> dict:
    """The prices the verdict uses: ``usd_per_hour`` (given, else the default for the device
    the model ran on), ``calls``, and token prices for openai: models."""
    from lmladder.config import USD_PER_HOUR_DEFAULTS

    model = model or {}
    device = str(model.get("device") or ("remote" if model.get("kind") == "openai" else "cpu")).split(":")[0]
    per_hour = cost_cfg.get("usd_per_hour")
    source = "cost.usd_per_hour"
    if per_hour is None:
        per_hour = USD_PER_HOUR_DEFAULTS.get(device, USD_PER_HOUR_DEFAULTS["cpu"])
        source = f"default for device {device}"
    return {"usd_per_hour": float(per_hour), "usd_per_hour_source": source, "calls": int(cost_cfg.get("calls", 100_000)),
            "usd_per_1k_prompt_tokens": cost_cfg.get("usd_per_1k_prompt_tokens"),
            "usd_per_1k_output_tokens": cost_cfg.get("usd_per_1k_output_tokens"),
            "remote": model.get("kind") == "openai"}


def money(cost: dict, p: dict) -> dict:
    """``one_time_usd``, ``per_call_usd`` and ``total_usd = one_time + calls x per_call`` from
    the two-part measured costs: seconds x the machine's price, or (an openai: model with
    token prices) the tokens a call bills."""
    hour = p["usd_per_hour"] / 3600.0
    one = float(cost.get("one_time_s") or 0.0) * hour
    if p["remote"] and (p.get("usd_per_1k_prompt_tokens") is not None or p.get("usd_per_1k_output_tokens") is not None):
        per = (float(cost.get("prompt_tokens_per_call") or 0.0) * (p.get("usd_per_1k_prompt_tokens") or 0.0)
               + float(cost.get("generated_tokens_per_call") or 0.0) * (p.get("usd_per_1k_output_tokens") or 0.0)) / 1000
    else:
        per = float(cost.get("per_call_s") or 0.0) * hour
    return {"one_time_usd": one, "per_call_usd": per, "total_usd": one + p["calls"] * per}


def breakeven(chosen: dict, others: list[dict]) -> list[dict]:
    """For each other target-meeting rung: the call volume at which it and the chosen rung
    cost the same, and on which side of it the other one is cheaper."""
    out = []
    c1, cp = (chosen.get("cost") or {}).get("one_time_usd"), (chosen.get("cost") or {}).get("per_call_usd")
    if c1 is None or cp is None:
        return out
    for r in others:
        o1, op = (r.get("cost") or {}).get("one_time_usd"), (r.get("cost") or {}).get("per_call_usd")
        if o1 is None or op is None or r is chosen:
            continue
        if op == cp:
            out.append({"rung": label(r), "calls": None, "cheaper": "never" if o1 >= c1 else "always"})
            continue
        n = (c1 - o1) / (op - cp)
        if n <= 0:  # the lines do not cross at a positive volume
            out.append({"rung": label(r), "calls": None, "cheaper": "never"})
        else:
            out.append({"rung": label(r), "calls": round(n), "cheaper": "below" if op > cp else "above"})
    return out


def calls_of(r: dict) -> int | None:
    return (r.get("cost") or {}).get("calls")


def fmt_usd(x: float) -> str:
    if x == 0:
        return "$0"
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}" if x >= 0.0001 else f"${x:.2e}"


def meets(r: dict, target: float, rule: str) -> bool:
    return (r["ci"][0] if rule == "lower-bound" else r["score"]) >= target


def _fmt(r: dict) -> str:
    return f"{label(r)} {r['score']:.3f} (95% CI {r['ci'][0]:.3f}-{r['ci'][1]:.3f})"


def _fmt_pair(pr: dict) -> str:
    p = "" if pr.get("p") is None else f", McNemar p={pr['p']:.3g}"
    return f"paired difference {pr['diff']:+.3f}, 95% CI [{pr['ci'][0]:+.3f}, {pr['ci'][1]:+.3f}]{p}"


def decide(rows: list[dict], baseline: dict | None, unfinished: list[dict], metric: str,
           target: float | None, rule: str = "point", n_test: int | None = None,
           n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The recommendation and, in place, each row's ``paired`` against it (see module doc).

    ``rows``: current results (name, rank, score, ci, cost, per_example, policy);
    ``unfinished``: ``{name, state, rank}`` for asked-for rungs with no current result."""
    rule_txt = f"rule {rule}: {RULES[rule]}"
    notes: list[str] = []
    if n_test is not None and n_test < SMALL_TEST:
        notes.append(f"warning: only {n_test} test examples (< {SMALL_TEST}); intervals are wide, "
                     "differences hard to detect")
    everyone = rows + ([baseline] if baseline else [])
    cands = sorted((r for r in rows if r.get("policy", True)), key=_cost_key)

    def finish(rec: dict) -> dict:
        ref = next((r for r in everyone if label(r) == (rec.get("rung") or rec.get("best"))), None)
        for r in everyone:
            if ref is None or r is ref:
                r["paired"] = None
                continue
            pr = paired(r.get("per_example"), ref.get("per_example"), n_boot, seed)
            r["paired"] = None if pr is None else {"vs": label(ref), **pr}
        rec["rule"] = rule
        if notes:
            rec["reason"] += "; " + "; ".join(notes)
        rec["warnings"] = notes
        return rec

    if not cands:
        rec = {"rung": None, "meets_target": False, "reason": "no finished rungs" + (
            f" (not finished: {', '.join(label(u) + ' ' + u['state'] for u in unfinished)})" if unfinished else "")}
        return finish(rec)

    best = min(cands, key=lambda r: (-r["score"], _cost_key(r)))  # ties: the cheaper rung
    chosen, meets_t = best, None
    if target is not None:
        ok = [r for r in cands if meets(r, target, rule)]
        chosen, meets_t = (ok[0], True) if ok else (best, False)
    # an unfinished rung could change the verdict: any of them when nothing meets the target
    # (or there is none), else those cheaper than the chosen one
    cheaper_unknown = ([u for u in unfinished if u["rank"] < chosen["rank"]] if meets_t else list(unfinished))
    # the chosen rung against chance
    if baseline is not None:
        pr = paired(chosen.get("per_example"), baseline.get("per_example"), n_boot, seed)
        if pr is not None and not (distinct(pr) and pr["diff"] > 0):
            reason = (f"{label(chosen)} ({_fmt(chosen)}) cannot be told apart from the {BASELINE} baseline "
                      f"({baseline['score']:.3f}: the most frequent train label for every input; {_fmt_pair(pr)}); "
                      "no rung is recommended")
            rec = {"rung": None, "best": label(chosen), "meets_target": False, "baseline": BASELINE,
                   "vs_baseline": pr, "reason": reason}
            return finish(rec)
    scope = "among finished rungs" if unfinished else "among the rungs run"
    unknown_txt = ""
    if cheaper_unknown:
        unknown_txt = "; not finished, so unknown: " + ", ".join(f"{label(u)} ({u['state']})" for u in cheaper_unknown)
    if target is None:
        rec = {"rung": label(best), "meets_target": None,
               "reason": f"no target set; best {metric} {scope}: {_fmt(best)}{unknown_txt}"}
        return finish(rec)
    if meets_t:
        calls = calls_of(chosen)
        reason = (f"{label(chosen)} is the cheapest rung {scope} that meets {metric} >= {target} ({rule_txt})"
                  + ("" if calls is None else f" at {calls:,} calls") + f": {_fmt(chosen)}")
        if calls is not None:
            reason += f", total {fmt_usd(chosen['cost']['total_usd'])}"
        parts = []
        for c in cands:
            if c is chosen or _cost_key(c) >= _cost_key(chosen):
                continue
            pr = paired(c.get("per_example"), chosen.get("per_example"), n_boot, seed)
            if pr is None:
                parts.append(f"{label(c)} {c['score']:.3f} (no paired data)")
            elif distinct(pr) and pr["diff"] < 0:
                parts.append(f"{label(c)} {c['score']:.3f} falls short ({_fmt_pair(pr)})")
            else:
                parts.append(f"{label(c)} {c['score']:.3f} cannot be told apart from {label(chosen)} "
                             f"({_fmt_pair(pr)}) but does not meet the target under the rule")
        if parts:
            reason += "; cheaper rungs: " + "; ".join(parts)
        if rule == "point" and chosen["ci"][0] < target:
            reason += f"; note the CI's lower bound {chosen['ci'][0]:.3f} is below the target"
        be = breakeven(chosen, [r for r in ok if r is not chosen])
        for b in be:
            if b["calls"] is not None:
                reason += (f"; {b['rung']} would be cheaper {b['cheaper']} {b['calls']:,} calls")
        reason += unknown_txt
        rec = {"rung": label(chosen), "meets_target": None if cheaper_unknown else True, "reason": reason,
               "breakeven": be}
        return finish(rec)
    gap = target - (best["ci"][0] if rule == "lower-bound" else best["score"])
    rec = {"rung": label(best), "meets_target": False, "gap": round(gap, 4),
           "reason": f"no rung {scope} meets {metric} >= {target} ({rule_txt}); the best is {_fmt(best)}, "
                     f"{gap:.3f} short{unknown_txt}"}
    return finish(rec)
