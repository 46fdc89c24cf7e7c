"""ia3: (IA)^3 via PEFT: learned per-channel scales on attention keys/values and the
feed-forward input; far fewer trainable parameters than LoRA. Same data path, training
engine, checkpoints and forgetting check as lora (training/sft.py, training/steps.py,
training/weights.py); the scales are merged into the weights for predictions, and
``from: ia3`` starts from the base with them merged."""

from __future__ import annotations

import gc
from typing import Any

from pydantic import Field

from lmladder.options import TrainConfig
from lmladder.rungs.base import Rung
from lmladder.training import forgetting, steps, weights


class Ia3Config(TrainConfig):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warmup, then decay).")
    target_modules: str | list[str] | None = Field(
        None, description="Modules to rescale (PEFT syntax; default: PEFT's per-architecture choice)."
    )
    feedforward_modules: str | list[str] | None = Field(
        None, description="Which target modules are feed-forward (PEFT syntax; default: PEFT's)."
    )


def peft_config(cfg):
    """The PEFT (IA)^3 adapter; PEFT's per-architecture module choice unless the config names them."""
    from peft import IA3Config, TaskType

    kw = {}
    if cfg.target_modules is not None:
        kw["target_modules"] = cfg.target_modules
    if cfg.feedforward_modules is not None:
        kw["feedforward_modules"] = cfg.feedforward_modules
    return IA3Config(task_type=TaskType.CAUSAL_LM, **kw)


class Ia3(Rung):
    name = "ia3"
    cost_rank = 22
    trains = True
    summary = "(IA)^3 scaling vectors, SFT on the train split"
    kinds = Rung.kinds + ("preference",)  # scores chosen vs rejected (tasks/preference.py)
    mergeable = True  # `from: ia3` starts from the base with this adapter merged
    artifact = "adapter"  # rungs/ia3/adapter: the trained scales

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

            self.model = get_peft_model(start, peft_config(self.cfg))  # the scales go into the base
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
        """At deployment speed: the scales merged into the base's weights while the task
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
