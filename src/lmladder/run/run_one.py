"""One rung: prepare -> fit -> predict -> score -> ``rungs/<rung>/result.json``.

    run_one(ctx, name)
      finished?      a result.json with this fingerprint: skip (rank 0 decides)
      _execute       prepare / fit (every rank trains) / predict (rank 0), each metered;
                     the rung is always closed and the shared base handed back
      _cost          two-part cost: one-time s (prepare + training + what it builds on) and
                     s per call; a stacked rung ranks after, and costs what, it builds on
      _result        task.score, the preference win rate, per-group scores, the learning
                     curve, the RungResult (run/result.py)
      write          predictions.jsonl, then result.json (last: it marks the rung finished)

A rung never scores itself (the task does) and never writes the report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmladder.cost import Meter
from lmladder.io import atomic_write_jsonl
from lmladder.registry import rung_class
from lmladder.run import distributed
from lmladder.run import result as result_mod
from lmladder.run.result import Cost, RungResult

log = logging.getLogger(__name__)


def dependencies(cfg, name: str) -> list[str]:
    """Rungs of this run whose outputs rung ``name`` reads (``Rung.after``), run first."""
    return [d for d in rung_class(name).after(cfg, name) if d in cfg.rungs and d != name]


@dataclass
class Steps:
    """What executing a rung gave: predictions and the meters of each step."""

    preds: list[dict] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    fit_stats: dict[str, Any] = field(default_factory=dict)
    trainable: int = 0
    artifacts: dict[str, str] = field(default_factory=dict)
    prepare_s: float = 0.0
    fit_s: float = 0.0
    predict_s: float = 0.0
    peak_rss_mb: float = 0.0


def run_one(ctx, name: str, *, force: bool = False, main: bool = True, multi: bool = False) -> None:
    """Run rung ``name`` unless its current result is on disk; rank 0 writes the result."""
    cls = rung_class(name)
    rdir = ctx.run_dir / "rungs" / name
    fp = ctx.fingerprint(name)
    if distributed.broadcast(_finished(rdir, fp, force, name) if main else None):  # rank 0 decides
        return
    if not main and not cls.trains:
        distributed.barrier()  # inference rungs run on rank 0 only (docs/distributed.md)
        return
    if main:  # a finished result.json stays until its replacement is written (atomically)
        rdir.mkdir(parents=True, exist_ok=True)
    steps = _execute(ctx, name, rdir, main)
    if not main:
        distributed.barrier()  # rank 0 evaluates and writes this rung
        return
    result, rows = _result(ctx, name, rdir, fp, steps, multi)
    atomic_write_jsonl(rdir / "predictions.jsonl", rows)
    result.write(rdir / "result.json")
    (rdir / "failed.json").unlink(missing_ok=True)  # this fingerprint finished after all
    log.info("%s: %s %.3f [%.3f, %.3f]", name, result.metric, result.score, *result.ci)
    if multi:
        distributed.barrier()


def _finished(rdir: Path, fp: str, force: bool, name: str) -> bool:
    """True when rungs/<name>/result.json is finished with the same fingerprint."""
    prev = result_mod.fingerprint_of(rdir / "result.json")
    if prev is None or force:
        return False
    if prev == fp:
        log.info("%s: finished in an earlier run, skipping", name)
        return True
    log.info("%s: config changed since the earlier run, running again", name)
    return False


def _execute(ctx, name: str, rdir: Path, main: bool) -> Steps:
    cls = rung_class(name)
    parent = ctx.cfg.parent_of(name)
    if cls.uses_base or parent:
        ctx.base()  # load outside the rung's meter: the model is shared by all rungs
    if parent:
        ctx.push_base(parent)  # the parent rung's output model is this rung's base
    rung = cls(ctx, ctx.cfg.rung_config(name), rdir)
    rung.name = name  # a named copy (lora@cpt) fingerprints and logs as itself
    log.info("%s: %s", name, cls.summary)
    s = Steps()
    with ctx.closing(rung, parent), Meter() as total:
        with Meter() as m:
            rung.prepare()  # prompts, shots, index build, teacher labels, format choice
        s.prepare_s = m.seconds
        with Meter() as m:
            s.fit_stats = rung.fit() if cls.trains else {}  # every rank trains
        s.fit_s = m.seconds
        with Meter() as m:
            s.preds, s.info = rung.predict() if main else (None, {})
        s.predict_s = m.seconds
        s.trainable, s.artifacts = rung.trainable_params(), rung.artifacts()
    s.peak_rss_mb = total.peak_rss_mb
    return s


def _cost(ctx, name: str, steps: Steps, details: dict) -> tuple[Cost, float]:
    """(two-part cost, ladder rank). Takes out of ``details`` the seconds that are not the
    rung's per-call cost: responses generated for the win rate (evaluation overhead), one-time
    work done inside predict (prompt search), the forgetting check. Reused weights cost what
    training them cost. A stacked rung (``from:``) costs its parent's training too and ranks
    after it; a rung ranks after the rungs whose outputs it reads."""
    cfg, task = ctx.cfg, ctx.task
    cls = rung_class(name)
    parent = cfg.parent_of(name)
    rungs_dir = ctx.run_dir / "rungs"
    pred_s = steps.predict_s - details.pop("response_seconds", 0.0)
    search_s = float(details.pop("one_time_seconds", 0.0) or 0.0)
    pred_s -= search_s
    forgetting_s = float(details.pop("forgetting_seconds", 0.0) or 0.0)
    fit_s = steps.fit_s - forgetting_s
    if (details.get("reused_adapter") or details.get("reused_model")) and details.get("original_train_seconds") is not None:
        fit_s = float(details["original_train_seconds"])  # the weights' real cost, not their load time
    train_s = round(fit_s, 2) if cls.trains else 0.0
    deps = dependencies(cfg, name)
    prior = 0.0  # one-time seconds of what it builds on
    for n in ([parent] if parent else []) + deps:
        r = result_mod.load(rungs_dir / n / "result.json")
        if r is not None:
            prior += float(r["cost"].get("one_time_s", r["cost"].get("train_seconds", 0.0)) or 0.0)
    one_time = round(steps.prepare_s + (fit_s if cls.trains else 0.0) + search_s + prior, 2)
    rank = cls.cost_rank
    if parent:
        prev = result_mod.load(rungs_dir / parent / "result.json")
        details["from"] = {"rung": parent, "train_seconds": prev["cost"]["train_seconds"],
                           "own_train_seconds": train_s}
        train_s = round(train_s + prev["cost"]["train_seconds"], 2)
        rank = max(rank, prev["rank"]) + cls.cost_rank / 100
    for d in deps:  # e.g. grpo's reward model: it ranks at least as dear as what it reads
        r = result_mod.load(rungs_dir / d / "result.json")
        if r is not None:
            rank = max(rank, r["rank"] + cls.cost_rank / 100)
    own = details.get("model")  # a rung with its own model (encoder): shares relative to it
    n_params = (own if isinstance(own, dict) else ctx.model_info).get("parameters") or 1
    n_test = len(ctx.data.test)
    ptok = steps.info.get("prompt_tokens_per_example", 0.0)
    gtok = steps.info.get("generated_tokens_per_example", 0.0)
    cost = Cost(
        one_time_s=one_time,
        per_call_s=round(pred_s / n_test, 6) if n_test and pred_s > 0 else 0.0,
        forgetting_s=round(forgetting_s, 2),
        prompt_tokens_per_call=round(ptok, 1),
        generated_tokens_per_call=round(gtok or 0.0, 1),
        peak_rss_mb=round(steps.peak_rss_mb, 1),
        eval_batch_size=cfg.eval.batch_size if not task.generative else cfg.eval.gen_batch_size,
        trainable_params=steps.trainable,
        trainable_share=steps.trainable / n_params,
        train_seconds=train_s,
        prepare_seconds=round(steps.prepare_s, 2),
        prompt_tokens_per_example=round(ptok, 1),
        eval_seconds=round(pred_s, 2),
        eval_examples_per_second=round(n_test / pred_s, 2) if pred_s > 0 else None,
    )
    return cost, rank


def _result(ctx, name: str, rdir: Path, fp: str, steps: Steps, multi: bool) -> tuple[RungResult, list[dict]]:
    from lmladder.inference import judge as judge_mod
    from lmladder.run import curves

    cfg, task, test = ctx.cfg, ctx.task, ctx.data.test
    cls = rung_class(name)
    parent = cfg.parent_of(name)
    preds = steps.preds
    golds = [task.gold(e) for e in test]
    scores = task.score(golds, [p["pred"] for p in preds])
    primary = cfg.primary_metric
    details = {**steps.info, **steps.fit_stats}
    wr = judge_mod.win_rate(ctx, name, parent, preds, rdir)  # preference: vs the starting model
    if wr:
        scores = {**scores, **wr[0]}
        details["judge"] = wr[1]
    cost, rank = _cost(ctx, name, steps, details)
    curve = None
    rc = cfg.rung_config(name)
    if getattr(rc, "learning_curve", None) or getattr(rc, "k_curve", None):
        if multi:
            log.warning("%s: learning_curve is measured in single-process runs only; skipped", name)
        else:
            curve = curves.measure(ctx, name, rdir, golds, scores[primary], preds, details)
    rows = [{"id": e.id, "source": e.source, "input": e.input, "gold": g, **p,
             "correct": bool(task.correct(p["pred"], g))} for e, g, p in zip(test, golds, preds)]
    result = RungResult(
        name=name, rank=rank, summary=cls.summary + (f" (from {parent})" if parent else ""), fingerprint=fp,
        policy=cls.policy, metric=primary, score=scores[primary]["value"], ci=scores[primary]["ci"],
        metrics=scores, n_test=len(test), per_example=task.paired_data(golds, [p["pred"] for p in preds], primary),
        cost=cost, details=details, by_group=group_scores(task, test, golds, preds) or None, learning_curve=curve,
        artifacts=steps.artifacts, model=ctx.model_info, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    return result, rows


def group_scores(task, test, golds, preds) -> dict:
    """Metrics per group (data.group_field, e.g. the source task of instruction data)."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(test):
        if e.group:
            groups.setdefault(e.group, []).append(i)
    out = {}
    for g in sorted(groups):
        ix = groups[g]
        sc = task.score([golds[i] for i in ix], [preds[i]["pred"] for i in ix])
        out[g] = {"n": len(ix), **{m: v["value"] for m, v in sc.items()}}
    return out


