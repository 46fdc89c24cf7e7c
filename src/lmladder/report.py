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


def recommend(rungs: list[dict], metric: str, target: float | None) -> dict[str, Any]:
    """Cheapest rung (ladder order) whose score meets the target; else the best and the gap."""
    if not rungs:
        return {"rung": None, "reason": "no finished rungs", "meets_target": False}
    ladder = sorted(rungs, key=lambda r: r["rank"])
    best = max(ladder, key=lambda r: (r["score"], -r["rank"]))  # ties go to the cheaper rung
    fmt = lambda r: f"{r['name']} {r['score']:.3f} (95% CI {r['ci'][0]:.3f}-{r['ci'][1]:.3f})"  # noqa: E731
    if target is None:
        return {
            "rung": best["name"],
            "meets_target": None,
            "reason": f"no target set; best {metric}: {fmt(best)}",
        }
    for i, r in enumerate(ladder):
        if r["score"] >= target:
            cheaper = ", ".join(f"{c['name']} {c['score']:.3f}" for c in ladder[:i])
            reason = f"{r['name']} is the cheapest rung that meets {metric} >= {target}: {fmt(r)}"
            if cheaper:
                reason += f"; cheaper rungs fall short ({cheaper})"
            if r["ci"][0] < target:
                reason += f"; note the CI's lower bound {r['ci'][0]:.3f} is below the target"
            return {"rung": r["name"], "meets_target": True, "reason": reason}
    gap = target - best["score"]
    return {
        "rung": best["name"],
        "meets_target": False,
        "gap": round(gap, 4),
        "reason": f"no rung meets {metric} >= {target}; the best is {fmt(best)}, {gap:.3f} short",
    }


def collect(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise LadderError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = yaml.safe_load(cfg_path.read_text())
    data_info = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
    rungs, missing = [], []
    for name in cfg.get("rungs", []):
        p = run_dir / "rungs" / name / "result.json"
        if p.is_file():
            rungs.append(json.loads(p.read_text()))
        else:
            missing.append(name)
    rungs.sort(key=lambda r: r["rank"])
    target = cfg["task"].get("target") or None
    metric = next(iter(target)) if target else (
        cfg["task"].get("metric") or (rungs[0]["metric"] if rungs else "accuracy")
    )
    tvalue = target[metric] if target else None
    model = next((r["model"] for r in rungs if r.get("model")), {"spec": cfg.get("model")})
    return {
        "lmladder_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "task": cfg["task"],
        "model": model,
        "data": data_info,
        "metric": metric,
        "target": tvalue,
        "rungs": [
            {k: r[k] for k in ("name", "rank", "summary", "metric", "score", "ci", "metrics", "n_test", "cost", "details", "artifacts")}
            | ({"by_group": r["by_group"]} if r.get("by_group") else {})
            for r in rungs
        ],
        "missing_rungs": missing,
        "recommendation": recommend(rungs, metric, tvalue),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = results["rungs"]
    metric = results["metric"]
    rec = results["recommendation"].get("rung")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = [
        ("compute to adapt + evaluate (s, log)", lambda r: r["cost"]["train_seconds"] + r["cost"]["eval_seconds"], True),
        ("prompt tokens per call", lambda r: r["cost"]["prompt_tokens_per_example"], False),
    ]
    for ax, (xlabel, xf, logx) in zip(axes, panels):
        seen: dict[tuple, int] = {}  # rungs on the same point: their labels stack upwards
        for r in rungs:
            x, y = max(xf(r), 1e-3), r["score"]
            lo, hi = r["ci"]
            color = "tab:green" if r["name"] == rec else "tab:blue"
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=color, capsize=4)
            k = (round(x, 6), round(y, 6))
            n = seen[k] = seen.get(k, -1) + 1
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 6 + 11 * n), fontsize=9)
        if results.get("target") is not None:
            ax.axhline(results["target"], color="tab:red", ls="--", lw=1, label=f"target {results['target']}")
            ax.legend(loc="best", fontsize=8)
        if logx:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (95% CI)")
    fig.suptitle("quality vs cost (green: recommended)")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


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
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
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


