"""ia3: (IA)^3 via PEFT: learned per-channel scales on attention keys/values and the
feed-forward input; far fewer trainable parameters than LoRA. Same data path, training
engine, checkpoints and forgetting check as lora (rungs/sft_rung.py)."""

from __future__ import annotations

from lmladder.rungs.sft_rung import SftRung
from pydantic import Field
from lmladder.options import TrainConfig


class Ia3Config(TrainConfig):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warmup, then decay).")
    target_modules: str | list[str] | None = Field(
        None, description="Modules to rescale (PEFT syntax; default: PEFT's per-architecture choice)."
    )
    feedforward_modules: str | list[str] | None = Field(
        None, description="Which target modules are feed-forward (PEFT syntax; default: PEFT's)."
    )


class Ia3(SftRung):
    name = "ia3"
    cost_rank = 22
    summary = "(IA)^3 scaling vectors, SFT on the train split"
    mergeable = True  # `from: ia3` starts from the base with this adapter merged

    def peft_config(self):
        from peft import IA3Config, TaskType

        kw = {}
        if self.cfg.target_modules is not None:
            kw["target_modules"] = self.cfg.target_modules
        if self.cfg.feedforward_modules is not None:
            kw["feedforward_modules"] = self.cfg.feedforward_modules
        return IA3Config(task_type=TaskType.CAUSAL_LM, **kw)
