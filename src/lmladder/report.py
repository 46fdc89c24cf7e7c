"""results.json, report.md, report.html and plot.png from a run folder.

Reads only the run folder (config.yaml, data.json, rungs/*/result.json), so
``lmladder report DIR`` can rebuild everything after the fact.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import yaml

from lmladder import __version__
from lmladder.errors import LadderError
from lmladder.io import atomic_write_bytes, atomic_write_json, atomic_write_text

METRIC_LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1"}


def recommend(rungs: list[dict], metric: str, target: float | None, rule: str = "point",
              baseline: dict | None = None, unfinished: list[dict] | None = None,
              n_test: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The verdict over current results (verdict.decide; fills each row's ``paired``)."""
    from lmladder import verdict

    return verdict.decide(rungs, baseline, unfinished or [], metric, target, rule, n_test, seed=seed)


ROW_KEYS = ("name", "rank", "summary", "policy", "metric", "score", "ci", "metrics", "n_test", "cost",
            "details", "artifacts", "paired")


def _read_jsonl(p: Path) -> list[dict]:
    try:
        return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    except (OSError, ValueError):
        return []


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def collect(run_dir: Path, calls: int | None = None) -> dict[str, Any]:
    """results.json's content: only results whose fingerprint is the one this run's config
    and data give (run.json, written by the ladder); every asked-for rung without one is
    listed with its state: failed, not run, stale (a result of another config / data) or
    skipped. Then money at the call volume, the verdict, each rung's diagnosis and
    learning-curve reading."""
    from lmladder import diagnosis, verdict

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise LadderError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = yaml.safe_load(cfg_path.read_text())
    data_info = _read_json(run_dir / "data.json") or {}
    run_info = _read_json(run_dir / "run.json") or {}
    n_test = run_info.get("n_test", data_info.get("test_used"))
    rungs, states = current_results(run_dir, cfg, run_info, n_test)
    task = cfg["task"]
    target = task.get("target") or None
    metric = next(iter(target)) if target else (task.get("metric") or (rungs[0]["metric"] if rungs else "accuracy"))
    tvalue = target[metric] if target else None
    base = _baseline(run_dir, run_info, metric)
    rule = (cfg.get("decision") or {}).get("rule", "point")
    model = next((r["model"] for r in rungs if r.get("model")), {"spec": cfg.get("model")})
    cost_cfg = dict(cfg.get("cost") or {})
    if calls is not None:
        cost_cfg["calls"] = calls
    prices = verdict.price(cost_cfg, model)
    for r in rungs + ([base] if base is not None else []):  # money at the call volume
        r["cost"] = {**r["cost"], **verdict.money(r["cost"], prices), "calls": prices["calls"]}
    seed = int(cfg.get("seed", 0))
    rec = recommend(rungs, metric, tvalue, rule, base, states, n_test, seed=seed)
    preds_of = _diagnose(run_dir, rungs, base, task.get("kind", "classification"), data_info.get("labels"),
                         tvalue, rule)
    for r in rungs:  # would more data help?
        if r.get("learning_curve"):
            r["learning_curve_reading"] = verdict.curve_reading(r["learning_curve"], tvalue, rule, seed=seed)
            r["learning_curve"] = [{k: v for k, v in p.items() if k != "per_example"} for p in r["learning_curve"]]
    rows = [{k: r.get(k) for k in ROW_KEYS + ("diagnosis",)}
            | ({"by_group": r["by_group"]} if r.get("by_group") else {})
            | ({"learning_curve": r["learning_curve"], "learning_curve_reading": r["learning_curve_reading"]}
               if r.get("learning_curve") else {})
            for r in rungs]
    baseline = None if base is None else {k: base.get(k) for k in ROW_KEYS} | {"baseline": True, "policy": False}
    return {
        "lmladder_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "task": cfg["task"],
        "model": model,
        "data": data_info,
        "metric": metric,
        "target": tvalue,
        "decision": {"rule": rule, "meaning": verdict.RULES[rule]},
        "cost": prices,
        "rungs": rows,
        "baseline": baseline,
        "unfinished": states,
        "disagreements": diagnosis.disagreements(preds_of),
        "missing_rungs": [s_["name"] for s_ in states],
        "recommendation": rec,
    }