def table_rows(results: dict) -> list[dict]:
    rows = []
    names: list[str] = []  # every rung's metrics (win_rate: only rungs judged against a start model)
    for r in results["rungs"]:
        names += [m for m in r["metrics"] if m not in names]
    for r in results["rungs"]:
        c = r["cost"]
        row = {"rung": r["name"]}
        for m in names:
            v = r["metrics"].get(m)
            row[METRIC_LABELS.get(m, m)] = f"{v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v else "-"
        share = c.get("trainable_share") or 0
        row["trainable params"] = _fmt_int(c["trainable_params"]) + (f" ({share:.2%})" if share else "")
        row["train s"] = f"{c['train_seconds']:.1f}"
        eps = c.get("eval_examples_per_second")
        row["eval ex/s"] = (f"{eps:.1f}" if eps >= 1 else f"{eps:.2f}") if eps else "-"
        row["prompt tok/call"] = f"{c['prompt_tokens_per_example']:.0f}"
        row["peak RSS MB"] = f"{c['peak_rss_mb']:.0f}"
        rows.append(row)
    details = [r.get("details") or {} for r in results["rungs"]]
    if any("generated_tokens_per_example" in d for d in details):  # generative rungs: decode cost
        for row, d in zip(rows, details):
            g = d.get("generated_tokens_per_example")
            row["samples/ex"] = str(d.get("samples_per_example", 1)) if g is not None else "-"
            row["gen tok/ex"] = f"{g:.0f}" if g is not None else "-"
    forgetting = [(r.get("details") or {}).get("forgetting") for r in results["rungs"]]
    if any(forgetting):  # weight-update rungs: general-text perplexity before -> after training
        for row, f in zip(rows, forgetting):
            row["forgetting ppl"] = f"{f['ppl_before']:.1f} → {f['ppl_after']:.1f}" if f else "-"
    return rows


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


def markdown(results: dict) -> str:
    rows = table_rows(results)
    rec = results["recommendation"]
    d = results["data"]
    lines = [
        "# lmladder report",
        "",
        f"**Recommendation: `{rec.get('rung')}`** — {rec['reason']}.",
        "",
        f"- Task: {results['task']['kind']}; metric `{results['metric']}`"
        + (f", target {results['target']}" if results.get("target") is not None else ""),
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
    if results.get("missing_rungs"):
        lines += ["", f"Not finished: {', '.join(results['missing_rungs'])}."]
    lines += group_table(results)
    lines += distill_table(results)
    lines += judge_lines(results)
    lines += [
        "",
        "![quality vs cost](plot.png)",
        *curves_lines(results),
        "",
        "Scores are on the held-out test split with 95% percentile-bootstrap CIs. "
        "Costs: trainable parameters, training wall time, eval throughput, prompt tokens "
        "per call (full prompt, as an API would bill it), peak resident memory during the rung. "
        "Forgetting ppl: perplexity of a general text sample (default: WikiText-2) under the "
        "starting model and after training.",
        "",
        f"Per-example predictions: `rungs/<rung>/predictions.jsonl`. Made by lmladder {results['lmladder_version']}.",
        "",
    ]
    return "\n".join(lines)


def html(results: dict, png: bytes | None, curves: dict[str, bytes] | None = None) -> str:
    """``curves``: rung name -> its training-curves PNG (shown under the plot)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("lmladder", "templates"), autoescape=select_autoescape())
    rows = table_rows(results)
    return env.get_template("report.html.j2").render(
        r=results,
        rows=rows,
        head=list(rows[0]) if rows else [],
        plot=base64.b64encode(png).decode() if png else None,
        curves=[(r["name"], base64.b64encode(curves[r["name"]]).decode(), r.get("details") or {})
                for r in results["rungs"] if r["name"] in (curves or {})],
    )


def build(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    results = collect(run_dir)
    png = None
    if results["rungs"]:
        plot(results, run_dir / "plot.png")
        png = (run_dir / "plot.png").read_bytes()
    curves = {}  # training curves (details.curves): a figure per rung, next to plot.png
    for r in results["rungs"]:
        f = run_dir / curves_file(r["name"])
        if plot_curves(r, f):
            curves[r["name"]] = f.read_bytes()
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "report.md", markdown(results))
    atomic_write_text(run_dir / "report.html", html(results, png, curves))
    return results
