"""Cost in money at a call volume (cost:, --calls), the break-even volumes, and
--until-target (ladder.stop_at_target)."""

from __future__ import annotations

import json

import pytest

from lmladder import verdict
from tests.test_verdict import _row

FAST = ["--set", "few-shot.k=4", "--set", "eval.bootstrap=200", "-q", "--set", "lora.max_steps=2",
        "--set", "lora.batch_size=4"]


def _priced(row, one_time_s, per_call_s, calls, usd_per_hour=0.10):
    row["cost"] = {"one_time_s": one_time_s, "per_call_s": per_call_s, "calls": calls}
    p = verdict.price({"usd_per_hour": usd_per_hour, "calls": calls}, {"device": "cpu"})
    row["cost"].update(verdict.money(row["cost"], p))
    return row


def _pair(calls):
    good = [1] * 90 + [0] * 10
    # the demo's measured costs: few-shot cheap once and dearer per call, lora the reverse
    fs = _priced(_row("few-shot", 1, good), 37.0, 0.0784, calls)
    lo = _priced(_row("lora", 23, good), 329.0, 0.0727, calls)
    return [fs, lo]


def test_money_is_seconds_times_price():
    p = verdict.price({"usd_per_hour": 3.6, "calls": 1000}, {"device": "cuda:0"})
    m = verdict.money({"one_time_s": 100.0, "per_call_s": 0.01}, p)
    assert m["one_time_usd"] == pytest.approx(0.1) and m["per_call_usd"] == pytest.approx(1e-5)
    assert m["total_usd"] == pytest.approx(0.1 + 1000 * 1e-5)
    # defaults by device kind, and token prices for openai: models
    assert verdict.price({}, {"device": "cpu"})["usd_per_hour"] == 0.10
    assert verdict.price({}, {"device": "cuda:0"})["usd_per_hour"] == 2.50
    pr = verdict.price({"usd_per_1k_prompt_tokens": 0.5, "usd_per_1k_output_tokens": 2.0, "calls": 10},
                       {"kind": "openai"})
    m = verdict.money({"one_time_s": 0, "per_call_s": 9.0, "prompt_tokens_per_call": 200,
                       "generated_tokens_per_call": 10}, pr)
    assert m["per_call_usd"] == pytest.approx(0.2 * 0.5 + 0.01 * 2.0)


def test_call_volume_flips_the_recommendation_and_gives_the_break_even():
    few = verdict.decide(_pair(10), None, [], "accuracy", 0.85, n_test=100)
    many = verdict.decide(_pair(10_000_000), None, [], "accuracy", 0.85, n_test=100)
    assert few["rung"] == "few-shot" and many["rung"] == "lora"
    n = (329.0 - 37.0) / (0.0784 - 0.0727)  # where the two lines cross
    assert few["breakeven"] == [{"rung": "lora", "calls": round(n), "cheaper": "above"}]
    assert many["breakeven"] == [{"rung": "few-shot", "calls": round(n), "cheaper": "below"}]
    assert "at 10 calls: few-shot" in few["reason"] and "lora would be cheaper above 51,228 calls" in few["reason"]


def test_calls_flag_and_bad_cost_input(run_cli, toy_data, tmp_path):
    train, test = toy_data
    out = tmp_path / "run"
    base = ["run", "--train", str(train), "--test", str(test), "--rungs", "zero-shot", *FAST]
    code, _, err = run_cli(*base, "--out", str(out), "--calls", "250")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    zs = res["rungs"][0]
    assert res["cost"]["calls"] == 250 and zs["cost"]["calls"] == 250
    assert zs["cost"]["total_usd"] == pytest.approx(zs["cost"]["one_time_usd"] + 250 * zs["cost"]["per_call_usd"], abs=1e-6)
    assert (out / "cost.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli("report", str(out), "--calls", "1000000")
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["rungs"][0]["cost"]["calls"] == 1_000_000
    for bad in (["--calls", "-5"], ["--set", "cost.currency=eur"], ["--set", "cost.usd_per_hour=-1"]):
        o = tmp_path / ("bad" + str(abs(hash(tuple(bad)))))
        code, _, err = run_cli(*base, "--out", str(o), *bad)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "cost." in err and not o.exists()


def test_until_target_stops_at_the_first_rung_that_meets_it(run_cli, toy_data, tmp_path, monkeypatch):
    from lmladder.rungs.zero_shot import ZeroShot

    def perfect(self):  # a zero-shot rung that is right on every test example
        return [{"pred": e.label, "scores": {}} for e in self.ctx.data.test], {"prompt_tokens_per_example": 10.0}

    monkeypatch.setattr(ZeroShot, "predict", perfect)
    train, test = toy_data
    # a test split where the majority label (neg in train) is wrong on 6 of 8, so a perfect
    # zero-shot beats the baseline with McNemar p = 0.03
    rows = [json.loads(l) for l in test.read_text().splitlines()]
    rows = [{**r, "label": "pos"} if i < 6 else r for i, r in enumerate(rows)]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = [json.loads(l) for l in train.read_text().splitlines()]
    train.write_text("".join(json.dumps(r) + "\n" for r in extra + [{"text": "dull film x", "label": "neg"}]))
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out),
                           "--target", "accuracy=0.9", "--until-target", *FAST)
    assert code == 0, err
    assert not (out / "rungs/few-shot/result.json").exists() and not (out / "rungs/lora").exists()
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rungs"]] == ["zero-shot"]
    states = {u["name"]: (u["state"], u["why"]) for u in res["unfinished"]}
    assert set(states) == {"few-shot", "lora"} and all(s == "skipped" for s, _ in states.values())
    assert "stopped at target: zero-shot met accuracy >= 0.9" in states["lora"][1]
    assert res["recommendation"]["rung"] == "zero-shot" and res["recommendation"]["meets_target"] is True


