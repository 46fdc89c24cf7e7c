"""Readers and splits: JSONL, CSV and Parquet give the same examples; seeded split and
limits are deterministic and recorded, never silent."""

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmladder.config import DataConfig
from lmladder.data import load, read_examples
from lmladder.errors import LadderError

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl


def _write_csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_jsonl_csv_parquet_read_the_same(tmp_path):
    rows = [{"text": "a, \"quoted\" one", "label": "pos"}, {"text": "b", "label": "neg"}]
    j = write_jsonl(tmp_path / "d.jsonl", rows)
    c = _write_csv(tmp_path / "d.csv", rows)
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    got = {
        name: [(e.input, e.label) for e in read_examples(path, DataConfig(), "train")]
        for name, path in (("jsonl", j), ("csv", c), ("parquet", p))
    }
    assert got["jsonl"] == got["csv"] == got["parquet"] == [(r["text"], r["label"]) for r in rows]
    # sources point at the file line (CSV: header is line 1)
    assert read_examples(c, DataConfig(), "train")[1].source.endswith("d.csv:3")


def test_seeded_split_when_no_test_file(tmp_path):
    train = write_jsonl(tmp_path / "all.jsonl", TRAIN_ROWS)
    cfg = DataConfig(train=str(train), test_fraction=0.25)
    a, b = load(cfg, seed=0), load(cfg, seed=0)
    assert [e.id for e in a.test] == [e.id for e in b.test]
    assert len(a.test) == 6 and len(a.train) == 18
    assert not {e.id for e in a.test} & {e.id for e in a.train}
    assert [e.id for e in load(cfg, seed=1).test] != [e.id for e in a.test]


