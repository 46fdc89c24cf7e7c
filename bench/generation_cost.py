"""Generation cost: constrained vs free decoding, self-consistency vs one greedy CoT (issue 3).

What is measured (SmolLM2-135M-Instruct, fp32, CPU; everything through lmladder's own
path ``tasks.base.generate_answers`` -> ``inference.generate``):

(a) **Grammar overhead.** The same zero-shot prompts decoded greedily with and without
    the task's grammar (inference/constrain.py, xgrammar, and llguidance with ``--llg``):
    * extraction: WNUT-16 tweets (examples/wnut_extraction.yaml, first ``--n-extract``
      test inputs), JSON Schema of ``[{"text", "type"}]`` entities, max_new_tokens 64;
    * classification: SST-2 sentences (examples/sst2.yaml), ``choice`` of the two labels,
      max_new_tokens 8.
    Reported: seconds per example and per generated token; their ratio constrained /
    free (target <= 1.3x), and the share of outputs that parse.
(b) **Self-consistency batching** (and, since issue 16, paths that stop at their answer
    line and leave the batch, as the cot / self-consistency rungs do by default;
    ``--no-stop-at-answer`` times the old behaviour). ``--n-math`` GSM8K questions (examples/gsm8k.yaml):
    one greedy CoT (n=1) vs self-consistency N=8 (sampled, T=0.7, top-p 0.95), same
    prompts and max_new_tokens; N paths share one prefill and decode as one batch.
    Reported: wall time ratio SC / CoT (target <= 3x) at ``--sc-batch`` sequences per
    batch (default 64: all 8 prompts x 8 paths in one batch) and, with ``--sc-bs8``, at
    gen_batch_size 8 (the default: one prompt's 8 paths per batch).

The CPU is shared with other jobs, so the arms alternate A/B/A/B (``--reps`` rounds) in
one process and every ratio is reported per round and as a range. torch runs 1 thread by
default (``--threads``): on an oversubscribed CPU two OpenMP threads wait at barriers
(measured: 3.0 s vs 0.36 s per SmolLM2 decode step at batch 4, load average 15).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generation_cost.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/generation_cost.py --reps 1 --n-extract 4 --n-math 2   # quick
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _task(example_yaml: str, limit: int, model_ctx):
    """(task, test examples, zero-shot messages) for an example config, first ``limit``
    test rows in file order."""
    from lmladder import config as config_mod
    from lmladder import data as data_mod
    from lmladder.tasks import make_task

    cfg = config_mod.build(config_mod.read_yaml(ROOT / "examples" / example_yaml))
    cfg.data.limit_test = None
    ds = data_mod.load(cfg.data, cfg.seed, cfg.task.labels, cfg.task.kind)
    task = make_task(cfg.task, ds.info["labels"], cfg.eval, cfg.seed, ds)
    test = ds.test[:limit]
    return cfg, task, test


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_grammar(model, fmt, name, yaml, n, max_new, reps, engines):
    from lmladder.tasks.base import generate_answers

    cfg, task, test = _task(yaml, n, None)
    task.eval_cfg.gen_batch_size = 8
    msgs = [task.user_message(e) for e in test]
    arms = [("free", False, "xgrammar")] + [(f"constrained ({e})", True, e) for e in engines]

    def run(constrained, engine):
        return generate_answers(task, model, fmt, msgs, test, constrained=constrained, engine=engine,
                                max_new_tokens=max_new, desc=name)

    run(True, engines[0])  # warmup: tokenizer info + grammar compile, kernels
    rows = []
    for r in range(reps):
        for arm, constrained, engine in arms:
            secs, (preds, info) = _timed(lambda: run(constrained, engine))
            toks = info["generation"]["generated_tokens"]
            gsec = info["generation"].get("grammar_seconds", 0.0)
            rows.append(dict(task=name, arm=arm, round=r + 1, seconds=secs, examples=len(msgs), tokens=toks,
                             grammar_seconds=gsec, parsed=sum(p["pred"] is not None for p in preds) / len(preds)))
            print(f"  {name} {arm} round {r + 1}: {secs:.2f}s, {toks} tokens, grammar {gsec:.3f}s, "
                  f"parsed {rows[-1]['parsed']:.0%}", flush=True)
    return rows


def bench_sc(model, fmt, n, max_new, reps, sc_batch, bs8=False, stop=True):
    from lmladder.tasks.base import generate_answers

    cfg, task, test = _task("gsm8k.yaml", n, None)
    msgs = [task.user_message(e, reasoning=cfg.cot.prompt) for e in test]

    def run(n_samples, batch):
        task.eval_cfg.gen_batch_size = batch
        kw = dict(do_sample=True, temperature=0.7, top_p=0.95) if n_samples > 1 else {}
        return generate_answers(task, model, fmt, msgs, test, reasoning=True, max_new_tokens=max_new,
                                n=n_samples, desc=f"n={n_samples}", stop_at_answer=stop, **kw)

    run(1, 8)  # warmup
    rows = []
    for r in range(reps):
        arms = [("cot greedy (n=1, bs 8)", 1, 8), (f"sc N=8 (bs {sc_batch})", 8, sc_batch)]
        if bs8:
            arms.append(("sc N=8 (bs 8)", 8, 8))
        for arm, n_samples, batch in arms:
            secs, (preds, info) = _timed(lambda: run(n_samples, batch))
            g = info["generation"]
            rows.append(dict(task="gsm8k", arm=arm, round=r + 1, seconds=secs, examples=len(msgs),
                             tokens=g["generated_tokens"], prefill=g["prefill_tokens"],
                             row_steps=g.get("decode_row_steps"), answer_stops=g.get("answer_stops"),
                             parsed=sum(p["pred"] is not None for p in preds) / len(preds)))
            print(f"  gsm8k {arm} round {r + 1}: {secs:.2f}s, {g['generated_tokens']} tokens, "
                  f"prefill {g['prefill_tokens']}", flush=True)
    return rows


def _range(xs):
    return f"{min(xs):.2f}–{max(xs):.2f}x" if len(xs) > 1 else f"{xs[0]:.2f}x"


def report(grammar_rows, sc_rows, engines):
    print("\n| task | arm | round | s / example | generated tokens | ms / token | grammar s (share) | parsed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in grammar_rows + sc_rows:
        g = r.get("grammar_seconds") or 0.0
        print(f"| {r['task']} | {r['arm']} | {r['round']} | {r['seconds'] / r['examples']:.3f} | {r['tokens']} | "
              f"{1000 * r['seconds'] / max(r['tokens'], 1):.1f} | {g:.3f} ({g / r['seconds']:.1%}) | {r['parsed']:.0%} |")
    print("\n| ratio | per round | range | target |")
    print("|---|---|---|---|")
    for task in sorted({r["task"] for r in grammar_rows}):
        for e in engines:
            pairs = []
            for rnd in sorted({r["round"] for r in grammar_rows}):
                get = {r["arm"]: r for r in grammar_rows if r["task"] == task and r["round"] == rnd}
                f, c = get["free"], get[f"constrained ({e})"]
                pairs.append((c["seconds"] / f["seconds"],
                              (c["seconds"] / max(c["tokens"], 1)) / (f["seconds"] / max(f["tokens"], 1))))
            shares = [r["grammar_seconds"] / r["seconds"] for r in grammar_rows
                      if r["task"] == task and r["arm"] == f"constrained ({e})"]
            xs = [1 / (1 - s) for s in shares]
            print(f"| {task}: constrained ({e}), wall time / (wall time - time in lmladder's grammar code) | "
                  f"{', '.join(f'{x:.3f}x' for x in xs)} | {_range(xs)} | <= 1.3x: {'met' if max(xs) <= 1.3 else 'missed'} |")
            for label, k in (("per example", 0), ("per generated token", 1)):
                xs = [p[k] for p in pairs]
                met = "met" if max(xs) <= 1.3 else ("met in some rounds" if min(xs) <= 1.3 else "missed")
                print(f"| {task}: constrained ({e}) / free, time {label} | "
                      f"{', '.join(f'{x:.2f}x' for x in xs)} | {_range(xs)} | <= 1.3x: {met} |")
    arms = sorted({r["arm"] for r in sc_rows if r["arm"].startswith("sc")})
    for arm in arms:
        xs = []
        for rnd in sorted({r["round"] for r in sc_rows}):
            get = {r["arm"]: r for r in sc_rows if r["round"] == rnd}
            xs.append(get[arm]["seconds"] / get["cot greedy (n=1, bs 8)"]["seconds"])
        met = "met" if max(xs) <= 3 else ("met in some rounds" if min(xs) <= 3 else "missed")
        print(f"| gsm8k: {arm} / cot greedy, wall time | {', '.join(f'{x:.2f}x' for x in xs)} | {_range(xs)} | <= 3x: {met} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="A/B rounds")
    ap.add_argument("--n-extract", type=int, default=16)
    ap.add_argument("--n-class", type=int, default=16)
    ap.add_argument("--n-math", type=int, default=8)
    ap.add_argument("--math-tokens", type=int, default=96)
    ap.add_argument("--sc-batch", type=int, default=64, help="sequences per batch for the batched SC arm")
    ap.add_argument("--sc-bs8", action="store_true", help="also time SC at gen_batch_size 8 (one prompt per batch)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, oversubscribed CPU two OpenMP threads stall at barriers)")
    ap.add_argument("--llg", action="store_true", help="also time llguidance")
    ap.add_argument("--skip", default="", help="comma list of: extraction,classification,sc")
    ap.add_argument("--no-stop-at-answer", action="store_true",
                    help="self-consistency / CoT paths decode to end-of-turn or max tokens (before issue 16)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from lmladder.models import load_causal_lm
    from lmladder.prompts import ChatFormat

    model, tok, _ = load_causal_lm("smollm2-135m")
    fmt = ChatFormat(tok)
    load0 = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, load avg {load0:.1f}", flush=True)
    engines = ["xgrammar"] + (["llguidance"] if args.llg else [])
    skip = set(filter(None, args.skip.split(",")))
    g_rows, sc_rows = [], []
    t0 = time.perf_counter()
    if "extraction" not in skip:
        g_rows += bench_grammar(model, fmt, "extraction", "wnut_extraction.yaml", args.n_extract, 64, args.reps, engines)
    if "classification" not in skip:
        g_rows += bench_grammar(model, fmt, "classification", "sst2.yaml", args.n_class, 8, args.reps, engines)
    if "sc" not in skip:
        sc_rows = bench_sc(model, fmt, args.n_math, args.math_tokens, args.reps, args.sc_batch, args.sc_bs8,
                           stop=not args.no_stop_at_answer)
    report(g_rows, sc_rows, engines)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; load avg before {load0:.1f}, after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
