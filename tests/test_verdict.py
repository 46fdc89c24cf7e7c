"""The verdict (verdict.py, report.collect): current results only, paired evidence, the
majority baseline, the stated rule, ties on measured cost, non-policy rungs."""

from __future__ import annotations

import json

import pytest

from lmladder import verdict
from tests.conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl

FAST = ["--set", "few-shot.k=4", "--set", "eval.bootstrap=200", "-q"]


def _row(name, rank, correct, *, policy=True, per_call=0.001, one_time=0.0):
    n = len(correct)
    k = sum(correct)
    from lmladder.metrics import wilson

    return {"name": name, "rank": rank, "score": k / n, "ci": wilson(k, n), "policy": policy,
            "cost": {"per_call_s": per_call, "one_time_s": one_time},
            "per_example": {"kind": "mean", "binary": True, "values": [float(c) for c in correct]}}


def test_cheaper_rung_one_example_apart_is_not_said_to_fall_short():
    # n=20: few-shot 17/20, zero-shot 16/20, differing on one example only
    zs = [1] * 16 + [0] * 4
    fs = [1] * 17 + [0] * 3
    rows = [_row("zero-shot", 0, zs), _row("few-shot", 1, fs)]
    rec = verdict.decide(rows, None, [], "accuracy", 0.82, n_test=20)
    assert rec["rung"] == "few-shot" and rec["meets_target"] is True
    assert "falls short" not in rec["reason"]
    assert "zero-shot 0.800 cannot be told apart from few-shot" in rec["reason"]
    assert rows[0]["paired"]["vs"] == "few-shot"
    assert rows[0]["paired"]["diff"] == pytest.approx(-0.05)
    assert rows[0]["paired"]["ci"][1] == 0.0 and rows[0]["paired"]["p"] == 1.0
    # and the small test split is called out
    assert "only 20 test examples" in rec["reason"] and rec["warnings"]


def test_cheaper_rung_clearly_worse_falls_short():
    zs = [1] * 40 + [0] * 60
    fs = [1] * 90 + [0] * 10
    rows = [_row("zero-shot", 0, zs), _row("few-shot", 1, fs)]
    rec = verdict.decide(rows, None, [], "accuracy", 0.85, n_test=100)
    assert rec["rung"] == "few-shot"
    assert "zero-shot 0.400 falls short" in rec["reason"] and "McNemar p=" in rec["reason"]
    assert not rec["warnings"]


def test_best_rung_indistinguishable_from_majority_is_not_recommended():
    # a real case: prompt rungs predict one class (0.500), LoRA 0.525 on 200 examples
    gold_pos = [1] * 100 + [0] * 100
    majority = _row(verdict.BASELINE, -1, [1] * 100 + [0] * 100, policy=False)
    zs = _row("zero-shot", 0, gold_pos)
    lora_correct = [1] * 100 + [0] * 100
    for i in range(100, 105):
        lora_correct[i] = 1  # 5 more right
    lora = _row("lora", 23, lora_correct)
    rec = verdict.decide([zs, lora], majority, [], "accuracy", 0.5, n_test=200)
    assert rec["rung"] is None and rec["best"] == "zero-shot"
    assert "majority" in rec["reason"] and "no rung is recommended" in rec["reason"]
    # 5 more right, none more wrong: the bootstrap interval alone would exclude 0, but the
    # exact McNemar p is 0.0625
    rec = verdict.decide([lora], majority, [], "accuracy", 0.52, n_test=200)
    assert rec["rung"] is None and rec["vs_baseline"]["diff"] == pytest.approx(0.025)
    assert rec["vs_baseline"]["p"] == pytest.approx(0.0625)
    # the usual shape: 25 more right, 20 more wrong
    mixed = [1] * 80 + [0] * 20 + [1] * 25 + [0] * 75
    rec = verdict.decide([_row("lora", 23, mixed)], majority, [], "accuracy", 0.52, n_test=200)
    assert rec["rung"] is None and rec["vs_baseline"]["ci"][0] < 0 < rec["vs_baseline"]["ci"][1]
    # clearly better than the baseline: recommended
    good = [1] * 100 + [1] * 60 + [0] * 40
    assert verdict.decide([_row("lora", 23, good)], majority, [], "accuracy", 0.7, n_test=200)["rung"] == "lora"


def test_unfinished_cheaper_rung_makes_the_verdict_provisional():
    fs = _row("few-shot", 1, [1] * 90 + [0] * 10)
    rec = verdict.decide([fs], None, [{"name": "zero-shot", "state": "failed", "rank": 0.0}],
                         "accuracy", 0.8, n_test=100)
    assert rec["rung"] == "few-shot"
    assert rec["meets_target"] is None  # not true while a cheaper rung is unknown
    assert "among finished rungs" in rec["reason"] and "zero-shot (failed)" in rec["reason"]


def test_lower_bound_rule():
    r = _row("zero-shot", 0, [1] * 17 + [0] * 3)  # 0.85, Wilson low ~0.64
    assert verdict.decide([r], None, [], "accuracy", 0.8, rule="point", n_test=20)["meets_target"] is True
    rec = verdict.decide([r], None, [], "accuracy", 0.8, rule="lower-bound", n_test=20)
    assert rec["meets_target"] is False and rec["rule"] == "lower-bound"
    assert "rule lower-bound" in rec["reason"]


