"""qlora: LoRA on a copy of the base model loaded in 4-bit NF4 (bitsandbytes; runs on
CPU too). The shared base is not touched: the quantised copy is loaded from the same
weights and dropped in ``close()``. The result reports the base weights' memory in
4-bit against the shared (lora) base's, and the saving."""

from __future__ import annotations

import logging
from pathlib import Path

from lmladder.errors import LadderError
from lmladder.rungs.lora import Lora
from pydantic import Field
from lmladder.rungs.lora import LoraConfig


class QloraConfig(LoraConfig):
    """LoRA on a base model loaded in 4-bit NF4 (bitsandbytes)."""

    double_quant: bool = Field(True, description="Quantise the 4-bit scales too (bnb double quantisation).")


def _mb(model) -> float:
    return round(model.get_memory_footprint() / 2**20, 3)


class Qlora(Lora):
    name = "qlora"
    cost_rank = 24
    summary = "LoRA adapter on a 4-bit NF4 base, SFT on the train split"

    def base_for_training(self):
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from lmladder import models

        try:
            from lmladder.training import bnb

            bnb.require()  # hidden from peft / transformers until a rung quantises
        except ImportError:
            raise LadderError("qlora needs bitsandbytes: pip install bitsandbytes") from None
        # on CPU bitsandbytes warns that an optional fused kernel package is missing; its
        # own kernels work (tested), so the warning would only alarm
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        shared, _ = self.ctx.base()
        # the folder the current base came from (a `from:` parent's model, or the base's cache)
        folder = Path(getattr(shared.config, "_name_or_path", "") or "")
        if (folder / "config.json").is_file():
            target, local_only = str(folder), True
        else:
            target, local_only = models.materialise(models.resolve(self.ctx.cfg.model))
        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=self.cfg.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        model = AutoModelForCausalLM.from_pretrained(
            target, quantization_config=quant, dtype=compute, local_files_only=local_only,
            device_map={"": shared.device.index if shared.device.type == "cuda" else "cpu"},
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.cfg.gradient_checkpointing)
        self.memory = {"base_weights_mb_4bit": _mb(model), "base_weights_mb_lora": _mb(shared)}
        self.memory["weights_saving"] = round(1 - self.memory["base_weights_mb_4bit"] / self.memory["base_weights_mb_lora"], 3)
        return model

    def fit(self):
        stats = super().fit()
        if hasattr(self, "memory"):
            stats["memory"] = self.memory
        return stats

    def release(self, model) -> None:
        pass  # the quantised copy is private to this rung; the shared base was never touched