def current_results(run_dir: Path, cfg: dict, run_info: dict, n_test) -> tuple[list[dict], list[dict]]:
    """(current results in ladder order, the state of every other asked-for rung)."""
    from lmladder.registry import rung_class
    from lmladder.run import result as result_mod

    expected = run_info.get("fingerprints") or {}
    rungs, states = [], []
    for name in cfg.get("rungs", []):
        rdir = run_dir / "rungs" / name
        r = result_mod.load(rdir / "result.json")
        failed = _read_json(rdir / "failed.json")
        want = expected.get(name)
        if r is not None and (r.get("fingerprint") == want if want else r.get("n_test") == n_test):
            rungs.append(r)  # (a --force rerun that failed leaves this same-fingerprint result valid)
            continue
        skip = (run_info.get("skipped") or {}).get(name)
        if skip is not None:
            est = skip.get("seconds_saved_estimate")
            state = {"name": name, "state": "skipped", "why": skip["reason"] + (
                f"; about {est:.0f} s saved (its earlier run)" if est else "; not run, so the time saved is not measured")}
        elif failed and (not want or failed.get("fingerprint") == want):
            state = {"name": name, "state": "failed", "error": failed.get("error")}
        elif r is not None:
            state = {"name": name, "state": "stale", "why": "finished for another config or data "
                     f"(fingerprint {r.get('fingerprint')}, {r.get('n_test')} test examples)"}
        else:
            state = {"name": name, "state": "not run"}
        try:  # where it would sit on the ladder (unknown rung classes: last)
            state["rank"] = float(rung_class(name).cost_rank)
        except Exception:  # noqa: BLE001
            state["rank"] = 99.0
        states.append(state)
    rungs.sort(key=lambda r: r["rank"])
    return rungs, states


def _baseline(run_dir: Path, run_info: dict, metric: str) -> dict | None:
    """The majority baseline's current result on the primary metric, or None."""
    from lmladder import verdict
    from lmladder.run import result as result_mod

    base = result_mod.load(run_dir / "rungs" / verdict.BASELINE / "result.json")
    if base is None or run_info.get("baseline_fingerprint") != base.get("fingerprint") or base.get("metric") != metric:
        return None
    return base


def _diagnose(run_dir: Path, rungs: list[dict], base, kind: str, labels, tvalue, rule) -> dict[str, list[dict]]:
    """Why each rung fails, from its predictions (``diagnosis`` on each row); the predictions."""
    from lmladder import diagnosis, verdict
    from lmladder.registry import rung_class

    preds_of: dict[str, list[dict]] = {}
    for r in rungs:
        preds_of[r["name"]] = _read_jsonl(run_dir / "rungs" / r["name"] / "predictions.jsonl")
        vs_base = None if base is None else verdict.paired(r.get("per_example"), base.get("per_example"))
        try:
            trains = bool(rung_class(r["name"]).trains)
        except Exception:  # noqa: BLE001
            trains = False
        r["diagnosis"] = diagnosis.diagnose(kind, labels, preds_of[r["name"]], r, tvalue, rule, trains, vs_base)
    return preds_of


