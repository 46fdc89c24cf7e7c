"""prefix-tuning: learned key/value prefixes (``num_virtual_tokens`` per layer) via
PEFT; the model's weights are untouched. No packing (each sequence needs the prefix);
predictions go through inference/prompt_learning.VirtualTokenModel so the shared-prefix
scoring cache keeps the learned prefix."""

from __future__ import annotations

from lmladder.rungs.sft_rung import PromptLearningRung
from pydantic import Field
from lmladder.options import TrainConfig


class PrefixTuningConfig(TrainConfig):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warmup, then decay).")
    num_virtual_tokens: int = Field(16, ge=1, description="Learned key/value prefix length per layer.")
    projection: bool = Field(
        False, description="Reparameterise the prefix through an MLP (prefix_projection)."
    )


class PrefixTuning(PromptLearningRung):
    name = "prefix-tuning"
    cost_rank = 21
    summary = "learned key/value prefix per layer, SFT on the train split"

    def peft_config(self):
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.cfg.num_virtual_tokens,
            prefix_projection=self.cfg.projection,
        )
