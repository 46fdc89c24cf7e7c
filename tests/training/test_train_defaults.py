"""Defaults that train: the step count from the data, and the best checkpoint chosen on the
task metric of the dev split (label scoring), not on the token loss."""

from __future__ import annotations

import json
from types import SimpleNamespace

from lmladder.training.hf_train import total_steps


def _cfg(**kw):
    return SimpleNamespace(**{"max_steps": None, "epochs": None, "batch_size": 8, "grad_accum": 1, **kw})


def test_step_count_rule():
    assert total_steps(_cfg(), 270) == 102  # 34 steps per epoch: 3 epochs (150 steps would be 4.4)
    assert total_steps(_cfg(), 500) == 150  # 63 per epoch: 150 steps (2.4 epochs)
    assert total_steps(_cfg(), 10_000) == 1250  # one epoch is already more than 150 steps
    assert total_steps(_cfg(), 16) == 6  # tiny sets: 3 epochs
    assert total_steps(_cfg(epochs=1.0), 500) == 63  # an explicit epoch count wins
    assert total_steps(_cfg(epochs=1.0, max_steps=7), 500) == 7


def test_best_checkpoint_on_the_dev_task_metric(run_cli, toy_data, tmp_path):
    train, test = toy_data
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out), "--rungs", "lora",
                           "--set", "lora.max_steps=6", "--set", "lora.batch_size=4", "--set", "lora.dev_fraction=0.25",
                           "--set", "lora.forgetting_text=null", "--set", "eval.bootstrap=200", "-q")
    assert code == 0, err
    d = json.loads((out / "rungs/lora/result.json").read_text())["details"]
    assert d["selected_on"] == "dev task metric"
    assert [s for s, _ in d["dev_metric_curve"]] == [s for s, _ in d["eval_curve"]]
    assert all(0.0 <= v <= 1.0 for _, v in d["dev_metric_curve"])
    assert d["best_dev_metric"] == max(v for _, v in d["dev_metric_curve"])
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "loss"),
                           "--rungs", "lora", "--set", "lora.max_steps=4", "--set", "lora.batch_size=4",
                           "--set", "lora.select_on=loss", "--set", "lora.forgetting_text=null", "-q")
    assert code == 0, err
    d = json.loads((tmp_path / "loss/rungs/lora/result.json").read_text())["details"]
    assert d["selected_on"] == "dev loss" and "dev_metric_curve" not in d
