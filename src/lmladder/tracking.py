"""Experiment tracking: TensorBoard, MLflow, Weights & Biases (``--report-to``).

What is logged, through transformers' own integrations (``TensorBoardCallback``,
``MLflowCallback``, ``WandbCallback``: ``report_to`` on every Trainer a rung creates):

* **each rung's training** as its own run, named by the rung (``lora``; a learning-curve
  subset ``lora/curve-0.25``): loss, learning rate, dev loss, TRL's rewards / margins, ...;
* **the results, once per ``lmladder run``** (:func:`log_results`, at the end of
  ``ladder.run``): every rung's score, 95% interval and costs, and the verdict (recommended
  rung and the reason). TensorBoard: scalars ``final/<metric>``, ``final/ci_low``,
  ``final/ci_high``, ``cost/<field>`` in each rung's folder and the verdict as text in
  ``ladder/``; MLflow and W&B: one run named ``ladder`` with ``<rung>/<metric>``, ...

Where (``tracking.dir``, default ``<out>/tracking``), unless the environment says otherwise:
``tensorboard/<rung>/`` (``TENSORBOARD_LOGGING_DIR`` is taken as the base folder instead),
the MLflow file store ``mlruns/`` (``MLFLOW_TRACKING_URI`` wins; the experiment is
``tracking.experiment``, default the run folder's name, unless ``MLFLOW_EXPERIMENT_NAME``),
``wandb/`` (``WANDB_DIR``; project ``WANDB_PROJECT`` or ``lmladder``, group
``WANDB_RUN_GROUP`` or the experiment; ``WANDB_MODE=offline`` is honoured by wandb).

Tracking never changes results: it is not part of any rung's fingerprint, and a failure
while logging the results is a warning, never a lost run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmladder.errors import LadderError

log = logging.getLogger(__name__)

# backend -> (module it needs, pip package that provides it)
BACKENDS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}


def check(report_to: list[str]) -> None:
    """Every requested backend's package is importable, else one ``LadderError`` (exit 2)
    naming the pip package to install."""
    for b in report_to:
        if b not in BACKENDS:
            raise LadderError(f"--report-to {b}: unknown backend (known: {', '.join(BACKENDS)})")
        module, package = BACKENDS[b]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise LadderError(
                f"--report-to {b}: the {module} package is not installed; "
                f"pip install {package} (or lmladder[tracking])"
            )


@dataclass
class Session:
    """Tracking settings of the ``ladder.run`` in progress."""

    backends: list[str]
    out_dir: Path
    base: Path  # tracking.dir
    experiment: str

    def tensorboard_dir(self) -> Path:
        env = os.environ.get("TENSORBOARD_LOGGING_DIR")
        return Path(env).expanduser() if env else self.base / "tensorboard"

    def mlflow_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or (self.base / "mlruns").resolve().as_uri()


_session: Session | None = None


def start(cfg, out_dir: Path) -> Session | None:
    """Check the backends' packages and make ``cfg.tracking`` the settings every Trainer of
    this run reads (none: tracking off). Called by ``ladder.run`` before any work."""
    global _session
    t = cfg.tracking
    check(t.report_to)
    out_dir = Path(out_dir).resolve()
    if not t.report_to:
        _session = None
        return None
    base = Path(t.dir).expanduser() if t.dir else out_dir / "tracking"
    _session = Session(list(t.report_to), out_dir, base.resolve(), t.experiment or out_dir.name)
    return _session


def stop() -> None:
    global _session
    _session = None


def active() -> Session | None:
    return _session


def label(output_dir, fallback: str | None = None) -> str | None:
    """The rung a Trainer writing to ``output_dir`` trains, from its folder under ``rungs/``
    with checkpoints and scratch folders left out: ``rungs/lora/checkpoints`` -> ``lora``;
    ``rungs/lora/curve-0.25/.trainer`` -> ``lora/curve-0.25``; else ``fallback``."""
    if output_dir is None:
        return fallback
    parts = Path(output_dir).resolve().parts
    if "rungs" not in parts:
        return fallback
    i = len(parts) - 1 - parts[::-1].index("rungs")
    keep = []
    for part in parts[i + 1:]:
        if part.startswith(".") or part == "checkpoints":
            break
        keep.append(part)
    return "/".join(keep) or fallback


def run_name(output_dir, fallback: str | None = None) -> str | None:
    """The tracked run a Trainer writing to ``output_dir`` belongs to (:func:`label`), or
    None: not tracked. Only trainers inside the active run's folder are (on rank 0)."""
    s = _session
    if s is None or output_dir is None:
        return None
    from lmladder.run.distributed import is_main

    if not is_main():
        return None
    try:
        Path(output_dir).resolve().relative_to(s.out_dir)
    except ValueError:
        return None
    return label(output_dir, fallback) or "train"