def test_limits_are_seeded_and_recorded(tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    te = write_jsonl(tmp_path / "test.jsonl", TEST_ROWS)
    ds = load(DataConfig(train=str(tr), test=str(te), limit_train=5, limit_test=3), seed=0)
    assert (ds.info["train_used"], ds.info["train_total"]) == (5, 24)
    assert (ds.info["test_used"], ds.info["test_total"]) == (3, 8)
    again = load(DataConfig(train=str(tr), test=str(te), limit_train=5, limit_test=3), seed=0)
    assert [e.id for e in ds.train] == [e.id for e in again.train]
    assert ds.info["labels"] == ["neg", "pos"]


def test_explicit_label_set_order_is_kept(tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    ds = load(DataConfig(train=str(tr)), seed=0, labels=["pos", "neg"])
    assert ds.info["labels"] == ["pos", "neg"]


def test_numeric_labels_become_text(tmp_path):
    rows = [r for i in range(3) for r in ({"text": f"x{i}", "label": 1}, {"text": f"y{i}", "label": 0})]
    tr = write_jsonl(tmp_path / "t.jsonl", rows)  # distinct inputs: duplicates split as one group
    ds = load(DataConfig(train=str(tr)), seed=0)
    assert ds.info["labels"] == ["0", "1"]


# --------------------------------------------------------------------------- multiple-choice golds

OBQA = [  # OpenBookQA's shape (HF): choices {text, label}, gold answerKey names a label
    {"id": "7-200", "question_stem": "Skunks have a stink sack, which means that",
     "choices": {"text": ["it is unable to smell", "it births live young", "other creatures avoid it",
                          "it is a predator"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "7-785", "question_stem": "A device may locate north through",
     "choices": {"text": ["Fe pulls", "series of attractions", "large robots", "metal conductors"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "x-1", "question_stem": "Numbered labels, lower-case gold",
     "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}, "answerKey": "3"},
    {"id": "x-2", "question_stem": "Letters out of order",
     "choices": {"text": ["pp", "qq", "rr"], "label": ["b", "a", "c"]}, "answerKey": "A"},
]
OBQA_CFG = dict(input_field="question_stem", choices_field="choices", label_field="answerKey")


def _mc(tmp_path, rows, name="mc.jsonl", **kw):
    f = write_jsonl(tmp_path / name, rows)
    cfg = DataConfig(**{"input_field": "q", "label_field": "a", "choices_field": "ch", **kw})
    return read_examples(f, cfg, "test", kind="multiple-choice")


def test_nested_choices_and_labels_openbookqa_shape(tmp_path):
    exs = _mc(tmp_path, OBQA, **OBQA_CFG)
    assert [e.target for e in exs] == [2, 0, 2, 1]  # "A" matches label "a" case-insensitively
    assert exs[0].choices[2] == "other creatures avoid it" and exs[0].choice_labels == ["A", "B", "C", "D"]
    assert exs[2].choice_labels == ["1", "2", "3"] and exs[0].label == "2"
    # and through load() with train and test files
    tr, te = write_jsonl(tmp_path / "tr.jsonl", OBQA[:2]), write_jsonl(tmp_path / "te.jsonl", OBQA[2:])
    ds = load(DataConfig(train=str(tr), test=str(te), **OBQA_CFG), seed=0, kind="multiple-choice")
    assert [e.target for e in ds.train + ds.test] == [2, 0, 2, 1]


def test_choice_labels_field_and_mapping_keys(tmp_path):
    rows = [{"q": "a?", "ch": ["x", "y", "z"], "lab": ["(i)", "(ii)", "(iii)"], "a": "(ii)"}]
    assert _mc(tmp_path, rows, choice_labels_field="lab")[0].target == 1
    assert _mc(tmp_path, [{"q": "b?", "ch": {"P": "x", "Q": "y"}, "a": "Q"}], "m.jsonl")[0].target == 1
    with pytest.raises(LadderError, match=r"mc\.jsonl:1: field 'lab' must be a list of 3 choice labels"):
        _mc(tmp_path, [{**rows[0], "lab": ["a", "b"]}], choice_labels_field="lab")


def test_answer_not_in_choice_labels_is_an_error(tmp_path):
    rows = OBQA[:1] + [{**OBQA[1], "answerKey": "E"}]
    with pytest.raises(LadderError, match=r"mc\.jsonl:2: field 'answerKey': answer 'E' is not one of "
                                          r"this example's choice labels \(A, B, C, D\)"):
        _mc(tmp_path, rows, **OBQA_CFG)


def _num_rows(answers, n_choices=4):
    return [{"q": f"q{i}", "ch": [f"c{j}" for j in range(n_choices)], "a": a} for i, a in enumerate(answers)]


def test_one_based_numbers_with_answer_base(tmp_path):
    assert [e.target for e in _mc(tmp_path, _num_rows([1, "2", 3]), answer_base=1)] == [0, 1, 2]
    assert [e.target for e in _mc(tmp_path, _num_rows([1, "2", 3]), answer_base=0)] == [1, 2, 3]
    with pytest.raises(LadderError, match=r"mc\.jsonl:2: field 'a': answer index 0 is out of range.*answer_base 1"):
        _mc(tmp_path, _num_rows([1, 0]), answer_base=1)


def test_ambiguous_numbers_name_the_line_and_ask_for_answer_base(tmp_path):
    with pytest.raises(LadderError, match=r"mc\.jsonl:1: field 'a': numeric answer 1 .*"
                                          r"set data\.answer_base: 0 or 1"):
        _mc(tmp_path, _num_rows([1, 2, 3]))


def test_number_base_is_inferred_when_certain(tmp_path):
    assert [e.target for e in _mc(tmp_path, _num_rows([2, 0, "1"]))] == [2, 0, 1]  # a 0: 0-based
    assert [e.target for e in _mc(tmp_path, _num_rows([2, 4, "1"]))] == [1, 3, 0]  # 4 of 4: 1-based
    with pytest.raises(LadderError, match=r"mc\.jsonl:3: field 'a': answer 4 of 4 choices means 1-based.*"
                                          r"mc\.jsonl:2: field 'a' has answer 0"):
        _mc(tmp_path, _num_rows([2, 0, 4]))
    # load() settles the base over train and test together: the 0 is in train only
    tr = write_jsonl(tmp_path / "tr.jsonl", _num_rows([0, 1]))
    te = write_jsonl(tmp_path / "te.jsonl", [{**r, "q": f"t{i}"} for i, r in enumerate(_num_rows([2, 1]))])
    ds = load(DataConfig(train=str(tr), test=str(te), input_field="q", label_field="a", choices_field="ch"),
              seed=0, kind="multiple-choice")
    assert [e.target for e in ds.test] == [2, 1]


def test_letters_mixed_with_numbers_is_an_error(tmp_path):
    with pytest.raises(LadderError, match=r"mc\.jsonl:3: field 'a': answer '1' is a number but most answers "
                                          r"in .*mc\.jsonl are letters"):
        _mc(tmp_path, _num_rows(["A", "B", "1", "C"]))
    with pytest.raises(LadderError, match=r"mc\.jsonl:2: field 'a': answer 'B' is a letter"):
        _mc(tmp_path, _num_rows([0, "B", 2, 1]))
