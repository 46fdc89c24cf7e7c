"""The run folder: its layout, and the rules that keep it consistent at every moment.

    DIR/config.yaml               snapshot of the resolved RunConfig
    DIR/data.json                 files, counts, label set, overlap, input lengths
    DIR/run.json                  the fingerprint each rung's result must carry to count
    DIR/rungs/<rung>/result.json  written last: its presence marks the rung finished
    DIR/rungs/<rung>/predictions.jsonl, failed.json, artifacts (adapter/, shots.json, ...)
    DIR/results.json, report.md, report.html, plot.png
    DIR/.lock                     held by the run using the folder

Nothing is written before validation passes (``check_out_dir`` checks the folder can be
written without creating it); a second run into a busy folder stops (``lock``); temp files a
killed run left are swept at the next start (``sweep_temp_files``); a finished result is only
ever replaced by a complete one (io.atomic_*). export and serve read a folder through
:func:`read_run` only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmladder.errors import LadderError
from lmladder.io import atomic_write_json
from lmladder.run import result as result_mod

log = logging.getLogger(__name__)


@dataclass
class RunFolder:
    """A run folder as written by ``lmladder run``: its validated config, label set and the
    rungs finished in it for that config (cost order). Read by export and serve."""

    dir: Path
    cfg: object  # config.RunConfig
    labels: list[str]
    finished: list[str]


def read_run(run_dir: str | Path) -> RunFolder:
    from lmladder import config as config_mod
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
    try:  # the fingerprints the run's config and data give: other results are stale
        expected = json.loads((d / "run.json").read_text()).get("fingerprints") or {}
    except (OSError, ValueError):
        expected = {}

    def current(p: Path) -> bool:
        if p.name not in cfg.rungs:
            return False  # (the majority baseline is not a rung)
        fp = result_mod.fingerprint_of(p / "result.json")
        return fp is not None and (p.name not in expected or fp == expected[p.name])

    rdir = d / "rungs"
    done = [p.name for p in rdir.iterdir() if current(p)] if rdir.is_dir() else []
    done.sort(key=lambda n: (rank.get(n, 99), n))
    return RunFolder(d, cfg, labels, done)


def default_out(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "run"
    return Path("runs") / name


def check_out_dir(out_dir: Path) -> None:
    """The run folder can be written: it is a folder (or can be made one) in a writable
    place. Checked before anything is written; nothing is created here (a probe file in
    the nearest existing folder is made and removed)."""
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


def create(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LadderError(f"--out {out_dir}: cannot create the run folder ({e.strerror})") from None


class Lock:
    def __init__(self, f):
        self.f = f

    def close(self) -> None:
        try:
            self.f.close()  # closing the file releases the lock
        except OSError:
            pass


def lock(out_dir: Path) -> Lock:
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
    return Lock(f)


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


def record_failure(rdir: Path, fp: str, err: BaseException) -> None:
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


def record_skipped(out_dir: Path, names: list[str], at: str, reason: str) -> None:
    """run.json ``skipped``: the rungs --until-target did not climb, with the reason and, when
    an earlier result of the same rung is on disk, roughly the seconds that saved."""
    info = json.loads((out_dir / "run.json").read_text())
    skipped = {}
    for n in names:
        est = None
        prev = result_mod.load(out_dir / "rungs" / n / "result.json")
        if prev is not None:
            c = prev["cost"]
            est = round(float(c.get("one_time_s", c.get("train_seconds", 0))) + float(c.get("eval_seconds", 0)), 1)
        skipped[n] = {"reason": reason, "after": at, "seconds_saved_estimate": est}
        log.info("%s: skipped (%s)", n, reason)
    atomic_write_json(out_dir / "run.json", {**info, "skipped": skipped})
