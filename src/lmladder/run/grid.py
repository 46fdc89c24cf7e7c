"""Which model and which method: one ladder over several models (``models:``), one verdict
over every (model, rung) cell.

Each model climbs the same rungs, on the same test split, in its own sub-run folder
``DIR/models/<name>/``: a complete single-model run folder (config.yaml with that model,
data.json, run.json, rungs/<rung>/...). So resume works per cell (a sub-run skips its
finished rungs), ``lmladder export`` / ``serve`` take a sub-folder as it is, and only one
model is in memory at a time (a sub-run loads its model and drops it when it ends).

    run_grid(cfg, DIR)
      validate     every model's sub-run (data, rungs, its tokenizer's context) before
                   anything is written; rungs a model cannot run (training on an openai:
                   model) are not applicable: left out of its sub-run, listed
      DIR          config.yaml (with models), run.json (the sub-runs, the not-applicable cells)
      each model   ladder.run(its config, DIR/models/<name>) in turn
      the verdict  grid_report.build(DIR): every cell priced with its own model's costs,
                   paired against the recommended cell; the models x rungs table and one
                   quality-vs-total-cost plot of every cell

Distributed runs (torchrun) climb one model per run; a grid runs in one process.
"""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path

from lmladder import config as config_mod
from lmladder.errors import LadderError
from lmladder.io import atomic_write_json, atomic_write_text
from lmladder.registry import rung_class
from lmladder.run import distributed
from lmladder.run import folder as folder_mod

log = logging.getLogger(__name__)

SUBDIR = "models"


def model_name(spec: str) -> str:
    """A model's folder name and label in the grid: the spec made path-safe
    (``Qwen/Qwen2.5-0.5B-Instruct`` -> ``Qwen--Qwen2.5-0.5B-Instruct``, a folder -> its name)."""
    s = spec.rstrip("/")
    if s.startswith(("/", ".", "~")):
        s = Path(s).name
    if s.lower().endswith(".gguf"):
        s = s[:-5]
    s = re.sub(r"[^A-Za-z0-9._-]+", "--", s).strip("-.") or "model"
    return s[:80]


def not_applicable(cfg, spec: str) -> dict[str, str]:
    """{rung: why} for the rungs this model cannot run."""
    from lmladder.inference import openai_backend

    out = {}
    if openai_backend.is_openai(spec):
        for r in cfg.rungs:
            if rung_class(r).trains:
                out[r] = "trains weights; an openai: model is served elsewhere"
    return out


def sub_runs(cfg, out_dir: Path) -> list[dict]:
    """Per model: its name, spec, sub-run config and folder, and its not-applicable rungs."""
    names = [model_name(m) for m in cfg.model_list]
    if len(set(names)) != len(names):
        raise LadderError(f"models: two models get the same folder name ({', '.join(names)}); "
                          "list distinct models")
    out = []
    for spec, name in zip(cfg.model_list, names):
        na = not_applicable(cfg, spec)
        rungs = [r for r in cfg.rungs if r not in na]
        if not rungs:
            raise LadderError(f"models: {spec}: none of the rungs applies to it ({', '.join(na)})")
        sub = Path(out_dir) / SUBDIR / name
        sub_cfg = cfg.model_copy(update={"model": spec, "models": None, "rungs": rungs, "out": str(sub)})
        out.append({"name": name, "spec": spec, "cfg": sub_cfg, "dir": sub, "not_applicable": na})
    return out


def run_grid(cfg, out_dir: Path, force: bool = False) -> dict:
    from lmladder import grid_report
    from lmladder.run import ladder

    if distributed.is_distributed():
        raise LadderError("models: a grid of models runs in one process; launch one model per torchrun run")
    out_dir = Path(out_dir)
    folder_mod.check_out_dir(out_dir)
    subs = sub_runs(cfg, out_dir)
    for s in subs:  # every model's checks before anything is written
        log.info("models: checking %s", s["spec"])
        ladder.prepare_run(s["cfg"], s["dir"], False)
    folder_mod.create(out_dir)
    lock = folder_mod.lock(out_dir)
    try:
        folder_mod.sweep_temp_files(out_dir)
        atomic_write_text(out_dir / "config.yaml", config_mod.dump(cfg))
        atomic_write_json(out_dir / "run.json", {
            "grid": True,
            "models": [{"name": s["name"], "spec": s["spec"], "dir": f"{SUBDIR}/{s['name']}"} for s in subs],
            "rungs": list(cfg.rungs),
            "not_applicable": {s["name"]: s["not_applicable"] for s in subs if s["not_applicable"]},
        })
        for i, s in enumerate(subs):
            log.info("models: %s (%d of %d)", s["spec"], i + 1, len(subs))
            try:
                ladder.run(s["cfg"], s["dir"], force=force)
            finally:
                gc.collect()  # one model in memory at a time
            grid_report.build(out_dir)  # the grid report follows the climb
        return grid_report.build(out_dir)
    except BaseException:
        try:
            grid_report.build(out_dir)
        except Exception:  # noqa: BLE001 - the run's own error is the one to show
            log.debug("grid report after a failed attempt", exc_info=True)
        raise
    finally:
        lock.close()
