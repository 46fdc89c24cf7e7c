"""Helper for tests/test_distributed.py: train the tiny LoRA model with lmladder's
sft.train, in one process or under ``torchrun``; rank 0 writes the per-step losses
and the final LoRA weights.

    python tests/ddp_worker.py OUT.json [BATCH_SIZE GRAD_ACCUM STEPS]
    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT.json ...
"""

from __future__ import annotations

from lmladder.run import distributed

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(out: str, batch_size: int = 4, grad_accum: int = 1, steps: int = 6) -> None:
    import torch
    from peft import LoraConfig as PeftLora, get_peft_model

    from conftest import make_model, make_tokenizer
    from lmladder.rungs.lora import LoraConfig
    from lmladder.training import sft
    from lmladder.prompts import ChatFormat

    distributed.init_distributed()
    tok = make_tokenizer()
    fmt = ChatFormat(tok)
    model = make_model(len(tok), seed=0)
    # 14 examples of different lengths and answer lengths: per-rank supervised token
    # counts differ (tests the global token normalisation), 14 is not a multiple of the
    # global batch (tests the wrap-round) and 6 steps span two epochs (the reshuffle).
    data = [
        (f"item {i} {'is really quite ' * (i % 4)}{'good' if i % 2 else 'bad'}", "positive" if i % 2 else "neg")
        for i in range(14)
    ]
    feats = [sft.build_feature(fmt, m, a, 512, f"t:{i}", {tok.eos_token_id}) for i, (m, a) in enumerate(data)]
    torch.manual_seed(1)
    pm = get_peft_model(
        model, PeftLora(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    cfg = LoraConfig(lr=5e-3, max_steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                     warmup_ratio=0.0, dropout=0.0)
    stats = sft.train(pm, tok, feats, [a for _, a in data], cfg, Path(out).parent / f"work-{os.getpid()}", 0)
    if distributed.is_main():
        weights = {n: p.detach().cpu().flatten().tolist() for n, p in pm.named_parameters() if p.requires_grad}
        Path(out).write_text(json.dumps({"stats": stats, "weights": weights}))
    distributed.barrier()


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    a = sys.argv[1:]
    main(a[0], *(int(x) for x in a[1:]))
