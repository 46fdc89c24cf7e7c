"""full: every weight trained (low learning rate, warmup then cosine decay, gradient
accumulation, bf16 mixed precision on CUDA devices that support it, fp32 on CPU).

Trains a private copy of the base model, so the shared base the other rungs use is
never modified; the trained model is saved (safetensors) in rungs/full/model and reused
when a later run has the same fingerprint (loaded from there, no copy of the base made).
Same data path, training engine, checkpoints and forgetting check as lora."""

from __future__ import annotations

import copy
import gc
from typing import Any, Literal

from pydantic import Field

from lmladder.options import TrainConfig
from lmladder.rungs.base import Rung
from lmladder.training import forgetting, steps, weights


class FullConfig(TrainConfig):
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (warmup, then decay).")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )


class Full(Rung):
    name = "full"
    cost_rank = 30
    trains = True
    summary = "full fine-tuning (all weights), SFT on the train split"
    kinds = Rung.kinds + ("preference",)  # scores chosen vs rejected (tasks/preference.py)
    artifact = "model"  # rungs/full/model: the whole trained model
    output_model = "model"  # a whole causal LM: other rungs can start `from: full`

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        steps.check_step_plan(cfg, dataset, cls.name)

    def prepare(self) -> None:
        self.features, self.answers, self.truncated = steps.sft_features(self.ctx, self.cfg, self.name)
        self.messages = [self.ctx.task.user_message(ex) for ex in self.ctx.data.test]
        self.trainable = 0

    def fit(self) -> dict[str, Any]:
        base, tok = self.ctx.base()  # the shared base, or the `from:` rung's model
        check = forgetting.before(base, tok, self.cfg)
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            from lmladder.training import sft

            self.model = copy.deepcopy(base)  # a private copy: the shared base is never trained
            for p in self.model.parameters():
                p.requires_grad_(True)
            self.trainable = weights.count_trainable(self.model)
            with steps.trainer_dirs(self.out_dir) as (work, checkpoints):
                return sft.train(self.model, tok, self.features, self.answers, self.cfg, work, self.ctx.cfg.seed,
                                 checkpoint_dir=checkpoints, fingerprint=fp, name=self.name,
                                 dev_metric=steps.dev_metric(self.ctx, self.cfg, self.name))

        def load(folder) -> dict[str, Any]:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=base.dtype).to(base.device).eval()
            self.trainable = weights.count_trainable(self.model, loaded=True)
            return {"truncated": self.truncated}

        stats = weights.reuse_or_train(
            self.out_dir / self.artifact, fp, train=train, load=load, name=self.name,
            save=lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True),
            checkpoints=self.out_dir / "checkpoints",
        )
        stats["trainable_params"] = self.trainable
        stats["trainable_share"] = weights.share_of_base(self.ctx, self.trainable, self.model)
        return forgetting.after(check, self.model, stats)

    def predict(self):
        return self.ctx.task.predict(self.model, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name)

    def trainable_params(self) -> int:
        return self.trainable

    def artifacts(self) -> dict[str, str]:
        return {self.artifact: self.artifact}

    def close(self) -> None:
        if self.model is not None:  # a private copy: dropping it leaves the shared base as it was
            self.model = None
            gc.collect()
