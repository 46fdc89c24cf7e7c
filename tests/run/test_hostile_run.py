"""Hostile input against a run's life (issue: hostile input and real users' data): nothing
lost, no traceback, no runaway. Each test is one case a tester found:

* ``--out`` a file / under a file / in a read-only folder, a pickle-only model folder:
  one-line error, exit 2, nothing created;
* a bad input run into a finished run loses nothing (config.yaml, data.json, results and
  report stay byte for byte); a failed attempt rebuilds results.json from the disk;
* temp files a killed run left are swept at start; a second run into a busy folder stops;
* a killed ``--force`` rerun never leaves results.json naming a rung without its result;
* every rung's ``close()`` is safe after any failed step (dpo's was not: two tracebacks);
* preference pairs too long for ``dpo.max_length`` are cut by default, counted;
* an input longer than the model's context is cut (counted) or an error, before any model work;
* export / report / serve never import code a run folder names unless --trust-run-code.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl

FAST = ["--set", "eval.bootstrap=100", "--set", "few-shot.k=2", "--set", "lora.max_steps=2", "--set", "lora.eval_steps=1",
        "--set", "lora.batch_size=4", "--set", "lora.forgetting_text=null"]


def _run(run_cli, toy_data, out, *extra):
    train, test = toy_data
    return run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out), "-q", *FAST, *extra)


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmladder: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# --------------------------------------------------------------------------- --out, model


def _read_only_dir(tmp_path) -> Path:
    """A folder this process cannot write in: chmod 555 as a user; as root (which ignores
    modes) a sysfs folder, where even root cannot create files."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    return Path("/sys")


@pytest.mark.parametrize("case", ["file", "under-file", "read-only"])
def test_out_that_cannot_be_a_run_folder_is_one_line_and_creates_nothing(run_cli, toy_data, tmp_path, case):
    f = tmp_path / "afile"
    f.write_text("not a folder")
    out = {"file": f, "under-file": f / "run", "read-only": _read_only_dir(tmp_path) / "lmladder-run"}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run(run_cli, toy_data, out, "--rungs", "zero-shot")
    line = _one_line_error(code, err, f"--out {out}")
    assert {"file": "is a file, not a folder", "under-file": "is a file, so no folder can be made",
            "read-only": "cannot write in"}[case] in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not out.exists() or out == f and f.read_text() == "not a folder"


def test_pickle_only_model_folder_is_refused_before_out_is_created(run_cli, toy_data, tiny_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    m = tmp_path / "pickled"
    m.mkdir()
    for name in os.listdir(tiny_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(tiny_dir / name, m / name)
    torch.save(load_file(tiny_dir / "model.safetensors"), m / "pytorch_model.bin")
    out = tmp_path / "run"
    code, _, err = _run(run_cli, toy_data, out, "--rungs", "zero-shot", "--model", str(m))
    _one_line_error(code, err, "pytorch_model.bin", "safetensors only")
    assert not out.exists()


# --------------------------------------------------------------------------- nothing lost


@pytest.fixture
def finished(run_cli, toy_data, tmp_path):
    out = tmp_path / "run"
    code, _, err = _run(run_cli, toy_data, out, "--rungs", "zero-shot")
    assert code == 0, err
    return out


def _bad_inputs(tmp_path, tiny_dir):
    """(name, extra CLI args) of inputs a run rejects; each must leave a finished run alone."""
    bad_data = write_jsonl(tmp_path / "bad.jsonl", TRAIN_ROWS[:3] + [{"text": "no label here"}])
    long_test = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 3000, "label": "pos"}] + TEST_ROWS[1:])
    weights = tmp_path / "noweights"
    weights.mkdir()
    (weights / "config.json").write_text((tiny_dir / "config.json").read_text())
    return [
        ("bad train row", ["--train", str(bad_data)]),
        ("model without weights", ["--model", str(weights)]),
        ("input too long, truncation error", ["--test", str(long_test), "--set", "data.truncation=error"]),
        ("unknown key", ["--set", "zero-shot.nope=1"]),
        ("out is busy", []),
    ]


