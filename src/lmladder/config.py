"""Typed configuration: the single source of truth for a run.

A YAML file, CLI flags and ``--set key=value`` overrides all map onto
:class:`RunConfig`. Field descriptions double as ``--help`` text and docs.
Rung configs live here too (one class per rung) so that a run's whole
configuration is visible in one place and validated before any model work.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmladder.errors import LadderError
from lmladder.textfiles import DEFAULT_MAX_LINE_BYTES


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


# --------------------------------------------------------------------------- data / task


class DataConfig(_Config):
    train: str | None = Field(
        None,
        description="Train data: a JSONL, CSV or Parquet file; a folder written by datasets' save_to_disk "
        "(FOLDER@SPLIT picks a DatasetDict's split; default: the 'train' split); or a Hugging Face "
        "dataset, hf:NAME[:CONFIG][@SPLIT] (default split: train).",
    )
    test: str | None = Field(
        None,
        description="Test data (a file, a saved dataset folder or hf:NAME[:CONFIG][@SPLIT]; default "
        "split: test). When absent, a seeded split of `train` (see test_fraction).",
    )
    input_field: str | None = Field(
        None,
        description="Field holding the model input. Default by task.kind: prompt (preference), question "
        "(multiple-choice), text (every other kind). Not used when data.input_template is set.",
    )
    input_template: str | None = Field(
        None,
        description="The model input made from several fields, e.g. 'Passage: {passage}\\nQuestion: "
        "{question}': {field} placeholders, dotted paths into nested fields ({meta.title}, {answers.0}), "
        "literal braces as {{ }}. Replaces data.input_field; a field missing from a row is an error "
        "naming file:line.",
    )
    label_field: str | None = Field(
        None,
        description="Field holding the gold label / answer. Default by task.kind: answerKey "
        "(multiple-choice), data.chosen_field (preference), label (every other kind).",
    )
    choices_field: str | None = Field(
        None,
        description="multiple-choice: field holding each example's list of choices. Default for "
        "multiple-choice: choices.",
    )
    choice_labels_field: str | None = Field(
        None,
        description="multiple-choice: field holding each example's list of choice labels, e.g. "
        '["A","B","C","D"]; the gold answer names one of them. Not needed when the choices field '
        'has the nested shape {"text": [...], "label": [...]} (read automatically) or is a '
        "{label: text} mapping.",
    )
    answer_base: Literal[0, 1] | None = Field(
        None,
        description="multiple-choice: whether numeric answers count choices from 0 or 1; needed only "
        "when the data has no choice labels and the answers are numbers. When unset it is inferred "
        "from all numeric answers: any 0 means 0-based, any answer equal to its row's number of "
        "choices means 1-based; both is an error, neither (ambiguous) is an error asking for this.",
    )
    allow_overlap: bool = Field(
        False,
        description="Allow test inputs that also appear in train (compared casefolded, whitespace "
        "collapsed; multiple-choice: with the choices). Off: such overlap is an error. On: the "
        "overlap is recorded in data.json ('overlap') and logged as a warning.",
    )
    chosen_field: str = Field("chosen", description="preference: field holding the preferred response.")
    rejected_field: str = Field("rejected", description="preference: field holding the dispreferred response.")
    instruction_field: str | None = Field(
        None, description="Field with a per-example instruction (multi-task / instruction-tuning data)."
    )
    group_field: str | None = Field(
        None, description="Field naming each example's group (e.g. source task): metrics per group too."
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of `train` held out as test when `test` is absent."
    )
    limit_train: int | None = Field(
        None, ge=1, description="Use a seeded sample of at most N train examples."
    )
    limit_test: int | None = Field(
        None, ge=1, description="Use a seeded sample of at most N test examples."
    )
    max_line_bytes: int = Field(
        DEFAULT_MAX_LINE_BYTES, ge=1024,
        description="Longest line of a data file (JSONL / CSV; a CSV field; a Parquet / dataset text value) "
        "in bytes; a longer one is an error naming file:line (lines are never read whole past this).",
    )
    max_input_tokens: int | None = Field(
        None, ge=1,
        description="Longest input in tokens; default: what fits the model's context after the prompt "
        "template and the answer (checked on every train and test input before any model work).",
    )
    truncation: Literal["truncate", "error"] = Field(
        "truncate",
        description="An input longer than max_input_tokens: 'truncate' keeps its first max_input_tokens "
        "tokens (counted in data.json and the report) or 'error' stops before any model work, naming "
        "file:line.",
    )

    @field_validator("input_template")
    @classmethod
    def _template_valid(cls, v):
        if v is not None:
            parse_template(v)
        return v

    @model_validator(mode="after")
    def _input_one_way(self):
        if self.input_template is not None and self.input_field is not None:
            raise ValueError("give data.input_template or data.input_field, not both (the template replaces the field)")
        return self

    def for_kind(self, kind: str) -> "DataConfig":
        """This config with the unset field names filled with the task kind's defaults
        (:data:`FIELD_DEFAULTS`; explicit settings win). Idempotent."""
        fill = {k: v for k, v in field_defaults(kind, self).items() if getattr(self, k) is None}
        if self.input_template is not None:
            fill.pop("input_field", None)
        return self.model_copy(update=fill) if fill else self


# The ecosystem's field names per task kind: TRL's preference columns (prompt / chosen /
# rejected; the gold is the chosen response), the Hugging Face multiple-choice shape of ARC /
# OpenBookQA / CommonsenseQA; every other kind: text / label.
FIELD_DEFAULTS: dict[str, dict[str, str]] = {
    "preference": {"input_field": "prompt", "label_field": "chosen"},
    "multiple-choice": {"input_field": "question", "label_field": "answerKey", "choices_field": "choices"},
}


def field_defaults(kind: str, data: DataConfig | None = None) -> dict[str, str]:
    """Default input / label / choices field names of a task kind (preference: the label is
    data.chosen_field, whatever it is named)."""
    out = dict(FIELD_DEFAULTS.get(kind, {"input_field": "text", "label_field": "label"}))
    if kind == "preference" and data is not None:
        out["label_field"] = data.chosen_field
    return out


def parse_template(template: str) -> list[tuple[str, tuple[str, ...] | None]]:
    """``data.input_template`` as [(literal text, field path or None)]; ValueError for what is
    not a plain {field} / {dotted.path} placeholder."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    out: list[tuple[str, tuple[str, ...] | None]] = []
    for literal, name, spec, conv in parsed:
        if name is None:
            out.append((literal, None))
            continue
        shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if conv or spec:
            raise ValueError(f"placeholder {shown}: conversions and format specs are not supported; use {{{name}}}")
        if not name.strip():
            raise ValueError("empty placeholder {}: name a field, e.g. {question}")
        if "[" in name or "]" in name:
            raise ValueError(f"placeholder {shown}: use dots for nested fields and list items, e.g. {{answers.0}}")
        if name.isdigit():
            raise ValueError(f"placeholder {shown}: name a field, e.g. {{question}}, not a position")
        parts = tuple(name.split("."))
        if any(not p for p in parts):
            raise ValueError(f"placeholder {shown}: empty part in the dotted path")
        out.append((literal, parts))
    if not any(p for _, p in out):
        raise ValueError("the template has no {field} placeholder")
    return out



