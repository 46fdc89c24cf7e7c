"""GRPO training speed: lmladder's ``grpo`` rung vs TRL's ``GRPOTrainer`` used directly (issue 5).

What is compared
----------------
The same model (SmolLM2-135M-Instruct, the embedded ``smollm2-135m``, fp32 on CPU), LoRA
(r=16, alpha=32, dropout 0.05, all-linear), prompts (``--prompts`` GSM8K train questions,
the rows lmladder's ``data.limit_train`` picks, in its order, as the math task's zero-shot
user message), reward (1.0 when the completion's
number equals the gold, the math task's own parse), ``num_generations``,
``max_completion_length``, batch size (completions per step), learning rate / warmup /
linear schedule, ``max_steps``, sampling temperature, ``beta=0``, seed, no gradient
checkpointing (lmladder's default; TRL's default is on), no checkpoints saved:

* ``lmladder``: the ``grpo`` rung's ``fit()`` as the ladder runs it (``Grpo.prepare`` +
  ``fit``: LoRA wrap, our prompt tokenisation and stop ids, ``training/trl_train.run`` with
  its subclassed trainer, the adapter saved), ``forgetting_text: null``,
  ``checkpoints: false``;
* ``trl``: ``trl.GRPOTrainer`` with a conversational ``prompt`` column (TRL applies the chat
  template), a ``gold`` column, the reward as a plain function, ``peft_config`` = the same
  LoRA, ``GRPOConfig`` with the same arguments.

Reported per run: the time of ``GRPOTrainer.train()`` (patched the same way on both sides:
lmladder's trainer subclasses it without overriding ``train``), as wall time and as this
process's CPU time (the machine is shared; single-threaded CPU time is far less sensitive
to other jobs than wall time), the time of construction + train (+ the adapter save for
lmladder), and the mean completion length. Both sample the very same step-1 completions
(checked and printed); with rewards that stay 0 (a 135M model on GSM8K) no update moves the
policy and every step samples the same on both sides, so the work is identical. Every run
is its own subprocess; the order alternates per round (``--rounds``); ratios are of the
medians, plus the per-round paired wall ratio.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/align_grpo.py --steps 4 --batch 4 \
        --max-len 32 --prompts 8 --rounds 4
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/align_grpo.py --model PATH   # another model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT / "examples/data/gsm8k.train.jsonl"
INSTRUCTION = "Solve the math word problem. Give the final answer as a number."
LR, WARMUP, R, ALPHA, DROPOUT, SEED = 2e-5, 0.1, 16, 32, 0.05, 0


FIRST: list = []  # the first reward call's completion ids: the two must sample the same at step 1


def _record(completion_ids, gold=()):
    if not FIRST:
        FIRST.append([list(map(int, c)) for c in completion_ids])
        FIRST.append(list(gold))


TIMES: dict = {}


def _time_train() -> None:
    """Time ``GRPOTrainer.train`` (wall and this process's CPU time) the same way on both
    sides: lmladder's trainer subclasses it without overriding ``train``."""
    from trl import GRPOTrainer

    train = GRPOTrainer.train

    def timed(self, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        out = train(self, *args, **kwargs)
        TIMES.update(train_s=time.perf_counter() - w, train_cpu_s=time.process_time() - c)
        return out

    GRPOTrainer.train = timed


def _cfg(a):
    """The run config both sides follow (the trl side reads its prompts through it too, so the
    same train rows come in the same order)."""
    from lmladder import config as C

    return C.build({
        "task": {"kind": "math", "instruction": INSTRUCTION}, "model": a.model, "rungs": ["grpo"], "seed": SEED,
        "data": {"train": str(DATA), "test": str(DATA), "input_field": "question", "label_field": "answer",
                 "limit_train": a.prompts, "limit_test": 1},
        "grpo": {"rewards": ["builtin"], "method": "lora", "r": R, "alpha": ALPHA, "dropout": DROPOUT,
                 "num_generations": a.generations, "batch_size": a.batch, "max_completion_length": a.max_len,
                 "temperature": 1.0, "beta": 0.0, "lr": LR, "warmup_ratio": WARMUP, "lr_scheduler": "linear",
                 "max_steps": a.steps, "forgetting_text": None, "checkpoints": False, "logging_steps": 1},
    })


def _lmladder(a) -> dict:
    from lmladder import rewards
    from lmladder.run import ladder
    from lmladder.rungs.grpo import Grpo
    from lmladder.tasks import make_task

    builtin = rewards.builtin

    def recording_builtin(task, examples):
        fn = builtin(task, examples)

        def exact_numeric(completions, example_index, completion_ids=(), **kw):
            _record(completion_ids, kw.get("gold", ()))
            return fn(completions=completions, example_index=example_index, **kw)

        return exact_numeric

    rewards.builtin = recording_builtin
    import importlib

    for m in ("datasets", "peft", "trl"):  # imported before the clock, as the trl run does
        importlib.import_module(m)

    with tempfile.TemporaryDirectory() as d:
        cfg = _cfg(a)
        dataset = ladder.validate(cfg)
        task = make_task(cfg.task, dataset.info["labels"], cfg.eval, cfg.seed, dataset)
        ctx = ladder.Context(cfg, dataset, task, Path(d))
        ctx.base()
        _time_train()
        t0, c0 = time.perf_counter(), time.process_time()
        rung = Grpo(ctx, cfg.grpo, Path(d) / "rungs" / "grpo")
        rung.prepare()
        stats = rung.fit()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rung.close()
    lengths = [v for _, v in stats["curves"]["completions/mean_length"]]
    return {"steps": stats["steps"], **TIMES, "wall_s": wall, "cpu_s": cpu, "rung_train_s": stats["train_seconds"],
            "mean_completion": sum(lengths) / len(lengths), "reward": stats["curves"]["reward"], "first": FIRST[0], "gold": FIRST[1]}


def _trl(a) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer

    from lmladder import data
    from lmladder.models import load_causal_lm
    from lmladder.prompts import user_message
    from lmladder.tasks.math import find_answer, gold_number

    cfg = _cfg(a)
    rows = data.load(cfg.data, cfg.seed, cfg.task.labels, cfg.task.kind).train  # the rows lmladder trains on
    hints = ["Answer with the final number only."]
    ds = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": user_message(INSTRUCTION, r.input, answer_word="Answer",
                                                             hints=hints)}],
         "gold": gold_number(r.label)} for r in rows])

    def exact_numeric(completions, gold, completion_ids=(), **_):
        _record(completion_ids, gold)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(find_answer(t, first_line=True)[0] == g) for t, g in zip(texts, gold)]

    model, tok, _ = load_causal_lm(a.model)
    _time_train()
    set_seed(SEED)
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        args = GRPOConfig(
            output_dir=d, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, learning_rate=LR,
            max_steps=a.steps, lr_scheduler_type="linear", warmup_steps=WARMUP, weight_decay=0.0,
            logging_steps=1, save_strategy="no", report_to="none", seed=SEED, data_seed=SEED, use_cpu=True,
            bf16=False, gradient_checkpointing=False, dataloader_num_workers=0,
            num_generations=a.generations, max_completion_length=a.max_len, temperature=1.0, top_p=1.0,
            beta=0.0, remove_unused_columns=False, log_completions=False,
        )
        peft = LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                          target_modules="all-linear")
        trainer = GRPOTrainer(model=model, reward_funcs=exact_numeric, args=args, train_dataset=ds,
                              processing_class=tok, peft_config=peft)
        out = trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    hist = trainer.state.log_history
    lengths = [h["completions/mean_length"] for h in hist if "completions/mean_length" in h]
    return {"steps": out.global_step, **TIMES, "wall_s": wall, "cpu_s": cpu,
            "mean_completion": sum(lengths) / len(lengths),
            "reward": [[h["step"], h["reward"]] for h in hist if "reward" in h], "first": FIRST[0], "gold": FIRST[1]}