def test_a_bad_input_run_into_a_finished_run_loses_nothing(run_cli, toy_data, finished, tmp_path, tiny_dir):
    from lmladder.run.folder import lock as lock_run_folder

    before = _snapshot(finished)
    assert "rungs/zero-shot/result.json" in before and "results.json" in before
    for name, extra in _bad_inputs(tmp_path, tiny_dir):
        lock = lock_run_folder(finished) if name == "out is busy" else None
        try:
            code, _, err = _run(run_cli, toy_data, finished, "--rungs", "zero-shot,few-shot", *extra)
        finally:
            if lock is not None:
                lock.close()
        _one_line_error(code, err)
        assert _snapshot(finished) == before, name


def test_a_failed_attempt_rebuilds_results_from_what_is_on_disk(run_cli, toy_data, finished, monkeypatch):
    """Run 2 changes the test limit (so zero-shot's result is stale) and dies loading the
    model: results.json and the report describe run 2's state, not run 1's."""
    import lmladder.models

    def boom(*a, **k):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(lmladder.models, "load_causal_lm", boom)
    with pytest.raises(RuntimeError, match="disk went away"):
        _run(run_cli, toy_data, finished, "--rungs", "zero-shot", "--limit-test", "6")
    res = json.loads((finished / "results.json").read_text())
    assert res["rungs"] == [] and res["recommendation"]["rung"] is None
    assert [(u["name"], u["state"]) for u in res["unfinished"]] == [("zero-shot", "failed")]
    assert "disk went away" in res["unfinished"][0]["error"]
    assert (finished / "rungs/zero-shot/result.json").is_file()  # run 1's result is kept on disk
    assert "zero-shot" in (finished / "report.md").read_text()


def test_stale_temp_files_are_swept_and_finished_files_kept(run_cli, toy_data, finished):
    tmps = [finished / ".report.html.k3j4.tmp", finished / "rungs/zero-shot/.result.json.x9.tmp",
            finished / "rungs/lora/.adapter.ab12.tmp/adapter_model.safetensors", finished / "rungs/lora/.adapter.old/x"]
    for t in tmps:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_text("half-written")
    result = (finished / "rungs/zero-shot/result.json").read_bytes()
    code, _, err = _run(run_cli, toy_data, finished, "--rungs", "zero-shot")
    assert code == 0, err
    assert not [p for p in finished.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert (finished / "rungs/zero-shot/result.json").read_bytes() == result  # resumed, untouched


def _results_consistent(out: Path) -> None:
    """Every rung results.json lists has its result.json on disk, current for run.json, with
    the same score."""
    res = json.loads((out / "results.json").read_text())
    expected = json.loads((out / "run.json").read_text())["fingerprints"]
    for r in res["rungs"]:
        on_disk = json.loads((out / "rungs" / r["name"] / "result.json").read_text())
        assert on_disk["fingerprint"] == expected[r["name"]] and on_disk["score"] == r["score"]


def test_killed_force_rerun_never_leaves_results_without_their_files(toy_data, tiny_dir, tmp_path):
    """SIGKILL a ``--force`` rerun (with a changed lora config) while it trains lora:
    results.json names only rungs current for run.json whose result.json is on disk (lora's
    earlier result is listed as stale, not as current, and is kept); the original config
    then finds that result again (no retraining), and the killed run's temp files are gone."""
    train, test = toy_data
    out = tmp_path / "run"
    base = [sys.executable, "-m", "lmladder.cli", "run", "--train", str(train), "--test", str(test), "--out",
            str(out), "--model", str(tiny_dir), "-q", "--rungs", "zero-shot,lora", *FAST]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(base, check=True, env=env, capture_output=True, timeout=300)
    _results_consistent(out)
    before = json.loads((out / "results.json").read_text())
    slow = [("lora.max_steps=400" if a == "lora.max_steps=2" else a) for a in base] + [
        "--force", "--set", "lora.save_steps=1"]
    p = subprocess.Popen(slow, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "rungs/lora/checkpoints").glob("checkpoint-*")):
            assert p.poll() is None, "the rerun ended before it could be killed"
            time.sleep(0.2)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    _results_consistent(out)
    killed = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in killed["rungs"]] == ["zero-shot"]
    assert [(u["name"], u["state"]) for u in killed["unfinished"]] == [("lora", "stale")]
    lora = (out / "rungs/lora/result.json").read_bytes()
    subprocess.run(base, check=True, env=env, capture_output=True, timeout=300)
    assert (out / "rungs/lora/result.json").read_bytes() == lora  # found again, not retrained
    _results_consistent(out)
    after = {r["name"]: r["score"] for r in json.loads((out / "results.json").read_text())["rungs"]}
    assert after == {r["name"]: r["score"] for r in before["rungs"]}  # (zero-shot was rerun by --force)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- rungs' failure paths


