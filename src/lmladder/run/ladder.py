"""The ladder: validate everything, then climb the rungs in cost order.

    run(cfg, out_dir)
      validate         rungs, metrics, stacking, data, each rung's own checks, the model;
                       inputs against the model's context (nothing written yet)
      the run folder   locked; a killed run's temp files swept; config.yaml, data.json,
                       run.json (the fingerprint each result must carry), the majority
                       baseline; results.json rebuilt at once (run/folder.py)
      for each rung    run_one (run/run_one.py); the report follows the climb;
      in run_order     --until-target stops at the first rung that meets the target
      the verdict      report.build (results.json, report.md / .html) and tracking

Rerunning into the same folder skips a rung whose result.json carries the same fingerprint
(run/fingerprint.py). Under ``torchrun`` / ``accelerate launch`` every process runs this
same code: global rank 0 alone decides (skip / rerun, reuse weights), writes every file and
evaluates; the other ranks join only the weight-update rungs' training and wait at barriers
otherwise (run/distributed.py, docs/distributed.md).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from lmladder import config as config_mod
from lmladder import data as data_mod
from lmladder.config import RunConfig
from lmladder.errors import LadderError
from lmladder.io import atomic_write_json, atomic_write_text
from lmladder.registry import RUNGS, rung_class
from lmladder.run import distributed
from lmladder.run import folder as folder_mod
from lmladder.run import result as result_mod
from lmladder.run.context import Context
from lmladder.run.run_one import dependencies, run_one, write_baseline

log = logging.getLogger(__name__)


def run(cfg: RunConfig, out_dir: Path, force: bool = False) -> dict:
    """Validate everything (nothing is written before that passes), then climb. results.json
    and the report are rebuilt from what is on disk at the start of an attempt, after each
    rung, and at the end of every attempt, a failed or interrupted one included."""
    from lmladder import report, tracking

    if cfg.models and len(cfg.models) > 1:
        raise LadderError("models: several models climb as a grid: run/grid.run_grid (lmladder run does it)")
    if cfg.models:
        cfg = cfg.model_copy(update={"model": cfg.models[0], "models": None})
    multi = distributed.init_distributed()
    main = distributed.is_main()
    if not main:  # one voice: the other ranks log warnings only
        logging.getLogger("lmladder").setLevel(logging.WARNING)
    if main:
        folder_mod.check_out_dir(out_dir)
    tracking.start(cfg, out_dir)  # --report-to: a missing backend package stops here (exit 2)
    ctx = prepare_run(cfg, out_dir, multi)
    lock = None
    if main:  # the first write
        folder_mod.create(out_dir)
        lock = folder_mod.lock(out_dir)
    try:
        if main:
            start_folder(ctx, out_dir)
        climb(ctx, force, main, multi)
        results = report.build(out_dir) if main else None
        tracking.log_results(cfg, out_dir, results)  # never raises; nothing off rank 0 (results None)
    except BaseException:
        if main:
            try:  # the report of what is on disk, with the failed rung listed as failed
                report.build(out_dir)
            except Exception:  # noqa: BLE001 - the run's own error is the one to show
                log.debug("report after a failed attempt", exc_info=True)
        raise
    finally:
        if lock is not None:
            lock.close()
    results = distributed.broadcast(results)
    distributed.shutdown_distributed()
    return results


def prepare_run(cfg: RunConfig, out_dir: Path, multi: bool) -> Context:
    """Every check before the first write; the run's context (data, task, no model yet)."""
    from lmladder.inference import judge as judge_mod
    from lmladder.tasks import make_task

    dataset = validate(cfg)  # every rank validates
    if multi:
        _materialise_once(cfg.model)
    task = make_task(cfg.task, dataset.info["labels"], cfg.eval, cfg.seed, dataset)  # + gold/schema checks
    check_lengths(cfg, dataset, task)  # every input against the model's context (tokenizer only)
    if judge_mod.enabled(cfg):  # preference: rungs also generate responses for the win rate
        task.judge_cfg = cfg.judge
    return Context(cfg, dataset, task, out_dir)


def start_folder(ctx: Context, out_dir: Path) -> None:
    """The run folder for this attempt: temp files swept, the config / data / expected
    fingerprints written, the baseline, and results.json describing this attempt at once
    (results of another config show as stale), so a kill at any later point leaves it true
    to run.json."""
    from lmladder import report

    cfg = ctx.cfg
    folder_mod.sweep_temp_files(out_dir)
    atomic_write_text(out_dir / "config.yaml", config_mod.dump(cfg))
    atomic_write_json(out_dir / "data.json", ctx.data.info)
    atomic_write_json(out_dir / "run.json", {
        "fingerprints": {name: ctx.fingerprint(name) for name in cfg.rungs},
        "baseline_fingerprint": ctx.fingerprint_baseline(),
        "n_test": len(ctx.data.test), "order": run_order(cfg),
    })
    write_baseline(ctx)
    report.build(out_dir)


