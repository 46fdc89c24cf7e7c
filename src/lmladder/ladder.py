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

log = logging.getLogger(__name__)


def _file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rung_class(name: str):
    """The rung class behind a rung name (``lora@cpt``, a named copy, is a ``lora``)."""
    from lmladder import rungs as rung_mod

    return rung_mod.get(name.partition("@")[0])


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
    from lmladder import rungs as rung_mod

    for r in cfg.rungs:
        p = parent_of(cfg, r)
        if p is None:
            continue
        if p == r:
            raise LadderError(f"{r}.from: a rung cannot start from itself")
        if p not in cfg.rungs:
            raise LadderError(f"{r}.from: '{p}' is not in rungs ({', '.join(cfg.rungs)}); add it to rungs")
        if not (rung_class(p).output_model or rung_class(p).mergeable):
            makers = [n for n, c in rung_mod.RUNGS.items() if c.output_model or c.mergeable]
            raise LadderError(
                f"{r}.from: rung '{p}' does not produce a model to start from (rungs that do: {', '.join(makers)})"
            )
        chain = [r]
        while p is not None:
            if p in chain:
                raise LadderError(f"{r}.from: a cycle of from: ({' -> '.join(chain + [p])})")
            chain.append(p)
            p = parent_of(cfg, p)


