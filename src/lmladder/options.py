"""Option bases the rungs' configs share (one description per option feeds --help and
the docs). A rung's own Config lives in its file under rungs/ and adds its fields to
one of these; config.RunConfig has one typed line per rung."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class Constrainable(ConfigModel):
    constrained: bool = Field(
        False,
        description="Restrict decoding by a grammar (label set / answer regex / JSON Schema).",
    )


class PromptFormatOptions(Constrainable):
    prompt_format: Literal["chat", "plain", "auto"] = Field(
        "auto",
        description="chat (the model's chat template), plain (the prompt as plain text; lm-eval style "
        "'Question: ...\\nAnswer:' for multiple-choice) or auto (label-scoring tasks: the better of the two "
        "on a dev split carved from train; otherwise chat).",
    )
    calibrate: bool = Field(
        False,
        description="classification: contextual calibration (Zhao et al. 2021): divide out the label "
        "distribution the prompt gives content-free inputs ('N/A', '', '[MASK]'); a fix for label bias.",
    )


class ReasoningOptions(Constrainable):
    prompt: str = Field(
        "Think step by step, then give the final answer on the last line as 'Answer: <answer>'.",
        description="Reasoning instruction appended to the task instruction.",
    )
    thinking: Literal["auto", "prompt", "native"] = Field(
        "auto",
        description="native = the chat template's thinking mode (enable_thinking); auto uses it when the template has one.",
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest reasoning + answer generated.")


class SampledOptions(ReasoningOptions):
    n: int = Field(8, ge=1, description="Samples per example.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling top-p.")


def check_curve(v):
    if v is None:
        return v
    if not v or any(not (0 < f <= 1) for f in v):
        raise ValueError(f"fractions must be in (0, 1], got {v}")
    return sorted(set(float(f) for f in v) | {1.0})


class OptimConfig(ConfigModel):
    """Fields shared by every weight-update rung: optimizer, steps, length, checkpoints, the
    forgetting check (SFT rungs add packing / dev split in TrainConfig; alignment rungs
    add their method's fields in AlignConfig)."""

    from_: str | None = Field(
        None,
        alias="from",
        description="Start from another rung's output model (e.g. continued-pretraining) instead "
        "of the base model; that rung runs first.",
    )

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (warmup, then decay).")
    learning_curve: list[float] | None = Field(
        None,
        description="Would more data help? Also train on these fractions of train (seeded, nested subsets, "
        "e.g. [0.25, 0.5]; 1.0 is the rung itself) and score each on the same test split.",
    )
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate decay after warmup."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the train set.")
    max_steps: int | None = Field(None, ge=1, description="Stop after N optimizer steps.")
    batch_size: int = Field(
        8, ge=1,
        description="Sequences per optimizer micro-batch at most (the global batch is batch_size x grad_accum; "
        "a smaller micro-batch with more accumulation may run, see memory_budget_mb).",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps used for warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(
        1024, ge=8, description="Longest training sequence in tokens (see truncation)."
    )
    truncation: Literal["truncate", "error"] = Field(
        "truncate",
        description="A sequence longer than max_length: 'truncate' cuts the prompt from the "
        "left (the answer is kept; counted in the report) or 'error' stops the run.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, slower)."
    )
    memory_budget_mb: int | None = Field(
        None, ge=64,
        description="Training memory budget in MB: the micro-batch (with gradient accumulation: the same global "
        "batch_size x grad_accum) and, below one sequence's need, the number of checkpointed layers are chosen "
        "to fit it; default: what the process holds plus half of the memory available when training starts.",
    )
    save_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (default: at every evaluation; about 5 per run without one)."
    )
    checkpoints: bool = Field(
        True, description="Write resumable checkpoints to rungs/<rung>/checkpoints (kept until the rung ends)."
    )
    logging_steps: int | None = Field(
        None, ge=1, description="Log the train loss every N steps (default: about 20 times per run)."
    )
    forgetting_text: str | None = Field(
        "builtin",
        description="JSONL file ({'text': ...} rows) for the forgetting check (perplexity before/after "
        "training); 'builtin' = a WikiText-2 sample shipped with lmladder; null disables it.",
    )
    forgetting_max_tokens: int = Field(
        4096, ge=16, description="Tokens of forgetting text to score (from the start of the file)."
    )

    @field_validator("learning_curve")
    @classmethod
    def _curve(cls, v):
        return check_curve(v)


class TrainConfig(OptimConfig):
    """Supervised fine-tuning rungs (lora, qlora, ia3, prompt/prefix tuning, full): packing and
    the dev split with early stopping (training/sft.py)."""

    epochs: float | None = Field(
        None, gt=0,
        description="Passes over the train set; default: from the data, at least 150 optimizer steps and at "
        "most 3 epochs (one epoch when that is more than 150 steps).",
    )
    packing: bool = Field(
        True,
        description="Pack each micro-batch's sequences into rows without padding (position ids "
        "restart per sequence, block-diagonal attention); off where the rung cannot pack.",
    )
    pack_length: int = Field(
        2048, ge=8, description="Longest packed row in tokens (a longer sequence gets its own row)."
    )
    group_by_length: bool = Field(True, description="Batch sequences of similar length together.")
    dev_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of train held out (seeded) as a dev set for eval loss; 0 = none."
    )
    dev_max: int = Field(200, ge=1, description="At most this many dev examples.")
    eval_steps: int | None = Field(
        None, ge=1, description="Dev loss every N steps (default: about 5 times per run)."
    )
    early_stopping_patience: int | None = Field(
        3, ge=1, description="Stop after N evaluations without a better dev score; null = never."
    )
    select_on: Literal["auto", "loss", "metric"] = Field(
        "auto",
        description="What picks the best checkpoint and early-stops: the task metric on the dev split (label "
        "scoring; classification, multiple-choice) or the dev loss; auto = the metric where the task has one.",
    )


class LoraParams(ConfigModel):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt (PEFT syntax)."
    )


class AlignConfig(OptimConfig, LoraParams):
    """Alignment / RL rungs trained by a TRL trainer (dpo, reward-model, grpo): LoRA (r, alpha,
    dropout, target_modules) or full. ``from:`` names a rung whose model (or LoRA / IA3
    adapter, merged) is the starting point and, for dpo / grpo, the reference."""

    method: Literal["lora", "full"] = Field("lora", description="Train a LoRA adapter or all weights.")
    logging_steps: int | None = Field(1, ge=1, description="Log loss / rewards every N steps (curves in the report).")
