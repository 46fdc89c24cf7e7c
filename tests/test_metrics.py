"""Metrics on known predictions; bootstrap CIs are seeded and bracket the estimate;
proportions get Wilson intervals; paired comparisons (bootstrap diff CI, exact McNemar)."""

import math

import numpy as np
import pytest

from lmladder.metrics import (
    accuracy, bootstrap_ci, classification_metrics, macro_f1, mcnemar_exact, mcnemar_p, mean_ci,
    micro_prf, paired, paired_bootstrap, proportion_ci, wilson,
)
from lmladder.tasks import base


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


def test_perfect_predictions_get_an_honest_wilson_ci():
    # Was {"value": 1.0, "ci": [1.0, 1.0]} (percentile bootstrap): 10 of 10 right does not
    # prove a perfect model; Wilson gives [0.722, 1].
    m = classification_metrics(["a", "b"] * 5, ["a", "b"] * 5, ["a", "b"], n_boot=200)
    assert m["accuracy"]["value"] == 1.0 and m["accuracy"]["interval"] == "wilson"
    assert m["accuracy"]["ci"] == pytest.approx([0.7225, 1.0], abs=5e-4)
    assert m["accuracy"]["ci"][1] == 1.0
    assert m["macro_f1"]["interval"] == "bootstrap"


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize("k, n, expected", [
    (8, 10, [0.4902, 0.9433]),
    (0, 10, [0.0, 0.2775]),
    (10, 10, [0.7225, 1.0]),
    (45, 60, [0.6277, 0.8422]),  # by hand: centre 0.7350, half-width 0.1073
    (1, 2, [0.0945, 0.9055]),
])
def test_wilson_known_values(k, n, expected):
    assert wilson(k, n) == pytest.approx(expected, abs=5e-4)


def test_wilson_edges():
    assert wilson(0, 0) == [0.0, 1.0]
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0  # exact ends, no float drift
    for n in (1, 5, 37):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    # wider at a higher confidence level
    lo95, hi95 = wilson(8, 10)
    lo99, hi99 = wilson(8, 10, z=2.575829)
    assert lo99 < lo95 and hi99 > hi95


def _coverage(ci_of_k, n, p):
    """Exact coverage: sum over k of Binomial(n, p) pmf(k) * [p in CI(k)]."""
    cov = 0.0
    for k in range(n + 1):
        lo, hi = ci_of_k(k)
        if lo <= p <= hi:
            cov += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
    return cov


def test_wilson_covers_at_small_n_where_the_percentile_bootstrap_does_not():
    n, p = 12, 0.9
    wilson_cov = _coverage(lambda k: wilson(k, n), n, p)
    boot_cov = _coverage(lambda k: bootstrap_ci([1.0] * k + [0.0] * (n - k), 1000, 0)["ci"], n, p)
    assert wilson_cov >= 0.9  # about 0.974
    assert boot_cov < 0.8  # about 0.71: 12/12 gives [1, 1], 9/12 and 10/12 reach just 1
    # mean_ci routes 0/1 values to Wilson, so the task metrics get the honest coverage
    assert _coverage(lambda k: mean_ci([1.0] * k + [0.0] * (n - k), 1000, 0)["ci"], n, p) == pytest.approx(wilson_cov)


def test_mean_ci_picks_the_interval_by_the_values():
    prop = mean_ci([1, 1, 0, 1, 1.0], 500, 0)
    assert prop == {"value": 0.8, "ci": wilson(4, 5), "interval": "wilson"}
    assert proportion_ci([1, 1, 0, 1, 1.0]) == prop
    f1 = mean_ci([1.0, 0.5, 0.0, 0.25, 1.0], 500, 0)
    assert f1["interval"] == "bootstrap" and f1["value"] == pytest.approx(0.55)
    assert f1 == mean_ci([1.0, 0.5, 0.0, 0.25, 1.0], 500, 0)  # seeded
    assert f1["ci"][0] <= f1["value"] <= f1["ci"][1]
    assert mean_ci([], 500, 0) == {"value": 0.0, "ci": [0.0, 1.0], "interval": "wilson"}
    # tasks.base.mean_ci is the same function (Task.mean_metrics uses it)
    assert base.mean_ci([0, 1, 1], 100, 0) == mean_ci([0, 1, 1], 100, 0)


