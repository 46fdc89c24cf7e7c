"""prompt-tuning: a learned soft prompt (``num_virtual_tokens`` embeddings) in front of
every input, via PEFT; the model's weights are untouched. Initialised from the task
instruction's token embeddings by default. No packing (the soft prompt must precede
each sequence); predictions go through inference/prompt_learning.VirtualTokenModel so the
shared-prefix scoring cache keeps the soft prompt (PEFT's own forward would drop it).
Same data path, training engine, checkpoints and forgetting check as lora."""

from __future__ import annotations

import gc
from typing import Any

from pydantic import Field

from lmladder.options import TrainConfig
from lmladder.rungs.base import Rung
from lmladder.training import forgetting, steps, weights


class PromptTuningConfig(TrainConfig):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warmup, then decay).")
    num_virtual_tokens: int = Field(16, ge=1, description="Length of the learned soft prompt.")
    init_from_instruction: bool = Field(
        True, description="Initialise the soft prompt from the task instruction's token embeddings."
    )


def peft_config(cfg):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )


class PromptTuning(Rung):
    name = "prompt-tuning"
    cost_rank = 20
    trains = True
    summary = "soft prompt (virtual token embeddings), SFT on the train split"
    kinds = Rung.kinds + ("preference",)  # scores chosen vs rejected (tasks/preference.py)
    artifact = "adapter"  # rungs/prompt-tuning/adapter: the soft prompt

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        steps.check_step_plan(cfg, dataset, cls.name)

    def prepare(self) -> None:
        self.features, self.answers, self.truncated = steps.sft_features(self.ctx, self.cfg, self.name)
        self.messages = [self.ctx.task.user_message(ex) for ex in self.ctx.data.test]
        self.trainable = 0
        self.scorer = None

    def fit(self) -> dict[str, Any]:
        start, tok = self.ctx.base()  # the shared base, or the `from:` rung's model
        check = forgetting.before(start, tok, self.cfg)
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            from lmladder.inference.prompt_learning import VirtualTokenModel
            from lmladder.training import sft

            self.model = self.soft_prompt(start)
            self.trainable = weights.count_trainable(self.model)
            with steps.trainer_dirs(self.out_dir) as (work, checkpoints):
                return sft.train(self.model, tok, self.features, self.answers, self.cfg, work, self.ctx.cfg.seed,
                                 checkpoint_dir=checkpoints, fingerprint=fp, name=self.name,
                                 no_packing_reason=steps.VIRTUAL_TOKENS_NO_PACKING,
                                 n_virtual=self.cfg.num_virtual_tokens,
                                 # fresh each time: the virtual tokens change while training
                                 dev_metric=steps.dev_metric(self.ctx, self.cfg, self.name, scorer=VirtualTokenModel))

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
        if check is not None:
            forgetting.after(check, self.scoring_model(), stats)
        return stats

    def soft_prompt(self, model):
        """PEFT prompt tuning around ``model`` (its modules untouched), the soft prompt
        initialised from the task instruction's token embeddings (PEFT's TEXT init would
        reload the tokenizer by name; it is at hand here)."""
        import torch
        from peft import get_peft_model

        pm = get_peft_model(model, peft_config(self.cfg))
        if self.cfg.init_from_instruction:
            _, tok = self.ctx.base()
            n = self.cfg.num_virtual_tokens
            ids = tok(self.ctx.task.user_message(""), add_special_tokens=False).input_ids or [0]
            ids = (ids * (n // len(ids) + 1))[:n]
            emb = model.get_input_embeddings().weight
            with torch.no_grad():
                pm.prompt_encoder["default"].embedding.weight.copy_(emb[torch.tensor(ids)].detach())
        return pm

    def scoring_model(self):
        """The trained soft prompt run once as a KV-cache prefix in front of every call
        (inference/prompt_learning.VirtualTokenModel), as the task scorer calls a model."""
        from lmladder.inference.prompt_learning import VirtualTokenModel

        if self.scorer is None or self.scorer.peft_model is not self.model:
            self.model.eval()
            self.scorer = VirtualTokenModel(self.model)
        return self.scorer

    def predict(self):
        return self.ctx.task.predict(self.scoring_model(), self.ctx.fmt(), self.messages, self.ctx.data.test,
                                     desc=self.name)

    def trainable_params(self) -> int:
        return self.trainable

    def artifacts(self) -> dict[str, str]:
        return {self.artifact: self.artifact}

    def close(self) -> None:
        if self.model is not None:  # PEFT wrapped the base without touching its modules
            model, self.model = self.model, None
            self.scorer = None
            weights.restore_base(self.ctx, model.get_base_model())
            del model
            gc.collect()