def _ctx_for(name, tmp_path, tiny_dir):
    from lmladder import config as C
    from lmladder import registry
    from lmladder.data import Dataset, Example
    from lmladder.run.context import Context
    from lmladder.tasks import make_task

    cls = registry.get(name)
    kind = "classification" if "classification" in cls.kinds else cls.kinds[0]
    if kind == "preference":
        mk = lambda i, s: Example(id=f"{s}{i}", input=f"question {i}?", label="yes good", target=True,  # noqa: E731
                                  fields={"chosen": "yes good", "rejected": "zq xv"}, source=f"{s}.jsonl:{i + 1}")
    else:
        mk = lambda i, s: Example(id=f"{s}{i}", input=f"item {i}", label=("pos", "neg")[i % 2],  # noqa: E731
                                  source=f"{s}.jsonl:{i + 1}")
    labels = [] if kind == "preference" else ["neg", "pos"]
    cfg = C.build({"model": str(tiny_dir), "task": {"kind": kind, **({"labels": labels} if labels else {})},
                   "rungs": [name], "eval": {"bootstrap": 100}})
    ds = Dataset([mk(i, "train") for i in range(8)], [mk(i, "test") for i in range(4)], {"labels": labels})
    task = make_task(cfg.task, labels, cfg.eval, cfg.seed)
    return Context(cfg, ds, task, tmp_path / "run"), cfg


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, before) -> bool:
    import torch

    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before)


def _all_rungs():
    from lmladder import registry

    return sorted(registry.RUNGS)


