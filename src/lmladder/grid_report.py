"""The report of a grid of models (run/grid.py): one verdict over every (model, rung) cell.

Reads only the run folder: DIR/run.json (the sub-runs, the not-applicable cells),
DIR/config.yaml, and each sub-run's current results through report.collect (so each cell
is priced with its own model's costs: seconds x usd_per_hour for local models, token prices
for openai: ones). Then the verdict (verdict.decide) over all cells at once: the cheapest
cell that meets the target under the decision rule, every cell paired against it on the
same test examples, break-even call volumes between target-meeting cells, the majority
baseline. Writes DIR/results.json (rows carry ``model`` and ``name``; the recommendation
``model`` and ``rung``), report.md / report.html with the models x rungs table, and
plot.png: quality against total cost for every cell.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import yaml

from lmladder import __version__
from lmladder.io import atomic_write_json, atomic_write_text


def is_grid(run_dir: Path) -> bool:
    try:
        return bool(json.loads((Path(run_dir) / "run.json").read_text()).get("grid"))
    except (OSError, ValueError):
        return False


def _cell(model: str, rung: str) -> str:
    return f"{model}/{rung}"


def _format_used(r: dict, model: dict) -> str:
    """The prompt format a cell used: the one its rung chose on dev, else the chat template
    when the model has one, else plain text."""
    chosen = ((r.get("details") or {}).get("prompt_format") or {}).get("chosen")
    if chosen:
        return chosen
    return "chat" if model.get("chat_template", True) else "plain (no chat template)"


def collect(run_dir: Path, calls: int | None = None) -> dict[str, Any]:
    from lmladder import report, verdict
    from lmladder.registry import rung_class
    from lmladder.run import result as result_mod

    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    rows, states, models, baseline, data, n_test = [], [], {}, None, {}, None
    for sub in info["models"]:
        name, d = sub["name"], run_dir / sub["dir"]
        na = (info.get("not_applicable") or {}).get(name, {})
        if not (d / "config.yaml").is_file():  # not started yet
            for r in info["rungs"]:
                if r not in na:
                    states.append({"name": r, "model": name, "cell": _cell(name, r), "state": "not run",
                                   "rank": float(rung_class(r).cost_rank)})
            models[name] = {"spec": sub["spec"]}
            continue
        res = report.collect(d, calls)
        model = {**res["model"], "spec": sub["spec"], "prices": res["cost"]}
        models[name] = model
        for r in res["rungs"]:  # (results.json rows leave out the per-example data the pairing needs)
            r = {k: v for k, v in r.items() if k != "paired"}
            per = (result_mod.load(d / "rungs" / r["name"] / "result.json") or {}).get("per_example")
            rows.append({**r, "per_example": per, "model": name, "cell": _cell(name, r["name"]),
                         "prompt_format": _format_used(r, model)})
        for u in res["unfinished"]:
            states.append({**u, "model": name, "cell": _cell(name, u["name"])})
        if baseline is None and res.get("baseline"):
            baseline = {k: v for k, v in res["baseline"].items() if k != "paired"}
            baseline["per_example"] = (result_mod.load(d / "rungs" / verdict.BASELINE / "result.json") or {}).get(
                "per_example")
        data = data or res["data"]
        n_test = n_test or res["data"].get("test_used")
    not_applicable = [{"model": m, "name": r, "cell": _cell(m, r), "why": why}
                      for m, per in (info.get("not_applicable") or {}).items() for r, why in per.items()]
    task = cfg["task"]
    target = task.get("target") or None
    metric = next(iter(target)) if target else (task.get("metric") or (rows[0]["metric"] if rows else "accuracy"))
    tvalue = target[metric] if target else None
    rule = (cfg.get("decision") or {}).get("rule", "point")
    rows.sort(key=lambda r: (r["rank"], r["model"]))
    rec = verdict.decide(rows, baseline, states, metric, tvalue, rule, n_test, seed=int(cfg.get("seed", 0)))
    _split_cells(rec)
    for r in rows + ([baseline] if baseline else []):
        r.pop("per_example", None)
    calls_used = next((r["cost"].get("calls") for r in rows if r["cost"].get("calls") is not None), calls)
    return {
        "lmladder_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "grid": True,
        "task": task,
        "models": models,
        "data": data,
        "metric": metric,
        "target": tvalue,
        "decision": {"rule": rule, "meaning": verdict.RULES[rule]},
        "cost": {"calls": calls_used},
        "rungs": rows,
        "baseline": baseline,
        "unfinished": states,
        "not_applicable": not_applicable,
        "table": _table(info, rows, states, not_applicable),
        "recommendation": rec,
    }


def _split_cells(rec: dict) -> None:
    """The verdict names cells ``model/rung``: results.json says model and rung apart."""
    cell = rec.get("rung")
    rec["cell"] = cell
    rec["model"], rec["rung"] = (cell.partition("/")[0], cell.partition("/")[2]) if cell else (None, None)
    if rec.get("best"):
        rec["best_cell"] = rec["best"]
        rec["best_model"], _, rec["best"] = rec["best"].partition("/")
    for b in rec.get("breakeven") or []:
        model, _, rung = b["rung"].partition("/")
        b.update(cell=b["rung"], model=model, rung=rung)


def _table(info: dict, rows: list[dict], states: list[dict], na: list[dict]) -> dict:
    """models x rungs: each cell's score, interval and total cost, or its state."""
    out: dict[str, dict[str, dict]] = {}
    for sub in info["models"]:
        out[sub["name"]] = {r: {"state": "not run"} for r in info["rungs"]}
    for r in rows:
        out[r["model"]][r["name"]] = {"score": r["score"], "ci": r["ci"], "total_usd": r["cost"].get("total_usd"),
                                      "per_call_s": r["cost"].get("per_call_s"), "one_time_s": r["cost"].get("one_time_s"),
                                      "prompt_format": r.get("prompt_format")}
    for u in states:
        out[u["model"]][u["name"]] = {"state": u["state"]}
    for u in na:
        out[u["model"]][u["name"]] = {"state": "not applicable", "why": u["why"]}
    return {"models": [s["name"] for s in info["models"]], "rungs": list(info["rungs"]), "cells": out}


