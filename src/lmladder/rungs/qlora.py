"""qlora: LoRA on a copy of the base model loaded in 4-bit NF4 (bitsandbytes; runs on
CPU too). The shared base is not touched: the quantised copy is loaded from the same
weights, the adapter (lora's, rungs/lora.peft_config) trained on it, merged into it for
predictions (as deployed), and the copy dropped in ``close()`` -- it is never handed to the
other rungs as their base. The result reports the base weights' memory in 4-bit against
the shared (lora) base's, and the saving. ``from: qlora`` merges the adapter into the
full-precision base (the usual QLoRA practice; run/context.py)."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from lmladder.errors import LadderError
from lmladder.rungs.base import Rung
from lmladder.rungs.lora import LoraConfig, peft_config
from lmladder.training import forgetting, steps, weights


class QloraConfig(LoraConfig):
    """LoRA on a base model loaded in 4-bit NF4 (bitsandbytes)."""

    double_quant: bool = Field(True, description="Quantise the 4-bit scales too (bnb double quantisation).")


CPU_NOTE = (
    "CPU: the 4-bit base saves weight memory only; training's peak is not below lora's. bitsandbytes' CPU path "
    "dequantises every 4-bit weight to fp32 for each forward and backward matmul (a transient full-precision "
    "copy per layer call), the shared fp32 base stays loaded beside the 4-bit copy, and at this size the "
    "activations dominate the peak anyway (docs/benchmarks.md, issue 16). QLoRA saves memory where the weights "
    "dominate: larger models, on GPUs."
)


def _on_cuda(model) -> bool:
    try:
        return next(model.parameters()).device.type == "cuda"
    except StopIteration:
        return False


def _mb(model) -> float:
    return round(model.get_memory_footprint() / 2**20, 3)


def four_bit_copy(ctx, cfg):
    """The current base (the shared base, or a `from:` parent's model) loaded again from its
    folder in 4-bit NF4, prepared for k-bit training."""
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
    shared, _ = ctx.base()
    # the folder the current base came from (a `from:` parent's model, or the base's cache)
    folder = Path(getattr(shared.config, "_name_or_path", "") or "")
    if (folder / "config.json").is_file():
        target, local_only = str(folder), True
    else:
        target, local_only = models.materialise(models.resolve(ctx.cfg.model))
    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(
        target, quantization_config=quant, dtype=compute, local_files_only=local_only,
        device_map={"": shared.device.index if shared.device.type == "cuda" else "cpu"},
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


class Qlora(Rung):
    name = "qlora"
    cost_rank = 24
    trains = True
    summary = "LoRA adapter on a 4-bit NF4 base, SFT on the train split"
    kinds = Rung.kinds + ("preference",)  # scores chosen vs rejected (tasks/preference.py)
    mergeable = True  # `from: qlora` starts from the full-precision base with this adapter merged
    artifact = "adapter"  # rungs/qlora/adapter

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        steps.check_step_plan(cfg, dataset, cls.name)

    def prepare(self) -> None:
        self.features, self.answers, self.truncated = steps.sft_features(self.ctx, self.cfg, self.name)
        self.messages = [self.ctx.task.user_message(ex) for ex in self.ctx.data.test]
        self.trainable = 0

    def fit(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        shared, tok = self.ctx.base()
        start = four_bit_copy(self.ctx, self.cfg)  # a private copy: the shared base stays as it is
        spent = time.perf_counter() - t0  # loading it is part of what the weights cost
        memory = {"base_weights_mb_4bit": _mb(start), "base_weights_mb_lora": _mb(shared)}
        memory["weights_saving"] = round(1 - memory["base_weights_mb_4bit"] / memory["base_weights_mb_lora"], 3)
        check = forgetting.before(start, tok, self.cfg)  # "before" is the 4-bit model
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            from peft import get_peft_model

            from lmladder.training import sft

            self.model = get_peft_model(start, peft_config(self.cfg))
            self.trainable = weights.count_trainable(self.model)
            with steps.trainer_dirs(self.out_dir) as (work, checkpoints):
                return sft.train(self.model, tok, self.features, self.answers, self.cfg, work, self.ctx.cfg.seed,
                                 checkpoint_dir=checkpoints, fingerprint=fp, name=self.name,
                                 dev_metric=steps.dev_metric(self.ctx, self.cfg, self.name))

        def load(folder) -> dict[str, Any]:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(start, folder).eval()
            self.trainable = weights.count_trainable(self.model, loaded=True)
            return {"truncated": self.truncated}

        stats = weights.reuse_or_train(
            self.out_dir / self.artifact, fp, train=train, load=load, name=self.name, spent=spent,
            save=lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True),
            checkpoints=self.out_dir / "checkpoints",
        )
        stats["trainable_params"] = self.trainable
        stats["trainable_share"] = weights.share_of_base(self.ctx, self.trainable, self.model)
        forgetting.after(check, self.model, stats)
        if not _on_cuda(start):
            memory["note"] = CPU_NOTE
        stats["memory"] = memory
        return stats

    def predict(self):
        """The adapter merged into the 4-bit copy (as deployed), which is then used up: it was
        private to this rung and is not handed to the others as their base."""
        from peft import PeftModel

        if self.model is None:  # merged away by an earlier predict: the adapter is on disk
            start = four_bit_copy(self.ctx, self.cfg)
            self.model = PeftModel.from_pretrained(start, self.out_dir / self.artifact).eval()
        model, self.model = self.model, None  # used up by the merge (close() collects it)
        merged = model.merge_and_unload()
        return self.ctx.task.predict(merged, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name)

    def trainable_params(self) -> int:
        return self.trainable

    def artifacts(self) -> dict[str, str]:
        return {self.artifact: self.artifact}

    def close(self) -> None:
        self.model = None  # the quantised copy is private: dropping it is all there is
        gc.collect()
