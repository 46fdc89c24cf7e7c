"""lora: supervised fine-tuning with PEFT LoRA on the zero-shot prompt format.

Loss only on the answer tokens and the end-of-turn token (prompt masked), built
through the chat template (see training/sft.py). The adapter is saved as safetensors;
if a finished adapter with the same fingerprint is already on disk (a run stopped
after training), it is loaded instead of retrained; a run killed during training
resumes from its newest checkpoint (rungs/lora/checkpoints).

Under ``torchrun`` / ``accelerate launch`` every rank trains (DDP, same global batch
as one process, see training/sft.py); rank 0 alone decides on reuse, saves the adapter
and evaluates.

The steps, in order: features (prepare) -> the start model and its forgetting perplexity ->
the adapter injected into it -> trained, or the saved one loaded (training/weights.
reuse_or_train) -> predictions with the adapter merged -> the shared base handed back.
"""

from __future__ import annotations

import gc
from typing import Any

from lmladder.options import LoraParams, TrainConfig
from lmladder.rungs.base import Rung
from lmladder.training import forgetting, steps, weights


class LoraConfig(TrainConfig, LoraParams):
    """lora: the shared SFT fields (options.TrainConfig: lr 1e-4, epochs from the data,
    batch_size 8, max_length 1024, packing, dev split, checkpoints, forgetting check...) and the
    adapter's (options.LoraParams: r 16, alpha 32, dropout 0.05, target_modules all-linear)."""


def peft_config(cfg):
    """The PEFT LoRA adapter a config's r / alpha / dropout / target_modules ask for (also
    qlora's, the distill student's, and dpo's / grpo's with ``method: lora``)."""
    from peft import LoraConfig as PeftLoraConfig, TaskType

    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
    )


class Lora(Rung):
    name = "lora"
    cost_rank = 23
    trains = True
    summary = "LoRA adapter, SFT on the train split"
    kinds = Rung.kinds + ("preference",)  # scores chosen vs rejected (tasks/preference.py)
    mergeable = True  # `from: lora` starts from the base with this adapter merged
    artifact = "adapter"  # rungs/lora/adapter: the trained adapter (what `from:` and export read)

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        steps.check_step_plan(cfg, dataset, cls.name)

    def prepare(self) -> None:
        self.features, self.answers, self.truncated = steps.sft_features(self.ctx, self.cfg, self.name)
        self.messages = [self.ctx.task.user_message(ex) for ex in self.ctx.data.test]
        self.trainable = 0

    def fit(self) -> dict[str, Any]:
        start, tok = self.ctx.base()  # the shared base, or the `from:` rung's model
        check = forgetting.before(start, tok, self.cfg)
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            from peft import get_peft_model

            from lmladder.training import sft

            self.model = get_peft_model(start, peft_config(self.cfg))  # the adapter goes into the base
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
            self.out_dir / self.artifact, fp, train=train, load=load, name=self.name,
            save=lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True),
            checkpoints=self.out_dir / "checkpoints",
        )
        stats["trainable_params"] = self.trainable
        stats["trainable_share"] = weights.share_of_base(self.ctx, self.trainable, self.model)
        return forgetting.after(check, self.model, stats)

    def predict(self):
        """At deployment speed: the adapter merged into the base's weights while the task
        predicts, the base restored bit for bit afterwards (training/weights.merged)."""
        from peft import PeftModel

        if self.model is None:  # merged away by an earlier predict: the adapter is on disk
            self.model = PeftModel.from_pretrained(self.ctx.base()[0], self.out_dir / self.artifact).eval()
        model, self.model = self.model, None  # merged below: nothing left for close() to unload
        with weights.merged(model, self.ctx) as base:
            return self.ctx.task.predict(base, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name)

    def trainable_params(self) -> int:
        return self.trainable

    def artifacts(self) -> dict[str, str]:
        return {self.artifact: self.artifact}

    def close(self) -> None:
        if self.model is not None:  # the adapter's modules out of the shared base
            model, self.model = self.model, None
            weights.restore_base(self.ctx, model.unload())
            del model
            gc.collect()
