"""Encoder vs LoRA time-to-accuracy on SMS spam (issue 4).

Runs examples/sms_spam_encoder.yaml (zero-shot, encoder = all-MiniLM-L6-v2 + a new
classification head, lora = LoRA SFT of SmolLM2-135M) through the normal ladder, once per
train-set size given with ``--train-sizes`` (a seeded sample of the 300 train messages;
the same 100 test messages every time; rungs that do not train run at the first size
only), and prints a markdown table: accuracy with its 95%
CI, training seconds, trainable parameters, eval throughput, and whether the target
accuracy is reached. Time-to-accuracy for a rung = the training seconds of the smallest
train set at which it reaches the target.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/encoder_vs_lora.py                      # 300 train
    HF_HUB_OFFLINE=1 .venv/bin/python bench/encoder_vs_lora.py --train-sizes 100,300

LoRA runs without its dev split and forgetting check (``FAIR``), so that its train
seconds, like the encoder's, are optimizer steps only. Every rung of every size runs in
one process, one after the other, on the same machine; timings on a shared CPU vary with
its load, so compare rungs within one invocation.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
# train time = optimizer steps only: LoRA's dev-loss evaluations and forgetting check (which
# the encoder does not do) would otherwise count as training time
FAIR = ["lora.dev_fraction=0", "lora.forgetting_text=null"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples/sms_spam_encoder.yaml"))
    ap.add_argument("--train-sizes", default="300", help="comma-separated train-set sizes")
    ap.add_argument("--rungs", default="zero-shot,encoder,lora")
    ap.add_argument("--out", default=str(ROOT / "runs/bench_encoder_vs_lora"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()

    import torch

    from lmladder import config as C
    from lmladder import registry
    from lmladder.run import ladder

    rows = []
    for i, n in enumerate(int(x) for x in a.train_sizes.split(",")):
        raw = C.read_yaml(a.config)
        # rungs that do not train (zero-shot) do not depend on the train size: run them once
        raw["rungs"] = [r for r in a.rungs.split(",") if i == 0 or registry.rung_class(r).trains]
        raw.setdefault("data", {})["limit_train"] = n
        for s in FAIR + a.set:
            C.apply_set(raw, s)
        cfg = C.build(raw)
        res = ladder.run(cfg, Path(a.out) / f"train{n}")
        target = res.get("target")
        for r in res["rungs"]:
            c = r["cost"]
            rows.append((n, r["name"], r["score"], r["ci"], c["train_seconds"], c["trainable_params"],
                         c.get("eval_examples_per_second"), target is not None and r["score"] >= target))
    metric = res["metric"]
    print(f"\n{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"target {metric} >= {target}\n")
    print(f"| train examples | rung | {metric} [95% CI] | train s | trainable params | eval ex/s | target met |")
    print("|---:|---|---|---:|---:|---:|---|")
    for n, name, score, ci, ts, tp, eps, met in rows:
        print(f"| {n} | {name} | {score:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {ts:.1f} | {tp:,} | {eps} | {'yes' if met else 'no'} |")
    for name in dict.fromkeys(r[1] for r in rows):
        hit = [r for r in rows if r[1] == name and r[7]]
        when = f"{hit[0][4]:.1f} s of training ({hit[0][0]} examples)" if hit else "not reached"
        print(f"- time to {metric} >= {target}, {name}: {when}")


if __name__ == "__main__":
    main()
