"""full: every weight trained (low learning rate, warmup then cosine decay, gradient
accumulation, bf16 mixed precision on CUDA devices that support it, fp32 on CPU).

Trains a private copy of the base model, so the shared base the other rungs use is
never modified; the trained model is saved (safetensors) in rungs/full/model and reused
when a later run has the same fingerprint."""

from __future__ import annotations

import copy
from pathlib import Path

from lmladder.rungs.sft_rung import SftRung
from typing import Literal
from pydantic import Field
from lmladder.options import TrainConfig


class FullConfig(TrainConfig):
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (warmup, then decay).")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )


class Full(SftRung):
    name = "full"
    cost_rank = 30
    summary = "full fine-tuning (all weights), SFT on the train split"
    artifact = "model"
    output_model = "model"  # a whole causal LM: other rungs can start `from: full`

    def base_for_training(self):
        return copy.deepcopy(self.ctx.base()[0])

    def wrap(self, model):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def load_saved(self, model, folder: Path):
        from transformers import AutoModelForCausalLM

        dtype, device = model.dtype, model.device
        del model
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)

    def release(self, model) -> None:
        pass  # a private copy: dropping it leaves the shared base as it was
