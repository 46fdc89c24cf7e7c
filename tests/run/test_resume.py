"""A run killed with SIGKILL during training resumes from its newest checkpoint and ends
where an uninterrupted run ends (optimizer, scheduler, RNG and the batch order restored)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _cmd(tiny_dir, train, test, out):
    return [
        sys.executable, "-m", "lmladder", "run", "--train", str(train), "--test", str(test),
        "--model", str(tiny_dir), "--rungs", "lora", "--out", str(out), "-q",
        "--set", "lora.max_steps=40", "--set", "lora.batch_size=4", "--set", "lora.lr=5e-3",
        "--set", "lora.save_steps=5", "--set", "lora.eval_steps=5", "--set", "lora.logging_steps=1",
        "--set", "lora.early_stopping_patience=null", "--set", "eval.bootstrap=200",
    ]


def _env():
    # one thread: the tiny model gains nothing from more, and a busy machine makes them spin
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _details(out):
    return json.loads((out / "rungs/lora/result.json").read_text())["details"]


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tiny_dir, toy_data, tmp_path):
    train, test = toy_data
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = subprocess.run(_cmd(tiny_dir, train, test, whole), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    ckpts = killed / "rungs/lora/checkpoints"
    p = subprocess.Popen(_cmd(tiny_dir, train, test, killed), env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if ckpts.is_dir() and any(c.name.startswith("checkpoint-") for c in ckpts.iterdir()):
            break
        time.sleep(0.005)
    assert p.poll() is None, "training finished before the first checkpoint was seen"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (killed / "rungs/lora/result.json").exists()
    left = [c.name for c in ckpts.iterdir() if c.name.startswith("checkpoint-")]
    assert left  # the kill came mid-training, with at least one complete checkpoint

    r = subprocess.run(_cmd(tiny_dir, train, test, killed), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _details(whole), _details(killed)
    assert a["resumed_from"] is None and b["resumed_from"] is not None and b["resumed_from"] % 5 == 0
    assert a["steps"] == b["steps"] == 40
    assert abs(a["final_train_loss"] - b["final_train_loss"]) < 1e-4
    assert len(a["loss_curve"]) == len(b["loss_curve"]) == 40
    assert max(abs(x - y) for x, y in zip(a["loss_curve"], b["loss_curve"])) < 1e-4
    assert max(abs(x[1] - y[1]) for x, y in zip(a["eval_curve"], b["eval_curve"])) < 1e-4
    wa = load_file(whole / "rungs/lora/adapter/adapter_model.safetensors")
    wb = load_file(killed / "rungs/lora/adapter/adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert not ckpts.exists()  # removed once the adapter is saved
