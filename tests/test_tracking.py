"""--report-to (TensorBoard, MLflow through transformers' integrations), progress lines off a
terminal, bitsandbytes only when a rung quantises, and the 80-column summary."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = ["--set", "lora.max_steps=3", "--set", "lora.batch_size=4", "--set", "eval.bootstrap=100",
         "--set", "lora.forgetting_text=null"]


def _run(run_cli, toy_data, out, *extra):
    train, test = toy_data
    return run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out),
                   "--rungs", "zero-shot,lora", "--target", "accuracy=0.6", *TRAIN, *extra)


def _scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_each_rungs_training_and_the_final_results(run_cli, toy_data, tmp_path):
    out = tmp_path / "run"
    code, _, err = _run(run_cli, toy_data, out, "--report-to", "tensorboard")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    tb = out / "tracking" / "tensorboard"
    lora = _scalars(tb / "lora")
    assert len(lora["train/loss"]) == 3  # logging_steps = 1 on a 3-step run
    by = {r["name"]: r for r in res["rungs"]}
    assert lora["final/accuracy"] == [pytest.approx(by["lora"]["score"])]
    assert lora["final/ci_low"] == [pytest.approx(by["lora"]["ci"][0])]
    assert "cost/one_time_s" in lora and "cost/total_usd" in lora
    zs = _scalars(tb / "zero-shot")  # an inference rung: its results only
    assert zs["final/accuracy"] == [pytest.approx(by["zero-shot"]["score"])]
    assert "train/loss" not in zs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb / "ladder"))
    acc.Reload()
    verdict = acc.Tensors("verdict/text_summary")[0].tensor_proto.string_val[0].decode()
    assert (res["recommendation"]["rung"] or "none") in verdict and res["recommendation"]["reason"][:40] in verdict

    # tracking is not part of the fingerprint: the same run without it reruns nothing
    fps = json.loads((out / "run.json").read_text())["fingerprints"]
    finished = json.loads((out / "rungs/lora/result.json").read_text())["finished"]
    code, _, err = _run(run_cli, toy_data, out)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["fingerprints"] == fps
    assert json.loads((out / "rungs/lora/result.json").read_text())["finished"] == finished


def test_mlflow_logs_a_run_per_rung_and_the_results(run_cli, toy_data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "store").as_uri()  # a file: URI, as the user's environment gives it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = tmp_path / "myrun"
    code, _, err = _run(run_cli, toy_data, out, "--report-to", "mlflow")
    assert code == 0, err
    assert not (out / "tracking" / "mlruns").exists()  # the environment's store won
    res = json.loads((out / "results.json").read_text())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("myrun")  # default experiment: the run folder's name
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"lora", "ladder"}
    lora = runs["lora"]
    assert lora.info.status == "FINISHED" and lora.data.tags["lmladder.rung"] == "lora"
    assert len(client.get_metric_history(lora.info.run_id, "loss")) == 3
    assert lora.data.params["learning_rate"]  # MLflowCallback's own parameters
    ladder = runs["ladder"].data
    by = {r["name"]: r for r in res["rungs"]}
    for name in ("zero-shot", "lora"):
        assert ladder.metrics[f"{name}/accuracy"] == pytest.approx(by[name]["score"])
        assert ladder.metrics[f"{name}/accuracy_ci_high"] == pytest.approx(by[name]["ci"][1])
        assert ladder.metrics[f"{name}/cost/one_time_s"] == pytest.approx(by[name]["cost"]["one_time_s"])
    assert ladder.params["recommended_rung"] == (res["recommendation"]["rung"] or "none")
    assert ladder.tags["mlflow.note.content"] == res["recommendation"]["reason"]


def test_a_missing_backend_package_stops_before_any_work(run_cli, toy_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = tmp_path / "run"
    code, _, err = _run(run_cli, toy_data, out, "--report-to", "tensorboard,wandb")
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "pip install wandb" in line, err
    assert not out.exists()
    code, _, err = _run(run_cli, toy_data, out, "--report-to", "neptune")
    assert code == 2 and "tracking.report_to" in err and not out.exists()


def test_report_to_config_values_and_fingerprints(tmp_path):
    from lmladder import config
    from lmladder.run import ladder

    raw = {"data": {"train": "t.jsonl"}}
    plain = config.build(raw)
    assert plain.tracking.report_to == []
    c = dict(raw)
    config.apply_set(c, "tracking.report_to=tensorboard, mlflow")
    tracked = config.build(c)
    assert tracked.tracking.report_to == ["tensorboard", "mlflow"]
    assert config.build({**raw, "tracking": {"report_to": "none"}}).tracking.report_to == []
    assert config.build({**raw, "tracking": {"report_to": ["tensorboard"]}}).tracking.report_to == ["tensorboard"]
    for rung in ("zero-shot", "lora", "dpo"):
        a = ladder.Context(plain, None, None, tmp_path).fingerprint(rung)
        b = ladder.Context(tracked, None, None, tmp_path).fingerprint(rung)
        assert a == b


def test_a_failing_backend_is_a_warning_never_a_lost_run(tmp_path, monkeypatch, caplog):
    from lmladder import config, tracking

    cfg = config.build({"tracking": {"report_to": ["tensorboard"]}})
    results = {"metric": "accuracy", "rungs": [{"name": "zero-shot", "score": 0.5, "ci": [0.2, 0.8], "cost": {}}],
               "recommendation": {"rung": None, "reason": "none"}}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "_log_tensorboard", boom)
    with caplog.at_level(logging.WARNING, logger="lmladder"):
        tracking.log_results(cfg, tmp_path, results)  # does not raise
    assert "tensorboard: could not log the results" in caplog.text and "disk full" in caplog.text
    assert tracking.active() is None


def test_training_runs_are_named_by_rung(tmp_path):
    from lmladder import config, tracking

    cfg = config.build({"tracking": {"report_to": ["tensorboard"]}})
    out = tmp_path / "run"
    tracking.start(cfg, out)
    try:
        assert tracking.run_name(out / "rungs/lora/checkpoints", "lora") == "lora"
        assert tracking.run_name(out / "rungs/lora/curve-0.25/.trainer", "lora") == "lora/curve-0.25"
        assert tracking.run_name(out / "rungs/lora@cpt/.trainer") == "lora@cpt"
        assert tracking.run_name(tmp_path / "elsewhere", "lora") is None  # not this run's trainer
        assert tracking.trainer_args("lora") == {"report_to": ["tensorboard"], "run_name": "lora"}
    finally:
        tracking.stop()
    assert tracking.trainer_args(tracking.run_name(out / "rungs/lora/checkpoints")) == {"report_to": "none"}


# --------------------------------------------------------------------------- progress lines


def test_progress_lines_off_a_terminal(run_cli, toy_data, tmp_path, monkeypatch, caplog):
    from lmladder import progress

    monkeypatch.setenv("LMLADDER_PROGRESS_SECONDS", "0")
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    caplog.set_level(logging.INFO, logger="lmladder.progress")
    code, _, err = _run(run_cli, toy_data, tmp_path / "run")
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if r.name == "lmladder.progress"]
    train = [m for m in lines if re.fullmatch(r"lora: step \d/3, loss (\d+\.\d{4}|\?), [\d,]+ tok/s, ETA \S+", m)]
    assert [m.split(",")[0] for m in train] == ["lora: step 1/3", "lora: step 2/3", "lora: step 3/3"], lines
    assert all(re.search(r"loss \d+\.\d{4}, [\d,]+ tok/s", m) for m in train)  # each step's own loss
    assert any(m.startswith("lora: done, 3 steps in ") for m in lines)
    ev = [m for m in lines if re.fullmatch(r"zero-shot: \d/8 examples, [\d.]+ ex/s, ETA \S+", m)]
    assert ev and ev[-1].startswith("zero-shot: 8/8 examples"), lines
    assert any(re.fullmatch(r"lora: \d/8 examples, [\d.]+ ex/s, ETA \S+", m) for m in lines)


def test_generation_progress_lines_and_terminal_bars(tiny, monkeypatch, caplog):
    from lmladder import progress
    from lmladder.inference.generate import generate

    model, tok = tiny
    monkeypatch.setenv("LMLADDER_PROGRESS_SECONDS", "0")
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    caplog.set_level(logging.INFO, logger="lmladder.progress")
    generate(model, tok, [tok("ab").input_ids, tok("abc").input_ids, tok("a").input_ids],
             max_new_tokens=2, batch_size=2, desc="cot")
    lines = [r.getMessage() for r in caplog.records if r.name == "lmladder.progress"]
    assert re.fullmatch(r"cot: 2/3 examples, [\d.]+ ex/s, ETA \S+", lines[0]), lines
    assert re.fullmatch(r"cot: 3/3 examples, [\d.]+ ex/s, ETA 0s", lines[1]), lines
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    from tqdm.auto import tqdm

    bar = progress.bar(3, "cot")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("LMLADDER_PROGRESS_SECONDS", "30")
    caplog.clear()
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    b = progress.bar(3, "quick")
    b.update(3)
    b.close()
    assert not caplog.records  # shorter than the interval: silent


# --------------------------------------------------------------------------- bitsandbytes

LORA_SCRIPT = """
import sys
from lmladder.cli import main
code = main(sys.argv[1:])
print("EXIT", code, "BNB", sys.modules.get("bitsandbytes") is not None or any(k.startswith("bitsandbytes.") for k in sys.modules))
"""


def test_a_lora_run_never_imports_bitsandbytes(tiny_dir, toy_data, tmp_path):
    train, test = toy_data
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(
        [sys.executable, "-c", LORA_SCRIPT, "run", "--train", str(train), "--test", str(test),
         "--model", str(tiny_dir), "--rungs", "lora", "--out", str(tmp_path / "run"), *TRAIN],
        capture_output=True, text=True, env=env, timeout=600,
    )
    both = p.stdout + p.stderr
    assert "EXIT 0 BNB False" in p.stdout, both[-3000:]
    assert "gemm_4bit" not in both and "bitsandbytes" not in both


def test_bitsandbytes_comes_back_for_a_rung_that_quantises():
    code = ("import sys, lmladder\n"
            "assert 'bitsandbytes' not in sys.modules  # importing lmladder hides nothing\n"
            "from lmladder.training import bnb\n"
            "bnb.defer()  # what the lmladder command does first\n"
            "import peft\n"
            "from peft.import_utils import is_bnb_available\n"
            "assert sys.modules['bitsandbytes'] is None and not is_bnb_available()\n"
            "m = bnb.require()\n"
            "from transformers.utils import is_bitsandbytes_available\n"
            "import peft.helpers\n"
            "assert is_bnb_available() and is_bitsandbytes_available() and peft.helpers.bnb is m\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout.strip().endswith("ok"), p.stderr[-3000:]


# --------------------------------------------------------------------------- summary table


def _results(names, metric="accuracy"):
    rungs = []
    for i, n in enumerate(names):
        rungs.append({
            "name": n, "score": 0.8123 + i / 100, "ci": [0.7512, 0.8734], "metrics": {},
            "paired": None if i == len(names) - 1 else {"diff": -0.0431, "ci": [-0.09, -0.01], "p": 0.0123},
            "cost": {"trainable_params": 1_234_567 * i, "one_time_s": 1234.5 * i, "per_call_s": 0.01234,
                     "prompt_tokens_per_call": 812.0, "total_usd": 12.3456 * (i + 1), "calls": 100_000},
        })
    return {"metric": metric, "data": {"test_used": 872}, "rungs": rungs,
            "baseline": {"name": "majority", "baseline": True, "score": 0.5092, "ci": [0.47, 0.54], "metrics": {},
                         "paired": {"diff": -0.3031, "ci": [-0.35, -0.25], "p": 1e-9},
                         "cost": {"trainable_params": 0, "one_time_s": 0, "per_call_s": 0, "total_usd": 0.0,
                                  "calls": 100_000}},
            "recommendation": {"rung": names[-1], "reason": "the cheapest rung that meets the target "
                               "accuracy >= 0.85 at 100,000 calls; cheaper rungs fall short (paired, p < 0.05) " * 2}}


@pytest.mark.parametrize("names,metric", [
    (["zero-shot", "few-shot", "calibrated", "self-consistency", "prompt-tuning", "lora"], "accuracy"),
    (["zero-shot", "continued-pretraining", "lora@cpt-long-tag"], "exact_match"),
])
def test_the_summary_fits_80_columns(names, metric, tmp_path):
    from rich.console import Console

    from lmladder.cli import _summary

    con = Console(width=80, record=True, force_terminal=False)
    _summary(_results(names, metric), tmp_path / "some" / "run", console=con)
    text = con.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "…" not in text
    table = [line for line in lines if re.search(r"\d\.\d{3} \[", line)]
    assert len(table) == len(names) + 1, text  # one line per rung and the baseline: no cell wrapped
    for n in names + ["majority"]:
        assert any(line.lstrip().startswith(n) for line in table), (n, text)
    assert any(line.lstrip().startswith(names[-1] + " *") for line in table)
    if metric == "accuracy":  # short names: every column shows
        head = next(line for line in lines if "score [95% CI]" in line)
        for h in ("vs rec.", "1-time s", "ms/call", "USD total"):
            assert h in head, text
