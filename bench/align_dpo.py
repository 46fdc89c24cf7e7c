"""DPO training speed: lmladder's dpo rung against TRL's DPOTrainer used directly (issue 5).

Both sides train the same thing: a LoRA adapter (the config's r / alpha / target modules)
on a fresh copy of the same loaded model, the same train pairs (prompt = the task's
rendered user message in the chat template), batch size, max_length, learning-rate
schedule, seed and number of steps, on the same machine, one after the other, for several
rounds with the order alternating (lmladder first in even rounds, TRL first in odd ones),
after a warm-up round that is not counted.

* **lmladder** -- the dpo rung's own training path: ``prepare()`` (our tokenisation,
  exact masks), ``wrap()`` and ``train_weights()`` = training/trl_train.run with
  ``PretokenizedDPOTrainer``, atomic checkpoints (about 5 per run, as in a normal run) and
  the stats / curves;
* **TRL** -- ``DPOTrainer(model, args=DPOConfig(...), train_dataset=<conversational
  prompt / chosen / rejected rows>, peft_config=LoraConfig(...))``, TRL's own
  tokenisation, checkpoints (plain ``Trainer`` ones) on the same schedule.

Two speeds per side: **loop** steps/s = steps / seconds inside ``trainer.train()``;
**call** steps/s = steps / seconds of the whole training call (tokenisation, trainer
construction, training, checkpoints). The ratio lmladder / TRL of each, per round and
median; the issue asks for lmladder's overhead (1 - ratio) <= 5%.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/align_dpo.py --steps 6 --rounds 4

Timings on a shared CPU vary with its load: compare the two sides within one invocation.

Memory mode (issue 16): ``--memory`` runs each side in its own subprocess (peak RSS = the
child's ``ru_maxrss``, model load included), alternating, on the issue's data: the first
``--limit-train`` pairs of ``--train`` with ``dpo.max_length=1024``, TRL's DPOTrainer with its
defaults at the rung's batch_size (the same global batch) vs
the dpo rung's path (lmladder's defaults: ``memory_budget_mb`` unset). ``--longest K`` trains
on the K longest pairs only (every step then holds long pairs: the worst case of a full run,
in a few steps); the loss curves of both sides are printed side by side.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/align_dpo.py --memory \
        --train ../shared/datasets/hhh.preferences.jsonl --limit-train 150 --longest 16 --steps 4
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def lmladder_side(ctx, cfg, base, tok, work: Path, tag: str) -> dict:
    from lmladder.rungs.dpo import Dpo

    ctx.set_base(copy.deepcopy(base))  # the rung trains (LoRA injected into) a fresh copy
    t0 = time.perf_counter()
    rung = Dpo(ctx, cfg.dpo, work)
    rung.prepare()
    model = rung.wrap(ctx.base()[0])
    stats = rung.train_weights(model, tok, work / ".trainer", work / "checkpoints", f"bench-{tag}")
    call = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return {"loop": stats["steps_per_second"], "call": stats["steps"] / call, "loss": stats["final_train_loss"],
            "steps": stats["steps"]}


def trl_rows(ctx) -> list[dict]:
    """The same pairs in TRL's conversational shape (the same user message)."""
    task = ctx.task
    return [{"prompt": [{"role": "user", "content": task.train_message(e)}],
             "chosen": [{"role": "assistant", "content": task.answer(e)}],
             "rejected": [{"role": "assistant", "content": task.rejected(e)}]} for e in ctx.data.train]


