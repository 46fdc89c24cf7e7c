"""Real users' data: multi-field inputs (data.input_template), Hugging Face datasets (a folder
written by save_to_disk, hf:NAME), the run fingerprint's data digest, and the ecosystem's
field names per task kind (TRL's prompt / chosen / rejected, HF's question / choices /
answerKey) with no flags."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from lmladder import config as C
from lmladder import data
from lmladder.config import DataConfig
from lmladder.errors import LadderError

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

PASSAGES = [
    {"passage": "The Nile flows north.", "question": "Which way does the Nile flow?", "answers": ["north"],
     "meta": {"title": "Nile", "tags": ["river", "africa"]}},
    {"passage": "Paris is in France.", "question": "Where is Paris?", "answers": ["France", "in France"],
     "meta": {"title": "Paris", "tags": ["city"]}},
]


# --------------------------------------------------------------------------- input_template


def test_template_renders_fields_nested_paths_and_literal_braces(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", PASSAGES)
    cfg = DataConfig(input_template="Passage: {passage}\nQuestion: {question}\n[{meta.title} / {meta.tags.0}] {{x}}",
                     label_field="answers")
    exs = data.read_examples(f, cfg, "test", kind="qa")
    assert exs[0].input == "Passage: The Nile flows north.\nQuestion: Which way does the Nile flow?\n[Nile / river] {x}"
    assert exs[1].input == "Passage: Paris is in France.\nQuestion: Where is Paris?\n[Paris / city] {x}"
    assert exs[1].target == ["France", "in France"] and exs[1].fields == PASSAGES[1]


def test_template_missing_field_names_file_line_and_field(tmp_path):
    rows = [PASSAGES[0], {k: v for k, v in PASSAGES[1].items() if k != "question"}]
    f = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = DataConfig(input_template="Passage: {passage}\nQuestion: {question}", label_field="answers")
    with pytest.raises(LadderError) as e:
        data.read_examples(f, cfg, "test", kind="qa")
    assert str(e.value) == (f"{f}:2: field 'question' (data.input_template) missing "
                            "(fields present: answers, meta, passage)")
    nested = DataConfig(input_template="{meta.author}: {question}", label_field="answers")
    with pytest.raises(LadderError) as e:
        data.read_examples(f, nested, "test", kind="qa")
    assert str(e.value) == f"{f}:1: field 'meta.author' (data.input_template) missing ('meta' has: tags, title)"


def test_template_through_the_cli_config_and_a_bad_template(run_cli, tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", PASSAGES)
    cfg = C.build({"task": {"kind": "qa"}, "data": {"train": str(f), "label_field": "answers",
                                                    "input_template": "Q: {question}"}})
    assert cfg.data.input_template == "Q: {question}" and cfg.data.input_field is None
    assert "input_template" in cfg.data.model_dump()  # part of the fingerprint's data section
    code, _, err = run_cli("run", "--train", str(f), "--task", "qa", "--label-field", "answers",
                           "--set", "data.input_template=Q: {question!r}", "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("lmladder: error: --set data.input_template=Q: {question!r}: data.input_template: ")
    assert "conversions and format specs are not supported; use {question}" in err
    with pytest.raises(LadderError, match=r"data\.input_template: .*the template has no \{field\} placeholder"):
        C.build({"data": {"input_template": "no fields {{here}}"}})
    with pytest.raises(LadderError, match=r"give data\.input_template or data\.input_field, not both"):
        C.build({"data": {"input_template": "{a}", "input_field": "text"}})


def test_template_feeds_the_leakage_check(tmp_path):
    tr = write_jsonl(tmp_path / "tr.jsonl", PASSAGES)
    same_question_other_passage = [{**PASSAGES[0], "passage": "A different passage."}]
    te = write_jsonl(tmp_path / "te.jsonl", same_question_other_passage)
    both = DataConfig(train=str(tr), test=str(te), label_field="answers",
                      input_template="{passage} {question}")
    assert data.load(both, 0, kind="qa").info["overlap"]["n"] == 0  # another input: the passage differs
    question_only = both.model_copy(update={"input_template": "{question}"})
    with pytest.raises(LadderError, match=r"1 test input also appears in train \(first: .*te\.jsonl:1 = .*tr\.jsonl:1\)"):
        data.load(question_only, 0, kind="qa")


@pytest.mark.skipif(not (SHARED / "squad.questions.jsonl").is_file(), reason="shared datasets not present")
def test_template_on_real_data_squad_and_openbookqa():
    squad = data.read_examples(SHARED / "squad.questions.jsonl",
                               DataConfig(input_template="Question: {question}\n(document {doc_id})",
                                          label_field="answers"), "test", kind="qa")
    assert len(squad) == 1000
    assert squad[0].input == 'Question: Harvard - Yale Regatta predates "The Game" by how many years?\n(document d0)'
    assert squad[0].target == ["23", "23 years"]
    # OpenBookQA: the stem through a template; choices / answerKey are multiple-choice's defaults
    obqa = data.read_examples(SHARED / "openbookqa.train.jsonl", DataConfig(input_template="Fact question: {question_stem}"),
                              "train", kind="multiple-choice")
    assert len(obqa) == 300
    assert obqa[0].input == "Fact question: Skunks are an animal which has a stink sack, which means that"
    assert obqa[0].choices[2] == "other creatures avoid it" and obqa[0].target == 2


# --------------------------------------------------------------------------- field names per kind


def test_trl_preference_file_loads_with_no_flags(tmp_path):
    rows = [{"prompt": f"Say hi {i}", "chosen": f"Hi {i}!", "rejected": f"Go away {i}."} for i in range(6)]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    exs = data.read_examples(f, DataConfig(), "train", kind="preference")
    assert [(e.input, e.label, e.fields["rejected"]) for e in exs[:2]] == [
        ("Say hi 0", "Hi 0!", "Go away 0."), ("Say hi 1", "Hi 1!", "Go away 1.")]
    cfg = C.build({"task": {"kind": "preference"}, "data": {"train": str(f)}})
    assert (cfg.data.input_field, cfg.data.label_field, cfg.data.chosen_field) == ("prompt", "chosen", "chosen")
    assert len(data.load(cfg.data, 0, kind="preference").train) == 5  # 6 rows, a seeded split of 1
    # the resolved names are what the snapshot (config.yaml) holds and reads back
    snap = tmp_path / "config.yaml"
    snap.write_text(C.dump(cfg))
    again = C.build(C.read_yaml(snap))
    assert again.data == cfg.data and "input_field: prompt" in snap.read_text()


def test_defaults_per_kind_and_explicit_settings_win():
    assert [C.build({"task": {"kind": k}}).data.input_field for k in ("classification", "preference", "multiple-choice")] \
        == ["text", "prompt", "question"]
    mc = C.build({"task": {"kind": "multiple-choice"}}).data
    assert (mc.label_field, mc.choices_field) == ("answerKey", "choices")
    assert C.build({"task": {"kind": "classification"}}).data.choices_field is None
    explicit = C.build({"task": {"kind": "preference"}, "data": {"input_field": "text", "label_field": "y"}}).data
    assert (explicit.input_field, explicit.label_field) == ("text", "y")
    assert C.build({"task": {"kind": "preference"}, "data": {"chosen_field": "better"}}).data.label_field == "better"
    from lmladder.cli import _set_keys_help

    help_text = _set_keys_help()
    assert "Default by task.kind: prompt (preference), question (multiple-choice), text (every other kind)" in help_text
    assert "answerKey (multiple-choice)" in help_text


def test_missing_default_field_suggests_the_datas_own_name(tmp_path):
    obqa = [{"id": "7-200", "question_stem": "Skunks have a stink sack, which means that",
             "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}]
    f = write_jsonl(tmp_path / "obqa.jsonl", obqa)
    with pytest.raises(LadderError) as e:
        data.read_examples(f, DataConfig(), "test", kind="multiple-choice")
    assert str(e.value) == (f"{f}:1: field 'question' missing (data.input_field; fields present: answerKey, choices, id, "
                            "question_stem); did you mean 'question_stem'? set data.input_field: question_stem "
                            "(--input-field question_stem)")
    assert data.read_examples(f, DataConfig(input_field="question_stem"), "test", kind="multiple-choice")[0].target == 1
    mmlu = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}])
    with pytest.raises(LadderError, match=r"field 'answerKey' missing .*did you mean 'answer'\? set data\.label_field: answer"):
        data.read_examples(mmlu, DataConfig(), "test", kind="multiple-choice")


# --------------------------------------------------------------------------- Hugging Face datasets


def _saved(tmp_path, name="ds", n=10, word="item"):
    """A DatasetDict (train / test, ClassLabel labels) saved with save_to_disk."""
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = datasets.Dataset.from_list([{"text": f"{word} {i}", "label": i % 2} for i in range(n)], features=feats)
    test = datasets.Dataset.from_list([{"text": f"other {word} {i}", "label": (i + 1) % 2} for i in range(4)], features=feats)
    folder = tmp_path / name
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    return folder


def test_rows_from_a_saved_dataset_dict(tmp_path):
    folder = _saved(tmp_path)
    ds = data.load(DataConfig(train=str(folder), test=str(folder)), 0)
    assert [(e.input, e.label, e.source) for e in ds.train[:3]] == [
        ("item 0", "neg", f"{folder}@train:1"), ("item 1", "pos", f"{folder}@train:2"), ("item 2", "neg", f"{folder}@train:3")]
    assert [(e.input, e.label) for e in ds.test] == [("other item 0", "pos"), ("other item 1", "neg"),
                                                      ("other item 2", "pos"), ("other item 3", "neg")]
    assert ds.info["labels"] == ["neg", "pos"]  # ClassLabel names, not 0 / 1
    # FOLDER@SPLIT, and a single saved Dataset folder
    assert [e.input for e in data.read_examples(f"{folder}@test", DataConfig(), "train")][:1] == ["other item 0"]
    single = folder / "train"
    assert len(data.read_examples(single, DataConfig(), "test")) == 10
    with pytest.raises(LadderError) as e:
        data.read_examples(f"{folder}@validation", DataConfig(), "test")
    assert str(e.value) == (f"{folder}@validation: no split 'validation' (data.test; its splits: train, test); "
                            f"pick one with {folder}@SPLIT")


def test_saved_dataset_rows_are_validated_like_files(tmp_path):
    import datasets

    folder = tmp_path / "bad"
    datasets.Dataset.from_list([{"text": "a", "label": "x"}, {"text": "", "label": "y"}]).save_to_disk(str(folder))
    with pytest.raises(LadderError) as e:
        data.read_examples(folder, DataConfig(), "train")
    assert str(e.value) == f"{folder}:2: field 'text' is empty"
    binary = tmp_path / "bin"
    datasets.Dataset.from_list([{"text": "a", "label": b"x"}]).save_to_disk(str(binary))
    with pytest.raises(LadderError, match=r":1: field 'label' holds binary data \(column type Value\('binary'\), Python bytes\)"):
        data.read_examples(binary, DataConfig(), "train")


def test_digest_changes_when_the_data_changes(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    assert data.digest(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()  # files: as before
    assert data.digest(None) is None and data.digest(str(tmp_path / "nope.jsonl")) is None
    a = _saved(tmp_path, "a")
    b = _saved(tmp_path, "b")  # the same rows saved again: the same digest
    c = _saved(tmp_path, "c", word="thing")  # other rows
    assert data.digest(str(a), "train") == data.digest(str(b), "train")
    assert data.digest(str(a), "train") != data.digest(str(c), "train")
    assert data.digest(str(a), "train") != data.digest(str(a), "test")  # the split read by role
    assert data.digest(str(a), "test") == data.digest(f"{a}@test", "train")


def test_hf_name_loads_through_datasets_and_its_digest_follows_the_data(tmp_path, monkeypatch):
    """hf:NAME goes to datasets.load_dataset (here a local data folder, no network)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", TRAIN_ROWS)
    write_jsonl(repo / "test.jsonl", TEST_ROWS)
    monkeypatch.setattr(data, "_LOADED", {})
    ds = data.load(DataConfig(train=f"hf:{repo}", test=f"hf:{repo}"), 0)
    assert ds.train[0].source == f"hf:{repo}@train:1" and ds.test[0].input == TEST_ROWS[0]["text"]
    before = data.digest(f"hf:{repo}", "test")
    assert before == data.digest(f"hf:{repo}@test", "test") != data.digest(f"hf:{repo}", "train")
    write_jsonl(repo / "test.jsonl", TEST_ROWS[::-1])
    monkeypatch.setattr(data, "_LOADED", {})
    assert data.digest(f"hf:{repo}", "test") != before