TASK_KINDS = ("classification", "math", "qa", "extraction", "multiple-choice", "generation", "tagging", "preference")


class TaskConfig(_Config):
    kind: Literal[
        "classification", "math", "qa", "extraction", "multiple-choice", "generation", "tagging", "preference"
    ] = Field(
        "classification",
        description="Task kind: classification, math, qa, extraction, multiple-choice, generation, "
        "tagging (BIO tags per token; encoder rung only), preference (prompt, chosen, rejected).",
    )
    instruction: str | None = Field(
        None, description="What the model should do; a default is written from the label set."
    )
    labels: list[str] | None = Field(
        None, description="Label set. Inferred from the train labels when absent."
    )
    metric: str | None = Field(
        None, description="Primary metric; default per kind (accuracy, exact_match, f1, ...)."
    )
    target: dict[str, float] | None = Field(
        None, description="Score to reach, e.g. {accuracy: 0.85}; drives the recommendation."
    )
    system_prompt: str | None = Field(
        None, description="System message; None keeps the chat template's default."
    )
    schema_: str | dict | list[str] | None = Field(
        None,
        alias="schema",
        description="extraction: JSON Schema (file path or inline mapping) or a list of field names.",
    )
    templates: list[str] | None = Field(
        None,
        description="FLAN-style prompt templates with {instruction} and {input}: training renders each "
        "example with a seeded choice among the default template and these (evaluation: the default).",
    )
    metric_fn: str | None = Field(
        None, description="generation: extra metric as 'module:function(pred, gold) -> float'."
    )

    @field_validator("labels")
    @classmethod
    def _labels_nonempty(cls, v):
        if v is not None:
            if len(v) < 2:
                raise ValueError("give at least two labels")
            if any(not str(x).strip() for x in v):
                raise ValueError("labels must be non-empty strings")
            if len(set(v)) != len(v):
                raise ValueError("labels must be distinct")
        return v

    @field_validator("templates")
    @classmethod
    def _templates_format(cls, v):
        for t in v or []:
            if "{input}" not in t:
                raise ValueError(f"template {t!r} has no {{input}} placeholder")
            try:
                t.format(instruction="", input="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"template {t!r}: only {{instruction}} and {{input}} may appear in braces ({e})")
        return v

    @field_validator("target")
    @classmethod
    def _one_target(cls, v):
        if v is not None and len(v) != 1:
            raise ValueError("give exactly one metric, e.g. {accuracy: 0.85}")
        return v


class EvalConfig(_Config):
    batch_size: int = Field(16, ge=1, description="Rows per forward pass when scoring.")
    gen_batch_size: int = Field(8, ge=1, description="Sequences per batch when generating.")
    max_new_tokens: int = Field(
        64, ge=1, description="Longest direct answer generated (reasoning rungs have their own)."
    )
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for the 95% CIs.")
    max_batch_tokens: int = Field(
        8192, ge=64,
        description="Most padded tokens in one scoring / generation batch (rows x longest row, past the "
        "prompts' shared prefix; new tokens included): long inputs run in smaller batches, so memory stays "
        "bounded by this budget, not by the longest input times the batch size.",
    )


# what an hour of the machine costs when cost.usd_per_hour is not given, by the device the
# model ran on: a 2-vCPU cloud VM (e.g. AWS c7i.large on demand, ~0.09 USD/h) and one
# data-centre GPU (an A100 80GB / H100 hour on demand at the cheaper clouds, ~2-3 USD/h)
USD_PER_HOUR_DEFAULTS = {"cpu": 0.10, "cuda": 2.50, "mps": 0.10, "xpu": 2.50}


class CostConfig(_Config):
    """Money: what a rung costs over a deployment of ``calls`` calls (rebuilds the report,
    reruns nothing)."""

    usd_per_hour: float | None = Field(
        None, ge=0,
        description="Price of an hour of the machine the rungs ran on (USD); default by device kind: "
        "cpu 0.10 (a 2-vCPU cloud VM), cuda 2.50 (one data-centre GPU).",
    )
    calls: int = Field(
        100_000, ge=0, description="Expected calls over the deployment's life: total = one-time + calls x per-call."
    )
    usd_per_1k_prompt_tokens: float | None = Field(
        None, ge=0, description="openai: models: price per 1,000 prompt tokens (then per-call cost is by tokens)."
    )
    usd_per_1k_output_tokens: float | None = Field(
        None, ge=0, description="openai: models: price per 1,000 generated tokens."
    )


class LadderConfig(_Config):
    stop_at_target: bool = Field(
        False,
        description="Climb in order of expected cost and stop at the first rung that meets the target under "
        "the decision rule (--until-target); the rest are listed as skipped.",
    )


class DecisionConfig(_Config):
    """How the verdict reads the evidence (changing it rebuilds the report, reruns nothing)."""

    rule: Literal["point", "lower-bound"] = Field(
        "point",
        description="When a rung meets the target: point (its score >= target) or lower-bound "
        "(its 95% interval's lower bound >= target).",
    )


class TrackingConfig(_Config):
    """Experiment tracking through transformers' integrations (src/lmladder/tracking.py).
    Not part of any rung's fingerprint: changing it reruns nothing."""

    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Backends that log each rung's training (a run per rung) and the final scores, costs and "
        "verdict: tensorboard, mlflow, wandb (a list, or comma-separated: --report-to tensorboard,mlflow).",
    )
    dir: str | None = Field(
        None,
        description="Folder for local tracking files (default <out>/tracking): tensorboard/<rung>/, the MLflow "
        "file store mlruns/ (unless MLFLOW_TRACKING_URI is set), wandb/ (unless WANDB_DIR is set).",
    )
    experiment: str | None = Field(
        None,
        description="MLflow experiment / W&B group of the run's tracked runs (default: the run folder's name; "
        "MLFLOW_EXPERIMENT_NAME / WANDB_RUN_GROUP win).",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _split(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            v = [str(x).strip().lower() for x in v if str(x).strip()]
            v = [x for x in v if x != "none"]
            return list(dict.fromkeys(v))
        return v


# --------------------------------------------------------------------------- rungs


class _Constrainable(_Config):
    constrained: bool = Field(
        False,
        description="Restrict decoding by a grammar (label set / answer regex / JSON Schema).",
    )


class _PromptFormat(_Constrainable):
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


class ZeroShotConfig(_PromptFormat):
    """Instruction + input through the chat template; no examples."""


class CalibratedConfig(_PromptFormat):
    """zero-shot with contextual calibration."""

    calibrate: bool = Field(True, description="Always true for this rung (it is zero-shot + calibration).")


class FewShotConfig(_PromptFormat):
    k: int | Literal["max"] = Field(
        8, description="In-context examples; 'max' = as many as fit the context (many-shot)."
    )
    k_curve: list[int] | None = Field(
        None, description="Would more examples help? Also score these smaller k (e.g. [1, 2, 4]) on the same test split."
    )

    @field_validator("k_curve")
    @classmethod
    def _k_curve(cls, v):
        if v is not None and (not v or any(k < 1 for k in v)):
            raise ValueError(f"k values must be >= 1, got {v}")
        return sorted(set(v)) if v else v
    balanced: bool = Field(True, description="Draw examples round-robin across labels.")
    selection: Literal["random", "similar"] = Field(
        "random", description="random (seeded) or similar (k nearest train inputs by embedding)."
    )
    embedder: str = Field(
        "all-minilm-l6-v2", description="Sentence embedder for selection: similar (embedded name, path or hub id)."
    )
    context_window: int | None = Field(
        None, ge=64, description="Token budget for many-shot prompts; default: the model's context length."
    )

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("k must be >= 1 or 'max'")
        return v


class _Reasoning(_Constrainable):
    prompt: str = Field(
        "Think step by step, then give the final answer on the last line as 'Answer: <answer>'.",
        description="Reasoning instruction appended to the task instruction.",
    )
    thinking: Literal["auto", "prompt", "native"] = Field(
        "auto",
        description="native = the chat template's thinking mode (enable_thinking); auto uses it when the template has one.",
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest reasoning + answer generated.")


class CotConfig(_Reasoning):
    """Greedy chain-of-thought, answer taken from the final part."""


class _Sampled(_Reasoning):
    n: int = Field(8, ge=1, description="Samples per example.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling top-p.")


class SelfConsistencyConfig(_Sampled):
    """N sampled reasoning paths, majority vote on the extracted answer."""


class BestOfNConfig(_Sampled):
    n: int = Field(4, ge=1, description="Candidates per example.")
    verifier: str = Field(
        "auto",
        description="auto = the task's programmatic checker when it has one, else an LM judge; "
        "programmatic; judge; reward-model = the highest score of this run's reward-model rung "
        "(it runs first); reward-model:<folder> = a saved reward model (rungs/reward-model/model).",
    )
    judge_model: str | None = Field(None, description="Judge model (default: the model itself).")
    judge_mode: Literal["pointwise", "ranking"] = Field(
        "pointwise", description="pointwise: score each candidate 1-10; ranking: pick the best of all at once."
    )

    @field_validator("verifier")
    @classmethod
    def _verifier_valid(cls, v: str) -> str:
        if v in ("auto", "programmatic", "judge", "reward-model") or (v.startswith("reward-model:") and v[13:].strip()):
            return v
        raise ValueError("give auto, programmatic, judge, reward-model or reward-model:<folder>")


class ConstrainedConfig(_Config):
    engine: Literal["xgrammar", "llguidance"] = Field("xgrammar", description="Grammar engine.")
    reasoning: bool = Field(False, description="Free reasoning first, then the constrained answer.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default: eval.max_new_tokens.")


class RagConfig(_Constrainable):
    corpus: str | None = Field(None, description="Passages: JSONL (id, text), a text file, or a folder of .txt/.md.")
    text_field: str = Field("text", description="Corpus JSONL field with the passage text.")
    id_field: str = Field("id", description="Corpus JSONL field with the passage id.")
    chunk_words: int = Field(200, ge=10, description="Chunk size in words (long passages are split).")
    chunk_overlap: int = Field(40, ge=0, description="Words shared by consecutive chunks.")
    top_k: int = Field(3, ge=1, description="Passages put in the prompt.")
    retriever: Literal["bm25", "dense", "hybrid"] = Field("hybrid", description="Retrieval method.")
    rrf_k: int = Field(60, ge=1, description="Reciprocal-rank-fusion constant (hybrid).")
    embedder: str = Field("all-minilm-l6-v2", description="Dense retrieval embedder.")
    query_writing: bool = Field(False, description="Let the model write the search query first.")
    gold_field: str | None = Field(
        "doc_id", description="Test field with the gold passage id (for recall@k), if present."
    )


class ToolsConfig(_Config):
    tools: list[str] = Field(
        default_factory=lambda: ["calculator"],
        description="Tools: built-in names (calculator) or Python callables 'module:function'.",
    )
    max_steps: int = Field(4, ge=1, description="Most tool calls per example.")
    format: Literal["auto", "template", "json"] = Field(
        "auto", description="template = the chat template's tool format; json = a JSON call line; auto picks."
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest model turn.")


class PromptSearchConfig(_Constrainable):
    variants: list[str] | None = Field(None, description="Instruction variants to try (besides the task's).")
    generate: int = Field(4, ge=0, description="Variants written by the model itself.")
    dev_size: int = Field(64, ge=4, description="Dev examples carved (seeded) from train for the search.")


def _check_curve(v):
    if v is None:
        return v
    if not v or any(not (0 < f <= 1) for f in v):
        raise ValueError(f"fractions must be in (0, 1], got {v}")
    return sorted(set(float(f) for f in v) | {1.0})


class OptimConfig(_Config):
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
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer micro-batch.")
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
        return _check_curve(v)


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


class LoraParams(_Config):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt (PEFT syntax)."
    )


class LoraConfig(TrainConfig, LoraParams):
    pass


class AlignConfig(OptimConfig, LoraParams):
    """Alignment / RL rungs trained by a TRL trainer (dpo, reward-model, grpo): LoRA (r, alpha,
    dropout, target_modules) or full. ``from:`` names a rung whose model (or LoRA / IA3
    adapter, merged) is the starting point and, for dpo / grpo, the reference."""

    method: Literal["lora", "full"] = Field("lora", description="Train a LoRA adapter or all weights.")
    logging_steps: int | None = Field(1, ge=1, description="Log loss / rewards every N steps (curves in the report).")


class DpoConfig(AlignConfig):
    """dpo: Direct Preference Optimization on (prompt, chosen, rejected) pairs (TRL DPOTrainer)."""

    beta: float = Field(0.1, gt=0, description="DPO beta (strength of the KL anchor to the reference).")
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "aot", "aot_unpaired",
        "apo_zero", "apo_down", "discopop", "sigmoid_norm",
    ] = Field("sigmoid", description="TRL DPO loss type (sigmoid = the DPO paper's; ipo, hinge, ...).")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (LoRA; use ~5e-7..5e-6 for full).")
    max_length: int = Field(
        512, ge=8, description="Longest prompt + response (+ end of turn) in tokens; a longer pair has its prompt "
        "cut from the left (counted; truncation: error stops instead)."
    )
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch.")


class RewardModelConfig(AlignConfig):
    """reward-model: a sequence-classification reward model on the pairs (TRL RewardTrainer);
    saved merged in rungs/reward-model/model for best-of-n (verifier) and grpo (reward)."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    max_length: int = Field(
        512, ge=8, description="Longest prompt+response in tokens (prompt cut from the left, see truncation)."
    )
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch.")
    forgetting_text: str | None = Field(
        None, description="Not used: a reward model is a classifier (no LM head to measure perplexity with)."
    )


class GrpoConfig(AlignConfig):
    """grpo: RL from verifiable rewards (TRL GRPOTrainer)."""

    rewards: list[str] = Field(
        default_factory=lambda: ["builtin"],
        description="Reward functions: 'builtin' (the task's: numeric answer for math, schema validity "
        "for extraction, label match for classification), 'reward-model' (the reward-model rung's, or "
        "reward-model:<folder>), or 'module:function' callables.",
    )
    reward_weights: list[float] | None = Field(
        None, description="Weight of each reward in the sum (default: 1 each); one per entry of rewards."
    )
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the group).")
    max_completion_length: int = Field(128, ge=1, description="Longest completion in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling top-p of the completions.")
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference (0: no reference pass).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(
        4, ge=1, description="Completions per micro-batch; batch_size x grad_accum must be a multiple of num_generations."
    )
    max_length: int = Field(
        512, ge=8, description="Longest prompt + completion in tokens (prompts cut from the left, see truncation)."
    )
    max_steps: int | None = Field(20, ge=1, description="Optimizer steps.")


class DistillConfig(LoraConfig):
    """distill: a teacher labels the train inputs; a LoRA student learns its outputs (SFT)."""

    teacher: str = Field(
        "few-shot",
        description="Who labels the train inputs: a rung name of this run (e.g. self-consistency, "
        "few-shot), 'model:<spec>' (another model, zero-shot), or 'module:function' (a callable "
        "taking the Example list and returning answer texts).",
    )
    kd: Literal["sequence", "logits"] = Field(
        "sequence",
        description="sequence: SFT on the teacher's answers; logits: also match the teacher's token "
        "distributions on them (teacher: zero-shot, few-shot or model:<spec> with the same vocabulary).",
    )
    kd_alpha: float = Field(
        0.5, ge=0, le=1, description="kd: logits: weight of the KL term (1 - kd_alpha on the answer's cross-entropy)."
    )
    kd_temperature: float = Field(1.0, gt=0, description="kd: logits: softmax temperature of teacher and student.")
    kd_top_k: int = Field(
        20, ge=1, description="kd: logits: the teacher's top-k tokens kept per answer token (renormalised)."
    )


class QloraConfig(LoraConfig):
    """LoRA on a base model loaded in 4-bit NF4 (bitsandbytes)."""

    double_quant: bool = Field(True, description="Quantise the 4-bit scales too (bnb double quantisation).")


class Ia3Config(TrainConfig):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warmup, then decay).")
    target_modules: str | list[str] | None = Field(
        None, description="Modules to rescale (PEFT syntax; default: PEFT's per-architecture choice)."
    )
    feedforward_modules: str | list[str] | None = Field(
        None, description="Which target modules are feed-forward (PEFT syntax; default: PEFT's)."
    )


class PromptTuningConfig(TrainConfig):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warmup, then decay).")
    num_virtual_tokens: int = Field(16, ge=1, description="Length of the learned soft prompt.")
    init_from_instruction: bool = Field(
        True, description="Initialise the soft prompt from the task instruction's token embeddings."
    )


class PrefixTuningConfig(TrainConfig):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (warmup, then decay).")
    num_virtual_tokens: int = Field(16, ge=1, description="Learned key/value prefix length per layer.")
    projection: bool = Field(
        False, description="Reparameterise the prefix through an MLP (prefix_projection)."
    )


class FullConfig(TrainConfig):
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (warmup, then decay).")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )


class EncoderConfig(_Config):
    """A separate encoder (not the causal LM) with a new classification / tagging head."""

    model: str = Field(
        "all-minilm-l6-v2",
        description="Encoder: all-minilm-l6-v2 (embedded), a local HF folder or a hub id (safetensors only).",
    )
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (linear decay after warmup).")
    epochs: float = Field(3.0, gt=0, description="Passes over the train set.")
    max_steps: int | None = Field(None, ge=1, description="Stop after N optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per optimizer step.")
    eval_batch_size: int = Field(64, ge=1, description="Examples per forward pass when predicting.")
    max_length: int = Field(
        128, ge=8, description="Longest input in sub-word tokens; longer inputs are truncated (counted)."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps used for warmup.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")


class ContinuedPretrainingConfig(_Config):
    """Next-token training on raw domain text, then the task's zero-shot prompt."""

    corpus: str | None = Field(
        None,
        description="Domain text: JSONL (one document per row), a .txt file (documents separated "
        "by blank lines), or a folder of .txt/.md files (one document each).",
    )
    text_field: str = Field("text", description="Corpus JSONL field with the document text.")
    method: Literal["lora", "full"] = Field(
        "lora", description="lora (adapter, merged into the saved model) or full (every weight)."
    )
    block_size: int = Field(
        512, ge=8, description="Tokens per training block (documents joined by EOS, then cut)."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Use at most the first N documents of the corpus."
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (linear decay after warmup).")
    epochs: float = Field(1.0, gt=0, description="Passes over the corpus blocks.")
    max_steps: int | None = Field(None, ge=1, description="Stop after N optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Blocks per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps used for warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    r: int = Field(16, ge=1, description="LoRA rank (method: lora).")
    alpha: int = Field(32, ge=1, description="LoRA alpha (method: lora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (method: lora).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt (PEFT syntax; method: lora)."
    )


JUDGE_PROMPT = (
    "You are comparing two assistant responses to the same user message.\n\n"
    "# User message\n{prompt}\n\n"
    "# Response A\n{response_a}\n\n"
    "# Response B\n{response_b}\n\n"
    "# Question\nWhich response is more helpful, honest and harmless? "
    "Answer with a single letter: A or B."
)


class JudgeConfig(_Config):
    """preference: win rate of a rung's greedy responses against its starting model's, judged
    pairwise by an LM (both orders; inference/judge.py)."""

    n: int = Field(
        32, ge=0, description="Test prompts (the first N) whose responses are generated and judged; 0 = no win rate."
    )
    max_new_tokens: int = Field(96, ge=1, description="Longest response generated per prompt (greedy).")
    model: str | None = Field(None, description="Judge model (default: the run's base model).")
    prompt: str = Field(
        JUDGE_PROMPT,
        description="Judge message with {prompt}, {response_a}, {response_b} (and optionally {instruction}); "
        "the judge's next-token log-probs of 'A' vs 'B' decide.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_format(cls, v):
        import string

        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ }}}}") from None
        missing = [f for f in ("prompt", "response_a", "response_b") if f not in names]
        if missing:
            raise ValueError(f"the template has no {', '.join('{' + m + '}' for m in missing)} placeholder")
        other = sorted(names - {"prompt", "response_a", "response_b", "instruction"})
        if other:
            raise ValueError(
                f"unknown placeholder {', '.join('{' + o + '}' for o in other)} "
                "(known: {prompt}, {response_a}, {response_b}, {instruction})"
            )
        return v


# --------------------------------------------------------------------------- run


class RunConfig(_Config):
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: str = Field(
        "smollm2-135m",
        description="HF hub id, local HF folder, .gguf file, or an embedded name (smollm2-135m).",
    )
    rungs: list[str] = Field(
        default_factory=lambda: ["zero-shot", "few-shot", "lora"],
        description="Rungs to climb (run and recommended in cost order).",
    )
    seed: int = Field(0, description="Seed for splits, example selection, training, bootstrap.")
    out: str | None = Field(None, description="Run folder (default runs/<config name>).")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    ladder: LadderConfig = Field(default_factory=LadderConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    zero_shot: ZeroShotConfig = Field(default_factory=ZeroShotConfig, alias="zero-shot")
    calibrated: CalibratedConfig = Field(default_factory=CalibratedConfig)
    few_shot: FewShotConfig = Field(default_factory=FewShotConfig, alias="few-shot")
    cot: CotConfig = Field(default_factory=CotConfig)
    self_consistency: SelfConsistencyConfig = Field(
        default_factory=SelfConsistencyConfig, alias="self-consistency"
    )
    best_of_n: BestOfNConfig = Field(default_factory=BestOfNConfig, alias="best-of-n")
    constrained: ConstrainedConfig = Field(default_factory=ConstrainedConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    prompt_search: PromptSearchConfig = Field(default_factory=PromptSearchConfig, alias="prompt-search")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    qlora: QloraConfig = Field(default_factory=QloraConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig, alias="reward-model")
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    ia3: Ia3Config = Field(default_factory=Ia3Config)
    prompt_tuning: PromptTuningConfig = Field(default_factory=PromptTuningConfig, alias="prompt-tuning")
    prefix_tuning: PrefixTuningConfig = Field(default_factory=PrefixTuningConfig, alias="prefix-tuning")
    full: FullConfig = Field(default_factory=FullConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    continued_pretraining: ContinuedPretrainingConfig = Field(
        default_factory=ContinuedPretrainingConfig, alias="continued-pretraining"
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig, description="preference: the LM judge of the win rate metric."
    )
    copies: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named copies of a rung, listed in rungs as <rung>@<tag> (e.g. lora@cpt): "
        "the rung's own section with these keys changed, e.g. {lora@cpt: {from: continued-pretraining}}.",
    )

    @field_validator("copies")
    @classmethod
    def _copies_valid(cls, v, info):
        for name, over in v.items():
            base, sep, tag = name.partition("@")
            section = base.replace("-", "_")
            if not sep or not tag.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"'{name}': name a copy <rung>@<tag>, e.g. lora@cpt")
            if not isinstance(info.data.get(section), BaseModel) or section in ("task", "data", "eval"):
                raise ValueError(f"'{name}': '{base}' is not a rung with a config section")
            _copy_config(info.data[section], over, name)
        return v

    @model_validator(mode="after")
    def _resolve_data_fields(self):
        """Fill data's unset field names from task.kind (data.input_field: prompt for preference,
        ...), here once, so every reader, the config snapshot and the fingerprint see the
        names actually used."""
        resolved = self.data.for_kind(self.task.kind)
        if resolved is not self.data:
            object.__setattr__(self, "data", resolved)  # not self.data = ...: that revalidates
        return self

    def rung_config(self, name: str) -> _Config:
        base, _, _ = name.partition("@")
        cfg = getattr(self, base.replace("-", "_"))
        return _copy_config(cfg, self.copies[name], name) if name in self.copies else cfg

    @property
    def primary_metric(self) -> str:
        if self.task.target:
            return next(iter(self.task.target))
        if self.task.metric:
            return self.task.metric
        from lmladder.tasks import KINDS

        return KINDS[self.task.kind].metric_names[0]


def _copy_config(cfg: _Config, over: Any, name: str) -> _Config:
    """A rung section with a named copy's keys changed (validated like the section)."""
    if not isinstance(over, dict):
        raise ValueError(f"'{name}': give a mapping of {name.partition('@')[0]} keys")
    raw = {**cfg.model_dump(by_alias=True), **_canonical(over, type(cfg), f"copies.{name}.", "config")}
    try:
        return type(cfg).model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ValueError(f"'{name}': {'.'.join(map(str, err['loc']))}: {msg}") from None


# --------------------------------------------------------------------------- loading

_PATH_KEYS = (
    ("data", "train"), ("data", "test"), ("rag", "corpus"), ("task", "schema"),
    ("continued-pretraining", "corpus"), ("tracking", "dir"),
)


def _norm(key: str) -> str:
    return key.replace("-", "_")


def _field_names(model: type[BaseModel]) -> dict[str, str]:
    """Map accepted spellings (name, alias, hyphenated) to the canonical key used in dicts."""
    out = {}
    for name, f in model.model_fields.items():
        key = f.alias or name
        for spelling in {name, key, name.replace("_", "-")}:
            out[spelling] = key
    return out


def _submodel(model: type[BaseModel], key: str):
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                return ann
            return None
    return None


def _yaml_lines(root) -> dict[tuple[str, ...], int]:
    """Map each key path in a composed YAML document (its root node; aliases already bounded
    by :func:`_check_yaml_size`) to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    stack = [(root, ())] if root is not None else []
    while stack:  # document order (children pushed reversed): a repeated key's last line wins
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            items = [(path + (str(k.value),), k, v) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            items = [(path + (str(n),), v, v) for n, v in enumerate(node.value)]
        else:
            continue
        for p, mark_node, _ in items:
            lines[p] = mark_node.start_mark.line + 1
        stack.extend((v, p) for p, _, v in reversed(items))
    return lines


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a YAML "\ud800" escape makes one
MAX_CONFIG_BYTES = 16 << 20  # a config file (inline schemas included) is far smaller
MAX_YAML_VALUES = 100_000  # values in the document once its aliases are expanded
MAX_YAML_CHARS = 64 << 20  # characters of scalars once expanded


def _check_yaml_size(root, path) -> None:
    """Refuse what aliases would blow up (billion laughs: a few hundred bytes expanding to
    billions of values) or make endless (an alias inside its own anchor). Counts each node
    once (iteratively; a shared node's expanded size is memoised)."""
    size: dict[int, tuple[int, int]] = {}
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done

    def kids(node):
        if isinstance(node, yaml.MappingNode):
            return [x for kv in node.value for x in kv]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    stack = [(root, False)]
    while stack:
        node, post = stack.pop()
        key = id(node)
        if post:
            ch = kids(node)
            n = 1 + sum(size[id(c)][0] for c in ch)
            chars = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(size[id(c)][1] for c in ch)
            if n > MAX_YAML_VALUES or chars > MAX_YAML_CHARS:
                what = f"{MAX_YAML_VALUES:,} values" if n > MAX_YAML_VALUES else f"{MAX_YAML_CHARS:,} characters"
                raise LadderError(
                    f"{path}:{node.start_mark.line + 1}: YAML aliases (*name) expand to over {what} "
                    "(an alias bomb?); write the values out instead of aliasing them"
                )
            bad = _LONE_SURROGATE.search(node.value) if isinstance(node, yaml.ScalarNode) else None
            if bad:
                raise LadderError(
                    f"{path}:{node.start_mark.line + 1}: a lone surrogate escape ('\\u{ord(bad.group()):04x}') is not "
                    "valid Unicode text; fix the escape (a character beyond \\uffff is written \\U0001f600)"
                )
            size[key], state[key] = (n, chars), 2
            continue
        if state.get(key) == 2:
            continue
        state[key] = 1
        stack.append((node, True))
        for c in kids(node):
            if state.get(id(c)) == 1:
                raise LadderError(
                    f"{path}:{c.start_mark.line + 1}: a YAML alias refers to its own anchor (a value containing "
                    "itself); write the value out"
                )
            if state.get(id(c)) != 2:
                stack.append((c, False))


def _load_yaml(path: Path, text: str):
    """(data, root node) of a YAML document, its aliases checked before anything expands them."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character first (ReaderError)
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_yaml_size(node, path)
        return loader.construct_document(node), node
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            line, why = f":{mark.line + 1}", e.problem
        elif isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
            line, why = f":{text.count(chr(10), 0, e.position) + 1}", f"unacceptable character #x{e.character:04x}"
        else:
            line, why = "", str(e)
        raise LadderError(f"{path}{line}: invalid YAML ({' '.join(str(why).split())})") from None
    except RecursionError:
        raise LadderError(f"{path}: invalid YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()


def _canonical(raw: dict, model: type[BaseModel], path: str, origin: str) -> dict:
    """Rename keys to their canonical spelling (``few_shot`` -> ``few-shot``), recursively
    for config sections, so later flags and --set overrides land on the same key."""
    names = _field_names(model)
    out: dict = {}
    for k, v in raw.items():
        key = names.get(str(k), k)
        if key in out:
            raise LadderError(f"{origin}: '{path}{k}' is given twice (as '{key}' too)")
        sub = _submodel(model, key) if key in names.values() else None
        out[key] = _canonical(v, sub, f"{path}{key}.", origin) if sub and isinstance(v, dict) else v
    return out


def _check_sections(raw: dict, yaml_lines: dict, path: Path) -> None:
    """Every config section (data, task, lora, ...) is a mapping; an empty one (``data:``) is {}."""
    for key in list(raw):
        sub = _submodel(RunConfig, key)
        if sub is None:
            continue
        v = raw[key]
        if v is None:
            raw[key] = {}
        elif not isinstance(v, dict):
            line = next((n for p, n in yaml_lines.items() if len(p) == 1 and _field_names(RunConfig).get(p[0]) == key), None)
            known = list(dict.fromkeys(_field_names(sub).values()))  # in the section's own order
            shown = ", ".join(known[:4]) + (", ..." if len(known) > 4 else "")
            raise LadderError(
                f"{path}{f':{line}' if line else ''}: {key}: must be a mapping of keys ({shown}), "
                f"got {'a list' if isinstance(v, list) else type(v).__name__ + ' ' + repr(v)[:40]}"
            )


def read_yaml(path: str | Path) -> dict:
    """A YAML config as a raw dict for :func:`build`: read defensively (a regular UTF-8 file of
    bounded size, aliases bounded, every section a mapping), keys canonical, paths made
    relative to the file, and each key's line kept for error messages."""
    from lmladder.textfiles import check_regular, decode_text, human_bytes, open_binary

    path = Path(path)
    if not path.exists():
        raise LadderError(f"{path}: config file not found")
    st = check_regular(path, "config file")
    if path.is_dir():
        raise LadderError(f"{path}: the config file is a folder; give a YAML file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise LadderError(f"{path}: the config file is {human_bytes(st.st_size)}; a config is at most "
                          f"{human_bytes(MAX_CONFIG_BYTES)} (put big data in files it names)")
    with open_binary(path) as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    text = decode_text(data, path)
    raw, root = _load_yaml(path, text)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LadderError(f"{path}:1: the config must be a mapping of keys (task, data, model, ...)")
    yaml_lines = _yaml_lines(root)
    raw = _canonical(raw, RunConfig, "", str(path))
    _check_sections(raw, yaml_lines, path)
    # Paths in a YAML file are relative to that file, so a config runs from any folder.
    base = path.resolve().parent
    for section, key in _PATH_KEYS:
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and not sec[key].startswith("hf:"):
            p = Path(sec[key]).expanduser()
            sec[key] = str(p if p.is_absolute() else (base / p))
    if isinstance(raw.get("out"), str):  # the run folder too (examples: out: ../runs/<name>)
        p = Path(raw["out"]).expanduser()
        raw["out"] = str(p if p.is_absolute() else (base / p))
    bon = raw.get("best-of-n")  # verifier: reward-model:<folder> is a path too
    if isinstance(bon, dict) and isinstance(bon.get("verifier"), str) and bon["verifier"].startswith("reward-model:"):
        p = Path(bon["verifier"][13:].strip()).expanduser()
        bon["verifier"] = "reward-model:" + str(p if p.is_absolute() else (base / p))
    lines = {}
    for p, line in yaml_lines.items():
        canon, model = [], RunConfig
        for seg in p:
            names = _field_names(model) if model else {}
            key = names.get(seg, seg)
            canon.append(key)
            model = _submodel(model, key) if model else None
        lines[tuple(canon)] = line
    raw["__source__"] = (str(path), lines)
    return raw


def _check_key_path(dotted: str, origin: str) -> list[str]:
    """Validate a dotted key against RunConfig's schema; return canonical segments."""
    model: type[BaseModel] = RunConfig
    out: list[str] = []
    segments = dotted.split(".")
    for i, seg in enumerate(segments):
        names = _field_names(model)
        if seg not in names:
            where = ".".join(out) or "the config"
            known = sorted(set(names.values()))
            hint = difflib.get_close_matches(seg, list(names), n=1)
            hint_s = f"; did you mean '{hint[0]}'?" if hint else ""
            raise LadderError(
                f"{origin}: unknown key '{seg}' in {where} (known: {', '.join(known)}){hint_s}"
            )
        out.append(names[seg])
        rest = segments[i + 1 :]
        if not rest:
            break
        sub = _submodel(model, names[seg])
        if sub is not None:
            model = sub
            continue
        field = next(f for n, f in model.model_fields.items() if names[seg] in (n, f.alias))
        if "dict" in str(field.annotation):  # free-form mapping, e.g. task.target.accuracy
            out.extend(rest)
            break
        raise LadderError(f"{origin}: '{'.'.join(out)}' takes a value, not sub-keys")
    return out


def _is_text_field(path: list[str]) -> bool:
    model: type[BaseModel] | None = RunConfig
    for key in path[:-1]:
        model = _submodel(model, key) if model else None
    if model is None:
        return False
    field = next((f for n, f in model.model_fields.items() if path[-1] in (n, f.alias)), None)
    return field is not None and field.annotation in (str, str | None)


def apply_set(raw: dict, assignment: str) -> None:
    """Apply one ``--set key.path=value`` to a raw config dict (value parsed as YAML)."""
    origin = f"--set {assignment}"
    if "=" not in assignment:
        raise LadderError(f"{origin}: expected key=value, e.g. --set few-shot.k=4")
    key, value = assignment.split("=", 1)
    if not key.strip():
        raise LadderError(f"{origin}: empty key")
    path = _check_key_path(key.strip(), origin)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (dict, list)) and _is_text_field(path):
        parsed = value  # "--set task.instruction=Classify: yes or no" is text, not YAML
    node = raw
    for k in path[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[path[-1]] = parsed
    raw.setdefault("__set__", {})[tuple(path)] = origin


def build(raw: dict) -> RunConfig:
    """Validate a raw dict into a RunConfig; errors name the file:line or --set flag."""
    raw = dict(raw)
    source, lines = raw.pop("__source__", (None, {}))
    set_origins = raw.pop("__set__", {})
    raw = _canonical(raw, RunConfig, "", "config")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(x) for x in err["loc"])
        dotted = ".".join(loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        origin = None
        for path, flag in set_origins.items():
            if tuple(loc[: len(path)]) == tuple(path):
                origin = flag
        if origin is None and source is not None:
            line = None
            for n in range(len(loc), 0, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
            origin = f"{source}:{line}" if line else source
        origin = origin or "config"
        raise LadderError(f"{origin}: {dotted}: {msg}") from None


def dump(cfg: RunConfig) -> str:
    """YAML snapshot of a config (with aliases, as a user would write it)."""
    return yaml.safe_dump(cfg.model_dump(by_alias=True, mode="json"), sort_keys=False)


def describe_fields() -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every leaf field; used by --help and docs."""
    rows = []

    def walk(model: type[BaseModel], prefix: str):
        for name, f in model.model_fields.items():
            key = prefix + (f.alias or name)
            sub = _submodel(model, f.alias or name)
            if sub is not None:
                walk(sub, key + ".")
            else:
                default = f.default if f.default_factory is None else f.default_factory()
                rows.append((key, f.description or "", default))

    walk(RunConfig, "")
    return rows