def trl_side(cfg, base, tok, rows, steps: int, seed: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from trl import DPOConfig, DPOTrainer

    d = cfg.dpo
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    args = DPOConfig(
        output_dir=str(work), per_device_train_batch_size=d.batch_size, gradient_accumulation_steps=d.grad_accum,
        learning_rate=d.lr, max_steps=steps, lr_scheduler_type=d.lr_scheduler, warmup_steps=d.warmup_ratio,
        weight_decay=d.weight_decay, logging_steps=1, report_to="none", seed=seed,
        # checkpoints on the rung's schedule (training/trl_train.training_args): the same work
        save_strategy="steps" if d.checkpoints else "no", save_steps=d.save_steps or max(1, steps // 5),
        save_total_limit=2,
        data_seed=seed, use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
        gradient_checkpointing=False, dataloader_num_workers=0, beta=d.beta, loss_type=[d.loss_type],
        max_length=d.max_length,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=copy.deepcopy(tok),
        peft_config=LoraConfig(task_type=TaskType.CAUSAL_LM, r=d.r, lora_alpha=d.alpha, lora_dropout=d.dropout,
                               target_modules=d.target_modules),
    )
    t1 = time.perf_counter()
    out = trainer.train()
    t2 = time.perf_counter()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(work, ignore_errors=True)
    return {"loop": out.global_step / (t2 - t1), "call": out.global_step / (t2 - t0), "loss": losses[-1],
            "steps": out.global_step}


def memory_child(side: str, a) -> dict:
    """One side of the memory comparison, in this (fresh) process."""
    import resource

    import torch

    from lmladder import config as C
    from lmladder.run import ladder
    from lmladder.tasks import make_task

    raw = {"task": {"kind": "preference"}, "model": "smollm2-135m", "rungs": ["dpo"],
           "data": {"train": str(Path(a.train).resolve()), "input_field": "prompt", "limit_train": a.limit_train}}
    for s_ in ["dpo.max_length=1024", f"dpo.max_steps={a.steps}", "dpo.forgetting_text=null", *a.set]:
        C.apply_set(raw, s_)
    cfg = C.build(raw)
    dataset = ladder.validate(cfg)
    if a.longest:  # the K longest pairs (characters): every step holds long pairs
        key = lambda e: len(e.input) + max(len(str(e.fields.get("chosen", ""))), len(str(e.fields.get("rejected", ""))))  # noqa: E731
        dataset.train = sorted(dataset.train, key=key, reverse=True)[: a.longest]
    task = make_task(cfg.task, dataset.info["labels"], cfg.eval, cfg.seed, dataset)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-mem-"))
    ctx = ladder.Context(cfg, dataset, task, tmp)
    base, tok = ctx.base()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if side == "lmladder":
        from lmladder.rungs.dpo import Dpo

        rung = Dpo(ctx, cfg.dpo, tmp / "dpo")
        rung.prepare()
        model = rung.wrap(base)
        stats = rung.train_weights(model, tok, tmp / "dpo" / ".trainer", None, "bench")
        losses, plan = stats["loss_curve"], stats.get("memory_plan", {})
        plan = {k: plan.get(k) for k in ("budget_mb", "micro", "accum", "fit_tokens", "micro_batches_checkpointed",
                                         "micro_batches", "max_layers_checkpointed")}
    else:
        from datasets import Dataset
        from peft import LoraConfig, TaskType
        from trl import DPOConfig, DPOTrainer

        d = cfg.dpo
        args = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=d.batch_size,
                         gradient_accumulation_steps=d.grad_accum, learning_rate=d.lr, max_steps=a.steps,
                         lr_scheduler_type=d.lr_scheduler, warmup_steps=d.warmup_ratio, logging_steps=1,
                         report_to="none", seed=cfg.seed, data_seed=cfg.seed, use_cpu=True, save_strategy="no",
                         beta=d.beta, max_length=d.max_length)
        trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(trl_rows(ctx)),
                             processing_class=copy.deepcopy(tok),
                             peft_config=LoraConfig(task_type=TaskType.CAUSAL_LM, r=d.r, lora_alpha=d.alpha,
                                                    lora_dropout=d.dropout, target_modules=d.target_modules))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        plan = {}
    seconds = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    return {"side": side, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds, "losses": losses, "plan": plan, "load": os.getloadavg(),
            "pairs": len(dataset.train)}


def _watched(cmd, env, kill_mb: int, scratch: Path) -> tuple[bool, float]:
    """Run ``cmd``, sampling its RSS (and its children's) every 0.5 s; stop it past ``kill_mb``.
    Returns (stopped, highest RSS sampled); stdout / stderr in ``_watched.last_stdout`` / ``_stderr``."""
    import subprocess

    import psutil

    scratch.mkdir(parents=True, exist_ok=True)
    with open(scratch / "out", "w") as fo, open(scratch / "err", "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        ps, top, killed = psutil.Process(proc.pid), 0.0, False
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]) / 2**20
            except psutil.Error:
                rss = 0.0
            top = max(top, rss)
            if rss > kill_mb:
                proc.kill()
                killed = True
                break
            time.sleep(0.5)
        proc.wait()
    _watched.last_stdout = (scratch / "out").read_text()
    _watched.last_stderr = (scratch / "err").read_text()
    shutil.rmtree(scratch, ignore_errors=True)
    return killed, top


