"""prompt-tuning: a learned soft prompt (``num_virtual_tokens`` embeddings) in front of
every input, via PEFT; the model's weights are untouched. Initialised from the task
instruction's token embeddings by default. No packing (the soft prompt must precede
each sequence); predictions go through inference/prompt_learning.VirtualTokenModel so the
shared-prefix scoring cache keeps the soft prompt."""

from __future__ import annotations

from lmladder.rungs.sft_rung import PromptLearningRung
from pydantic import Field
from lmladder.options import TrainConfig


class PromptTuningConfig(TrainConfig):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warmup, then decay).")
    num_virtual_tokens: int = Field(16, ge=1, description="Length of the learned soft prompt.")
    init_from_instruction: bool = Field(
        True, description="Initialise the soft prompt from the task instruction's token embeddings."
    )


class PromptTuning(PromptLearningRung):
    name = "prompt-tuning"
    cost_rank = 20
    summary = "soft prompt (virtual token embeddings), SFT on the train split"

    def n_virtual(self) -> int:
        return self.cfg.num_virtual_tokens

    def peft_config(self):
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )

    def wrap(self, model):
        import torch

        pm = super().wrap(model)
        if self.cfg.init_from_instruction:
            # PEFT's TEXT init reloads the tokenizer by name; the tokenizer is at hand here
            _, tok = self.ctx.base()
            ids = tok(self.ctx.task.user_message(""), add_special_tokens=False).input_ids or [0]
            ids = (ids * (self.n_virtual() // len(ids) + 1))[: self.n_virtual()]
            emb = model.get_input_embeddings().weight
            with torch.no_grad():
                pm.prompt_encoder["default"].embedding.weight.copy_(emb[torch.tensor(ids)].detach())
        return pm
