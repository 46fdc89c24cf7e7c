"""Orchestration: validate everything, then climb the rungs in cost order.

Run folder layout::

    DIR/config.yaml               snapshot of the resolved RunConfig
    DIR/rungs/<rung>/result.json  written last: its presence marks the rung finished
    DIR/rungs/<rung>/predictions.jsonl
    DIR/rungs/<rung>/...          artifacts (adapter/, shots.json)
    DIR/results.json, report.md, report.html, plot.png

Rerunning into the same DIR skips a rung whose result.json carries the same
fingerprint (config of the task, data files' content, model, seed, eval, rung).

Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) every process runs this
same code: global rank 0 alone decides (skip / rerun, reuse an adapter), writes every
file and evaluates; the other ranks join only the weight-update rungs' training and
wait at barriers otherwise, so nothing is written twice and nothing races. Rank 0's
decisions are broadcast, so the run folder need not be on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmladder import config as config_mod
from lmladder import data as data_mod
from lmladder.config import RunConfig
from lmladder.errors import LadderError
from lmladder.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from lmladder.run import distributed

log = logging.getLogger(__name__)


def rung_class(name: str):
    """The rung class behind a rung name (``lora@cpt``, a named copy, is a ``lora``)."""
    from lmladder import registry

    return registry.rung_class(name)


def parent_of(cfg: RunConfig, rung: str) -> str | None:
    """The rung whose output model ``rung`` starts from (its config's ``from``), if any."""
    return getattr(cfg.rung_config(rung), "from_", None)


def run_order(cfg: RunConfig) -> list[str]:
    """Cost order, except that a rung with ``from:`` runs after the rung it starts from, and a
    rung after the rungs whose outputs it reads (``Rung.after``, e.g. best-of-n's reward model)."""
    out: list[str] = []

    def place(r: str) -> None:
        if r not in out:
            p = parent_of(cfg, r)
            if p:
                place(p)
            for dep in rung_class(r).after(cfg, r):  # rungs whose outputs r reads
                if dep in cfg.rungs and dep != r:
                    place(dep)
            out.append(r)

    for r in sorted(cfg.rungs, key=lambda r: rung_class(r).cost_rank):
        place(r)
    return out


def _check_stacking(cfg: RunConfig) -> None:
    """``from:`` must name another rung of this run that produces a model; no cycles."""
    from lmladder import registry

    for r in cfg.rungs:
        p = parent_of(cfg, r)
        if p is None:
            continue
        if p == r:
            raise LadderError(f"{r}.from: a rung cannot start from itself")
        if p not in cfg.rungs:
            raise LadderError(f"{r}.from: '{p}' is not in rungs ({', '.join(cfg.rungs)}); add it to rungs")
        if not (rung_class(p).output_model or rung_class(p).mergeable):
            makers = [n for n, c in registry.RUNGS.items() if c.output_model or c.mergeable]
            raise LadderError(
                f"{r}.from: rung '{p}' does not produce a model to start from (rungs that do: {', '.join(makers)})"
            )
        chain = [r]
        while p is not None:
            if p in chain:
                raise LadderError(f"{r}.from: a cycle of from: ({' -> '.join(chain + [p])})")
            chain.append(p)
            p = parent_of(cfg, p)


# data keys a result does not depend on: the files are fingerprinted by content (digests),
# and a line-length cap either lets the data in unchanged or stops the run
DATA_NOT_FINGERPRINTED = {"train", "test", "max_line_bytes"}


class Context:
    """What rungs share: config, data, task, and the base model (loaded once, lazily)."""

    def __init__(self, cfg: RunConfig, dataset, task, run_dir: Path):
        self.cfg, self.data, self.task, self.run_dir = cfg, dataset, task, run_dir
        self._model = self._tok = self._fmt = None
        self.model_info: dict[str, Any] = {}
        self._digests = {  # a file's sha256; a saved dataset's files; an hf: dataset's fingerprint
            "train": data_mod.digest(cfg.data.train, "train"),
            "test": data_mod.digest(cfg.data.test, "test"),
        }

    def base(self):
        if self._model is None:
            from lmladder.models import load_causal_lm

            t0 = time.perf_counter()
            log.info("loading model %s", self.cfg.model)
            self._model, self._tok, ref = load_causal_lm(self.cfg.model)
            if ref.kind == "openai":  # served elsewhere: no local weights
                self.model_info = {
                    "spec": self.cfg.model,
                    "kind": ref.kind,
                    "path": ref.path,
                    "endpoint": self._model.url,
                    "parameters": None,
                    "tokenizer": os.environ.get("LMLADDER_OPENAI_TOKENIZER") or None,
                    "load_seconds": round(time.perf_counter() - t0, 2),
                }
                return self._model, self._tok
            n = sum(p.numel() for p in self._model.parameters())
            self.model_info = {
                "spec": self.cfg.model,
                "kind": ref.kind,
                "path": ref.path,
                "parameters": n,
                "dtype": str(next(self._model.parameters()).dtype).replace("torch.", ""),
                "device": str(next(self._model.parameters()).device),
                "load_seconds": round(time.perf_counter() - t0, 2),
            }
        return self._model, self._tok

    def set_base(self, model) -> None:
        self._model = model

    def push_base(self, parent: str) -> None:
        """Until :meth:`pop_base`, the base model is ``parent``'s model (same tokenizer): its
        output model (rungs/<parent>/model), or, for an adapter rung (lora, ia3), the model it
        trained on with its adapter merged; the shared base is kept aside."""
        model, _ = self.base()
        m = self._start_model(parent, model)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        self._stack = getattr(self, "_stack", []) + [self._model]
        self._model = m

    def _start_model(self, parent: str, base):
        import copy

        from transformers import AutoModelForCausalLM

        cls = rung_class(parent)
        if cls.output_model:
            folder = self.run_dir / "rungs" / parent / cls.output_model
            if not (folder / "config.json").is_file():
                raise LadderError(f"from: {parent}: no model in {folder} (did the {parent} rung fail?)")
            log.info("starting from %s's model (%s)", parent, folder)
            return AutoModelForCausalLM.from_pretrained(
                folder, dtype=base.dtype, use_safetensors=True, trust_remote_code=False
            ).to(base.device)
        from peft import PeftModel

        folder = self.run_dir / "rungs" / parent / cls.artifact
        if not (folder / "adapter_config.json").is_file():
            raise LadderError(f"from: {parent}: no adapter in {folder} (did the {parent} rung fail?)")
        grand = parent_of(self.cfg, parent)  # the adapter was trained on its own start model
        start = self._start_model(grand, base) if grand else copy.deepcopy(base)
        log.info("starting from the model with %s's adapter merged (%s)", parent, folder)
        return PeftModel.from_pretrained(start, folder).merge_and_unload()

    def pop_base(self) -> None:
        self._model = self._stack.pop()

    def fmt(self, plain: bool = False):
        """The prompt format: the chat template, or (``plain``) the same prompts as text."""
        from lmladder.prompts import ChatFormat

        if self._fmt is None:
            _, tok = self.base()
            self._fmt = ChatFormat(tok, self.cfg.task.system_prompt)
        if plain:
            return ChatFormat(self._fmt.tokenizer, self.cfg.task.system_prompt, plain=True)
        return self._fmt

    def fingerprint(self, rung: str, training: bool = False) -> str:
        """What a rung's result depends on (a change reruns it). ``training=True``: what its
        trained weights depend on (saved weights and checkpoints are reused across changes
        of the evaluation-only settings, ``eval:`` and ``judge:``)."""
        cfg = self.cfg
        payload = {
            "model": cfg.model,
            "task": cfg.task.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json", exclude=DATA_NOT_FINGERPRINTED),
            "digests": self._digests,
            "seed": cfg.seed,
            "rung": rung,
            # trained weights do not depend on which learning-curve points are also measured
            "rung_config": cfg.rung_config(rung).model_dump(
                mode="json", exclude={"learning_curve"} if training else None),
        }
        if not training:
            payload["eval"] = cfg.eval.model_dump(mode="json")
            if cfg.task.kind == "preference":  # responses / win rate depend on the judge settings
                payload["judge"] = cfg.judge.model_dump(mode="json")
        from lmladder.inference import openai_backend

        parent = parent_of(cfg, rung)
        if parent:  # a stacked rung reruns when the model it starts from changes
            payload["from"] = self.fingerprint(parent, training)
        deps = [d for d in rung_class(rung).after(cfg, rung) if d in cfg.rungs and d != rung]
        if deps:  # e.g. best-of-n reruns when the reward model it ranks with changes
            payload["after"] = {d: self.fingerprint(d, training) for d in deps}
        extra = rung_class(rung).fingerprint_extra(cfg)
        if extra:  # e.g. the rag corpus's content digest
            payload["extra"] = extra
        if openai_backend.is_openai(cfg.model):  # another server or tokenizer: other scores
            payload["openai"] = {
                "endpoint": os.environ.get("OPENAI_BASE_URL", "").rstrip("/"),
                "tokenizer": os.environ.get("LMLADDER_OPENAI_TOKENIZER") or None,
            }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint_baseline(self) -> str:
        """What the majority baseline depends on: the task and the data (no model)."""
        cfg = self.cfg
        payload = {"task": cfg.task.model_dump(mode="json"), "digests": self._digests, "seed": cfg.seed,
                   "data": cfg.data.model_dump(mode="json", exclude=DATA_NOT_FINGERPRINTED), "baseline": "majority"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def validate(cfg: RunConfig):
    """Every check that needs no model: rungs, metric, data. Raises LadderError."""
    from lmladder import registry
    from lmladder.tasks import KINDS

    if not cfg.rungs:
        raise LadderError("no rungs to run (--rungs zero-shot,few-shot,lora)")
    for r in cfg.rungs:
        if "@" in r and r.partition("@")[0] in registry.RUNGS and r not in cfg.copies:
            raise LadderError(f"rung '{r}' is a named copy: give its changes in copies.{r}, e.g. from: ...")
        if r.partition("@")[0] not in registry.RUNGS:
            import difflib

            hint = difflib.get_close_matches(r, list(registry.RUNGS), n=1)
            raise LadderError(
                f"unknown rung '{r}' (known: {', '.join(registry.RUNGS)})"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
            )
    if len(set(cfg.rungs)) != len(cfg.rungs):
        raise LadderError(f"rung listed twice in rungs: {', '.join(cfg.rungs)}")
    for r in cfg.rungs:
        if cfg.task.kind not in rung_class(r).kinds:
            raise LadderError(f"rung {r} does not support task kind {cfg.task.kind}")
    _check_stacking(cfg)
    from lmladder.inference import openai_backend

    if openai_backend.is_openai(cfg.model):
        for r in cfg.rungs:
            if rung_class(r).trains:
                raise LadderError(openai_backend.TRAINING_ERROR.format(rung=r))
    if cfg.task.kind not in KINDS:
        raise LadderError(f"task kind '{cfg.task.kind}' is not available (known: {', '.join(KINDS)})")
    metric_names = KINDS[cfg.task.kind].metrics_for(cfg.task)
    for m in [m for m in [cfg.task.metric] if m] + list(cfg.task.target or {}):
        if m not in metric_names:
            raise LadderError(
                f"unknown metric '{m}' for {cfg.task.kind} (known: {', '.join(metric_names)})"
            )

    world = distributed.dist_env()[1]
    for r in cfg.rungs:  # under N processes the global batch must split evenly
        rc = cfg.rung_config(r)
        if rung_class(r).trains and hasattr(rc, "batch_size") and hasattr(rc, "grad_accum"):
            distributed.split_global_batch(rc.batch_size, rc.grad_accum, world)
        if rung_class(r).trains and distributed.sharding_requested():
            raise LadderError(distributed.SHARDING_ERROR.format(what=" / ".join(distributed.sharding_requested())))
    dataset = data_mod.load(cfg.data, cfg.seed, cfg.task.labels, cfg.task.kind)
    for r in cfg.rungs:  # rung-specific checks that need no model (corpus, tools, schema...)
        check = getattr(rung_class(r), "validate", None)
        if check is not None:
            check(cfg, dataset)
    from lmladder import models
    from lmladder.inference import judge as judge_mod

    if any(rung_class(r).uses_base for r in cfg.rungs):
        models.check_available(models.resolve(cfg.model))
    judge_mod.validate(cfg)  # preference: the win-rate judge model exists
    return dataset


@dataclass
class RunFolder:
    """A run folder as written by :func:`run`: its validated config, label set and the
    rungs finished in it (cost order). Read by export and serve."""

    dir: Path
    cfg: RunConfig
    labels: list[str]
    finished: list[str]


def read_run(run_dir: str | Path) -> RunFolder:
    from lmladder import registry

    d = Path(run_dir)
    if not (d / "config.yaml").is_file():
        raise LadderError(f"{d}: not a run folder (no config.yaml); give a folder written by `lmladder run`")
    cfg = config_mod.build(config_mod.read_yaml(d / "config.yaml"))
    try:
        labels = list(json.loads((d / "data.json").read_text())["labels"])
    except (OSError, ValueError, KeyError):
        labels = list(cfg.task.labels or [])
    rank = {n: c.cost_rank for n, c in registry.RUNGS.items()}
    rdir = d / "rungs"
    try:  # the fingerprints the run's config and data give: other results are stale
        expected = json.loads((d / "run.json").read_text()).get("fingerprints") or {}
    except (OSError, ValueError):
        expected = {}

    def current(p: Path) -> bool:
        if not (p / "result.json").is_file() or p.name not in cfg.rungs:
            return False  # (the majority baseline is not a rung)
        if p.name not in expected:
            return True
        try:
            return json.loads((p / "result.json").read_text()).get("fingerprint") == expected[p.name]
        except (OSError, ValueError):
            return False

    done = [p.name for p in rdir.iterdir() if current(p)] if rdir.is_dir() else []
    done.sort(key=lambda n: (rank.get(n, 99), n))
    return RunFolder(d, cfg, labels, done)


def default_out(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "run"
    return Path("runs") / name


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


def _skip_decision(done: Path, fp: str, force: bool, name: str) -> bool:
    """True when rungs/<name>/result.json is finished with the same fingerprint."""
    if done.is_file() and not force:
        prev = json.loads(done.read_text())
        if prev.get("fingerprint") == fp:
            log.info("%s: finished in an earlier run, skipping", name)
            return True
        log.info("%s: config changed since the earlier run, running again", name)
    return False


def _group_scores(task, test, golds, preds) -> dict:
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


def expected_fingerprints(ctx: "Context") -> dict[str, str]:
    """The fingerprint every asked-for rung's result must carry to count as current."""
    return {name: ctx.fingerprint(name) for name in ctx.cfg.rungs}


def _write_baseline(ctx: "Context", out_dir: Path) -> None:
    """rungs/majority/result.json: the most frequent train label predicted for every test
    example (classification, multiple-choice): zero cost, shown and paired like any rung,
    never recommended (see verdict.py)."""
    from lmladder import verdict

    task, data = ctx.task, ctx.data
    preds = verdict.majority_predictions(task, data)
    if preds is None:
        return
    rdir = out_dir / "rungs" / verdict.BASELINE
    rdir.mkdir(parents=True, exist_ok=True)
    golds = [task.gold(e) for e in data.test]
    scores = task.score(golds, [p["pred"] for p in preds])
    primary = ctx.cfg.primary_metric
    rows = [{"id": e.id, "source": e.source, "gold": g, **p, "correct": bool(task.correct(p["pred"], g))}
            for e, g, p in zip(data.test, golds, preds)]
    atomic_write_jsonl(rdir / "predictions.jsonl", rows)
    atomic_write_json(rdir / "result.json", {
        "name": verdict.BASELINE,
        "rank": -1.0,
        "summary": f"most frequent train label ({preds[0]['answer']}) for every input" if preds else "",
        "baseline": True,
        "fingerprint": ctx.fingerprint_baseline(),
        "metric": primary,
        "score": scores[primary]["value"],
        "ci": scores[primary]["ci"],
        "metrics": scores,
        "n_test": len(data.test),
        "per_example": task.paired_data(golds, [p["pred"] for p in preds], primary),
        "cost": verdict.zero_cost(),
        "details": {"label": preds[0]["answer"] if preds else None},
        "artifacts": {},
        "model": None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })


def _met_target(ctx: "Context", name: str) -> str | None:
    """``ladder.stop_at_target``: a reason when rung ``name``'s current result meets the
    target under the decision rule and beats the majority baseline (verdict.py), else None."""
    from lmladder import verdict

    cfg = ctx.cfg
    target = cfg.task.target
    if not target:
        return None
    metric = next(iter(target))
    try:
        r = json.loads((ctx.run_dir / "rungs" / name / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if r.get("fingerprint") != ctx.fingerprint(name) or r.get("metric") != metric or not rung_class(name).policy:
        return None
    if not verdict.meets(r, target[metric], cfg.decision.rule):
        return None
    try:
        base = json.loads((ctx.run_dir / "rungs" / verdict.BASELINE / "result.json").read_text())
    except (OSError, ValueError):
        base = None
    if base is not None and base.get("metric") == metric:
        pr = verdict.paired(r.get("per_example"), base.get("per_example"))
        if pr is not None and not (verdict.distinct(pr) and pr["diff"] > 0):
            return None  # meets the target but cannot be told apart from the baseline
    return (f"stopped at target: {name} met {metric} >= {target[metric]} "
            f"({r['score']:.3f}, rule {cfg.decision.rule})")


def _record_skipped(out_dir: Path, names: list[str], at: str, reason: str) -> None:
    """run.json ``skipped``: the rungs --until-target did not climb, with the reason and, when
    an earlier result of the same rung is on disk, roughly the seconds that saved."""
    info = json.loads((out_dir / "run.json").read_text())
    skipped = {}
    for n in names:
        est = None
        try:
            c = json.loads((out_dir / "rungs" / n / "result.json").read_text())["cost"]
            est = round(float(c.get("one_time_s", c.get("train_seconds", 0))) + float(c.get("eval_seconds", 0)), 1)
        except (OSError, ValueError, KeyError):
            pass
        skipped[n] = {"reason": reason, "after": at, "seconds_saved_estimate": est}
        log.info("%s: skipped (%s)", n, reason)
    atomic_write_json(out_dir / "run.json", {**info, "skipped": skipped})


def _record_failure(rdir: Path, fp: str, err: BaseException) -> None:
    """rungs/<rung>/failed.json: the rung was run for this fingerprint and raised. A finished
    result.json beside it is kept (never deleted before its replacement exists); the
    report tells which one is current."""
    try:
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rdir / "failed.json", {
            "fingerprint": fp, "error": f"{type(err).__name__}: {err}".splitlines()[0][:500],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
    except OSError:
        pass


def run(cfg: RunConfig, out_dir: Path, force: bool = False) -> dict:
    """Validate everything (nothing is written before that passes), then climb. The run
    folder is locked against a second run into it; temp files a killed run left are swept;
    results.json and the report are rebuilt from what is on disk at the end of every
    attempt, a failed or interrupted one included."""
    from lmladder import report, tracking
    from lmladder.cost import Meter
    from lmladder.tasks import make_task

    multi = distributed.init_distributed()
    main = distributed.is_main()
    if not main:  # one voice: the other ranks log warnings only
        logging.getLogger("lmladder").setLevel(logging.WARNING)
    if main:
        check_out_dir(out_dir)
    tracking.start(cfg, out_dir)  # --report-to: a missing backend package stops here (exit 2)
    dataset = validate(cfg)  # before anything is written (every rank validates)
    if multi:
        _materialise_once(cfg.model)
    task = make_task(cfg.task, dataset.info["labels"], cfg.eval, cfg.seed, dataset)  # + gold/schema checks
    check_lengths(cfg, dataset, task)  # every input against the model's context (tokenizer only)
    from lmladder.inference import judge as judge_mod

    if judge_mod.enabled(cfg):  # preference: rungs also generate responses for the win rate
        task.judge_cfg = cfg.judge
    ctx = Context(cfg, dataset, task, out_dir)
    lock = None
    if main:  # the first write
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LadderError(f"--out {out_dir}: cannot create the run folder ({e.strerror})") from None
        lock = lock_run_folder(out_dir)
    try:
        if main:
            sweep_temp_files(out_dir)
            atomic_write_text(out_dir / "config.yaml", config_mod.dump(cfg))
            atomic_write_json(out_dir / "data.json", dataset.info)
            # what report.collect checks every result.json against (stale results stay out)
            atomic_write_json(out_dir / "run.json", {
                "fingerprints": expected_fingerprints(ctx), "baseline_fingerprint": ctx.fingerprint_baseline(),
                "n_test": len(dataset.test), "order": run_order(cfg),
            })
            _write_baseline(ctx, out_dir)
            # results.json now describes this attempt (results of another config are listed as
            # stale), so a kill at any later point leaves it true to run.json
            report.build(out_dir)
        order = run_order(cfg)
        for i, name in enumerate(order):
            try:
                _run_rung(ctx, name, force, main, multi, Meter)
            except BaseException as e:
                if main:
                    _record_failure(out_dir / "rungs" / name, ctx.fingerprint(name), e)
                raise
            if main and i + 1 < len(order):
                report.build(out_dir)  # the report follows the climb
            if cfg.ladder.stop_at_target and i + 1 < len(order):
                met = distributed.broadcast(_met_target(ctx, name) if main else None)
                if met:
                    if main:
                        _record_skipped(out_dir, order[i + 1:], name, met)
                    break
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


def check_out_dir(out_dir: Path) -> None:
    """The run folder can be written: it is a folder (or can be made one) in a writable
    place. Checked before anything is written; nothing is created here (a probe file in
    the nearest existing folder is made and removed)."""
    import tempfile

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LadderError(f"--out {out_dir}: is a file, not a folder; give a folder for the run")
    probe_in = out_dir
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise LadderError(f"--out {out_dir}: {probe_in} is a file, so no folder can be made under it")
    try:
        fd, name = tempfile.mkstemp(prefix=".lmladder-probe.", suffix=".tmp", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        what = "the run folder" if probe_in == out_dir else f"{probe_in} (where it would be made)"
        raise LadderError(f"--out {out_dir}: cannot write in {what} ({e.strerror})") from None


class _Lock:
    def __init__(self, f):
        self.f = f

    def close(self) -> None:
        try:
            self.f.close()  # closing the file releases the lock
        except OSError:
            pass


def lock_run_folder(out_dir: Path) -> _Lock:
    """An exclusive lock on ``out_dir/.lock`` for this run (released when the process
    ends, killed or not): a second run into the same folder stops at once instead of
    racing this one for the same files."""
    import fcntl

    f = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise LadderError(f"--out {out_dir}: another lmladder run is using this folder; wait for it or "
                          "give another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return _Lock(f)


def sweep_temp_files(out_dir: Path) -> int:
    """Remove what a killed run left half-written: ``.name.*.tmp`` files and folders
    (io.atomic_write_*, io.atomic_dir) and ``.name.old`` folders a replace did not finish.
    A finished file is never touched (its replacement was never renamed over it)."""
    import shutil

    n = 0
    for p in sorted(Path(out_dir).rglob(".*"), key=lambda p: -len(p.parts)):
        if not (p.name.endswith(".tmp") or p.name.endswith(".old")) or not p.exists():
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            n += 1
        except OSError:
            pass
    if n:
        log.info("removed %d temp file(s) left by an interrupted run", n)
    return n


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


def curve_subset(train: list, fraction: float, seed: int) -> list:
    """A seeded subset of ``fraction`` of train; subsets for growing fractions are nested
    (one seeded order, cut at each size)."""
    import random

    order = list(range(len(train)))
    random.Random(f"learning-curve:{seed}").shuffle(order)
    n = max(1, round(fraction * len(train)))
    return [train[i] for i in sorted(order[:n])]


def _learning_curve(ctx: "Context", name: str, cls, parent, rdir: Path, golds, full_score, full_preds, Meter,
                    details: dict) -> list:
    """The rung retrained on nested subsets of train (``learning_curve`` fractions < 1), each
    scored on the same test split; the full rung is the last point. Its seconds are the
    ladder's own evaluation overhead (``details.learning_curve_seconds``), not the rung's cost."""
    import copy

    cfg, task = ctx.cfg, ctx.task
    primary = cfg.primary_metric
    rc = cfg.rung_config(name)
    if getattr(rc, "k_curve", None):  # few-shot: the same rung with fewer examples in the prompt
        k_full = len(ctx.data.train) if rc.k == "max" else rc.k
        points = []
        for k in [k for k in rc.k_curve if k < k_full] + [k_full]:
            if k == k_full:
                preds = full_preds
            else:
                chosen = (details.get("prompt_format") or {}).get("chosen") or rc.prompt_format
                rung = cls(ctx, rc.model_copy(update={"k": k, "k_curve": None, "prompt_format": chosen}),
                           rdir / f"k-{k}")
                rung.name = name
                with _closing(rung, ctx, None):
                    rung.prepare()
                    preds, _ = rung.predict()
            sc = task.score(golds, [p["pred"] for p in preds])[primary]
            points.append({"k": k, "fraction": k / k_full, "n_train": k, "score": sc["value"], "ci": sc["ci"],
                           "per_example": task.paired_data(golds, [p["pred"] for p in preds], primary)})
        return points
    fractions = rc.learning_curve
    points = []
    for f in fractions:
        if f >= 1.0:
            points.append({"fraction": 1.0, "n_train": len(ctx.data.train), "score": full_score["value"],
                           "ci": full_score["ci"],
                           "per_example": task.paired_data(golds, [p["pred"] for p in full_preds], primary)})
            continue
        sub = copy.copy(ctx)
        sub.data = copy.copy(ctx.data)
        sub.data.train = curve_subset(ctx.data.train, f, cfg.seed)
        base_fp = ctx.fingerprint

        def fingerprint(rung, training=False, _f=f, _base=base_fp):  # this subset's weights are its own
            return hashlib.sha256(f"{_base(rung, training)}:curve:{_f}".encode()).hexdigest()[:16]

        sub.fingerprint = fingerprint
        if parent:
            ctx.push_base(parent)
            sub._model = ctx._model
        rung = cls(sub, cfg.rung_config(name), rdir / f"curve-{f:g}")
        rung.name = name
        log.info("%s: learning curve, %d of %d train examples (%.0f%%)", name, len(sub.data.train),
                 len(ctx.data.train), 100 * f)
        # (without a parent, a rung may hand the restored base back via set_base on sub)
        with Meter() as m, _closing(rung, ctx, parent, lambda: setattr(ctx, "_model", sub._model)):
            rung.prepare()
            rung.fit()
            preds, _ = rung.predict()
        sc = task.score(golds, [p["pred"] for p in preds])[primary]
        points.append({"fraction": f, "n_train": len(sub.data.train), "score": sc["value"], "ci": sc["ci"],
                       "seconds": round(m.seconds, 1),
                       "per_example": task.paired_data(golds, [p["pred"] for p in preds], primary)})
        log.info("%s: learning curve at %.0f%%: %s %.3f [%.3f, %.3f]", name, 100 * f, primary, sc["value"], *sc["ci"])
    return points


@contextlib.contextmanager
def _closing(rung, ctx: "Context", parent: str | None, restore=None):
    """Run a rung's steps, then always close it and hand the shared base back: pop the
    ``from:`` parent's model, else call ``restore``. When a step failed, that failure is
    the one the user sees: an error in close() is then logged, not raised over it."""
    failed = True
    try:
        yield rung
        failed = False
    finally:
        try:
            rung.close()
        except Exception:
            if not failed:
                raise
            log.warning("%s: cleaning up after the failure also failed", getattr(rung, "name", "rung"),
                        exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            if parent:
                ctx.pop_base()
            elif restore is not None:
                restore()


def _prior_one_time(out_dir: Path, names: list[str]) -> float:
    """One-time seconds of finished rungs this one builds on (its ``from:`` parent and
    ``after:`` dependencies), read from their result.json."""
    total = 0.0
    for n in names:
        p = out_dir / "rungs" / n / "result.json"
        if p.is_file():
            c = json.loads(p.read_text()).get("cost", {})
            total += float(c.get("one_time_s", c.get("train_seconds", 0.0)) or 0.0)
    return total


def _run_rung(ctx: "Context", name: str, force: bool, main: bool, multi: bool, Meter) -> None:
    from lmladder.inference import judge as judge_mod

    cfg, dataset, task, out_dir = ctx.cfg, ctx.data, ctx.task, ctx.run_dir
    cls = rung_class(name)
    parent = parent_of(cfg, name)
    rdir = out_dir / "rungs" / name
    fp = ctx.fingerprint(name)
    done = rdir / "result.json"
    skip = _skip_decision(done, fp, force, name) if main else None
    if distributed.broadcast(skip):  # rank 0 decides for everyone
        return
    if not main and not cls.trains:
        # inference rungs run on rank 0 only; wait for it (see docs/distributed.md)
        distributed.barrier()
        return
    if main:
        # a finished result.json stays until its replacement is written (atomically)
        rdir.mkdir(parents=True, exist_ok=True)
    if cls.uses_base or parent:
        ctx.base()  # load outside the rung's meter: the model is shared by all rungs
    if parent:
        ctx.push_base(parent)  # the parent rung's output model is this rung's base
    rung = cls(ctx, cfg.rung_config(name), rdir)
    rung.name = name  # a named copy (lora@cpt) fingerprints and logs as itself
    log.info("%s: %s", name, cls.summary)
    with _closing(rung, ctx, parent), Meter() as total:
        with Meter() as prep_m:
            rung.prepare()  # prompts, shots, index build, teacher labels, format choice
        with Meter() as fit_m:
            fit_stats = rung.fit() if cls.trains else {}  # every rank trains
        with Meter() as pred_m:
            preds, pinfo = rung.predict() if main else (None, None)
        trainable = rung.trainable_params()
    if not main:
        distributed.barrier()  # rank 0 evaluates and writes this rung
        return
    golds = [task.gold(e) for e in dataset.test]
    scores = task.score(golds, [p["pred"] for p in preds])
    primary = cfg.primary_metric
    details = {**pinfo, **fit_stats}
    # responses generated for the win rate are evaluation overhead, not the rung's cost
    pred_s = pred_m.seconds - details.pop("response_seconds", 0.0)
    # one-time work a rung does inside predict (prompt search on its dev split)
    search_s = float(details.pop("one_time_seconds", 0.0) or 0.0)
    pred_s -= search_s
    wr = judge_mod.win_rate(ctx, name, parent, preds, rdir)  # preference: vs the starting model
    if wr:
        scores = {**scores, **wr[0]}
        details["judge"] = wr[1]
    own = details.get("model")  # a rung with its own model (encoder): shares relative to it
    n_params = (own if isinstance(own, dict) else ctx.model_info).get("parameters") or 1
    forgetting_s = float(details.pop("forgetting_seconds", 0.0) or 0.0)
    fit_s = fit_m.seconds - forgetting_s
    if details.get("reused_adapter") and details.get("original_train_seconds") is not None:
        fit_s = float(details["original_train_seconds"])  # the weights' real cost, not their load time
    train_s = round(fit_s, 2) if cls.trains else 0.0
    deps = [d for d in cls.after(cfg, name) if d in cfg.rungs and d != name]
    prior = _prior_one_time(out_dir, ([parent] if parent else []) + deps)
    one_time = round(prep_m.seconds + (fit_s if cls.trains else 0.0) + search_s + prior, 2)
    rank = cls.cost_rank
    if parent:  # stacked: its cost includes the parent's training
        prev = json.loads((out_dir / "rungs" / parent / "result.json").read_text())
        details["from"] = {"rung": parent, "train_seconds": prev["cost"]["train_seconds"],
                           "own_train_seconds": train_s}
        train_s = round(train_s + prev["cost"]["train_seconds"], 2)
        rank = max(rank, prev["rank"]) + cls.cost_rank / 100
    for d in deps:  # e.g. grpo's reward model: it ranks at least as dear as what it reads
        p = out_dir / "rungs" / d / "result.json"
        if p.is_file():
            rank = max(rank, json.loads(p.read_text())["rank"] + cls.cost_rank / 100)
    curve = None
    rc_ = cfg.rung_config(name)
    if getattr(rc_, "learning_curve", None) or getattr(rc_, "k_curve", None):
        if multi:
            log.warning("%s: learning_curve is measured in single-process runs only; skipped", name)
        else:
            curve = _learning_curve(ctx, name, cls, parent, rdir, golds, scores[primary], preds, Meter, details)
    n_test = len(dataset.test)
    rows = [
        {"id": e.id, "source": e.source, "input": e.input, "gold": g, **p,
         "correct": bool(task.correct(p["pred"], g))}
        for e, g, p in zip(dataset.test, golds, preds)
    ]
    atomic_write_jsonl(rdir / "predictions.jsonl", rows)
    by_group = _group_scores(task, dataset.test, golds, preds)
    ptok = pinfo.get("prompt_tokens_per_example", 0.0)
    gtok = pinfo.get("generated_tokens_per_example", 0.0)
    result = {
        "name": name,
        "rank": rank,
        "summary": cls.summary + (f" (from {parent})" if parent else ""),
        "fingerprint": fp,
        "policy": cls.policy,
        "metric": primary,
        "score": scores[primary]["value"],
        "ci": scores[primary]["ci"],
        "metrics": scores,
        "n_test": n_test,
        "per_example": task.paired_data(golds, [p["pred"] for p in preds], primary),
        "cost": {
            "one_time_s": one_time,
            "per_call_s": round(pred_s / n_test, 6) if n_test and pred_s > 0 else 0.0,
            "forgetting_s": round(forgetting_s, 2),
            "prompt_tokens_per_call": round(ptok, 1),
            "generated_tokens_per_call": round(gtok or 0.0, 1),
            "peak_rss_mb": round(total.peak_rss_mb, 1),
            "eval_batch_size": cfg.eval.batch_size if not task.generative else cfg.eval.gen_batch_size,
            "trainable_params": trainable,
            "trainable_share": trainable / n_params,
            "train_seconds": train_s,
            "prepare_seconds": round(prep_m.seconds, 2),
            "prompt_tokens_per_example": round(ptok, 1),
            "eval_seconds": round(pred_s, 2),
            "eval_examples_per_second": round(n_test / pred_s, 2) if pred_s > 0 else None,
        },
        "details": details,
        **({"by_group": by_group} if by_group else {}),
        **({"learning_curve": curve} if curve else {}),
        "artifacts": rung.artifacts(),
        "model": ctx.model_info,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(done, result)
    (rdir / "failed.json").unlink(missing_ok=True)  # this fingerprint finished after all
    log.info(
        "%s: %s %.3f [%.3f, %.3f]", name, primary, result["score"], *result["ci"]
    )
    if multi:
        distributed.barrier()