def memory_main(a) -> None:
    import json
    import sys

    results = []
    for i in range(a.rounds):
        sides = [x for x in a.sides.split(",") if x]
        for side in (sides if i % 2 == 0 else sides[::-1]):
            cmd = [sys.executable, __file__, "--memory-child", side, "--train", a.train, "--limit-train",
                   str(a.limit_train), "--longest", str(a.longest), "--steps", str(a.steps),
                   *[x for s_ in a.set for x in ("--set", s_)]]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            killed, top = _watched(cmd, env, a.kill_mb, Path(tempfile.mkdtemp()) / f"{side}{i}")
            if killed:  # the machine is shared: a run past --kill-mb is stopped, its peak reported as a floor
                print(f"{side:9s} peak RSS > {a.kill_mb} MB: stopped at {top:.0f} MB (--kill-mb)", flush=True)
                results.append({"side": side, "peak_rss_mb": top, "killed": True})
                continue
            stdout = _watched.last_stdout
            line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{side}: failed\n{_watched.last_stderr[-3000:]}", flush=True)
                continue
            res = json.loads(line[7:])
            results.append(res)
            print(f"{side:9s} peak RSS {res['peak_rss_mb']:7.0f} MB  {res['seconds']:6.1f} s  pairs {res['pairs']}  "
                  f"load {res['load'][0]:.2f}  losses {[round(x, 4) for x in res['losses']]}  {res['plan']}",
                  flush=True)
    for side in ("lmladder", "trl"):
        v = [r["peak_rss_mb"] for r in results if r["side"] == side]
        if v:
            print(f"{side}: peak RSS {min(v):.0f}-{max(v):.0f} MB (n={len(v)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", action="store_true", help="peak RSS per side, each in its own process (issue 16)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--train", default=str(ROOT.parent / "shared/datasets/hhh.preferences.jsonl"))
    ap.add_argument("--limit-train", type=int, default=150)
    ap.add_argument("--longest", type=int, default=0, help="memory mode: train on the K longest pairs only")
    ap.add_argument("--sides", default="lmladder,trl", help="memory mode: the sides run, alternating")
    ap.add_argument("--kill-mb", type=int, default=12000, help="memory mode: stop a side whose RSS passes this")
    ap.add_argument("--config", default=str(ROOT / "examples/hhh_dpo.yaml"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4, help="counted rounds (the order alternates)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (caches, allocator)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides (e.g. dpo.batch_size=2, dpo.max_length=128)")
    a = ap.parse_args()
    if a.memory_child:
        import json

        print("RESULT " + json.dumps(memory_child(a.memory_child, a)), flush=True)
        return
    if a.memory:
        memory_main(a)
        return

    import torch

    from lmladder import config as C
    from lmladder.run import ladder
    from lmladder.tasks import make_task

    raw = C.read_yaml(a.config)
    raw["rungs"] = ["dpo"]
    for k in ("from", "from_"):  # both sides start from the base model
        raw.setdefault("dpo", {}).pop(k, None)
    for s in [f"dpo.max_steps={a.steps}", "dpo.forgetting_text=null", *a.set]:
        C.apply_set(raw, s)
    cfg = C.build(raw)
    dataset = ladder.validate(cfg)
    task = make_task(cfg.task, dataset.info["labels"], cfg.eval, cfg.seed, dataset)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    ctx = ladder.Context(cfg, dataset, task, tmp)
    base, tok = ctx.base()
    rows = trl_rows(ctx)

    d = cfg.dpo
    print(f"# DPO steps/s: lmladder dpo rung vs TRL DPOTrainer directly ({platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, {'cuda' if torch.cuda.is_available() else 'cpu'})")
    print(f"model {cfg.model}, {len(rows)} train pairs, LoRA r={d.r} alpha={d.alpha} {d.target_modules}, "
          f"batch {d.batch_size}, max_length {d.max_length}, {a.steps} steps, beta {d.beta}, loss {d.loss_type}\n")
    print("| round | side | loop steps/s | call steps/s | final loss |")
    print("|---|---|---|---|---|")
    res: dict[str, list[dict]] = {"lmladder": [], "trl": []}
    for i in range(-a.warmup, a.rounds):
        order = ["lmladder", "trl"] if i % 2 == 0 else ["trl", "lmladder"]
        for side in order:
            work = tmp / f"{side}{i}"
            r = (lmladder_side(ctx, cfg, base, tok, work, str(i)) if side == "lmladder"
                 else trl_side(cfg, base, tok, rows, a.steps, cfg.seed, work))
            if i >= 0:
                res[side].append(r)
            name = str(i) if i >= 0 else "warm-up"
            print(f"| {name} | {side} | {r['loop']:.4f} | {r['call']:.4f} | {r['loss']:.4f} |", flush=True)
    print("\n| measure | lmladder (median) | TRL (median) | ratio lmladder/TRL | per-round ratios |")
    print("|---|---|---|---|---|")
    for k in ("loop", "call"):
        lm = [r[k] for r in res["lmladder"]]
        tr = [r[k] for r in res["trl"]]
        ratios = [x / y for x, y in zip(lm, tr)]
        print(f"| {k} steps/s | {statistics.median(lm):.4f} | {statistics.median(tr):.4f} | "
              f"{statistics.median(lm) / statistics.median(tr):.3f} | {', '.join(f'{x:.3f}' for x in ratios)} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