def test_ties_break_on_measured_cost_not_config_order():
    c = [1] * 90 + [0] * 10
    k32 = _row("few-shot@k32", 1, c, per_call=0.050)
    k8 = _row("few-shot", 1, c, per_call=0.010)
    rec = verdict.decide([k32, k8], None, [], "accuracy", 0.85, n_test=100)
    assert rec["rung"] == "few-shot"
    rec = verdict.decide([k32, k8], None, [], "accuracy", None, n_test=100)
    assert rec["rung"] == "few-shot"  # equal scores: the cheaper one


def test_reward_model_is_never_recommended():
    rm = _row("reward-model", 25, [1] * 95 + [0] * 5, policy=False)
    zs = _row("zero-shot", 0, [1] * 60 + [0] * 40)
    rec = verdict.decide([zs, rm], None, [], "reward_accuracy", 0.9, n_test=100)
    assert rec["rung"] == "zero-shot" and rec["meets_target"] is False


def test_paired_macro_f1_and_micro():
    a = {"kind": "macro_f1", "pred": [0, 1, 0, 1] * 10, "gold": [0, 1, 0, 1] * 10, "k": 2}
    b = {"kind": "macro_f1", "pred": [0, 0, 0, 0] * 10, "gold": [0, 1, 0, 1] * 10, "k": 2}
    pr = verdict.paired(a, b, seed=0)
    # macro-F1 of all-zero predictions: class 0 F1 = 2/3, class 1 F1 = 0 -> 1/3
    assert pr["diff"] == pytest.approx(1 - 1 / 3, abs=1e-6) and pr["ci"][0] > 0 and pr["p"] is None
    m1 = {"kind": "micro", "which": "f1", "counts": [[1, 1, 1]] * 10}
    m2 = {"kind": "micro", "which": "f1", "counts": [[0, 1, 1]] * 10}
    assert verdict.paired(m1, m2)["diff"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- through the CLI

def _cli(run_cli, train, test, out, *extra):
    return run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out), *FAST, *extra)


def test_stale_results_never_enter_the_verdict(run_cli, tmp_path, monkeypatch):
    """Run 1 on an 8-example test file; run 2 on a 40-example file fails in zero-shot:
    few-shot's old 8-example result is stale, zero-shot failed, nothing is recommended."""
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    small = write_jsonl(tmp_path / "small.jsonl", TEST_ROWS)
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"{w} show {i}", "label": lab}
                                               for i in range(20) for w, lab in (("fine", "pos"), ("dire", "neg"))])
    out = tmp_path / "run"
    assert _cli(run_cli, train, small, out, "--rungs", "zero-shot,few-shot")[0] == 0
    from lmladder.rungs.zero_shot import ZeroShot

    def boom(self):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ZeroShot, "predict", boom)
    with pytest.raises(RuntimeError):
        _cli(run_cli, train, big, out, "--rungs", "zero-shot,few-shot")
    monkeypatch.undo()
    code, _, err = run_cli("report", str(out))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["rungs"] == []
    states = {u["name"]: u["state"] for u in res["unfinished"]}
    assert states == {"zero-shot": "failed", "few-shot": "stale"}
    assert res["recommendation"]["rung"] is None
    assert "simulated failure" in (out / "report.md").read_text()
    # the stale result was kept on disk (never deleted before a replacement exists)
    assert json.loads((out / "rungs/few-shot/result.json").read_text())["n_test"] == 8


def test_results_carry_paired_rule_baseline_and_two_part_costs(run_cli, toy_data, tmp_path):
    train, test = toy_data
    out = tmp_path / "run"
    code, _, err = _cli(run_cli, train, test, out, "--rungs", "zero-shot,few-shot", "--target", "accuracy=0.5",
                        "--set", "decision.rule=lower-bound")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["decision"]["rule"] == "lower-bound" and res["recommendation"]["rule"] == "lower-bound"
    base = res["baseline"]
    assert base["name"] == "majority" and base["baseline"] is True and base["score"] == 0.5
    ref = res["recommendation"]["rung"] or res["recommendation"]["best"]
    for r in res["rungs"] + [base]:
        c = r["cost"]
        assert {"one_time_s", "per_call_s", "forgetting_s", "prompt_tokens_per_call",
                "generated_tokens_per_call", "peak_rss_mb"} <= set(c)
        if r["name"] != ref:
            assert set(r["paired"]) == {"vs", "diff", "ci", "p"} and r["paired"]["vs"] == ref
    zs = next(r for r in res["rungs"] if r["name"] == "zero-shot")
    assert zs["cost"]["per_call_s"] > 0 and zs["cost"]["one_time_s"] > 0  # the format choice on dev
    assert zs["details"]["prompt_format"]["setting"] == "auto"
    assert set(zs["details"]["prompt_format"]["dev_scores"]) == {"chat", "plain"}
    assert "only 8 test examples" in res["recommendation"]["reason"]
    md = (out / "report.md").read_text()
    assert "Decision rule: `lower-bound`" in md and "majority (baseline)" in md and "Warning" in md


def test_bad_decision_key_or_rule_is_a_one_line_error(run_cli, toy_data, tmp_path):
    train, test = toy_data
    for bad in ("decision.rule=median", "decision.margin=0.1"):
        out = tmp_path / bad.replace("=", "_")
        code, _, err = _cli(run_cli, train, test, out, "--rungs", "zero-shot", "--set", bad)
        assert code == 2, err
        assert "decision." in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