def trainer_args(run: str | None) -> dict[str, Any]:
    """``TrainingArguments`` keywords: ``report_to`` (``"none"`` when not tracked) and
    ``run_name``."""
    s = _session
    if run is None or s is None:
        return {"report_to": "none"}
    return {"report_to": list(s.backends), "run_name": run}


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]):
    """Set environment variables the user has not set, for the block only."""
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _env_for(s: Session) -> dict[str, str]:
    env: dict[str, str] = {}
    if "mlflow" in s.backends:
        uri = s.mlflow_uri()
        if uri.startswith("file:") or "://" not in uri:  # MLflow 3 wants an explicit opt-in for files
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "wandb" in s.backends:
        env.update(WANDB_PROJECT="lmladder", WANDB_RUN_GROUP=s.experiment, WANDB_DIR=str(s.base))
        s.base.mkdir(parents=True, exist_ok=True)
    return env


def _mlflow_setup(s: Session):
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # it configures its own INFO chatter on import

    mlflow.set_tracking_uri(s.mlflow_uri())
    if not os.environ.get("MLFLOW_EXPERIMENT_NAME"):  # else MLflowCallback sets the user's
        mlflow.set_experiment(s.experiment)
    return mlflow


@contextlib.contextmanager
def training(trainer, run: str | None):
    """Around ``trainer.train()``: point transformers' integrations at this run's folders
    (TensorBoard ``<dir>/tensorboard/<run>``, the MLflow store and experiment, W&B project /
    group / dir), tag the MLflow run, and close every backend's run afterwards (a W&B run
    would otherwise swallow the next rung; a failed training's MLflow run is ended FAILED)."""
    s = _session
    if run is None or s is None:
        yield
        return
    with _env_defaults(_env_for(s)):
        if "tensorboard" in s.backends:
            from transformers.integrations import TensorBoardCallback

            for cb in trainer.callback_handler.callbacks:
                if isinstance(cb, TensorBoardCallback) and cb.tb_writer is None:
                    cb.logging_dir = str(s.tensorboard_dir() / run)
        mlflow = outer = None
        if "mlflow" in s.backends:
            mlflow = _mlflow_setup(s)
            outer = mlflow.active_run()  # the caller's own run (MLflowCallback logs into it): left open
            trainer.add_callback(_mlflow_tags(run, s, outer.info.run_id if outer else None))
        ok = False
        try:
            yield
            ok = True
        finally:
            if "tensorboard" in s.backends:
                from transformers.integrations import TensorBoardCallback

                for cb in trainer.callback_handler.callbacks:
                    if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                        cb.tb_writer.close()
                        cb.tb_writer = None
            active = mlflow.active_run() if mlflow is not None else None
            if active is not None and (outer is None or active.info.run_id != outer.info.run_id):
                with contextlib.suppress(Exception):
                    mlflow.end_run(status="FINISHED" if ok else "FAILED")
            if "wandb" in s.backends:
                with contextlib.suppress(Exception):
                    import wandb

                    if wandb.run is not None:
                        wandb.finish(exit_code=0 if ok else 1)