class Context:
    """What rungs share: config, data, task, and the base model (loaded once, lazily)."""

    def __init__(self, cfg: RunConfig, dataset, task, run_dir: Path):
        self.cfg, self.data, self.task, self.run_dir = cfg, dataset, task, run_dir
        self._model = self._tok = self._fmt = None
        self.model_info: dict[str, Any] = {}
        self._digests = {
            "train": _file_digest(cfg.data.train),
            "test": _file_digest(cfg.data.test),
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

    def fmt(self):
        if self._fmt is None:
            from lmladder.prompts import ChatFormat

            _, tok = self.base()
            self._fmt = ChatFormat(tok, self.cfg.task.system_prompt)
        return self._fmt

    def fingerprint(self, rung: str, training: bool = False) -> str:
        """What a rung's result depends on (a change reruns it). ``training=True``: what its
        trained weights depend on (saved weights and checkpoints are reused across changes
        of the evaluation-only settings, ``eval:`` and ``judge:``)."""
        cfg = self.cfg
        payload = {
            "model": cfg.model,
            "task": cfg.task.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json", exclude={"train", "test"}),
            "digests": self._digests,
            "seed": cfg.seed,
            "rung": rung,
            "rung_config": cfg.rung_config(rung).model_dump(mode="json"),
        }
        if not training:
            payload["eval"] = cfg.eval.model_dump(mode="json")
            if cfg.task.kind == "preference":  # responses / win rate depend on the judge settings
                payload["judge"] = cfg.judge.model_dump(mode="json")
        from lmladder.engine import openai_backend

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


def validate(cfg: RunConfig):
    """Every check that needs no model: rungs, metric, data. Raises LadderError."""
    from lmladder import rungs as rung_mod
    from lmladder.tasks import KINDS

    if not cfg.rungs:
        raise LadderError("no rungs to run (--rungs zero-shot,few-shot,lora)")
    for r in cfg.rungs:
        if "@" in r and r.partition("@")[0] in rung_mod.RUNGS and r not in cfg.copies:
            raise LadderError(f"rung '{r}' is a named copy: give its changes in copies.{r}, e.g. from: ...")
        if r.partition("@")[0] not in rung_mod.RUNGS:
            import difflib

            hint = difflib.get_close_matches(r, list(rung_mod.RUNGS), n=1)
            raise LadderError(
                f"unknown rung '{r}' (known: {', '.join(rung_mod.RUNGS)})"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
            )
    if len(set(cfg.rungs)) != len(cfg.rungs):
        raise LadderError(f"rung listed twice in rungs: {', '.join(cfg.rungs)}")
    for r in cfg.rungs:
        if cfg.task.kind not in rung_class(r).kinds:
            raise LadderError(f"rung {r} does not support task kind {cfg.task.kind}")
    _check_stacking(cfg)
    from lmladder.engine import openai_backend

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
    from lmladder.engine import sft

    world = sft.dist_env()[1]
    for r in cfg.rungs:  # under N processes the global batch must split evenly
        rc = cfg.rung_config(r)
        if rung_class(r).trains and hasattr(rc, "batch_size") and hasattr(rc, "grad_accum"):
            sft.split_global_batch(rc.batch_size, rc.grad_accum, world)
        if rung_class(r).trains and sft.sharding_requested():
            raise LadderError(sft.SHARDING_ERROR.format(what=" / ".join(sft.sharding_requested())))
    dataset = data_mod.load(cfg.data, cfg.seed, cfg.task.labels, cfg.task.kind)
    for r in cfg.rungs:  # rung-specific checks that need no model (corpus, tools, schema...)
        check = getattr(rung_class(r), "validate", None)
        if check is not None:
            check(cfg, dataset)
    from lmladder import models
    from lmladder.engine import judge as judge_mod

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
    from lmladder import rungs as rung_mod

    d = Path(run_dir)
    if not (d / "config.yaml").is_file():
        raise LadderError(f"{d}: not a run folder (no config.yaml); give a folder written by `lmladder run`")
    cfg = config_mod.build(config_mod.read_yaml(d / "config.yaml"))
    try:
        labels = list(json.loads((d / "data.json").read_text())["labels"])
    except (OSError, ValueError, KeyError):
        labels = list(cfg.task.labels or [])
    rank = {n: c.cost_rank for n, c in rung_mod.RUNGS.items()}
    rdir = d / "rungs"
    done = [p.name for p in rdir.iterdir() if (p / "result.json").is_file()] if rdir.is_dir() else []
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
    from lmladder.engine import sft

    ref = models.resolve(spec)
    if ref.kind not in ("embedded", "gguf"):
        return
    rank, _, local_rank = sft.dist_env()
    if rank == 0:
        models.materialise(ref)
    sft.barrier()
    if local_rank == 0 and rank != 0:
        models.materialise(ref)
    sft.barrier()


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


def run(cfg: RunConfig, out_dir: Path, force: bool = False) -> dict:
    from lmladder import report
    from lmladder.cost import Meter
    from lmladder.engine import sft
    from lmladder.tasks import make_task

    distributed = sft.init_distributed()
    main = sft.is_main()
    if not main:  # one voice: the other ranks log warnings only
        logging.getLogger("lmladder").setLevel(logging.WARNING)
    dataset = validate(cfg)  # before anything is written (every rank validates)
    if distributed:
        _materialise_once(cfg.model)
    task = make_task(cfg.task, dataset.info["labels"], cfg.eval, cfg.seed, dataset)  # + gold/schema checks
    from lmladder.engine import judge as judge_mod

    if judge_mod.enabled(cfg):  # preference: rungs also generate responses for the win rate
        task.judge_cfg = cfg.judge
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", config_mod.dump(cfg))
        atomic_write_json(out_dir / "data.json", dataset.info)
    ctx = Context(cfg, dataset, task, out_dir)

    for name in run_order(cfg):
        cls = rung_class(name)
        parent = parent_of(cfg, name)
        rdir = out_dir / "rungs" / name
        fp = ctx.fingerprint(name)
        done = rdir / "result.json"
        skip = _skip_decision(done, fp, force, name) if main else None
        if sft.broadcast(skip):  # rank 0 decides for everyone
            continue
        if not main and not cls.trains:
            # inference rungs run on rank 0 only; wait for it (see docs/distributed.md)
            sft.barrier()
            continue
        if main:
            if done.is_file():
                done.unlink()
            rdir.mkdir(parents=True, exist_ok=True)
        if cls.uses_base or parent:
            ctx.base()  # load outside the rung's meter: the model is shared by all rungs
        if parent:
            ctx.push_base(parent)  # the parent rung's output model is this rung's base
        rung = cls(ctx, cfg.rung_config(name), rdir)
        rung.name = name  # a named copy (lora@cpt) fingerprints and logs as itself
        log.info("%s: %s", name, cls.summary)
        try:
            with Meter() as total:
                rung.prepare()
                with Meter() as fit_m:
                    fit_stats = rung.fit() if cls.trains else {}  # every rank trains
                with Meter() as pred_m:
                    preds, pinfo = rung.predict() if main else (None, None)
                trainable = rung.trainable_params()
        finally:
            try:
                rung.close()
            finally:
                if parent:
                    ctx.pop_base()
        if not main:
            sft.barrier()  # rank 0 evaluates and writes this rung
            continue
        golds = [task.gold(e) for e in dataset.test]
        scores = task.score(golds, [p["pred"] for p in preds])
        primary = cfg.primary_metric
        details = {**pinfo, **fit_stats}
        # responses generated for the win rate are evaluation overhead, not the rung's cost
        pred_s = pred_m.seconds - details.pop("response_seconds", 0.0)
        wr = judge_mod.win_rate(ctx, name, parent, preds, rdir)  # preference: vs the starting model
        if wr:
            scores = {**scores, **wr[0]}
            details["judge"] = wr[1]
        own = details.get("model")  # a rung with its own model (encoder): shares relative to it
        n_params = (own if isinstance(own, dict) else ctx.model_info).get("parameters") or 1
        train_s = round(fit_m.seconds, 2) if cls.trains else 0.0
        rank = cls.cost_rank
        if parent:  # stacked: its cost includes the parent's training
            prev = json.loads((out_dir / "rungs" / parent / "result.json").read_text())
            details["from"] = {"rung": parent, "train_seconds": prev["cost"]["train_seconds"],
                               "own_train_seconds": train_s}
            train_s = round(train_s + prev["cost"]["train_seconds"], 2)
            rank = max(rank, prev["rank"]) + cls.cost_rank / 100
        n_test = len(dataset.test)
        rows = [
            {"id": e.id, "source": e.source, "input": e.input, "gold": g, **p,
             "correct": bool(task.correct(p["pred"], g))}
            for e, g, p in zip(dataset.test, golds, preds)
        ]
        atomic_write_jsonl(rdir / "predictions.jsonl", rows)
        by_group = _group_scores(task, dataset.test, golds, preds)
        result = {
            "name": name,
            "rank": rank,
            "summary": cls.summary + (f" (from {parent})" if parent else ""),
            "fingerprint": fp,
            "metric": primary,
            "score": scores[primary]["value"],
            "ci": scores[primary]["ci"],
            "metrics": scores,
            "n_test": n_test,
            "cost": {
                "trainable_params": trainable,
                "trainable_share": trainable / n_params,
                "train_seconds": train_s,
                "peak_rss_mb": round(total.peak_rss_mb, 1),
                "prompt_tokens_per_example": round(pinfo["prompt_tokens_per_example"], 1),
                "eval_seconds": round(pred_s, 2),
                "eval_examples_per_second": round(n_test / pred_s, 2) if pred_s > 0 else None,
            },
            "details": details,
            **({"by_group": by_group} if by_group else {}),
            "artifacts": rung.artifacts(),
            "model": ctx.model_info,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(done, result)
        log.info(
            "%s: %s %.3f [%.3f, %.3f]", name, primary, result["score"], *result["ci"]
        )
        if distributed:
            sft.barrier()
    results = report.build(out_dir) if main else None
    results = sft.broadcast(results)
    sft.shutdown_distributed()
    return results
