"""Unit tests of lmladder.config: --set overrides, YAML loading, error locations, dump."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lmladder import config as C
from lmladder.config import RunConfig, TaskConfig
from lmladder.errors import LadderError


def _built(*assignments: str, raw: dict | None = None) -> RunConfig:
    raw = {} if raw is None else raw
    for a in assignments:
        C.apply_set(raw, a)
    return C.build(raw)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- apply_set + build


@pytest.mark.parametrize("key", ["few-shot.k", "few_shot.k"])
def test_set_hyphen_and_underscore_spellings(key):
    cfg = _built(f"{key}=4")
    assert cfg.few_shot.k == 4
    assert RunConfig().few_shot.k != 4  # the override changed something


@pytest.mark.parametrize("key", ["zero-shot", "zero_shot"])
def test_set_on_hyphenated_section_unknown_subkey_is_rejected(key):
    with pytest.raises(LadderError, match=r"unknown key 'x'"):
        C.apply_set({}, f"{key}.x=1")


@pytest.mark.parametrize("key", ["lora.warmup-ratio", "lora.warmup_ratio"])
def test_set_hyphenated_leaf(key):
    cfg = _built(f"{key}=0.25")
    assert cfg.lora.warmup_ratio == 0.25


def test_set_values_are_parsed_as_yaml():
    cfg = _built(
        "lora.lr=2e-4",
        "rungs=[zero-shot,lora]",
        "task.target.accuracy=0.9",
        "few-shot.balanced=false",
        "lora.max_steps=7",
        "task.instruction=Say yes or no",
    )
    assert isinstance(cfg.lora.lr, float) and cfg.lora.lr == pytest.approx(2e-4)
    assert cfg.rungs == ["zero-shot", "lora"]
    assert cfg.task.target == {"accuracy": 0.9}
    assert isinstance(cfg.task.target["accuracy"], float)
    assert cfg.few_shot.balanced is False
    assert cfg.lora.max_steps == 7 and isinstance(cfg.lora.max_steps, int)
    assert cfg.task.instruction == "Say yes or no"


def test_set_value_may_contain_equals_sign():
    cfg = _built("task.instruction=a=b")
    assert cfg.task.instruction == "a=b"


def test_set_last_assignment_wins():
    cfg = _built("few-shot.k=3", "few_shot.k=5")
    assert cfg.few_shot.k == 5


def test_set_keeps_sibling_keys_from_yaml(tmp_path):
    p = _write(tmp_path / "c.yaml", "few-shot:\n  balanced: false\nlora:\n  r: 4\n")
    raw = C.read_yaml(p)
    cfg = _built("few-shot.k=3", "lora.alpha=9", raw=raw)
    assert (cfg.few_shot.k, cfg.few_shot.balanced) == (3, False)
    assert (cfg.lora.r, cfg.lora.alpha) == (4, 9)


@pytest.mark.parametrize("section", ["few-shot", "few_shot"])
@pytest.mark.parametrize("setkey", ["few-shot.k", "few_shot.k"])
def test_set_overrides_yaml_whatever_the_spelling(tmp_path, section, setkey):
    """--set must win over the YAML file for every spelling of the same key."""
    p = _write(tmp_path / "c.yaml", f"{section}:\n  k: 2\n  balanced: false\n")
    raw = C.read_yaml(p)
    cfg = _built(f"{setkey}=6", raw=raw)
    assert cfg.few_shot.k == 6
    assert cfg.few_shot.balanced is False


@pytest.mark.parametrize("yaml_key", ["input-field", "input_field"])
@pytest.mark.parametrize("setkey", ["data.input-field", "data.input_field"])
def test_set_overrides_yaml_hyphenated_leaf(tmp_path, yaml_key, setkey):
    p = _write(tmp_path / "c.yaml", f"data:\n  {yaml_key}: sentence\n")
    raw = C.read_yaml(p)
    cfg = _built(f"{setkey}=review", raw=raw)
    assert cfg.data.input_field == "review"


def test_set_errors():
    with pytest.raises(LadderError, match=r"--set few-shot\.kk=3: .*'kk'.*known: .*balanced, .*\bk\b"):
        C.apply_set({}, "few-shot.kk=3")
    with pytest.raises(LadderError, match=r"--set nosuch=1: .*'nosuch'"):
        C.apply_set({}, "nosuch=1")
    with pytest.raises(LadderError, match=r"--set few-shot\.k\.x=1: .*takes a value"):
        C.apply_set({}, "few-shot.k.x=1")
    with pytest.raises(LadderError, match=r"expected key=value"):
        C.apply_set({}, "few-shot.k")
    with pytest.raises(LadderError, match=r"empty key"):
        C.apply_set({}, "=3")


def test_set_unknown_key_suggests_close_match():
    with pytest.raises(LadderError, match=r"did you mean 'lr'"):
        C.apply_set({}, "lora.lrr=1")


def test_set_bad_value_type_names_the_flag():
    raw: dict = {}
    C.apply_set(raw, "few-shot.k=abc")
    with pytest.raises(LadderError) as ei:
        C.build(raw)
    msg = str(ei.value)
    assert msg.startswith("--set few-shot.k=abc")
    assert "few-shot.k" in msg or "few_shot.k" in msg
    assert "\n" not in msg


def test_set_out_of_range_names_the_flag():
    raw: dict = {}
    C.apply_set(raw, "lora.dropout=1.5")
    with pytest.raises(LadderError, match=r"^--set lora\.dropout=1\.5: lora\.dropout: "):
        C.build(raw)


def test_build_without_source_names_config():
    with pytest.raises(LadderError, match=r"^config: seed: "):
        C.build({"seed": "many"})


# --------------------------------------------------------------------------- read_yaml


def test_read_yaml_paths_relative_to_yaml_folder(tmp_path, monkeypatch):
    cfgdir = tmp_path / "proj" / "cfg"
    _write(cfgdir / "run.yaml", "data:\n  train: d/train.jsonl\n  test: ../test.jsonl\nout: ../runs/x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    raw = C.read_yaml(Path("..") / "proj" / "cfg" / "run.yaml")  # a relative config path
    cfg = C.build(raw)
    assert Path(cfg.data.train) == (cfgdir / "d" / "train.jsonl").resolve()
    assert Path(cfg.data.test).resolve() == (tmp_path / "proj" / "test.jsonl").resolve()
    assert Path(cfg.data.train).is_absolute() and Path(cfg.data.test).is_absolute()
    assert not str(cfg.data.train).startswith(str(elsewhere))
    assert Path(cfg.out).resolve() == (tmp_path / "proj" / "runs" / "x").resolve()  # the run folder too


def test_read_yaml_keeps_absolute_paths(tmp_path):
    abs_train = tmp_path / "abs" / "train.jsonl"
    p = _write(tmp_path / "cfg" / "run.yaml", f"data:\n  train: {abs_train}\n")
    cfg = C.build(C.read_yaml(p))
    assert Path(cfg.data.train) == abs_train


def test_read_yaml_hyphenated_keys_map_to_fields(tmp_path):
    p = _write(
        tmp_path / "c.yaml",
        "few-shot:\n  k: 3\n"
        "zero-shot: {}\n"
        "data:\n  input-field: sentence\n  label-field: y\n  test-fraction: 0.3\n"
        "lora:\n  warmup-ratio: 0.2\n  grad-accum: 2\n",
    )
    cfg = C.build(C.read_yaml(p))
    assert cfg.few_shot.k == 3
    assert cfg.data.input_field == "sentence"
    assert cfg.data.label_field == "y"
    assert cfg.data.test_fraction == 0.3
    assert cfg.lora.warmup_ratio == 0.2
    assert cfg.lora.grad_accum == 2


def test_read_yaml_underscore_section_maps_to_field(tmp_path):
    p = _write(tmp_path / "c.yaml", "few_shot:\n  k: 5\n")
    cfg = C.build(C.read_yaml(p))
    assert cfg.few_shot.k == 5


def test_read_yaml_empty_file_gives_defaults(tmp_path):
    p = _write(tmp_path / "c.yaml", "")
    assert C.build(C.read_yaml(p)) == RunConfig()


def test_read_yaml_not_found(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(LadderError, match=re.escape(str(p)) + r": config file not found"):
        C.read_yaml(p)


def test_read_yaml_invalid_syntax_names_file_and_line(tmp_path):
    p = _write(tmp_path / "c.yaml", "task:\n  kind: classification\nfew-shot:\n  k: [1, 2\nlora: {}\n")
    with pytest.raises(LadderError) as ei:
        C.read_yaml(p)
    msg = str(ei.value)
    assert re.match(re.escape(str(p)) + r":\d+: invalid YAML", msg), msg
    assert "\n" not in msg


def test_read_yaml_not_a_mapping(tmp_path):
    p = _write(tmp_path / "c.yaml", "- a\n- b\n")
    with pytest.raises(LadderError, match=re.escape(f"{p}:1:")):
        C.read_yaml(p)


# --------------------------------------------------------------------------- error locations


def _build_error(tmp_path: Path, text: str) -> tuple[str, Path]:
    p = _write(tmp_path / "config.yaml", text)
    with pytest.raises(LadderError) as ei:
        C.build(C.read_yaml(p))
    msg = str(ei.value)
    assert "\n" not in msg
    return msg, p


def test_error_line_nested_key(tmp_path):
    msg, p = _build_error(tmp_path, "model: m\nseed: 1\nlora:\n  r: 4\n  lr: -1\n")
    assert msg.startswith(f"{p}:5: lora.lr: "), msg


def test_error_line_unknown_key_in_hyphenated_section(tmp_path):
    msg, p = _build_error(tmp_path, "model: m\nrungs: [zero-shot]\nfew-shot:\n  kk: 3\n")
    assert msg.startswith(f"{p}:4: "), msg
    assert "kk" in msg and "unknown key" in msg


def test_error_line_bad_value_in_hyphenated_section(tmp_path):
    msg, p = _build_error(tmp_path, "seed: 1\nfew-shot:\n  balanced: true\n  k: 0\n")
    assert msg.startswith(f"{p}:4: "), msg
    assert "few-shot.k" in msg or "few_shot.k" in msg


def test_error_line_underscore_spelled_section(tmp_path):
    msg, p = _build_error(tmp_path, "seed: 1\nfew_shot:\n  balanced: true\n  k: 0\n")
    assert msg.startswith(f"{p}:4: "), msg


def test_error_line_hyphenated_leaf(tmp_path):
    msg, p = _build_error(tmp_path, "data:\n  train: t.jsonl\n  test-fraction: 3\n")
    assert msg.startswith(f"{p}:3: "), msg
    assert "test_fraction" in msg or "test-fraction" in msg


def test_error_line_top_level_unknown_key(tmp_path):
    msg, p = _build_error(tmp_path, "seed: 1\nmodle: x\n")
    assert msg.startswith(f"{p}:2: "), msg
    assert "modle" in msg and "unknown key" in msg


def test_error_line_task_target(tmp_path):
    msg, p = _build_error(tmp_path, "task:\n  target:\n    accuracy: high\n")
    assert msg.startswith(f"{p}:3: "), msg


def test_error_line_labels(tmp_path):
    msg, p = _build_error(tmp_path, "seed: 0\ntask:\n  labels: [pos]\n")
    assert msg.startswith(f"{p}:3: task.labels: "), msg
    assert "two labels" in msg


# --------------------------------------------------------------------------- dump


def _custom_cfg() -> RunConfig:
    raw: dict = {}
    for a in (
        "few-shot.k=3",
        "few-shot.balanced=false",
        "lora.lr=2e-4",
        "lora.target_modules=[q_proj,v_proj]",
        "rungs=[zero-shot,lora]",
        "task.target.macro_f1=0.7",
        "task.labels=[neg,pos]",
        "data.train=/x/train.jsonl",
        "data.limit_test=5",
        "seed=3",
        "out=/x/runs/x",
    ):
        C.apply_set(raw, a)
    raw["task"]["instruction"] = "Classify: 'yes' or \"no\"? #1"  # needs YAML quoting
    return C.build(raw)


@pytest.mark.parametrize("make", [RunConfig, _custom_cfg], ids=["default", "custom"])
def test_dump_round_trips(make):
    cfg = make()
    text = C.dump(cfg)
    back = C.build(yaml.safe_load(text))
    assert back == cfg
    assert back.model_dump() == cfg.model_dump()


def test_dump_uses_user_spelling_and_round_trips_through_file(tmp_path):
    cfg = _custom_cfg()
    text = C.dump(cfg)
    top = yaml.safe_load(text)
    assert "few-shot" in top and "zero-shot" in top
    assert "few_shot" not in top
    p = _write(tmp_path / "snap" / "config.yaml", text)
    assert C.build(C.read_yaml(p)) == cfg


# --------------------------------------------------------------------------- describe / metric / task


def test_describe_fields():
    rows = C.describe_fields()
    keys = {k for k, _, _ in rows}
    assert {"few-shot.k", "lora.lr", "data.train", "task.target", "seed"} <= keys
    d = {k: (desc, default) for k, desc, default in rows}
    assert d["few-shot.k"][1] == 8
    assert d["lora.lr"][1] == pytest.approx(1e-4)
    assert all(desc for k, (desc, _) in d.items() if k != "task.kind" and not k.startswith("zero"))
    # leaves only: no section names
    assert "few-shot" not in keys and "lora" not in keys


def test_every_described_key_is_settable():
    """Each key listed by describe_fields (the --help text) is accepted by --set."""
    for key, _, default in C.describe_fields():
        value = yaml.safe_dump(default, default_flow_style=True).strip()
        value = value.removesuffix("...").strip()
        raw: dict = {}
        C.apply_set(raw, f"{key}={value}")
        assert C.build(raw) == RunConfig(), key


def test_primary_metric():
    assert RunConfig().primary_metric == "accuracy"
    assert RunConfig(task=TaskConfig(metric="macro_f1")).primary_metric == "macro_f1"
    cfg = RunConfig(task=TaskConfig(metric="accuracy", target={"macro_f1": 0.8}))
    assert cfg.primary_metric == "macro_f1"
    cfg = _built("task.metric=macro_f1", "task.target.accuracy=0.9")
    assert cfg.primary_metric == "accuracy"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"labels": ["pos"]}, "at least two"),
        ({"labels": []}, "at least two"),
        ({"labels": ["pos", "neg", "pos"]}, "distinct"),
        ({"labels": ["pos", " "]}, "non-empty"),
        ({"target": {"accuracy": 0.8, "macro_f1": 0.7}}, "exactly one"),
        ({"target": {}}, "exactly one"),
    ],
)
def test_task_config_rejects(kwargs, pattern):
    with pytest.raises(ValidationError, match=pattern):
        TaskConfig(**kwargs)


def test_task_config_accepts_valid():
    t = TaskConfig(labels=["neg", "pos"], target={"accuracy": 0.85})
    assert t.labels == ["neg", "pos"] and t.target == {"accuracy": 0.85}


def test_task_errors_via_build_are_ladder_errors():
    with pytest.raises(LadderError, match=r"task\.labels"):
        _built("task.labels=[a,a]")
    with pytest.raises(LadderError, match=r"task\.target"):
        C.build({"task": {"target": {"accuracy": 0.8, "macro_f1": 0.7}}})


def test_unknown_field_rejected_everywhere():
    for raw in ({"nosuch": 1}, {"lora": {"nosuch": 1}}, {"data": {"nosuch": 1}}, {"few-shot": {"nosuch": 1}}):
        with pytest.raises(LadderError, match="unknown key"):
            C.build(raw)
