"""lora: supervised fine-tuning with PEFT LoRA on the zero-shot prompt format.

Loss only on the answer tokens and the end-of-turn token (prompt masked), built
through the chat template (see training/sft.py). The adapter is saved as safetensors;
if a finished adapter with the same fingerprint is already on disk (a run stopped
after training), it is loaded instead of retrained; a run killed during training
resumes from its newest checkpoint (rungs/lora/checkpoints).

Under ``torchrun`` / ``accelerate launch`` every rank trains (DDP, same global batch
as one process, see training/sft.py); rank 0 alone decides on reuse, saves the adapter
and evaluates.
"""

from __future__ import annotations

from lmladder.rungs.sft_rung import SftRung
from lmladder.options import LoraParams, TrainConfig


class LoraConfig(TrainConfig, LoraParams):
    pass


class Lora(SftRung):
    name = "lora"
    cost_rank = 23
    summary = "LoRA adapter, SFT on the train split"
    mergeable = True  # `from: lora` starts from the base with this adapter merged

    def peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules,
        )

    @property
    def peft_model(self):
        return self.model
