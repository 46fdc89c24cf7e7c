"""lmladder command line: parse, build a RunConfig, call the ladder / report.

Heavy libraries (torch, transformers, peft) are imported only when a command needs
them, so ``lmladder --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lmladder import __version__
from lmladder.errors import LadderError

log = logging.getLogger("lmladder")

RUN_EPILOG = """\
examples:
  lmladder run examples/sst2.yaml
  lmladder run --train train.jsonl --test test.jsonl --input-field text --label-field label \\
      --rungs zero-shot,few-shot,lora --target accuracy=0.85 --out runs/mine
  lmladder run examples/sst2.yaml --limit-test 50 --set few-shot.k=4 --set lora.epochs=2
  lmladder run --task math --train gsm8k.jsonl --input-field question --label-field answer \\
      --rungs zero-shot,few-shot,cot
  lmladder run --task qa --train questions.jsonl --input-field question --label-field answers \\
      --corpus passages.jsonl --rungs zero-shot,rag
  lmladder run --task extraction --train ner.jsonl --input-field tokens --label-field tags \\
      --schema entities.schema.json --rungs zero-shot,constrained
  (task kinds and their metrics: docs/tasks.md)

--set takes any config key (dotted, hyphens or underscores), e.g.:
{keys}

Model (--model): a Hugging Face id (e.g. Qwen/Qwen2.5-0.5B-Instruct), a local HF
folder, a .gguf file, or the embedded default smollm2-135m (works offline).
Rerunning into the same --out skips rungs already finished with the same settings.
"""


TRUST_HELP = ("import Python code the run folder's config names (task.metric_fn, tools, teachers); "
              "off by default: a run folder may come from anyone")


def _set_keys_help() -> str:
    from lmladder.config import describe_fields

    rows = [r for r in describe_fields() if r[0] not in ("task.kind",)]
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"  {k:<{width}}  {d} (default: {v})" for k, d, v in rows)


def _path(flag, v):
    return v if str(v).startswith("hf:") else os.path.abspath(v)


def _listed(flag, v):
    return [x.strip() for x in v.split(",") if x.strip()]


def _schema(flag, v):  # a file, or field names: --schema name,date,amount
    is_file = os.path.exists(v) or v.endswith(".json") or os.sep in v
    return os.path.abspath(v) if is_file else _listed(flag, v)


def _target(flag, v):
    if "=" not in v:
        raise LadderError(f"{flag} {v}: expected METRIC=VALUE, e.g. accuracy=0.85")
    m, x = v.split("=", 1)
    try:
        return {m.strip(): float(x)}
    except ValueError:
        raise LadderError(f"{flag} {v}: '{x}' is not a number") from None


_READ = {"path": _path, "list": _listed, "schema": _schema, "target": _target}

# Every `lmladder run` flag that sets a config key: (flag, key, argparse options, how the
# value is read). The help text is the key's Field description (config.describe_fields),
# so --help, --set and the docs never drift apart.
RUN_FLAGS = [
    ("--train", "data.train", {}, "path"),
    ("--test", "data.test", {}, "path"),
    ("--task", "task.kind", {"metavar": "KIND"}, None),
    ("--input-field", "data.input_field", {}, None),
    ("--label-field", "data.label_field", {}, None),
    ("--choices-field", "data.choices_field", {}, None),
    ("--schema", "task.schema", {"metavar": "FILE|FIELDS"}, "schema"),
    ("--metric-fn", "task.metric_fn", {"metavar": "MODULE:FUNC"}, None),
    ("--metric", "task.metric", {}, None),
    ("--corpus", "rag.corpus", {"metavar": "FILE"}, "path"),
    ("--labels", "task.labels", {"metavar": "A,B,..."}, "list"),
    ("--instruction", "task.instruction", {}, None),
    ("--target", "task.target", {"metavar": "METRIC=VALUE"}, "target"),
    ("--rungs", "rungs", {"metavar": "A,B,..."}, "list"),
    ("--model", "model", {}, None),
    ("--models", "models", {"metavar": "A,B,..."}, "list"),
    ("--limit-train", "data.limit_train", {"type": int, "metavar": "N"}, None),
    ("--limit-test", "data.limit_test", {"type": int, "metavar": "N"}, None),
    ("--seed", "seed", {"type": int}, None),
    ("--out", "out", {}, None),
    ("--calls", "cost.calls", {"type": int, "metavar": "N"}, None),
    ("--until-target", "ladder.stop_at_target", {"action": "store_true"}, None),
    ("--report-to", "tracking.report_to", {"metavar": "A,B"}, "list"),
]


def add_run_flags(r) -> None:
    from lmladder.config import describe_fields

    about = {k: (d, v) for k, d, v in describe_fields()}
    for flag, key, opts, _ in RUN_FLAGS:
        desc, default = about[key]
        shown = "" if default in (None, False, [], {}) else f" (default: {default})"
        r.add_argument(flag, help=f"{key}: {desc}{shown}".replace("%", "%%"), **opts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmladder",
        description="Climb the adaptation ladder on your task (zero-shot -> few-shot -> LoRA) "
        "and get the cheapest rung that meets your target, with evidence.",
    )
    p.add_argument("--version", action="version", version=f"lmladder {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run the ladder and write a report",
        description="Run the rungs on one held-out split and recommend the cheapest that meets the target.",
        epilog=RUN_EPILOG.format(keys=_set_keys_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("config", nargs="?", help="YAML config (paths inside are relative to it)")
    add_run_flags(r)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    r.add_argument("--force", action="store_true", help="rerun rungs even if finished")
    r.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")

    rep = sub.add_parser("report", help="rebuild results.json / report.md / report.html from a run folder")
    rep.add_argument("run_dir", help="run folder written by `lmladder run`")
    rep.add_argument("--calls", type=int, metavar="N", help="expected calls over the deployment (default: the run's cost.calls)")
    rep.add_argument("--trust-run-code", action="store_true", help=TRUST_HELP)

    # export / serve own their flags (lmladder/export/cli.py, lmladder/serving/cli.py: add_arguments + main);
    # those modules import heavy libraries only inside main().
    from lmladder import export
    from lmladder.serving import cli as serve

    export.add_arguments(
        sub.add_parser("export", help="export a rung as adapter, merged model or GGUF", description=export.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    serve.add_arguments(
        sub.add_parser("serve", help="OpenAI-compatible server for a run's base model + adapters", description=serve.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    return p


def _config_from_args(a):
    """YAML (if given), then the flags (RUN_FLAGS), then every --set, validated into a RunConfig."""
    from lmladder import config as C

    raw: dict = C.read_yaml(a.config) if a.config else {}
    for flag, key, _, read in RUN_FLAGS:
        value = getattr(a, flag.lstrip("-").replace("-", "_"))
        if value is None or value is False:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = _READ[read](flag, value) if read else value
    for s in a.set:
        C.apply_set(raw, s)
    return C.build(raw)


def _short(x: float, sign: bool = False) -> str:
    """0.812 -> .812, -0.030 -> -.030, (sign) +0.043 -> +.043; |x| >= 1 as it is."""
    t = f"{x:+.3f}" if sign else f"{x:.3f}"
    if t.startswith("0."):
        return t[1:]
    return t[0] + t[2:] if t[:3] in ("-0.", "+0.") else t


def _summary_table(results: dict, width: int):
    """(table, legend): the summary table at most ``width`` columns wide, no cell wrapped:
    score with its 95% interval, the paired difference vs the recommended rung (p),
    one-time seconds, ms per call, total USD at the run's call volume; the last columns
    give way first when the rung names are long (report.md has every column)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from lmladder.report import with_baseline
    from lmladder.verdict import fmt_usd

    metric, rec = results["metric"], results["recommendation"]
    ref = rec.get("rung") or rec.get("best")
    rows = []
    for r in with_baseline(results):
        c, pr = r["cost"], r.get("paired")
        mark = " *" if r["name"] == rec.get("rung") else " (base)" if r.get("baseline") else ""
        vs = "" if r["name"] == ref or not pr else _short(pr["diff"], sign=True) + (
            "" if pr.get("p") is None else " p<.001" if pr["p"] < 0.001 else f" p={_short(pr['p'])}")
        per = c.get("per_call_s")
        rows.append({
            "rung": r["name"] + mark,
            "score [95% CI]": f"{r['score']:.3f} [{_short(r['ci'][0])},{_short(r['ci'][1])}]",
            "vs rec.": vs,
            "1-time s": f"{c.get('one_time_s', c.get('train_seconds', 0)) or 0:.0f}",
            "ms/call": "-" if not per else f"{1000 * per:.1f}",
            "USD total": "" if c.get("total_usd") is None else fmt_usd(c["total_usd"]),
        })
    cols = list(rows[0]) if rows else []
    if not any(r["USD total"] for r in rows):
        cols.remove("USD total")
    if not ref or not any(r["vs rec."] for r in rows):
        cols.remove("vs rec.")
    calls = next((r["cost"].get("calls") for r in results["rungs"] if r["cost"].get("calls")), None)
    title = f"lmladder: {metric} on {results['data'].get('test_used')} test examples"
    probe = Console(width=1000)
    while True:
        t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
        for h in cols:
            t.add_column(h, justify="left" if h == "rung" else "right", no_wrap=True)
        for r in rows:
            t.add_row(*(r[h] for h in cols))
        if probe.measure(t).maximum <= width or len(cols) <= 2:
            legend = ["* recommended"] + (["vs rec.: paired difference"] if "vs rec." in cols else []) + (
                [f"USD at {calls:,} calls"] if calls and "USD total" in cols else [])
            return t, "; ".join(legend)
        # drop the least needed column first; the full table is in report.md
        for h in ("ms/call", "1-time s", "vs rec.", "USD total"):
            if h in cols:
                cols.remove(h)
                break