def _child(a) -> None:
    r = (_lmladder if a.child == "lmladder" else _trl)(a)
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="completions per step (a multiple of --generations)")
    p.add_argument("--max-len", type=int, default=64, help="max_completion_length")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--child", choices=["lmladder", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _child(a)
    runs: dict[str, list[dict]] = {"lmladder": [], "trl": []}
    for rnd in range(a.rounds):
        order = ["lmladder", "trl"] if rnd % 2 == 0 else ["trl", "lmladder"]
        for name in order:
            cmd = [sys.executable, __file__, "--child", name, "--steps", str(a.steps), "--prompts", str(a.prompts),
                   "--generations", str(a.generations), "--batch", str(a.batch), "--max-len", str(a.max_len),
                   "--model", a.model]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            runs[name].append(r)
            print(f"round {rnd + 1} {name:9s} train {r['steps'] / r['train_s']:.4f} steps/s wall, "
                  f"{r['steps'] / r['train_cpu_s']:.4f} steps/CPU-s  (train {r['train_s']:.1f}s, CPU {r['train_cpu_s']:.1f}s; "
                  f"construct+train{' +save' if name == 'lmladder' else ''} {r['wall_s']:.1f}s, CPU {r['cpu_s']:.1f}s)  "
                  f"mean completion {r['mean_completion']:.2f} tok", flush=True)
    same = all(r["first"] == runs["lmladder"][0]["first"] for rs in runs.values() for r in rs)
    lengths = {n: sorted({round(r["mean_completion"], 3) for r in rs}) for n, rs in runs.items()}
    print(f"\nstep-1 completions identical across all runs: {same}; mean completion length per run: {lengths}")
    print(f"settings: {a.steps} steps, {a.batch} completions/step ({a.batch // a.generations} prompts x "
          f"{a.generations}), max_completion_length {a.max_len}, {a.prompts} prompts, LoRA r={R}, {a.rounds} rounds")

    def med(key, n):
        return statistics.median(r["steps"] / r[key] for r in runs[n])

    for key, what in (("train_s", "train steps/s (wall)"), ("train_cpu_s", "train steps/CPU-s")):
        lm, tr = med(key, "lmladder"), med(key, "trl")
        print(f"median {what}: lmladder {lm:.4f}, trl {tr:.4f}; lmladder / trl = {lm / tr:.3f} "
              f"(lmladder overhead {100 * (tr / lm - 1):+.1f}%)")
    paired = [lm["train_s"] / tr["train_s"] for lm, tr in zip(runs["lmladder"], runs["trl"])]
    print("per-round train time lmladder / trl (wall): " + ", ".join(f"{x:.3f}" for x in paired)
          + f"; median {statistics.median(paired):.3f}")
    for key in ("wall_s", "cpu_s"):
        print(f"median construct + train (+ adapter save) {'wall' if key == 'wall_s' else 'CPU'} s: "
              f"lmladder {statistics.median(r[key] for r in runs['lmladder']):.1f}, "
              f"trl {statistics.median(r[key] for r in runs['trl']):.1f}")

if __name__ == "__main__":
    main()