def _mlflow_tags(run: str, s: Session, outer_id: str | None):
    from transformers import TrainerCallback

    class MlflowTags(TrainerCallback):
        """After MLflowCallback has started the run: say which lmladder run and rung it is."""

        def on_train_begin(self, args, state, control, **kw):
            import mlflow

            active = mlflow.active_run()
            if state.is_world_process_zero and active is not None and active.info.run_id != outer_id:
                with contextlib.suppress(Exception):
                    mlflow.set_tags({"lmladder.rung": run, "lmladder.run_dir": str(s.out_dir)})

    return MlflowTags()


# --------------------------------------------------------------------------- results


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if v == v and abs(v) != float("inf") else None


def result_rows(results: dict) -> list[dict[str, Any]]:
    """Per finished rung (and the majority baseline): name, score, ci, cost fields."""
    rows = []
    for r in results.get("rungs") or []:
        rows.append(r)
    b = results.get("baseline")
    if isinstance(b, dict) and b.get("name") and _num(b.get("score")) is not None:
        rows.append({**b, "baseline": True})
    out = []
    for r in rows:
        ci = r.get("ci") or [None, None]
        row = {"rung": r["name"], "score": _num(r.get("score")), "ci_low": _num(ci[0]), "ci_high": _num(ci[1])}
        pr = r.get("paired")
        if isinstance(pr, dict) and _num(pr.get("diff")) is not None:
            row["paired_diff"] = _num(pr["diff"])
        cost = {k: _num(v) for k, v in (r.get("cost") or {}).items()}
        row["cost"] = {k: v for k, v in cost.items() if v is not None}
        out.append(row)
    return out


def _flat_metrics(results: dict) -> dict[str, float]:
    metric = results.get("metric", "score")
    flat: dict[str, float] = {}
    for row in result_rows(results):
        p = row["rung"]
        for key, name in (("score", metric), ("ci_low", f"{metric}_ci_low"), ("ci_high", f"{metric}_ci_high"),
                          ("paired_diff", "paired_diff")):
            if row.get(key) is not None:
                flat[f"{p}/{name}"] = row[key]
        for k, v in row["cost"].items():
            flat[f"{p}/cost/{k}"] = v
    return flat


def _verdict(results: dict) -> tuple[str, str]:
    """(recommended rung, or "none"; the reason)."""
    rec = results.get("recommendation") or {}
    return str(rec.get("rung") or "none"), str(rec.get("reason") or "")


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _table_md(results: dict) -> str:
    metric = results.get("metric", "score")
    lines = [f"| rung | {metric} | 95% CI | one-time s | per call ms | total USD |", "|---|---|---|---|---|---|"]
    for row in result_rows(results):
        c = row["cost"]
        ci = f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if row["ci_low"] is not None else ""
        per = c.get("per_call_s")
        lines.append(f"| {row['rung']} | {_fmt(row['score'], '.3f')} | {ci} | {_fmt(c.get('one_time_s'), '.0f')} | "
                     f"{_fmt(None if per is None else 1000 * per, '.1f')} | {_fmt(c.get('total_usd'), '.4g')} |")
    return "\n".join(lines)


