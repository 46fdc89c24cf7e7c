"""Typed configuration: the single source of truth for a run.

A YAML file, CLI flags and ``--set key=value`` overrides all map onto
:class:`RunConfig`. Field descriptions double as ``--help`` text and docs.
The run-wide sections (data, task, eval, decision, cost, ladder, tracking, judge) live
here; each rung's Config lives in its own file under rungs/ (on the shared bases of
options.py), and RunConfig has one typed line per rung, so a run's whole configuration
is still validated in one place before any model work.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from lmladder.errors import LadderError
from lmladder.options import ConfigModel
from lmladder.rungs.best_of_n import BestOfNConfig
from lmladder.rungs.calibrated import CalibratedConfig
from lmladder.rungs.constrained import ConstrainedConfig
from lmladder.rungs.continued_pretraining import ContinuedPretrainingConfig
from lmladder.rungs.cot import CotConfig
from lmladder.rungs.distill import DistillConfig
from lmladder.rungs.dpo import DpoConfig
from lmladder.rungs.encoder import EncoderConfig
from lmladder.rungs.few_shot import FewShotConfig
from lmladder.rungs.full import FullConfig
from lmladder.rungs.grpo import GrpoConfig
from lmladder.rungs.ia3 import Ia3Config
from lmladder.rungs.lora import LoraConfig
from lmladder.rungs.prefix_tuning import PrefixTuningConfig
from lmladder.rungs.prompt_search import PromptSearchConfig
from lmladder.rungs.prompt_tuning import PromptTuningConfig
from lmladder.rungs.qlora import QloraConfig
from lmladder.rungs.rag import RagConfig
from lmladder.rungs.reward_model import RewardModelConfig
from lmladder.rungs.self_consistency import SelfConsistencyConfig
from lmladder.rungs.tools import ToolsConfig
from lmladder.rungs.zero_shot import ZeroShotConfig
from lmladder.tasks import KINDS, kinds_help
from lmladder.textfiles import DEFAULT_MAX_LINE_BYTES


# --------------------------------------------------------------------------- data / task


class DataConfig(ConfigModel):
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
            from lmladder.data import parse_template

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




class TaskConfig(ConfigModel):
    kind: str = Field("classification", description="Task kind (tasks.KINDS): " + kinds_help() + ".")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v):
        if v not in KINDS:
            hint = difflib.get_close_matches(v, list(KINDS), n=1)
            raise ValueError(f"'{v}' is not a task kind (known: {', '.join(KINDS)})"
                             + (f"; did you mean '{hint[0]}'?" if hint else ""))
        return v

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


class EvalConfig(ConfigModel):
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


class CostConfig(ConfigModel):
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


class LadderConfig(ConfigModel):
    stop_at_target: bool = Field(
        False,
        description="Climb in order of expected cost and stop at the first rung that meets the target under "
        "the decision rule (--until-target); the rest are listed as skipped.",
    )


class DecisionConfig(ConfigModel):
    """How the verdict reads the evidence (changing it rebuilds the report, reruns nothing)."""

    rule: Literal["point", "lower-bound"] = Field(
        "point",
        description="When a rung meets the target: point (its score >= target) or lower-bound "
        "(its 95% interval's lower bound >= target).",
    )


class TrackingConfig(ConfigModel):
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


JUDGE_PROMPT = (
    "You are comparing two assistant responses to the same user message.\n\n"
    "# User message\n{prompt}\n\n"
    "# Response A\n{response_a}\n\n"
    "# Response B\n{response_b}\n\n"
    "# Question\nWhich response is more helpful, honest and harmless? "
    "Answer with a single letter: A or B."
)


class JudgeConfig(ConfigModel):
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


class RunConfig(ConfigModel):
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: str = Field(
        "smollm2-135m",
        description="HF hub id, local HF folder, .gguf file, an embedded name (smollm2-135m, gemma3-270m) or "
        "openai:NAME.",
    )
    models: list[str] | None = Field(
        None,
        description="Several models (replaces model): the same rungs on each, on the same test split; one run "
        "folder with a sub-run per model (models/<name>/), results per (model, rung) cell, one verdict over every "
        "cell. Rungs a model cannot run (training on openai:) are listed as not applicable.",
    )

    @field_validator("models")
    @classmethod
    def _models_valid(cls, v):
        if v is not None:
            if not v or any(not isinstance(m, str) or not m.strip() for m in v):
                raise ValueError("give at least one model spec, e.g. [smollm2-135m, gemma3-270m]")
            if len(set(v)) != len(v):
                raise ValueError(f"a model is listed twice: {v}")
        return v

    @property
    def model_list(self) -> list[str]:
        """The models this run climbs with: ``models``, else ``[model]``."""
        return list(self.models) if self.models else [self.model]
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

    def parent_of(self, rung: str) -> str | None:
        """The rung whose output model ``rung`` starts from (its section's ``from``), if any."""
        return getattr(self.rung_config(rung), "from_", None)

    def rung_config(self, name: str) -> ConfigModel:
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


def _copy_config(cfg: ConfigModel, over: Any, name: str) -> ConfigModel:
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
