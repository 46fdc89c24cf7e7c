"""Fair prompt rungs: lmladder's zero-shot (chat, plain, auto) next to an lm-eval-style
plain prompt computed independently, on the same questions with the same model.

The reference follows lm-eval-harness's multiple-choice recipe (e.g. arc_easy /
openbookqa): context ``Question: <stem>\\nAnswer:``, each choice scored as the
continuation ``" " + choice`` by the sum of its token log-probabilities, the context and
continuation split as lm-eval splits them (encode context + continuation together, the
continuation is what follows the context's own encoding); accuracy = argmax == gold. It
is written here with plain ``transformers`` forward passes, one sequence at a time, so it
shares no code with lmladder's scorer.

lmladder's rows run the ladder's zero-shot rung through ``ladder.run`` with
``prompt_format`` chat / plain / auto on the same test split (auto picks on a dev split
carved from train; the test split is never used to choose).

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python bench/prompt_format.py            # 200 questions
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python bench/prompt_format.py --limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def lm_eval_style_accuracy(model, tok, rows) -> tuple[float, list[int]]:
    """(accuracy, per-question 0/1) of the lm-eval-style plain prompt (see module doc)."""
    import torch

    correct = []
    for r in rows:
        ctx = f"Question: {r['question_stem']}\nAnswer:"
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids
        lls = []
        for c in r["choices"]["text"]:
            whole = tok(ctx + " " + c, add_special_tokens=False).input_ids
            cont = whole[len(ctx_ids):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            start = len(whole) - len(cont)
            lls.append(float(sum(logp[start - 1 + t, tid] for t, tid in enumerate(cont))))
        pred = max(range(len(lls)), key=lls.__getitem__)
        correct.append(int(r["choices"]["label"][pred] == r["answerKey"]))
    return sum(correct) / len(correct), correct


def lmladder_zero_shot(fmt: str, limit: int, out: Path) -> dict:
    from lmladder import config
    from lmladder.run import ladder

    cfg = config.build({
        "task": {"kind": "multiple-choice"},
        "data": {"train": str(DATA / "openbookqa.train.jsonl"), "test": str(DATA / "openbookqa.test.jsonl"),
                 "input_field": "question_stem", "choices_field": "choices", "label_field": "answerKey",
                 "limit_test": limit},
        "model": "smollm2-135m", "rungs": ["zero-shot"], "zero-shot": {"prompt_format": fmt},
    })
    t0 = time.perf_counter()
    ladder.run(cfg, out)
    r = json.loads((out / "rungs/zero-shot/result.json").read_text())
    r["wall_s"] = time.perf_counter() - t0
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    a = ap.parse_args()
    from lmladder.metrics import wilson
    from lmladder.models import load_causal_lm

    model, tok, _ = load_causal_lm("smollm2-135m")
    rows = [json.loads(l) for l in (DATA / "openbookqa.test.jsonl").read_text().splitlines()]
    # the same questions as lmladder's limit_test sample (a seeded sample of the test file)
    tmp = Path(tempfile.mkdtemp(prefix="lmladder-bench-"))
    res = {f: lmladder_zero_shot(f, a.limit, tmp / f) for f in ("chat", "plain", "auto")}
    # the test rows lmladder scored, by their source line (file:line)
    ids = [int(json.loads(l)["source"].rpartition(":")[2])
           for l in (tmp / "plain/rungs/zero-shot/predictions.jsonl").read_text().splitlines()]
    t0 = time.perf_counter()
    ref, ref_correct = lm_eval_style_accuracy(model, tok, [rows[i - 1] for i in ids])
    ref_s = time.perf_counter() - t0
    k = sum(ref_correct)
    lo, hi = wilson(k, len(ref_correct))
    print(f"OpenBookQA, {len(ids)} test questions, SmolLM2-135M-Instruct (fp32, CPU), load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| prompt | accuracy [95% CI] | per call ms | note |")
    print("|---|---|---|---|")
    print(f"| lm-eval-style plain (reference, this script) | {ref:.3f} [{lo:.3f}, {hi:.3f}] | "
          f"{1000 * ref_s / len(ids):.0f} | one sequence per choice, no batching |")
    for f, r in res.items():
        pf = r["details"].get("prompt_format", {})
        note = f"chose {pf.get('chosen')}; dev chat {pf['dev_scores']['chat']:.3f}, plain " \
               f"{pf['dev_scores']['plain']:.3f} on {pf['dev_size']} train questions, {pf['seconds']:.0f} s" \
            if f == "auto" else ""
        print(f"| lmladder zero-shot, prompt_format: {f} | {r['score']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | "
              f"{1000 * r['cost']['per_call_s']:.0f} | {note} |")
    auto = res["auto"]
    inside = auto["ci"][0] <= ref <= auto["ci"][1]
    print(f"\nreference inside zero-shot (auto)'s interval: {inside}; "
          f"plain is right / wrong on the same questions as the reference on "
          f"{_agreement(tmp / 'plain', ids, ref_correct)} of {len(ids)}")


def _agreement(run: Path, ids, ref_correct) -> int:
    preds = [json.loads(l) for l in (run / "rungs/zero-shot/predictions.jsonl").read_text().splitlines()]
    return sum(int(p["correct"]) == c for p, c in zip(preds, ref_correct))


if __name__ == "__main__":
    main()
