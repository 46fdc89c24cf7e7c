"""Eval throughput: lmladder's scorer vs lm-eval-harness on the same prompts (issue 2).

What is compared
----------------
Both engines score the SAME (prompt, label) pairs with the SAME model object, in one
process: SST-2 test sentences (examples/data/sst2.test.jsonl) as zero-shot and as
8-shot prompts, each rendered through SmolLM2's chat template by lmladder's
``ChatFormat``, with the two labels ``negative`` / ``positive`` as continuations.

* lmladder: ``ClassificationTask.predict`` -> ``inference.scoring.loglikelihoods`` (shared
  prefix KV cache computed once, only the last position's logits computed).
* lm-eval:  ``HFLM(pretrained=model, tokenizer=tok).loglikelihood(requests)`` with one
  ``Instance(context=prompt, continuation=label)`` per (example, label); run at
  batch size 1 (its default) and at lmladder's batch size. lm-eval runs each full
  prompt through the model, computes logits at every position, and (logits_cache)
  runs one row per prompt for single-token labels.

The script checks that both engines see the same token ids (lm-eval with
``add_bos_token=False``; the chat template already writes its special tokens),
times each measurement once after a small warmup, checks that the two engines agree
(argmax label, max |log-likelihood difference|), and prints a markdown table.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/eval_throughput.py            # full: 372 examples
    HF_HUB_OFFLINE=1 .venv/bin/python bench/eval_throughput.py --limit 32 # quick run

Needs lm-eval: ``.venv/bin/pip install -c constraints.txt lm-eval``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Decide whether the sentiment of the movie review sentence is positive or negative."
LABELS = ["negative", "positive"]


@dataclass
class Timing:
    engine: str  # e.g. "lmladder (bs=16)"
    kind: str  # "zero-shot" | "8-shot"
    n: int  # examples scored
    seconds: float
    lls: list[list[float]]  # lls[i][j] = log p(label j | prompt i)
    load: tuple[float, float]  # 1-min load average before / after (noise indicator)

    @property
    def per_s(self) -> float:
        return self.n / self.seconds


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=None, help="score only the first N test examples (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="lmladder batch size; lm-eval also runs at this size")
    p.add_argument("--bs1-limit", type=int, default=None,
                   help="run lm-eval batch_size=1 on only the first N examples (lmladder is then "
                        "timed again on the same N for that ratio); default: same set as the rest")
    p.add_argument("--shots", type=int, default=8, help="in-context examples for the few-shot prompts")
    p.add_argument("--warmup", type=int, default=4, help="examples per engine and prompt kind scored before timing")
    p.add_argument("--model", default="smollm2-135m", help="lmladder model spec")
    p.add_argument("--data", type=Path, default=ROOT / "examples" / "data", help="folder with sst2.{train,test}.jsonl")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# --------------------------------------------------------------------------- engines


def run_lmladder(task, model, fmt, messages: list[str], label: str, kind: str) -> Timing:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    preds, _ = task.predict(model, fmt, messages, desc=f"lmladder {kind}")
    seconds = time.perf_counter() - t0
    lls = [[p["scores"][lab] for lab in task.labels] for p in preds]
    return Timing(label, kind, len(messages), seconds, lls, (load0, os.getloadavg()[0]))


def lmeval_requests(fmt, messages: list[str], labels: list[str]):
    from lm_eval.api.instance import Instance

    reqs = []
    for m in messages:
        context = fmt.prompt(m)
        for j, lab in enumerate(labels):  # idx = choice index, as lm-eval's own tasks set it
            reqs.append(
                Instance(
                    request_type="loglikelihood",
                    doc={},
                    arguments=(context, fmt.answer_prefix() + lab),
                    idx=j,
                )
            )
    return reqs


def run_lmeval(lm, fmt, messages: list[str], labels: list[str], label: str, kind: str) -> Timing:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    # Building the requests (chat-template rendering) is part of the work, as in lmladder.
    out = lm.loglikelihood(lmeval_requests(fmt, messages, labels), disable_tqdm=True)
    seconds = time.perf_counter() - t0
    k = len(labels)
    lls = [[out[i * k + j][0] for j in range(k)] for i in range(len(messages))]
    return Timing(label, kind, len(messages), seconds, lls, (load0, os.getloadavg()[0]))


def check_same_tokens(lm, fmt, messages: list[str], labels: list[str]) -> tuple[int, int]:
    """Compare the token ids both engines score, over every (prompt, label) pair.

    Returns (pairs whose full prompt+label ids differ, pairs where lm-eval splits
    context/continuation elsewhere). lm-eval moves trailing whitespace of the context
    into the continuation (``_encode_pair``): the chat template's prompt ends with
    ``"assistant\\n"``, so lm-eval scores ``"\\n" + label`` after the prompt minus its last
    token. The model sees the same sequence; lm-eval's log-likelihood adds the
    log p("\\n") term, which is the same for both labels (so the margin is unchanged).
    """
    tok = fmt.tokenizer
    choices = [tok(fmt.answer_prefix() + lab, add_special_tokens=False).input_ids for lab in labels]
    differ = moved = 0
    for m in messages:
        prompt = fmt.prompt(m)
        ours = fmt.encode(prompt)
        for lab, choice in zip(labels, choices):
            ctx, cont = lm._encode_pair(prompt, fmt.answer_prefix() + lab)
            differ += ctx + cont != ours + choice
            moved += ctx != ours
    return differ, moved


# --------------------------------------------------------------------------- comparison


def agreement(a: Timing, b: Timing) -> tuple[float, float, float]:
    """(share of examples with the same argmax label, max |ll_a - ll_b|,
    max |margin_a - margin_b|) where margin = ll(label j) - ll(label 0): what decides
    the prediction, and free of any term shared by all labels."""
    same, diff, mdiff = 0, 0.0, 0.0
    for ra, rb in zip(a.lls, b.lls, strict=True):
        same += max(range(len(ra)), key=ra.__getitem__) == max(range(len(rb)), key=rb.__getitem__)
        diff = max(diff, max(abs(x - y) for x, y in zip(ra, rb)))
        mdiff = max(mdiff, max(abs((x - ra[0]) - (y - rb[0])) for x, y in zip(ra, rb)))
    return same / len(a.lls), diff, mdiff


def accuracy(t: Timing, golds: list[str]) -> float:
    return sum(LABELS[max(range(len(r)), key=r.__getitem__)] == g for r, g in zip(t.lls, golds)) / len(golds)


def main() -> None:
    args = parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    from lmladder.config import DataConfig, EvalConfig, TaskConfig
    from lmladder.data import read_examples
    from lmladder.models import load_causal_lm
    from lmladder.prompts import ChatFormat
    from lmladder.rungs.few_shot import select_balanced
    from lmladder.tasks.classification import ClassificationTask

    B = args.batch_size
    model, tok, _ = load_causal_lm(args.model)
    fmt = ChatFormat(tok, system_prompt=None)
    task = ClassificationTask(TaskConfig(instruction=INSTRUCTION), LABELS, EvalConfig(batch_size=B), seed=args.seed)
    train = read_examples(args.data / "sst2.train.jsonl", DataConfig(), "train")
    test = read_examples(args.data / "sst2.test.jsonl", DataConfig(), "test")
    if args.limit:
        test = test[: args.limit]
    golds = [e.label for e in test]
    shots = [(e.input, task.answer(e)) for e in select_balanced(train, args.shots, seed=args.seed)]
    kinds = {
        "zero-shot": [task.user_message(e.input) for e in test],
        f"{args.shots}-shot": [task.user_message(e.input, shots) for e in test],
    }
    zero, few = list(kinds)
    n = len(test)
    n1 = min(args.bs1_limit or n, n)

    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, lm-eval {lm_eval.__version__}")
    print(f"# model {args.model} ({model.dtype}, {model.device}); {n} SST-2 test examples; "
          f"labels {LABELS}; lmladder bs={B}; lm-eval bs=1 on {n1} examples, bs={B} on {n}")
    for kind, msgs in kinds.items():
        lens = [len(fmt.encode(fmt.prompt(m))) for m in msgs]
        print(f"# {kind}: {sum(lens) / n:.0f} prompt tokens/example (min {min(lens)}, max {max(lens)})")

    # One HFLM per batch size, both wrapping the same model object and tokenizer.
    lm_eval_bs = {b: HFLM(pretrained=model, tokenizer=tok, batch_size=b, add_bos_token=False) for b in (1, B)}
    for kind, msgs in kinds.items():
        differ, moved = check_same_tokens(lm_eval_bs[B], fmt, msgs, LABELS)
        print(f"# {kind}: prompt+label token ids differ between engines in {differ} of {n * len(LABELS)} "
              f"pairs; lm-eval moved the trailing '\\n' into the continuation in {moved}")

    # Warmup: every engine and batch size on a few examples of each kind (the first
    # forward pass in a process is much slower; nobody should pay it in the timings).
    w = min(args.warmup, n)
    for kind, msgs in kinds.items():
        task.predict(model, fmt, msgs[:w], desc="warmup")
        for lm in lm_eval_bs.values():
            lm.loglikelihood(lmeval_requests(fmt, msgs[:w], LABELS), disable_tqdm=True)

    res: dict[tuple[str, str], Timing] = {}

    def record(t: Timing) -> None:
        res[t.engine, t.kind] = t
        print(f"  {t.engine:<22} {t.kind:<9} n={t.n:<4} {t.seconds:8.1f} s  {t.per_s:6.2f} ex/s  "
              f"(load avg {t.load[0]:.2f} -> {t.load[1]:.2f})", flush=True)

    L, E1, EB = f"lmladder (bs={B})", "lm-eval (bs=1)", f"lm-eval (bs={B})"
    for kind, msgs in kinds.items():
        record(run_lmladder(task, model, fmt, msgs, L, kind))
    for kind, msgs in kinds.items():
        record(run_lmeval(lm_eval_bs[B], fmt, msgs, LABELS, EB, kind))
    for kind, msgs in kinds.items():
        record(run_lmeval(lm_eval_bs[1], fmt, msgs[:n1], LABELS, E1, kind))
    L1 = L  # lmladder timing on the examples lm-eval bs=1 saw
    if n1 < n:
        L1 = f"lmladder (bs={B}) n={n1}"
        for kind, msgs in kinds.items():
            record(run_lmladder(task, model, fmt, msgs[:n1], L1, kind))

    # ------------------------------------------------------------------ report
    print("\n| engine | prompts | examples | seconds | examples/s | accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    for t in res.values():
        print(f"| {t.engine} | {t.kind} | {t.n} | {t.seconds:.1f} | {t.per_s:.2f} | {accuracy(t, golds[: t.n]):.3f} |")

    print("\n| engines compared | prompts | same predicted label | max abs log-lik diff | max abs margin diff |")
    print("|---|---|---:|---:|---:|")
    for other, mine in ((EB, L), (E1, L1)):
        for kind in kinds:
            a, b = res[mine, kind], res[other, kind]
            agree, diff, mdiff = agreement(a, b)
            print(f"| {a.engine} vs {b.engine} | {kind} | {agree:.1%} ({round(agree * a.n)}/{a.n}) "
                  f"| {diff:.2e} | {mdiff:.2e} |")

    def ratio(num: Timing, den: Timing) -> float:
        assert num.n == den.n, "ratios only between timings of the same examples"
        return num.seconds / den.seconds

    s1, sB = ratio(res[E1, zero], res[L1, zero]), ratio(res[EB, zero], res[L, zero])
    fz = ratio(res[L, few], res[L, zero])
    print("\n| ratio | value | target |")
    print("|---|---:|---|")
    print(f"| zero-shot speedup, lmladder vs lm-eval bs=1 (time lm-eval / time lmladder) | {s1:.2f}x | >= 1.5x: {'met' if s1 >= 1.5 else 'NOT met'} |")
    print(f"| zero-shot speedup, lmladder vs lm-eval bs={B} | {sB:.2f}x | >= 1.5x: {'met' if sB >= 1.5 else 'NOT met'} |")
    print(f"| {few} speedup, lmladder vs lm-eval bs=1 | {ratio(res[E1, few], res[L1, few]):.2f}x | |")
    print(f"| {few} speedup, lmladder vs lm-eval bs={B} | {ratio(res[EB, few], res[L, few]):.2f}x | |")
    print(f"| lmladder {few} time / zero-shot time | {fz:.2f} | <= 1.5: {'met' if fz <= 1.5 else 'NOT met'} |")
    print(f"| lm-eval bs=1 {few} time / zero-shot time | {ratio(res[E1, few], res[E1, zero]):.2f} | (comparison) |")
    print(f"| lm-eval bs={B} {few} time / zero-shot time | {ratio(res[EB, few], res[EB, zero]):.2f} | (comparison) |")


if __name__ == "__main__":
    main()
