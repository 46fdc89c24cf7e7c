"""Readers and splits: JSONL, CSV and Parquet give the same examples; seeded split and
limits are deterministic and recorded, never silent."""

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmladder.config import DataConfig
from lmladder.data import load, read_examples

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
    tr = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}] * 3)
    ds = load(DataConfig(train=str(tr)), seed=0)
    assert ds.info["labels"] == ["0", "1"]