def _summary(results: dict, out: Path, console=None) -> None:
    from rich.console import Console

    con = console or Console()
    rec = results["recommendation"]
    shown = results
    if results.get("grid"):  # several models: rows named by their (model/rung) cell
        from lmladder.grid_report import display

        shown = display(results)
    if results["rungs"]:
        table, legend = _summary_table(shown, min(con.width, 80))
        con.print(table)
        con.print(legend, style="dim", highlight=False)
    what = rec.get("rung") if not results.get("grid") or not rec.get("rung") else f"{rec['rung']} on {rec['model']}"
    con.print(f"[bold]Recommendation:[/bold] {what} — {rec['reason']}")
    con.print(f"Report: {out / 'report.html'}  (also report.md, results.json)")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="lmladder: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "peft", "accelerate", "httpx", "urllib3", "matplotlib", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_run(a) -> int:
    _setup_logging(a.quiet)
    cfg = _config_from_args(a)
    from lmladder.run import ladder

    from lmladder.run.folder import default_out

    out = (Path(cfg.out) if cfg.out else default_out(a.config)).expanduser().resolve()
    cfg = cfg.model_copy(update={"out": str(out)})  # the snapshot (config.yaml) names where it is
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        from lmladder import progress

        if not progress.on_terminal():  # its load / save bars would print raw \r frames in a log
            transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if cfg.models and len(cfg.models) > 1:  # several models: a grid of sub-runs, one verdict (run/grid.py)
        from lmladder.run import grid

        results = grid.run_grid(cfg, out, force=a.force)
    else:
        results = ladder.run(cfg, out, force=a.force)
    from lmladder.run.distributed import is_main

    if is_main():  # under torchrun, one summary
        _summary(results, out)
    return 0


def cmd_report(a) -> int:
    from lmladder import grid_report, report

    out = Path(a.run_dir)
    if a.calls is not None and a.calls < 0:
        raise LadderError(f"--calls {a.calls}: must be >= 0")
    # several models: one verdict over every (model, rung) cell (grid_report.py)
    results = (grid_report if grid_report.is_grid(out) else report).build(out, calls=a.calls)
    _summary(results, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lmladder.training import bnb

    bnb.defer()  # the command owns the process: bitsandbytes only for a rung that quantises (training/bnb.py)
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    try:
        if a.command == "run":
            return cmd_run(a)
        from lmladder import plugins

        # export / report / serve read a run folder that may be anyone's: no imports of the
        # code its config names unless --trust-run-code
        with plugins.untrusted(getattr(a, "trust_run_code", False)):
            if a.command == "export":
                from lmladder import export

                return export.main(a)
            if a.command == "serve":
                from lmladder.serving import cli as serve

                return serve.main(a)
            return cmd_report(a)
    except LadderError as e:
        print(f"lmladder: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lmladder: interrupted; finished rungs are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