def _save_png(fig, path: Path, dpi: int) -> None:
    """Lay out, render and write a figure atomically; close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = with_baseline(results)
    metric = results["metric"]
    rec = results["recommendation"].get("rung")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = [
        ("one-time cost: seconds to adapt (log)", lambda r: r["cost"].get("one_time_s", r["cost"].get("train_seconds", 0)), True),
        ("per-call cost: ms per example (log)", lambda r: 1000 * (r["cost"].get("per_call_s") or 0), True),
    ]
    for ax, (xlabel, xf, logx) in zip(axes, panels):
        seen: dict[tuple, int] = {}  # rungs on the same point: their labels stack upwards
        for r in rungs:
            x, y = max(xf(r), 1e-3), r["score"]
            lo, hi = r["ci"]
            color = "tab:green" if r["name"] == rec else "tab:gray" if r.get("baseline") else "tab:blue"
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=color, capsize=4)
            k = (round(x, 6), round(y, 6))
            n = seen[k] = seen.get(k, -1) + 1
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 6 + 11 * n), fontsize=9)
        if results.get("target") is not None:
            ax.axhline(results["target"], color="tab:red", ls="--", lw=1, label=f"target {results['target']}")
            ax.legend(loc="best", fontsize=8)
        if logx:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (95% CI)")
    fig.suptitle("quality vs cost (green: recommended)")
    _save_png(fig, path, dpi=110)


def cost_lines_rows(results: dict) -> list[dict]:
    """The rungs the cost-vs-calls figure draws: those meeting the target (all policy rungs
    when no target is set or none meets it)."""
    from lmladder import verdict

    rows = [r for r in results["rungs"] if r.get("policy", True) and r["cost"].get("total_usd") is not None]
    t, rule = results.get("target"), (results.get("decision") or {}).get("rule", "point")
    ok = [r for r in rows if t is not None and verdict.meets(r, t, rule)]
    return ok or rows


def plot_cost(results: dict, path: Path) -> bool:
    """Total cost (USD) against calls, log-log, one line per target-meeting rung; the
    break-even volumes against the recommended rung are marked. False: nothing to draw."""
    rows = cost_lines_rows(results)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rec = results["recommendation"].get("rung")
    calls = results.get("cost", {}).get("calls", 100_000)
    bes = [b["calls"] for b in results["recommendation"].get("breakeven") or [] if b.get("calls")]
    lo = max(1.0, min([calls / 1000] + [b / 10 for b in bes]))
    hi = max([calls * 1000] + [b * 10 for b in bes])
    n = np.logspace(np.log10(lo), np.log10(hi), 200)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        c = r["cost"]
        y = c["one_time_usd"] + n * c["per_call_usd"]
        ax.plot(n, np.maximum(y, 1e-9), lw=2.2 if r["name"] == rec else 1.3, label=r["name"])
    by_name = {r["name"]: r for r in rows}
    for b in results["recommendation"].get("breakeven") or []:
        if b.get("calls") and b["rung"] in by_name and rec in by_name:
            c = by_name[rec]["cost"]
            y = c["one_time_usd"] + b["calls"] * c["per_call_usd"]
            ax.plot([b["calls"]], [max(y, 1e-9)], "kx", ms=8)
            ax.annotate(f"{b['rung']} = {rec} at {b['calls']:,}", (b["calls"], max(y, 1e-9)),
                        textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.axvline(calls, color="tab:gray", ls=":", lw=1, label=f"cost.calls = {calls:,}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("calls over the deployment")
    ax.set_ylabel("total cost, USD (one-time + calls x per-call)")
    p = results.get("cost", {})
    ax.set_title(f"total cost vs calls at {p.get('usd_per_hour', 0):.2f} USD/h ({p.get('usd_per_hour_source', '')})",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save_png(fig, path, dpi=100)
    return True


# --------------------------------------------------------------------------- training curves

# what a rung's training-curves figure shows, in order (at most 3 panels): an RL rung (grpo)
# its mean reward (and KL, completion length), a preference rung (dpo) loss and reward
# margin, other trainers their loss
CURVE_TITLES = {
    "reward": "mean reward per step",
    "rewards/margins": "reward margin (chosen - rejected)",
    "rewards/accuracies": "reward accuracy",
    "loss": "train loss",
    "accuracy": "train accuracy",
    "kl": "KL to the reference",
    "completions/mean_length": "completion length (tokens)",
}


def curve_series(curves: dict) -> list[str]:
    """The curve names a rung's figure draws (empty: no figure)."""
    if not curves:
        return []
    if "reward" in curves:  # RL: the loss of a policy-gradient step says little
        keys = ["reward", "kl", "completions/mean_length"]
    else:
        keys = ["loss", "rewards/margins", "rewards/accuracies", "accuracy"]
    return [k for k in keys if curves.get(k)][:3]


def curves_file(rung: str) -> str:
    import re

    return "curves-" + re.sub(r"[^A-Za-z0-9_.-]", "_", rung) + ".png"