def climb(ctx: Context, force: bool, main: bool, multi: bool) -> None:
    """Each rung in run order (run_one); a failure is recorded (failed.json) and raised."""
    from lmladder import report

    cfg, out_dir = ctx.cfg, ctx.run_dir
    order = run_order(cfg)
    for i, name in enumerate(order):
        try:
            run_one(ctx, name, force=force, main=main, multi=multi)
        except BaseException as e:
            if main:
                folder_mod.record_failure(out_dir / "rungs" / name, ctx.fingerprint(name), e)
            raise
        last = i + 1 == len(order)
        if main and not last:
            report.build(out_dir)  # the report follows the climb
        if cfg.ladder.stop_at_target and not last:
            met = distributed.broadcast(met_target(ctx, name) if main else None)
            if met:
                if main:
                    folder_mod.record_skipped(out_dir, order[i + 1:], name, met)
                return


def run_order(cfg: RunConfig) -> list[str]:
    """Cost order, except that a rung with ``from:`` runs after the rung it starts from, and a
    rung after the rungs whose outputs it reads (``Rung.after``, e.g. best-of-n's reward model)."""
    out: list[str] = []

    def place(r: str) -> None:
        if r not in out:
            p = cfg.parent_of(r)
            if p:
                place(p)
            for dep in dependencies(cfg, r):
                place(dep)
            out.append(r)

    for r in sorted(cfg.rungs, key=lambda r: rung_class(r).cost_rank):
        place(r)
    return out


# --------------------------------------------------------------------------- validation


def validate(cfg: RunConfig):
    """Every check that needs no model: rungs, metric, data, each rung's own. Raises
    LadderError; returns the loaded dataset."""
    _check_rungs(cfg)
    _check_metrics(cfg)
    _check_stacking(cfg)
    _check_uses(cfg)
    world = distributed.dist_env()[1]
    for r in cfg.rungs:  # under N processes the global batch must split evenly
        rc = cfg.rung_config(r)
        if rung_class(r).trains and hasattr(rc, "batch_size") and hasattr(rc, "grad_accum"):
            distributed.split_global_batch(rc.batch_size, rc.grad_accum, world)
        if rung_class(r).trains and distributed.sharding_requested():
            raise LadderError(distributed.SHARDING_ERROR.format(what=" / ".join(distributed.sharding_requested())))
    dataset = data_mod.load(cfg.data, cfg.seed, cfg.task.labels, cfg.task.kind)
    for r in cfg.rungs + _used_rungs(cfg):  # each rung's own checks (corpus, tools, schema, step plans...)
        rung_class(r).validate(cfg, dataset)
    from lmladder import models
    from lmladder.inference import judge as judge_mod

    if any(rung_class(r).uses_base for r in cfg.rungs):
        models.check_available(models.resolve(cfg.model))
    judge_mod.validate(cfg)  # preference: the win-rate judge model exists
    return dataset


def _check_rungs(cfg: RunConfig) -> None:
    from lmladder.inference import openai_backend, vllm_backend

    if not cfg.rungs:
        raise LadderError("no rungs to run (--rungs zero-shot,few-shot,lora)")
    for r in cfg.rungs:
        if "@" in r and r.partition("@")[0] in RUNGS and r not in cfg.copies:
            raise LadderError(f"rung '{r}' is a named copy: give its changes in copies.{r}, e.g. from: ...")
        if r.partition("@")[0] not in RUNGS:
            hint = difflib.get_close_matches(r, list(RUNGS), n=1)
            raise LadderError(f"unknown rung '{r}' (known: {', '.join(RUNGS)})"
                              + (f"; did you mean '{hint[0]}'?" if hint else ""))
    if len(set(cfg.rungs)) != len(cfg.rungs):
        raise LadderError(f"rung listed twice in rungs: {', '.join(cfg.rungs)}")
    for r in cfg.rungs:
        if cfg.task.kind not in rung_class(r).kinds:
            raise LadderError(f"rung {r} does not support task kind {cfg.task.kind}")
        if openai_backend.is_openai(cfg.model) and rung_class(r).trains:
            raise LadderError(openai_backend.TRAINING_ERROR.format(rung=r))
        if vllm_backend.is_vllm(cfg.model) and rung_class(r).trains:
            raise LadderError(vllm_backend.TRAINING_ERROR.format(rung=r))


def _check_metrics(cfg: RunConfig) -> None:
    from lmladder.tasks import KINDS

    if cfg.task.kind not in KINDS:
        raise LadderError(f"task kind '{cfg.task.kind}' is not available (known: {', '.join(KINDS)})")
    metric_names = KINDS[cfg.task.kind].metrics_for(cfg.task)
    for m in [m for m in [cfg.task.metric] if m] + list(cfg.task.target or {}):
        if m not in metric_names:
            raise LadderError(f"unknown metric '{m}' for {cfg.task.kind} (known: {', '.join(metric_names)})")