def display(results: dict) -> dict:
    """The results as the single-model report renders them: each row named by its cell."""
    rec = dict(results["recommendation"])
    rec["rung"], rec["best"] = rec.get("cell"), rec.get("best_cell")
    rows = [{**r, "name": r["cell"], "paired": r.get("paired") and {**r["paired"]}} for r in results["rungs"]]
    base = results.get("baseline")
    return {**results, "rungs": rows, "recommendation": rec, "baseline": base}


def cell_text(c: dict) -> str:
    from lmladder.verdict import fmt_usd

    if "score" not in c:
        return c["state"]
    usd = "" if c.get("total_usd") is None else f"; {fmt_usd(c['total_usd'])}"
    return f"{c['score']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]{usd}"


def grid_lines(results: dict) -> list[str]:
    t = results["table"]
    rec = results["recommendation"]
    lines = ["| model | " + " | ".join(t["rungs"]) + " |", "|---|" + "---|" * len(t["rungs"])]
    for m in t["models"]:
        cells = []
        for r in t["rungs"]:
            txt = cell_text(t["cells"][m][r])
            cells.append(f"**{txt}**" if rec.get("cell") == _cell(m, r) else txt)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def cell_rows(shown: dict) -> list[dict]:
    """The single-model report's table, a row per cell, with the prompt format each used."""
    from lmladder import report

    rows = report.table_rows(shown)
    for row, r in zip(rows, report.with_baseline(shown)):
        row["prompt format"] = r.get("prompt_format", "-")
    return rows