def test_task_mean_metrics_wilson_for_proportions_bootstrap_otherwise():
    class Cfg:
        bootstrap = 300

    t = base.Task(None, [], Cfg(), seed=0)
    m = t.mean_metrics({"exact_match": [1.0] * 10, "f1": [1.0] * 9 + [0.5]})
    assert m["exact_match"]["interval"] == "wilson"
    assert m["exact_match"]["value"] == 1.0 and m["exact_match"]["ci"] == pytest.approx([0.7225, 1.0], abs=5e-4)
    assert m["f1"]["interval"] == "bootstrap" and m["f1"]["value"] == pytest.approx(0.95)


def test_micro_prf_says_bootstrap():
    m = micro_prf([1, 2, 0], [2, 2, 1], [1, 3, 0], n_boot=200, seed=0)
    assert {v["interval"] for v in m.values()} == {"bootstrap"}
    assert m["precision"]["value"] == pytest.approx(3 / 5) and m["recall"]["value"] == pytest.approx(3 / 4)


# --------------------------------------------------------------------------- paired


@pytest.mark.parametrize("b01, b10, p", [
    (0, 6, 0.03125),  # 2 / 2**6
    (6, 0, 0.03125),
    (1, 1, 1.0),
    (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
    (0, 0, 1.0),
    (1, 0, 1.0),
    (0, 5, 0.0625),
])
def test_mcnemar_exact_values(b01, b10, p):
    assert mcnemar_p(b01, b10) == pytest.approx(p)
    a = [1] * b01 + [0] * b10 + [1, 1, 0]  # concordant pairs do not matter
    b = [0] * b01 + [1] * b10 + [1, 1, 0]
    assert mcnemar_exact(a, b) == pytest.approx(p)


def _one_discordant_pair():
    a = np.array([1.0] * 17 + [0.0] * 3)  # 17 / 20 right
    b = a.copy()
    b[0] = 0.0  # 16 / 20: they differ only on example 0 (a right, b wrong)
    return a, b


def test_paired_one_discordant_pair_is_no_evidence():
    a, b = _one_discordant_pair()
    r = paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert r["diff"] == pytest.approx(0.05)
    assert r["ci"][0] == 0.0 and r["ci"][1] > 0.05  # the CI touches 0: not a win
    assert mcnemar_exact(a, b) == 1.0
    p = paired(a, b, binary=True, n_boot=2000, seed=0)
    assert p["diff"] == pytest.approx(0.05) and p["ci"] == r["ci"] and p["p"] == 1.0 and p["test"] == "mcnemar"
    assert paired(a, b)["test"] == "mcnemar"  # binary detected


def test_paired_bootstrap_seeded_and_sided():
    rng = np.random.default_rng(7)
    a = rng.random(50)
    b = a - 0.1 + 0.02 * rng.standard_normal(50)  # a is clearly better on every example
    r1, r2 = paired_bootstrap(a, b, 1000, seed=3), paired_bootstrap(a, b, 1000, seed=3)
    assert r1 == r2
    assert r1 != paired_bootstrap(a, b, 1000, seed=4)
    assert r1["diff"] == pytest.approx(float(np.mean(a - b)))
    assert 0.0 < r1["ci"][0] <= r1["diff"] <= r1["ci"][1]
    back = paired_bootstrap(b, a, 1000, seed=3)
    assert back["diff"] == pytest.approx(-r1["diff"]) and back["ci"] == pytest.approx([-r1["ci"][1], -r1["ci"][0]])
    assert paired_bootstrap([], [], 100, 0) == {"diff": 0.0, "ci": [0.0, 0.0]}
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1], 100, 0)


def test_paired_continuous_uses_sign_flip_p():
    rng = np.random.default_rng(1)
    a = rng.random(40)
    r = paired(a, a - 0.2, binary=False, n_boot=1000, seed=0)
    assert r["test"] == "sign-flip" and r["p"] < 0.01 and r["ci"][0] > 0
    same = paired(a, a.copy(), binary=False, n_boot=1000, seed=0)
    assert same == {"diff": 0.0, "ci": [0.0, 0.0], "p": 1.0, "test": "sign-flip"}
    assert paired(a, a[::-1], n_boot=500, seed=2) == paired(a, a[::-1], n_boot=500, seed=2)