def test_hf_name_offline_and_uncached_fails_at_once(run_cli, tmp_path, monkeypatch):
    import lmladder.models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(lmladder.models, "_hub_reachable", lambda *a, **k: False)
    t0 = time.perf_counter()
    code, _, err = run_cli("run", "--train", "hf:nosuch-owner/nosuch-dataset:cfg@train", "--out", str(tmp_path / "out"))
    assert time.perf_counter() - t0 < 20
    assert code == 2 and err == (
        "lmladder: error: hf:nosuch-owner/nosuch-dataset:cfg@train: dataset 'nosuch-owner/nosuch-dataset' is not in "
        "the local Hugging Face cache and the Hugging Face hub is unreachable; load it once online, or give a folder "
        "written by save_to_disk\n")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LadderError, match=r"^hf:x:: expected hf:NAME\[:CONFIG\]\[@SPLIT\]"):
        data.read_examples("hf:x:", DataConfig(), "train")


def test_hf_spec_in_yaml_is_not_a_relative_path(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  train: hf:stanfordnlp/sst2@validation\n  test: saved@test\n")
    raw = C.read_yaml(y)
    assert raw["data"]["train"] == "hf:stanfordnlp/sst2@validation"
    assert raw["data"]["test"] == str(tmp_path / "saved@test")


def test_cli_run_on_a_saved_dataset(run_cli, tmp_path):
    folder = _saved(tmp_path, n=12)
    out = tmp_path / "out"
    code, _, err = run_cli("run", "--train", str(folder), "--test", f"{folder}@test", "--rungs", "zero-shot",
                           "--limit-test", "2", "--set", "eval.bootstrap=100", "--out", str(out), "-q")
    assert code == 0, err
    info = json.loads((out / "data.json").read_text())
    assert info["train_total"] == 12 and info["test_total"] == 4 and info["labels"] == ["neg", "pos"]