def markdown(results: dict) -> str:
    shown = display(results)
    rec = results["recommendation"]
    head = (f"`{rec['rung']}` on `{rec['model']}`" if rec.get("rung") else "`None`")
    calls = results["cost"].get("calls")
    lines = [
        "# lmladder report: models x rungs",
        "",
        f"**Recommendation: {head}** — {rec['reason']}.",
        "",
        *[f"> **Warning:** {w}." for w in rec.get("warnings") or []],
        "",
        f"- Task: {results['task']['kind']}; metric `{results['metric']}`"
        + (f", target {results['target']}" if results.get("target") is not None else "")
        + f"; decision rule `{results['decision']['rule']}` ({results['decision']['meaning']})",
        "- Models: " + "; ".join(
            f"`{m}` ({info.get('parameters') or 0:,} params, {info.get('device', 'remote')}, "
            f"{'chat template' if info.get('chat_template', True) else 'no chat template: plain prompts'}, "
            f"{(info.get('prices') or {}).get('usd_per_hour', 0):.2f} USD/h)"
            for m, info in results["models"].items()),
        f"- Test: {results['data'].get('test_used')} examples, the same split for every cell"
        + (f"; total cost at {calls:,} calls (one-time + calls x per-call)" if calls else ""),
        "",
        f"## {results['metric']} [95% CI]; total cost, per (model, rung) cell",
        "",
        *grid_lines(results),
        "",
    ]
    if results.get("not_applicable"):
        lines += ["Not applicable: " + "; ".join(f"{u['cell']} ({u['why']})" for u in results["not_applicable"]) + ".",
                  ""]
    rows = cell_rows(shown)
    if rows:
        hd = list(rows[0])
        lines += ["## Every cell", "", "| " + " | ".join(hd) + " |", "|" + "---|" * len(hd)]
        lines += ["| " + " | ".join(str(r.get(h, "")) for h in hd) + " |" for r in rows]
    if results.get("unfinished"):
        lines += ["", "Asked for, without a current result: " + "; ".join(
            f"{u['cell']}: {u['state']}" for u in results["unfinished"]) + "."]
    lines += ["", "![quality vs total cost](plot.png)", "",
              "Each model's cells are a complete run folder under `models/<model>/` (its own report, "
              "predictions and weights; `lmladder export` / `serve` take it as it is). Paired: each cell minus "
              f"the recommended one on the same test examples. Made by lmladder {results['lmladder_version']}.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Quality against total cost at the call volume, every cell, a color per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmladder.report import _save_png

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rec = results["recommendation"].get("cell")
    for i, m in enumerate(results["table"]["models"]):
        for r in [r for r in results["rungs"] if r["model"] == m]:
            x = max(float(r["cost"].get("total_usd") or 0.0), 1e-6)
            y, (lo, hi) = r["score"], r["ci"]
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=colors[i % len(colors)], capsize=4,
                        ms=10 if r["cell"] == rec else 6, label=m if r is next(q for q in results["rungs"] if q["model"] == m) else None)
            ax.annotate(r["name"] + (" *" if r["cell"] == rec else ""), (x, y), textcoords="offset points",
                        xytext=(6, 5), fontsize=8)
    if results.get("target") is not None:
        ax.axhline(results["target"], color="tab:red", ls="--", lw=1, label=f"target {results['target']}")
    ax.set_xscale("log")
    calls = results["cost"].get("calls")
    ax.set_xlabel(f"total cost, USD at {calls:,} calls (log)" if calls else "total cost, USD (log)")
    ax.set_ylabel(f"{results['metric']} (95% CI)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("quality vs total cost, every (model, rung) cell (* recommended)")
    _save_png(fig, path, dpi=110)


def html(results: dict, png: bytes | None) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("lmladder", "templates"), autoescape=select_autoescape())
    shown = display(results)
    rows = cell_rows(shown)
    t = results["table"]
    grid = [(m, [(cell_text(t["cells"][m][r]), results["recommendation"].get("cell") == _cell(m, r))
                 for r in t["rungs"]]) for m in t["models"]]
    return env.get_template("grid.html.j2").render(
        r=results, grid=grid, rungs=t["rungs"], rows=rows, head=list(rows[0]) if rows else [],
        plot=base64.b64encode(png).decode() if png else None)


def build(run_dir: Path, calls: int | None = None) -> dict:
    run_dir = Path(run_dir)
    results = collect(run_dir, calls)
    png = None
    if results["rungs"]:
        plot(results, run_dir / "plot.png")
        png = (run_dir / "plot.png").read_bytes()
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "report.md", markdown(results))
    atomic_write_text(run_dir / "report.html", html(results, png))
    return results
