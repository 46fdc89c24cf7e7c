"""Measured costs in two parts: one-time seconds (prepare, training incl. what a rung builds
on, never the forgetting check; a reused adapter keeps what it cost to train) and
per-call seconds at deployment speed (adapters merged while they predict)."""

from __future__ import annotations

import json
import time

import pytest

from lmladder import config
from lmladder.run import ladder
from lmladder.tasks import make_task

FAST = ["--set", "few-shot.k=4", "--set", "eval.bootstrap=200", "-q", "--set", "lora.max_steps=4",
        "--set", "lora.batch_size=4"]


def _res(out, name):
    return json.loads((out / "rungs" / name / "result.json").read_text())


def test_prepare_is_timed_as_one_time_cost(run_cli, toy_data, tmp_path, monkeypatch):
    from lmladder.rungs.zero_shot import ZeroShot

    orig = ZeroShot.prepare

    def slow_prepare(self):
        time.sleep(0.6)  # e.g. an index build or embedding the train set
        orig(self)

    monkeypatch.setattr(ZeroShot, "prepare", slow_prepare)
    train, test = toy_data
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out),
                           "--rungs", "zero-shot", "--set", "zero-shot.prompt_format=chat", *FAST)
    assert code == 0, err
    c = _res(out, "zero-shot")["cost"]
    assert c["one_time_s"] >= 0.6 and c["prepare_seconds"] >= 0.6
    assert c["per_call_s"] * 8 < 0.6  # the sleep is not charged per call


def test_reused_adapter_keeps_its_train_seconds_and_forgetting_is_separate(run_cli, toy_data, tmp_path):
    train, test = toy_data
    out = tmp_path / "run"
    args = ["run", "--train", str(train), "--test", str(test), "--out", str(out), "--rungs", "lora", *FAST]
    assert run_cli(*args)[0] == 0
    first = _res(out, "lora")
    stamp = json.loads((out / "rungs/lora/adapter/lmladder_cost.json").read_text())
    assert first["cost"]["train_seconds"] == pytest.approx(stamp["train_seconds"], abs=0.05)
    assert first["cost"]["forgetting_s"] > 0 and first["details"]["forgetting"]["ppl_after"] > 0
    # one-time = prepare + training; the forgetting check is not in it
    assert first["cost"]["one_time_s"] == pytest.approx(
        first["cost"]["prepare_seconds"] + first["cost"]["train_seconds"], abs=0.03)
    # an eval-only change reruns the rung but reuses the weights: their cost is what they cost
    assert run_cli(*args, "--set", "eval.bootstrap=300")[0] == 0
    again = _res(out, "lora")
    assert again["details"]["reused_adapter"] is True
    assert again["cost"]["train_seconds"] == pytest.approx(stamp["train_seconds"], abs=0.02)


def test_stacked_rung_counts_the_one_time_cost_of_what_it_builds_on(run_cli, toy_data, tmp_path):
    train, test = toy_data
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out),
                           "--rungs", "lora,lora@2", "--set", "copies={lora@2: {from: lora}}",
                           "--set", "lora.forgetting_text=null", *FAST)
    assert code == 0, err
    parent, child = _res(out, "lora"), _res(out, "lora@2")
    assert child["cost"]["one_time_s"] >= parent["cost"]["one_time_s"] + child["details"]["from"]["own_train_seconds"] - 0.01


def _min_time(fn, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_lora_per_call_is_within_15_percent_of_zero_shot(tiny_dir, toy_data, tmp_path):
    """Adapters are evaluated merged, as deployed: an unmerged PEFT forward pays for every
    adapted module on every call."""
    from lmladder.rungs.lora import Lora

    train, test = toy_data
    cfg = config.build({"data": {"train": str(train), "test": str(test)}, "model": str(tiny_dir),
                        "lora": {"max_steps": 1, "batch_size": 4, "forgetting_text": None}})
    ds = ladder.validate(cfg)
    ctx = ladder.Context(cfg, ds, make_task(cfg.task, ds.info["labels"], cfg.eval, 0), tmp_path)
    base, _ = ctx.base()
    task, fmt = ctx.task, ctx.fmt()
    exs = list(ds.test) * 4
    msgs = [task.user_message(e) for e in exs]

    def zero():  # the clean base, as the zero-shot rung sees it
        task.predict(base, fmt, msgs, exs)

    zero()  # warm up
    t_zero = _min_time(zero)
    rung = Lora(ctx, cfg.lora, tmp_path / "lora")
    rung.name = "lora"
    rung.prepare()
    rung.fit()

    def unmerged():
        task.predict(rung.model, fmt, msgs, exs)

    unmerged()
    t_unmerged = _min_time(unmerged)
    flat = lambda preds: [v for p in preds for v in p["scores"].values()]  # noqa: E731
    before = flat(task.predict(rung.model, fmt, rung.messages, ds.test)[0])
    merged_scores = flat(rung.predict()[0])
    assert merged_scores == pytest.approx(before, abs=1e-4)  # merged: the same predictions
    assert flat(rung.predict()[0]) == merged_scores  # a second predict reloads it
    from peft import PeftModel

    from lmladder.training import weights

    with weights.merged(PeftModel.from_pretrained(ctx.base()[0], tmp_path / "lora/adapter").eval(), ctx) as model:
        def merged():
            task.predict(model, fmt, msgs, exs)

        merged()
        t_merged = _min_time(merged, 15)  # the best of many: a busy machine adds, never takes away
    rung.close()
    assert not any("lora_" in n for n, _ in base.named_parameters())
    t_zero = min(t_zero, _min_time(zero, 15))
    print(f"zero {t_zero:.4f}s merged {t_merged:.4f}s unmerged {t_unmerged:.4f}s")
    assert t_merged <= 1.15 * t_zero, (t_merged, t_zero, t_unmerged)


def test_reuse_or_train_stamps_saves_reuses_and_retrains(tmp_path):
    """training/weights.reuse_or_train, the one "load or train" of every weight-update rung:
    saved atomically with the stamp and the cost (the seconds before train() included), the
    checkpoints gone; loaded back under the same fingerprint (the original cost reported);
    trained again under another."""
    from lmladder.training import weights

    folder, ckpts = tmp_path / "adapter", tmp_path / "checkpoints"
    calls = []

    def train():
        calls.append("train")
        ckpts.mkdir(exist_ok=True)
        return {"steps": 3}

    def save(tmp):
        assert tmp != folder and tmp.parent == folder.parent  # written aside, renamed over the folder when complete
        (tmp / "weights.bin").write_text("w")

    def load(f):
        calls.append("load")
        return {"truncated": 0}

    kw = dict(train=train, save=save, load=load, name="t", checkpoints=ckpts)
    assert weights.reuse_or_train(folder, "fp1", spent=2.0, **kw) == {"steps": 3}
    assert sorted(p.name for p in folder.iterdir()) == ["lmladder_cost.json", "lmladder_fingerprint.txt", "weights.bin"]
    assert weights.stamp_of(folder) == "fp1" and weights.stamped(folder, "fp1") and not ckpts.exists()
    cost = json.loads((folder / "lmladder_cost.json").read_text())["train_seconds"]
    assert 2.0 <= cost < 3.0
    again = weights.reuse_or_train(folder, "fp1", **kw)
    assert again == {"reused_adapter": True, "truncated": 0, "original_train_seconds": cost}
    assert weights.reuse_or_train(folder, "fp2", flag="reused_model", **kw) == {"steps": 3}
    assert weights.stamp_of(folder) == "fp2" and calls == ["train", "load", "train"]