def write_baseline(ctx) -> None:
    """rungs/majority/result.json: the most frequent train label predicted for every test
    example (classification, multiple-choice): zero cost, shown and paired like any rung,
    never recommended (see verdict.py)."""
    from lmladder import verdict

    task, data = ctx.task, ctx.data
    preds = verdict.majority_predictions(task, data)
    if preds is None:
        return
    rdir = ctx.run_dir / "rungs" / verdict.BASELINE
    rdir.mkdir(parents=True, exist_ok=True)
    golds = [task.gold(e) for e in data.test]
    scores = task.score(golds, [p["pred"] for p in preds])
    primary = ctx.cfg.primary_metric
    rows = [{"id": e.id, "source": e.source, "gold": g, **p, "correct": bool(task.correct(p["pred"], g))}
            for e, g, p in zip(data.test, golds, preds)]
    atomic_write_jsonl(rdir / "predictions.jsonl", rows)
    RungResult(
        name=verdict.BASELINE, rank=-1.0, baseline=True,
        summary=f"most frequent train label ({preds[0]['answer']}) for every input" if preds else "",
        fingerprint=ctx.fingerprint_baseline(), metric=primary, score=scores[primary]["value"],
        ci=scores[primary]["ci"], metrics=scores, n_test=len(data.test),
        per_example=task.paired_data(golds, [p["pred"] for p in preds], primary), cost=verdict.zero_cost(),
        details={"label": preds[0]["answer"] if preds else None}, artifacts={}, model=None,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    ).write(rdir / "result.json")