def _log_tensorboard(s: Session, results: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    metric = results.get("metric", "score")
    root = s.tensorboard_dir()
    for row in result_rows(results):
        w = SummaryWriter(log_dir=str(root / row["rung"]))
        try:
            if row["score"] is not None:
                w.add_scalar(f"final/{metric}", row["score"], 0)
            for key in ("ci_low", "ci_high", "paired_diff"):
                if row.get(key) is not None:
                    w.add_scalar(f"final/{key}", row[key], 0)
            for k, v in row["cost"].items():
                w.add_scalar(f"cost/{k}", v, 0)
        finally:
            w.close()
    rung, reason = _verdict(results)
    w = SummaryWriter(log_dir=str(root / "ladder"))
    try:
        w.add_text("verdict", f"**recommended: {rung}**  \n{reason}", 0)
        w.add_text("results", _table_md(results), 0)
    finally:
        w.close()


def _sanitize(k: str) -> str:  # MLflow's accepted metric / param name characters
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", k)


def _log_mlflow(s: Session, results: dict, out_dir: Path) -> None:
    mlflow = _mlflow_setup(s)
    rung, reason = _verdict(results)
    rec = results.get("recommendation") or {}
    with mlflow.start_run(run_name="ladder", nested=mlflow.active_run() is not None):
        mlflow.set_tags({"lmladder.rung": "ladder", "lmladder.run_dir": str(s.out_dir),
                         "lmladder.recommended": rung, "mlflow.note.content": reason[:5000]})
        params = {"metric": results.get("metric"), "recommended_rung": rung,
                  "meets_target": rec.get("meets_target"), "target": results.get("target"),
                  "decision_rule": results.get("rule") or results.get("decision_rule"),
                  "reason": reason[:500]}
        mlflow.log_params({k: str(v) for k, v in params.items() if v is not None})
        mlflow.log_metrics({_sanitize(k): v for k, v in _flat_metrics(results).items()}, step=0)
        for name in ("results.json", "report.md"):
            if (out_dir / name).is_file():
                with contextlib.suppress(Exception):
                    mlflow.log_artifact(str(out_dir / name))


def _log_wandb(s: Session, results: dict) -> None:
    import wandb

    rung, reason = _verdict(results)
    metric = results.get("metric", "score")
    if wandb.run is not None:
        wandb.finish()
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmladder"), name="ladder", job_type="results",
                     group=os.environ.get("WANDB_RUN_GROUP", s.experiment), dir=os.environ.get("WANDB_DIR", str(s.base)),
                     config={"metric": metric, "recommended_rung": rung, "reason": reason})
    try:
        run.summary.update({**_flat_metrics(results), "recommended_rung": rung, "reason": reason})
        rows = result_rows(results)
        table = wandb.Table(columns=["rung", metric, "ci_low", "ci_high", "one_time_s", "per_call_s", "total_usd"],
                            data=[[r["rung"], r["score"], r["ci_low"], r["ci_high"], r["cost"].get("one_time_s"),
                                   r["cost"].get("per_call_s"), r["cost"].get("total_usd")] for r in rows])
        run.log({"results": table})
    finally:
        run.finish()


def log_results(cfg, out_dir, results: dict | None) -> None:
    """Log every rung's final metrics (score, CI, costs) and the verdict once, through each
    backend of ``cfg.tracking.report_to``; called by ``ladder.run`` after the report is
    built (``results`` None off rank 0: nothing). Never raises: a backend that fails logs
    a warning and the run's results stay as written."""
    try:
        s = _session
        if results is None or not cfg.tracking.report_to:
            return
        if s is None:  # called outside ladder.run
            s = start(cfg, Path(out_dir))
        out_dir = Path(out_dir)
        with _env_defaults(_env_for(s)):
            for b in s.backends:
                try:
                    {"tensorboard": lambda: _log_tensorboard(s, results),
                     "mlflow": lambda: _log_mlflow(s, results, out_dir),
                     "wandb": lambda: _log_wandb(s, results)}[b]()
                except Exception as e:  # noqa: BLE001 - tracking must never lose a run
                    log.warning("tracking: %s: could not log the results (%s: %s); they are in %s",
                                b, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", out_dir)
        where = ", ".join(_where(s, b) for b in s.backends)
        log.info("tracking: results logged to %s", where)
    except Exception as e:  # noqa: BLE001
        log.warning("tracking: could not log the results (%s: %s)", type(e).__name__, e)
    finally:
        stop()


def _where(s: Session, backend: str) -> str:
    if backend == "tensorboard":
        return f"tensorboard ({s.tensorboard_dir()})"
    if backend == "mlflow":
        return f"mlflow ({s.mlflow_uri()}, experiment {os.environ.get('MLFLOW_EXPERIMENT_NAME') or s.experiment})"
    return f"wandb ({os.environ.get('WANDB_MODE', 'online')}, group {s.experiment})"