def plot_curves(rung: dict, path: Path) -> bool:
    """A small figure of one rung's training curves (``details.curves``: name -> [[step,
    value], ...]); False when it has none to draw."""
    curves = (rung.get("details") or {}).get("curves") or {}
    keys = curve_series(curves)
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(s, v) for s, v in curves[k] if s is not None and v is not None]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "-", color="tab:blue", lw=1.1, marker="o" if len(xs) <= 30 else None, ms=3, label="per step")
        std = {s: v for s, v in curves.get("reward_std", [])} if k == "reward" else {}
        if std and all(x in std for x in xs):
            ax.fill_between(xs, [y - std[x] for x, y in zip(xs, ys)], [y + std[x] for x, y in zip(xs, ys)],
                            color="tab:blue", alpha=0.12, lw=0, label="± std within groups")
        if len(ys) >= 6:  # a running mean: single RL steps are noisy
            w = max(2, len(ys) // 5)
            run = [sum(ys[max(0, i - w + 1): i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(ys))]
            ax.plot(xs, run, "-", color="tab:orange", lw=1.8, label=f"mean of {w} steps")
        if k == "reward":
            ax.legend(loc="best", fontsize=7)
        ax.set_title(CURVE_TITLES.get(k, k), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{rung['name']}: training curves", fontsize=10)
    _save_png(fig, path, dpi=100)
    return True


def curves_lines(results: dict) -> list[str]:
    """Markdown: the training-curves figures (files written by :func:`build`)."""
    out = []
    for r in results["rungs"]:
        d = r.get("details") or {}
        if not curve_series(d.get("curves") or {}):
            continue
        note = ""
        if d.get("reward_first") is not None and d.get("reward_last") is not None:
            note = f" Mean reward {d['reward_first']:.3f} (first steps) → {d['reward_last']:.3f} (last steps)."
        out += ["", f"**{r['name']}**.{note}", "", f"![{r['name']} training curves]({curves_file(r['name'])})"]
    return ["", "## Training curves", *out] if out else []


def _fmt_int(n):
    return f"{n:,}" if n else "0"


def with_baseline(results: dict) -> list[dict]:
    """The rows the table and the plot show: the majority baseline (if any), then the rungs."""
    return ([results["baseline"]] if results.get("baseline") else []) + list(results["rungs"])


def table_rows(results: dict) -> list[dict]:
    rows = []
    names: list[str] = []  # every rung's metrics (win_rate: only rungs judged against a start model)
    for r in with_baseline(results):
        names += [m for m in r["metrics"] if m not in names]
    rec = results["recommendation"]
    ref = rec.get("rung") or rec.get("best")
    for r in with_baseline(results):
        c = r["cost"]
        row = {"rung": r["name"] + (" (baseline)" if r.get("baseline") else "")
               + (" (not a policy)" if r.get("policy") is False and not r.get("baseline") else "")}
        for m in names:
            v = r["metrics"].get(m)
            row[METRIC_LABELS.get(m, m)] = f"{v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v else "-"
        pr = r.get("paired")
        if ref:
            row[f"vs {ref} (paired)"] = "-" if r["name"] == ref else "n/a" if not pr else (
                f"{pr['diff']:+.3f} [{pr['ci'][0]:+.3f}, {pr['ci'][1]:+.3f}]"
                + ("" if pr.get("p") is None else f" p={pr['p']:.2g}"))
        share = c.get("trainable_share") or 0
        row["trainable params"] = _fmt_int(c["trainable_params"]) + (f" ({share:.2%})" if share else "")
        one = c.get("one_time_s", c.get("train_seconds", 0.0)) or 0.0
        row["one-time s"] = f"{one:.1f}"
        per = c.get("per_call_s")
        row["per call ms"] = "-" if not per else f"{per * 1000:.1f}"
        row["prompt tok/call"] = f"{c.get('prompt_tokens_per_call', c.get('prompt_tokens_per_example', 0)):.0f}"
        row["peak RSS MB"] = "-" if not c.get("peak_rss_mb") else f"{c['peak_rss_mb']:.0f}"
        if c.get("total_usd") is not None:
            from lmladder.verdict import fmt_usd

            row[f"total USD @ {c.get('calls', 0):,} calls"] = fmt_usd(c["total_usd"])
        rows.append(row)
    details = [r.get("details") or {} for r in with_baseline(results)]
    if any("generated_tokens_per_example" in d for d in details):  # generative rungs: decode cost
        for row, d in zip(rows, details):
            g = d.get("generated_tokens_per_example")
            row["samples/ex"] = str(d.get("samples_per_example", 1)) if g is not None else "-"
            row["gen tok/ex"] = f"{g:.0f}" if g is not None else "-"
    forgetting = [(r.get("details") or {}).get("forgetting") for r in with_baseline(results)]
    if any(forgetting):  # weight-update rungs: general-text perplexity before -> after training
        for row, f in zip(rows, forgetting):
            row["forgetting ppl"] = f"{f['ppl_before']:.1f} → {f['ppl_after']:.1f}" if f else "-"
    return rows


def curve_lines(results: dict, figure: bool = False) -> list[str]:
    """Markdown: each learning curve's points and its reading."""
    out = []
    for r in results["rungs"]:
        pts, rd = r.get("learning_curve"), r.get("learning_curve_reading")
        if not pts:
            continue
        line = f"- **{r['name']}**: " + ", ".join(
            f"{p['n_train']} examples ({p['fraction']:.0%}) {p['score']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]" for p in pts)
        if rd:
            g = rd.get("gain")
            line += (f". Last doubling ({rd['from_fraction']:.0%} → {rd['to_fraction']:.0%}): "
                     + (f"{g['diff']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]" if g else "no paired data")
                     + f" — {rd['reading']}")
            if rd.get("smallest_fraction_meeting_target") is not None:
                line += f"; {rd['smallest_fraction_meeting_target']:.0%} of train already meets the target"
        out.append(line + ".")
    if not out:
        return []
    return ["", "## Would more data help? (learning curves)", "", *out,
            *(["", "![learning curves](learning_curve.png)"] if figure else [])]


def plot_learning_curves(results: dict, path: Path) -> bool:
    rows = [r for r in results["rungs"] if r.get("learning_curve")]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        pts = r["learning_curve"]
        xs, ys = [p["n_train"] for p in pts], [p["score"] for p in pts]
        err = [[y - p["ci"][0] for y, p in zip(ys, pts)], [p["ci"][1] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=r["name"])
    if results.get("target") is not None:
        ax.axhline(results["target"], color="tab:red", ls="--", lw=1, label=f"target {results['target']}")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("train examples (log)")
    ax.set_ylabel(f"{results['metric']} (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, path, dpi=100)
    return True


def diagnosis_lines(results: dict) -> list[str]:
    """Markdown: why each rung falls short, and what to try next (diagnosis.py)."""
    out = []
    for r in results["rungs"]:
        d = r.get("diagnosis") or {}
        if not (d.get("findings") or d.get("next")):
            continue
        line = f"- **{r['name']}**: " + ("; ".join(d.get("findings") or []) or "no specific failure found")
        if d.get("next"):
            line += ". Try next: " + "; ".join(d["next"])
        out.append(line + ".")
    conf = [(r["name"], r["diagnosis"]["confusion"]) for r in results["rungs"] if (r.get("diagnosis") or {}).get("confusion")]
    for name, c in conf:
        if len(c["labels"]) > 12:  # a big label set: see results.json
            continue
        out += ["", f"{name} — confusion (rows: gold, columns: predicted)", "",
                "| gold \\ pred | " + " | ".join(c["labels"]) + " |", "|---|" + "---|" * len(c["labels"])]
        out += [f"| {g} | " + " | ".join(str(x) for x in row) + " |" for g, row in zip(c["labels"], c["matrix"])]
    dis = results.get("disagreements") or []
    if dis:
        names = list(dis[0]["preds"])
        out += ["", f"Test examples where the rungs disagree (first {len(dis)}):", "",
                "| input | gold | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")[:80]  # noqa: E731
        out += [f"| {cell(x['input'])} | {cell(x['gold'])} | " + " | ".join(cell(x["preds"][k]) for k in names) + " |"
                for x in dis]
    return ["", "## Why it falls short, and what to try next", "", *out] if out else []


def group_table(results: dict) -> list[str]:
    """Markdown lines: the primary metric per group (data.group_field) and rung."""
    with_groups = [r for r in results["rungs"] if r.get("by_group")]
    if not with_groups:
        return []
    m = results["metric"]
    groups = sorted({g for r in with_groups for g in r["by_group"]})
    lines = ["", f"## {m} per group", "", "| group | n | " + " | ".join(r["name"] for r in with_groups) + " |",
             "|---|---|" + "---|" * len(with_groups)]
    for g in groups:
        n = next(r["by_group"][g]["n"] for r in with_groups if g in r["by_group"])
        vals = [r["by_group"].get(g, {}).get(m) for r in with_groups]
        lines.append(f"| {g} | {n} | " + " | ".join("" if v is None else f"{v:.3f}" for v in vals) + " |")
    return lines


def judge_lines(results: dict) -> list[str]:
    """Markdown lines explaining the preference win rate (who was judged against whom)."""
    judged = [(r["name"], r["details"]["judge"]) for r in results["rungs"] if (r.get("details") or {}).get("judge")]
    if not judged:
        return []
    pc = lambda j: "-" if j.get("position_consistency") is None else f"{j['position_consistency']:.2f}"  # noqa: E731
    lines = ["", f"win_rate: each rung's greedy responses to the first {judged[0][1]['n']} test prompts against its "
             f"starting model's, judged pairwise by `{judged[0][1]['judge_model']}` in both orders (1 win, 0.5 tie or "
             "orders disagreeing, 0 loss); per-example verdicts in `rungs/<rung>/judgements.jsonl`.", "",
             "| rung | reference | wins / ties / losses | position consistency |", "|---|---|---|---|"]
    lines += [f"| {n} | {j['reference']} | {j['wins']} / {j['ties']} / {j['losses']} | {pc(j)} |" for n, j in judged]
    return lines


def distill_table(results: dict) -> list[str]:
    """Markdown lines: each distill rung's teacher (who labelled the train inputs, at what
    cost per call) next to the student's cost per call."""
    rows = [r for r in results["rungs"] if isinstance((r.get("details") or {}).get("teacher"), dict)]
    if not rows:
        return []
    lines = ["", "## Distillation teachers (labelling the train inputs)", "",
             "| student | teacher | labelled / dropped | teacher agreement with gold | labelling s "
             "| teacher prompt tok/call | student prompt tok/call |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["details"]["teacher"]
        agree = t.get("agreement_with_gold")
        ptok = t.get("prompt_tokens_per_example")
        lines.append(
            f"| {r['name']} | {t['name']} | {t['labelled']} / {t['dropped']} | "
            f"{'-' if agree is None else f'{agree:.3f}'} | {t['seconds']:.1f}{' (cached)' if t.get('cached') else ''} | "
            f"{'-' if ptok is None else f'{ptok:.0f}'} | {r['cost']['prompt_tokens_per_example']:.0f} |"
        )
    return lines


def truncation_warning(d: dict) -> str | None:
    """The inputs cut to fit the model's context (lengths.py), as one sentence, or None."""
    info = d.get("lengths") or {}
    t = info.get("truncated") or {}
    if not t.get("n"):
        return None
    n, lim = t["n"], info.get("max_input_tokens")
    return (f"{n} input{'s' if n != 1 else ''} ({t.get('train', 0)} train, {t.get('test', 0)} test) longer than "
            f"{lim} tokens (the model's context {info.get('model_context')} less the prompt and answer) "
            f"{'were' if n != 1 else 'was'} cut to the first {lim} tokens (data.truncation); first: {t.get('first')}")


def markdown(results: dict, cost_plot: bool = False, curve_plot: bool = False) -> str:
    rows = table_rows(results)
    rec = results["recommendation"]
    d = results["data"]
    lines = [
        "# lmladder report",
        "",
        f"**Recommendation: `{rec.get('rung')}`** — {rec['reason']}.",
        "",
        *[f"> **Warning:** {w}." for w in rec.get("warnings") or []],
        *([f"> **Warning:** {d['overlap']['n']} test inputs also appear in train (data.allow_overlap: true); "
           f"first: {', '.join(' = '.join(p) for p in d['overlap']['pairs'][:3])}.", ""]
          if (d.get("overlap") or {}).get("n") else [""] if rec.get("warnings") else []),
        *([f"> **Warning:** {truncation_warning(d)}.", ""] if truncation_warning(d) else []),
        f"- Task: {results['task']['kind']}; metric `{results['metric']}`"
        + (f", target {results['target']}" if results.get("target") is not None else ""),
        *([f"- Cost: {results['cost']['usd_per_hour']:.2f} USD per hour of the machine "
           f"({results['cost']['usd_per_hour_source']}); the verdict prices {results['cost']['calls']:,} calls "
           "(total = one-time + calls x per-call; `cost.calls`, `--calls`)"] if results.get("cost") else []),
        f"- Decision rule: `{(results.get('decision') or {}).get('rule', 'point')}` "
        f"({(results.get('decision') or {}).get('meaning', 'score >= target')}); ties on the ladder go to "
        "the lower measured cost; a rung is called worse only when its paired difference's 95% interval excludes 0",
        f"- Model: `{results['model'].get('spec')}`"
        + (f" ({results['model'].get('parameters', 0):,} params, {results['model'].get('dtype')}, {results['model'].get('device')})" if results["model"].get("parameters") else ""),
        f"- Train: {d.get('train_used')} of {d.get('train_total')} examples from `{d.get('train_file')}`",
        f"- Test: {d.get('test_used')} of {d.get('test_total')} examples from `{d.get('test_file')}` (the same split for every rung)",
        *([f"- Labels: {', '.join(d['labels'])}"] if d.get("labels") else []),
        "",
    ]
    if rows:
        head = list(rows[0])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(r.get(h, "")) for h in head) + " |" for r in rows]
    if results.get("unfinished"):
        lines += ["", "Asked for, without a current result (not part of the verdict): " + "; ".join(
            f"{u['name']}: {u['state']}" + (f" ({u['error']})" if u.get("error") else f" ({u['why']})" if u.get("why") else "")
            for u in results["unfinished"]) + "."]
    lines += curve_lines(results, curve_plot)
    lines += diagnosis_lines(results)
    lines += group_table(results)
    lines += distill_table(results)
    lines += judge_lines(results)
    lines += [
        "",
        "![quality vs cost](plot.png)",
        *(["", "![total cost vs calls](cost.png)"] if cost_plot else []),
        *curves_lines(results),
        "",
        "Scores are on the held-out test split with 95% intervals: Wilson score intervals for "
        "proportions (accuracy, exact match, valid-JSON rate), seeded percentile bootstrap otherwise. "
        "Paired: each rung minus the recommended one on the same test examples (paired bootstrap 95% "
        "interval; exact McNemar p for 0/1 metrics). `majority` predicts the most frequent train label for "
        "every input: a rung that cannot beat it is not recommended. "
        "Costs, in two parts: one-time seconds (prompt building, format choice, index build, teacher "
        "labelling, prompt search, training incl. the rungs it builds on; not the forgetting check) and "
        "per-call milliseconds (evaluation seconds per test example at the eval batch size, adapters "
        "merged as deployed); prompt tokens per call (the full prompt, as an API would bill it), peak "
        "resident memory during the rung. See docs/verdict.md. "
        "Forgetting ppl: perplexity of a general text sample (default: WikiText-2) under the "
        "starting model and after training.",
        "",
        f"Per-example predictions: `rungs/<rung>/predictions.jsonl`. Made by lmladder {results['lmladder_version']}.",
        "",
    ]
    return "\n".join(lines)


def html(results: dict, png: bytes | None, curves: dict[str, bytes] | None = None,
         cost_png: bytes | None = None, curve_png: bytes | None = None) -> str:
    """``curves``: rung name -> its training-curves PNG (shown under the plot)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("lmladder", "templates"), autoescape=select_autoescape())
    rows = table_rows(results)
    return env.get_template("report.html.j2").render(
        r=results,
        rows=rows,
        head=list(rows[0]) if rows else [],
        plot=base64.b64encode(png).decode() if png else None,
        cost_plot=base64.b64encode(cost_png).decode() if cost_png else None,
        curve_plot=base64.b64encode(curve_png).decode() if curve_png else None,
        curve_md=curve_lines(results),
        diagnosis_md=diagnosis_lines(results),
        truncation_warning=truncation_warning(results["data"]),
        curves=[(r["name"], base64.b64encode(curves[r["name"]]).decode(), r.get("details") or {})
                for r in results["rungs"] if r["name"] in (curves or {})],
    )


def build(run_dir: Path, calls: int | None = None) -> dict:
    """``calls``: price the verdict at this call volume instead of the run's cost.calls."""
    run_dir = Path(run_dir)
    results = collect(run_dir, calls)
    png = None
    if results["rungs"]:
        plot(results, run_dir / "plot.png")
        png = (run_dir / "plot.png").read_bytes()
    cost_png = None
    if plot_cost(results, run_dir / "cost.png"):
        cost_png = (run_dir / "cost.png").read_bytes()
    curves = {}  # training curves (details.curves): a figure per rung, next to plot.png
    for r in results["rungs"]:
        f = run_dir / curves_file(r["name"])
        if plot_curves(r, f):
            curves[r["name"]] = f.read_bytes()
    atomic_write_json(run_dir / "results.json", results)
    curve_png = (run_dir / "learning_curve.png").read_bytes() if plot_learning_curves(
        results, run_dir / "learning_curve.png") else None
    atomic_write_text(run_dir / "report.md", markdown(results, cost_plot=cost_png is not None,
                                                      curve_plot=curve_png is not None))
    atomic_write_text(run_dir / "report.html", html(results, png, curves, cost_png, curve_png))
    return results
