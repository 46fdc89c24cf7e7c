"""Metrics on known predictions; bootstrap CIs are seeded and bracket the estimate."""

import pytest

from lmladder.metrics import accuracy, classification_metrics, macro_f1


def test_accuracy_and_macro_f1_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # a: tp2 fp0 fn1 -> f1 = 4/5 ; b: tp1 fp1 fn1 -> 1/2 ; c: tp1 fp1 fn0 -> 2/3
    assert macro_f1(pred, gold, ["a", "b", "c"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_ignores_labels_absent_from_gold_and_pred():
    assert macro_f1(["a", "b"], ["a", "b"], ["a", "b", "never"]) == pytest.approx(1.0)


def test_ci_seeded_and_brackets_value():
    gold = ["a"] * 30 + ["b"] * 30
    pred = ["a"] * 25 + ["b"] * 5 + ["b"] * 20 + ["a"] * 10
    m1 = classification_metrics(pred, gold, ["a", "b"], n_boot=500, seed=3)
    m2 = classification_metrics(pred, gold, ["a", "b"], n_boot=500, seed=3)
    assert m1 == m2
    for name in ("accuracy", "macro_f1"):
        lo, hi = m1[name]["ci"]
        assert lo < m1[name]["value"] < hi
        assert 0.0 <= lo and hi <= 1.0
    assert m1["accuracy"]["value"] == pytest.approx(45 / 60)


def test_perfect_predictions_have_degenerate_ci():
    m = classification_metrics(["a", "b"] * 5, ["a", "b"] * 5, ["a", "b"], n_boot=200)
    assert m["accuracy"] == {"value": 1.0, "ci": [1.0, 1.0]}