@pytest.mark.parametrize("name", _all_rungs())
def test_every_rung_closes_cleanly_after_any_failed_step(name, tmp_path, tiny_dir, monkeypatch):
    """close() before prepare, after prepare raised, and (rungs that train) after fit raised
    mid-training: never raises, and the shared base comes back with the same weights and
    no adapter modules in it."""
    from lmladder import registry

    cls = registry.get(name)
    ctx, cfg = _ctx_for(name, tmp_path, tiny_dir)
    base, _ = ctx.base()
    before, grads = _state(base), [p.requires_grad for p in base.parameters()]

    rung = cls(ctx, cfg.rung_config(name), tmp_path / "run/rungs" / name)
    rung.name = name
    rung.close()  # nothing was set up

    rung = cls(ctx, cfg.rung_config(name), tmp_path / "run/rungs" / name)
    rung.name = name
    real_fmt = ctx.fmt
    monkeypatch.setattr(ctx, "fmt", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected in prepare")))
    try:
        rung.prepare()
    except Exception:  # noqa: BLE001 - the injected failure, or the rung's own refusal
        pass
    rung.close()
    monkeypatch.setattr(ctx, "fmt", real_fmt)

    if cls.trains:  # killed inside its trainer: the SFT engine, a TRL trainer or the plain Trainer glue
        from lmladder.training import hf_train, sft, trl_train

        rung = cls(ctx, cfg.rung_config(name), tmp_path / "run/rungs" / name)
        rung.name = name
        killed = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed"))  # noqa: E731
        for engine, fn in ((sft, "train"), (trl_train, "run"), (hf_train, "train")):
            monkeypatch.setattr(engine, fn, killed)
        try:
            rung.prepare()
            rung.fit()
        except Exception:  # noqa: BLE001
            pass
        rung.close()
    base, _ = ctx.base()
    assert _same(base, before)
    assert not any("lora" in n or "ia3" in n for n, _ in base.named_modules())
    assert [p.requires_grad for p in base.parameters()] == grads or not any(p.requires_grad for p in base.parameters())


def test_dpo_error_path_gives_one_line_not_two_tracebacks(run_cli, tmp_path):
    """The tester's case: a pair over dpo.max_length with truncation: error stops on a clean
    error naming the file:line, and the rung's clean-up does not raise over it."""
    long = [{"prompt": f"Say something about item {i}.", "chosen": "yes good", "rejected": "zq xv " * (60 if i == 3 else 1)}
            for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", long)
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Tell me.", "chosen": "yes", "rejected": "no"}] * 2)
    args = ("run", "--train", str(train), "--test", str(test), "--task", "preference", "--rungs", "dpo",
            "--out", str(tmp_path / "run"), "-q", "--set", "judge.n=0", "--set", "eval.bootstrap=100",
            "--set", "dpo.max_length=256", "--set", "dpo.max_steps=1", "--set", "dpo.forgetting_text=null")
    code, _, err = run_cli(*args, "--set", "dpo.truncation=error")
    _one_line_error(code, err, f"{train}:4: preference pair has", "dpo.max_length=256")
    # the default cuts the over-long response from the end, and counts it
    code, _, err = run_cli(*args)
    assert code == 0, err
    d = json.loads((tmp_path / "run/rungs/dpo/result.json").read_text())["details"]
    assert d["truncated"] == 1 and d["truncated_responses"] == 1


# --------------------------------------------------------------------------- input length


def test_inputs_longer_than_the_context_are_cut_and_counted_or_an_error(run_cli, toy_data, tiny_dir, tmp_path):
    """The tiny model's context is 4,096 tokens (one per byte): a 6,000-byte test input is
    cut to what fits after the prompt and the answer, counted in data.json; with
    data.truncation: error it is a one-line error naming file:line: field, nothing written."""
    train, _ = toy_data
    test = write_jsonl(tmp_path / "long.jsonl", TEST_ROWS[:3] + [{"text": "x" * 6000, "label": "pos"}] + TEST_ROWS[4:])
    out = tmp_path / "run"
    args = ("run", "--train", str(train), "--test", str(test), "--out", str(out), "-q", "--rungs", "zero-shot", *FAST)
    code, _, err = run_cli(*args, "--set", "data.truncation=error")
    _one_line_error(code, err, f"{test}:4: field 'text' has 6000 tokens", "data.max_input_tokens=")
    assert not out.exists()
    code, _, err = run_cli(*args)
    assert code == 0, err
    info = json.loads((out / "data.json").read_text())["lengths"]
    assert info["model_context"] == 4096 and info["longest_input"] == 6000
    assert info["truncated"] == {"n": 1, "train": 0, "test": 1, "first": f"{test}:4"}
    limit = info["max_input_tokens"]
    assert 3900 < limit < 4096
    preds = [json.loads(l) for l in (out / "rungs/zero-shot/predictions.jsonl").read_text().splitlines()]
    assert preds[3]["input"] == "x" * limit
    assert "1 input" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- code in a run folder


def test_export_report_and_serve_never_import_run_folder_code(run_cli, tmp_path, tiny_dir, monkeypatch):
    """A run folder whose config names task.metric_fn (a module that leaves a marker when
    imported): export, report and serve's folder reading do not import it; the import
    itself is refused with a one-line error unless --trust-run-code."""
    from lmladder import plugins
    from lmladder.errors import LadderError

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_metric.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef score(pred, gold):\n    return 1.0\n")
    rows = [{"text": f"say {w} {i}", "label": w} for i in range(6) for w in ("yes", "no")]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    test = write_jsonl(tmp_path / "s.jsonl", [{"text": f"reply {w}", "label": w} for w in ("yes", "no")])
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--task", "generation", "--train", str(train), "--test", str(test),
                           "--metric-fn", "evil_metric:score", "--rungs", "zero-shot", "--out", str(out), "-q",
                           "--set", "eval.bootstrap=100", "--set", "eval.max_new_tokens=2")
    assert code == 0, err
    assert marker.read_text() == "ran"  # `run` imports what its own config names
    marker.unlink()
    sys.modules.pop("evil_metric", None)
    code, _, err = run_cli("report", str(out), model=False)
    assert code == 0, err
    code, _, err = run_cli("export", str(out), "--rung", "zero-shot", "--format", "merged", "--out",
                           str(tmp_path / "exp"), "--no-verify", model=False)
    assert code == 0, err
    from lmladder.serving.cli import resolve_target

    resolve_target(str(out))
    assert not marker.exists()
    with plugins.untrusted():
        with pytest.raises(LadderError, match=r"^task.metric_fn: 'evil_metric:score' is code named in the run "
                                              r"folder's config; .* --trust-run-code$"):
            plugins.load_callable("evil_metric:score", "task.metric_fn")
    assert not marker.exists()
    with plugins.untrusted(trust=True):
        plugins.load_callable("evil_metric:score", "task.metric_fn")
    assert marker.read_text() == "ran"