# --------------------------------------------------------------------------- learning curves

def test_curve_subsets_are_seeded_and_nested():
    from lmladder.run.curves import curve_subset

    train = list(range(40))
    a, b = curve_subset(train, 0.25, 0), curve_subset(train, 0.5, 0)
    assert len(a) == 10 and len(b) == 20 and set(a) <= set(b)
    assert curve_subset(train, 0.5, 0) == b and curve_subset(train, 0.5, 1) != b


def test_curve_reading():
    full = _row("lora", 23, [1] * 90 + [0] * 10)
    half = _row("lora", 23, [1] * 60 + [0] * 40)
    pts = [{"fraction": 0.5, "n_train": 50, **{k: half[k] for k in ("score", "ci", "per_example")}},
           {"fraction": 1.0, "n_train": 100, **{k: full[k] for k in ("score", "ci", "per_example")}}]
    rd = verdict.curve_reading(pts, 0.85)
    assert rd["reading"] == "more data is likely to help" and rd["gain"]["diff"] == pytest.approx(0.3)
    assert rd["smallest_fraction_meeting_target"] == 1.0
    same = [{**pts[1], "fraction": 0.5}, pts[1]]
    assert verdict.curve_reading(same, 0.85)["reading"] == "flat"


def test_learning_curve_and_k_curve_end_to_end(run_cli, toy_data, tmp_path):
    train, test = toy_data
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out),
                           "--rungs", "few-shot,lora", "--set", "lora.learning_curve=[0.5]",
                           "--set", "few-shot.k_curve=[1,2]", "--set", "lora.forgetting_text=null", *FAST)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    lora = next(r for r in res["rungs"] if r["name"] == "lora")
    assert [(p["fraction"], p["n_train"]) for p in lora["learning_curve"]] == [(0.5, 12), (1.0, 24)]
    assert lora["learning_curve_reading"]["reading"] in {"more data is likely to help", "flat", "cannot tell",
                                                         "more data made it worse (check the training settings)"}
    fs = next(r for r in res["rungs"] if r["name"] == "few-shot")
    assert [p["k"] for p in fs["learning_curve"]] == [1, 2, 4]
    assert (out / "rungs/lora/curve-0.5/adapter/adapter_model.safetensors").is_file()
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "Would more data help?" in (out / "report.md").read_text()
    # training on a subset never replaces the rung's own adapter: a rerun reuses both
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out),
                           "--rungs", "few-shot,lora", "--set", "lora.learning_curve=[0.5]",
                           "--set", "few-shot.k_curve=[1,2]", "--set", "lora.forgetting_text=null", *FAST)
    assert code == 0, err


def test_bad_learning_curve_is_a_one_line_error(run_cli, toy_data, tmp_path):
    train, test = toy_data
    for bad in ("lora.learning_curve=[0.5,1.5]", "lora.learning_curve=[0]", "zero-shot.learning_curve=[0.5]"):
        o = tmp_path / ("b" + str(abs(hash(bad))))
        code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(o),
                               "--rungs", "zero-shot,lora", "--set", bad, *FAST)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "learning_curve" in err, err
        assert not o.exists()
