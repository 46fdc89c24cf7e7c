"""Multi-process training: 2-process DDP on CPU (gloo) gives the same loss trajectory
as 1 process at the same global batch; `lmladder run` under torchrun writes one set of
outputs. The workers are real ``torchrun`` launches on loopback, bounded in time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmladder.training import sft
from lmladder.errors import LadderError
from lmladder.run import distributed

HERE = Path(__file__).resolve().parent
TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def _launch(args: list[str], cwd: Path, nproc: int | None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` (nproc None) or ``torchrun --nproc_per_node N ARGS``; kill the
    whole process group on timeout so no worker outlives the test."""
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd += args
    p = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, None)


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "bs,ga,world,want",
    [(8, 1, 1, (8, 1)), (2, 4, 1, (2, 4)), (4, 1, 2, (2, 1)), (2, 2, 2, (2, 1)),
     (2, 4, 2, (2, 2)), (4, 2, 4, (2, 1)), (6, 1, 3, (2, 1)), (1, 8, 4, (1, 2))],
)
def test_split_global_batch_keeps_the_global_batch(bs, ga, world, want):
    micro, accum = distributed.split_global_batch(bs, ga, world)
    assert (micro, accum) == want
    assert micro * accum * world == bs * ga and micro <= bs


def test_split_global_batch_that_does_not_divide_is_a_clear_error():
    with pytest.raises(LadderError, match=r"lora.batch_size x lora.grad_accum = 3 x 1 = 3 .* not divisible by the 2 processes"):
        distributed.split_global_batch(3, 1, 2)


def test_global_batch_sampler_is_deterministic_and_covers_every_example():
    lengths = [5, 9, 3, 12, 7, 7, 2, 30, 4, 8, 6, 11, 1, 10]
    a = sft.GlobalBatchSampler(lengths, 4, seed=0)
    b = sft.GlobalBatchSampler(lengths, 4, seed=0)
    assert len(a) == 16  # ceil(14 / 4) * 4: the last global batch wraps round
    e0, e1 = a.order(0), a.order(1)
    assert e0 == b.order(0) and e0 != e1
    for e in (e0, e1):
        assert len(e) == 16 and set(e) == set(range(14)) and e[14:] == e[:2]
    assert list(iter(b)) == e0 and list(iter(b)) == e1  # counts passes without set_epoch
    b.set_epoch(0)
    assert list(iter(b)) == e0


def _one_process(out: Path, bs: int, ga: int, steps: int) -> dict:
    """The worker in this process (world size 1)."""
    sys.path.insert(0, str(HERE))
    import ddp_worker

    ddp_worker.main(str(out), bs, ga, steps)
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- torchrun


def test_two_process_ddp_matches_one_process(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    a = _one_process(one, 4, 1, 6)
    # the same global batch as 2 micro-batches accumulated: the same steps (token-normalised)
    acc = _one_process(tmp_path / "accum.json", 2, 2, 6)["stats"]["loss_curve"]
    assert max(abs(x - y) for x, y in zip(a["stats"]["loss_curve"], acc)) < TOL
    r2 = _launch([str(HERE / "ddp_worker.py"), str(two), "4", "1", "6"], tmp_path, nproc=2)
    assert r2.returncode == 0, r2.stdout[-4000:]
    b = json.loads(two.read_text())
    assert a["stats"]["world_size"] == 1 and b["stats"]["world_size"] == 2
    # 2 sequences per process per step (the memory planner may run them as 2 micro-batches of 1)
    assert b["stats"]["per_device_batch"] * b["stats"]["grad_accum_per_device"] == 2
    assert b["stats"]["global_batch"] == 4
    la, lb = a["stats"]["loss_curve"], b["stats"]["loss_curve"]
    assert len(la) == len(lb) == 6
    diff = max(abs(x - y) for x, y in zip(la, lb))
    assert diff < TOL, (la, lb)
    assert la[-1] < la[0]  # it trained
    wdiff = max(abs(x - y) for k in a["weights"] for x, y in zip(a["weights"][k], b["weights"][k]))
    assert set(a["weights"]) == set(b["weights"]) and wdiff < 1e-5
    print(f"max loss diff {diff:.2e}, max LoRA weight diff {wdiff:.2e}")


def test_lmladder_run_under_torchrun_writes_one_set_of_outputs(tiny_dir, toy_data, tmp_path, run_cli):
    train, test = toy_data
    common = ["--train", str(train), "--test", str(test), "--rungs", "zero-shot,lora",
              "--set", "lora.max_steps=4", "--set", "lora.batch_size=4", "--set", "lora.dropout=0",
              "--set", "lora.lr=5e-3", "--set", "eval.bootstrap=200", "-q"]
    out2 = tmp_path / "run2"
    r = _launch(["-m", "lmladder", "run", *common, "--model", str(tiny_dir), "--out", str(out2)], tmp_path, nproc=2)
    assert r.returncode == 0, r.stdout[-4000:]
    files = sorted(str(p.relative_to(out2)) for p in out2.rglob("*") if p.is_file())
    assert files == sorted([
        ".lock", "config.yaml", "data.json", "run.json", "results.json", "report.md", "report.html", "plot.png",
        "cost.png", "rungs/majority/result.json", "rungs/majority/predictions.jsonl",
        "rungs/zero-shot/result.json", "rungs/zero-shot/predictions.jsonl",
        "rungs/lora/result.json", "rungs/lora/predictions.jsonl",
        "rungs/lora/adapter/adapter_config.json", "rungs/lora/adapter/adapter_model.safetensors",
        "rungs/lora/adapter/lmladder_fingerprint.txt", "rungs/lora/adapter/lmladder_cost.json",
        "rungs/lora/adapter/README.md",
    ]), files
    assert not [p for p in out2.rglob("*") if p.is_dir() and p.name.startswith(".")]
    res = json.loads((out2 / "results.json").read_text())
    assert [x["name"] for x in res["rungs"]] == ["zero-shot", "lora"]
    lora = json.loads((out2 / "rungs/lora/result.json").read_text())
    assert lora["details"]["world_size"] == 2 and lora["details"]["steps"] == 4
    assert len((out2 / "rungs/lora/predictions.jsonl").read_text().splitlines()) == 8

    # the same run in one process: same fingerprint, same loss trajectory
    out1 = tmp_path / "run1"
    code, _, err = run_cli("run", *common, "--out", str(out1))
    assert code == 0, err
    one = json.loads((out1 / "rungs/lora/result.json").read_text())
    assert one["fingerprint"] == lora["fingerprint"]
    la, lb = one["details"]["loss_curve"], lora["details"]["loss_curve"]
    assert len(la) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < TOL

    # resume under torchrun: rank 0 decides, nothing runs again
    stamp = (out2 / "rungs/lora/result.json").read_text()
    r = _launch(["-m", "lmladder", "run", *common, "--model", str(tiny_dir), "--out", str(out2)], tmp_path, nproc=2)
    assert r.returncode == 0, r.stdout[-4000:]
    assert (out2 / "rungs/lora/result.json").read_text() == stamp


def test_fsdp_launch_is_refused_before_anything_is_written(run_cli, toy_data, tmp_path, monkeypatch):
    """FSDP/DeepSpeed would leave rank 0 with a shard to save and evaluate: refuse it."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    train, test = toy_data
    out = tmp_path / "r"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "lora", "--out", str(out))
    assert code == 2 and "lora: FSDP sharding is not supported yet" in err
    assert not out.exists()
