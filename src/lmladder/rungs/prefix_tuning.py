"""prefix-tuning: learned key/value prefixes (``num_virtual_tokens`` per layer) via
PEFT; the model's weights are untouched. No packing (each sequence needs the prefix);
predictions go through inference/prompt_learning.VirtualTokenModel so the shared-prefix
scoring cache keeps the learned prefix."""

from __future__ import annotations

from lmladder.rungs.sft_rung import PromptLearningRung


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
