"""No leakage: a test input that is also a train input (casefolded, whitespace collapsed;
multiple-choice: with its choices) is an error unless data.allow_overlap, which records it;
the seeded split keeps duplicate inputs on one side."""

import logging
import random

import pytest

from lmladder.config import DataConfig
from lmladder.data import input_key, load
from lmladder.errors import LadderError

from conftest import TRAIN_ROWS, write_jsonl


def test_same_file_as_train_and_test_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", TRAIN_ROWS)
    with pytest.raises(LadderError, match=r"^data: 24 test inputs also appear in train \(first: "
                                          r".*all\.jsonl:1 = .*all\.jsonl:1\); remove them or set "
                                          r"data\.allow_overlap: true$"):
        load(DataConfig(train=str(f), test=str(f)), seed=0)


def test_overlap_is_found_after_normalising(tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", [{"text": "great movie", "label": "pos"},
                                                {"text": "awful film", "label": "neg"}])
    te = write_jsonl(tmp_path / "test.jsonl", [{"text": "fine movie", "label": "pos"},
                                               {"text": "  AWFUL\t\n film ", "label": "neg"}])
    with pytest.raises(LadderError, match=r"data: 1 test input also appears in train \(first: "
                                          r".*test\.jsonl:2 = .*train\.jsonl:2\)"):
        load(DataConfig(train=str(tr), test=str(te)), seed=0)


def test_allow_overlap_records_it_and_warns(tmp_path, caplog):
    rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(30)]
    f = write_jsonl(tmp_path / "all.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lmladder"):
        ds = load(DataConfig(train=str(f), test=str(f), allow_overlap=True), seed=0)
    ov = ds.info["overlap"]
    assert ov["n"] == 30 and len(ov["pairs"]) == 20  # first 20 pairs kept
    assert ov["pairs"][0] == [f"{f}:1", f"{f}:1"] and ov["pairs"][19] == [f"{f}:20", f"{f}:20"]
    assert "30 test inputs also appear in train" in caplog.text and "allow_overlap" in caplog.text
    clean = write_jsonl(tmp_path / "other.jsonl", [{"text": f"new {i}", "label": "ab"[i % 2]} for i in range(4)])
    assert load(DataConfig(train=str(f), test=str(clean)), seed=0).info["overlap"] == {"n": 0, "pairs": []}


def test_multiple_choice_compares_the_choices_too(tmp_path):
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"q": "Which is red?", "ch": ["sky", "blood"], "a": "B"},
                                             {"q": "Pick one", "ch": ["x", "y"], "a": "A"}])
    other = [{"q": "Which is red?", "ch": ["grass", "rose"], "a": "B"}]  # same stem, other choices
    same = [{"q": "which is  RED?", "ch": ["Sky", "blood "], "a": "A"}]
    cfg = dict(train=str(tr), input_field="q", label_field="a", choices_field="ch")
    ds = load(DataConfig(**cfg, test=str(write_jsonl(tmp_path / "o.jsonl", other))), 0, kind="multiple-choice")
    assert ds.info["overlap"]["n"] == 0
    with pytest.raises(LadderError, match=r"1 test input also appears in train \(first: .*s\.jsonl:1 = .*tr\.jsonl:1\)"):
        load(DataConfig(**cfg, test=str(write_jsonl(tmp_path / "s.jsonl", same))), 0, kind="multiple-choice")


def test_other_instruction_is_another_input(tmp_path):
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"i": "cat", "o": "cat", "ins": "Repeat."}])
    te = write_jsonl(tmp_path / "te.jsonl", [{"i": "cat", "o": "CAT", "ins": "Upper-case it."}])
    ds = load(DataConfig(train=str(tr), test=str(te), input_field="i", label_field="o", instruction_field="ins"),
              0, kind="generation")
    assert ds.info["overlap"]["n"] == 0


def test_seeded_split_keeps_duplicates_on_one_side(tmp_path):
    rows = [{"text": f"item {i}", "label": "ab"[i % 2]} for i in range(20)]
    dupes = rows + [{"text": f"  ITEM {i} ", "label": "ab"[i % 2]} for i in range(0, 20, 3)] + rows[:5]
    f = write_jsonl(tmp_path / "all.jsonl", dupes)
    cfg = DataConfig(train=str(f), test_fraction=0.25)
    for seed in range(8):
        ds = load(cfg, seed=seed)  # no leakage error from a self-split
        assert ds.info["overlap"] == {"n": 0, "pairs": []}
        assert not {input_key(e) for e in ds.train} & {input_key(e) for e in ds.test}
        assert len(ds.train) + len(ds.test) == len(dupes) and len(ds.test) >= round(len(dupes) * 0.25)
        assert [e.id for e in load(cfg, seed=seed).test] == [e.id for e in ds.test]  # deterministic


def test_split_without_duplicates_is_the_plain_seeded_shuffle(tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", TRAIN_ROWS)
    ds = load(DataConfig(train=str(f), test_fraction=0.25), seed=3)
    idx = list(range(len(TRAIN_ROWS)))
    random.Random(3).shuffle(idx)
    assert [int(e.id.rsplit(":", 1)[1]) - 1 for e in ds.test] == sorted(idx[:6])


def test_too_few_distinct_inputs_to_split(tmp_path):
    f = write_jsonl(tmp_path / "same.jsonl", [{"text": "x ", "label": "a"}, {"text": "X", "label": "b"}] * 3)
    with pytest.raises(LadderError, match=r"same\.jsonl: too few distinct inputs \(1 in 6 rows\)"):
        load(DataConfig(train=str(f)), seed=0, kind="generation")


def test_cli_same_train_and_test_is_a_one_line_error(run_cli, tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", TRAIN_ROWS)
    code, _, err = run_cli("run", "--train", str(f), "--test", str(f), "--rungs", "zero-shot",
                           "--out", str(tmp_path / "run"))
    assert code == 2 and err.strip().count("\n") == 0
    assert "24 test inputs also appear in train" in err and "data.allow_overlap: true" in err