def _check_stacking(cfg: RunConfig) -> None:
    """``from:`` must name another rung of this run that produces a model; no cycles."""
    for r in cfg.rungs:
        p = cfg.parent_of(r)
        if p is None:
            continue
        if p == r:
            raise LadderError(f"{r}.from: a rung cannot start from itself")
        if p not in cfg.rungs:
            raise LadderError(f"{r}.from: '{p}' is not in rungs ({', '.join(cfg.rungs)}); add it to rungs")
        if not (rung_class(p).output_model or rung_class(p).mergeable):
            makers = [n for n, c in RUNGS.items() if c.output_model or c.mergeable]
            raise LadderError(
                f"{r}.from: rung '{p}' does not produce a model to start from (rungs that do: {', '.join(makers)})")
        chain = [r]
        while p is not None:
            if p in chain:
                raise LadderError(f"{r}.from: a cycle of from: ({' -> '.join(chain + [p])})")
            chain.append(p)
            p = cfg.parent_of(p)


def _check_uses(cfg: RunConfig) -> None:
    """Rungs a rung runs itself (``Rung.uses``, distill's teacher) must be inference rungs
    for the task kind."""
    inference = ", ".join(n for n, c in RUNGS.items() if not c.trains)
    for r in cfg.rungs:
        for field, u in rung_class(r).uses(cfg, r).items():
            where = f"{r}.{field}"
            base = u.partition("@")[0]
            if base not in RUNGS:
                hint = difflib.get_close_matches(base, list(RUNGS), n=1)
                raise LadderError(f"{where}: unknown rung '{u}' (an inference rung: {inference}; see {where}'s "
                                  "description for the other kinds of value)" + (f"; did you mean '{hint[0]}'?" if hint else ""))
            if "@" in u and u not in cfg.copies:
                raise LadderError(f"{where}: '{u}' is a named copy: give its changes in copies.{u}")
            if RUNGS[base].trains:
                raise LadderError(f"{where}: '{u}' trains; name an inference rung ({inference})")
            if cfg.task.kind not in RUNGS[base].kinds:
                raise LadderError(f"{where}: rung {u} does not support task kind {cfg.task.kind}")


def _used_rungs(cfg: RunConfig) -> list[str]:
    """Rungs that run only inside another (a teacher not in ``rungs``): validated like rungs."""
    out = []
    for r in cfg.rungs:
        out += [u for u in rung_class(r).uses(cfg, r).values() if u not in cfg.rungs and u not in out]
    return out


def check_lengths(cfg: RunConfig, dataset, task) -> None:
    """Every input against the model's context (lengths.py), before any model work: too
    long is cut (counted in data.json) or an error, as data.truncation says."""
    from lmladder import lengths

    if not any(rung_class(r).uses_base for r in cfg.rungs):
        return
    tok, context = lengths.load_tokenizer_and_context(cfg.model)
    info = lengths.check_inputs(cfg, dataset, task, tok, context)
    if info is not None:
        dataset.info["lengths"] = info


def _materialise_once(spec: str) -> None:
    """Under N processes, convert an embedded / .gguf model to its safetensors cache
    once instead of N racing conversions: global rank 0 first, then the first rank of
    every other node (a no-op when the cache is on a shared filesystem)."""
    from lmladder import models

    ref = models.resolve(spec)
    if ref.kind not in ("embedded", "gguf"):
        return
    rank, _, local_rank = distributed.dist_env()
    if rank == 0:
        models.materialise(ref)
    distributed.barrier()
    if local_rank == 0 and rank != 0:
        models.materialise(ref)
    distributed.barrier()


def met_target(ctx: Context, name: str) -> str | None:
    """``ladder.stop_at_target``: a reason when rung ``name``'s current result meets the
    target under the decision rule and beats the majority baseline (verdict.py), else None."""
    from lmladder import verdict

    cfg = ctx.cfg
    target = cfg.task.target
    if not target:
        return None
    metric = next(iter(target))
    r = result_mod.load(ctx.run_dir / "rungs" / name / "result.json")
    if r is None or r.get("fingerprint") != ctx.fingerprint(name) or r.get("metric") != metric \
            or not rung_class(name).policy:
        return None
    if not verdict.meets(r, target[metric], cfg.decision.rule):
        return None
    base = result_mod.load(ctx.run_dir / "rungs" / verdict.BASELINE / "result.json")
    if base is not None and base.get("metric") == metric:
        pr = verdict.paired(r.get("per_example"), base.get("per_example"))
        if pr is not None and not (verdict.distinct(pr) and pr["diff"] > 0):
            return None  # meets the target but cannot be told apart from the baseline
    return (f"stopped at target: {name} met {metric} >= {target[metric]} "
            f"({r['score']:.3f}, rule {cfg.decision.rule})")
