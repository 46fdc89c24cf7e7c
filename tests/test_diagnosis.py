"""Why a rung fails (diagnosis.py, on scripted predictions) and calibration fixing a
planted label bias."""

from __future__ import annotations

import json

import pytest
from torch import nn

from lmladder import config, diagnosis
from lmladder.run import ladder
from lmladder.tasks import make_task


def _rows(preds, golds):
    return [{"pred": p, "gold": g, "correct": p == g, "input": f"x{i}", "id": str(i)}
            for i, (p, g) in enumerate(zip(preds, golds))]


def test_label_bias_confusion_and_calibration_offered():
    golds = ["neg", "pos"] * 50
    preds = ["pos"] * 100  # one class for every input
    res = {"score": 0.5, "ci": [0.4, 0.6], "metrics": {}}
    d = diagnosis.diagnose("classification", ["neg", "pos"], _rows(preds, golds), res, target=0.8)
    assert d["label_bias"] == {"label": "pos", "pred_share": 1.0, "gold_share": 0.5, "biased": True}
    assert d["confusion"]["matrix"] == [[0, 50], [0, 50]]
    assert any("calibration" in s for s in d["next"])
    # one label for every input on imbalanced gold (85% ham) is label bias too, and a rung
    # no better than the baseline says so
    golds = ["ham"] * 85 + ["spam"] * 15
    d = diagnosis.diagnose("classification", ["ham", "spam"], _rows(["ham"] * 100, golds),
                           {"score": 0.85, "ci": [0.77, 0.91], "metrics": {}}, target=0.95,
                           vs_baseline={"diff": 0.0, "ci": [0.0, 0.0], "p": 1.0})
    assert d["label_bias"]["biased"] and "no better than the majority baseline" in d["findings"][-1]
    d = diagnosis.diagnose("classification", ["ham", "spam"], _rows(["ham"] * 100, golds),
                           {"score": 0.85, "ci": [0.77, 0.91], "metrics": {}, "details": {"calibration": {"method": "contextual"}}})
    assert d["next"] == ["label bias left after calibration -> fine-tuning (`lora`)"]
    # a balanced predictor has no bias finding
    d = diagnosis.diagnose("classification", ["neg", "pos"], _rows(golds, golds), {**res, "score": 1.0}, target=0.8)
    assert not d["label_bias"]["biased"] and d["next"] == []


def test_format_failures_send_to_constrained_decoding_and_under_trained():
    golds = ["a"] * 20
    preds = [None] * 6 + ["a"] * 14
    rows = _rows(preds, golds)
    for r in rows[:6]:
        r["error"] = "no label (a, b) in the output"
    d = diagnosis.diagnose("classification", ["a", "b"], rows, {"score": 0.7, "ci": [0.5, 0.85], "metrics": {}},
                           target=0.9)
    assert d["unparseable"] == 0.3 and "format" in d["findings"][0]
    assert d["next"][0].startswith("format -> constrained decoding")
    vs = {"diff": 0.01, "ci": [-0.03, 0.05], "p": 0.7}
    d = diagnosis.diagnose("classification", ["a", "b"], _rows(golds, golds), {"score": 1.0, "ci": [0.8, 1.0],
                           "metrics": {}}, trains=True, vs_baseline=vs)
    assert d["under_trained"] is True and any("more steps" in s for s in d["next"])


def test_rag_retrieval_vs_reading_misses_and_schema_failures():
    rows = _rows(["x", "y", "z", "w"], ["x", "q", "q", "q"])
    for r, hit in zip(rows, [True, False, False, True]):
        r["gold_retrieved"] = hit
    d = diagnosis.diagnose("qa", None, rows, {"score": 0.25, "ci": [0, 0.7], "metrics": {}}, target=0.5)
    assert d["retrieval"] == {"with_gold": 4, "retrieval_misses": 2, "reading_misses": 1}
    assert "knowledge" in d["findings"][0]
    m = {"valid_json": {"value": 1.0}, "schema_valid": {"value": 0.6}}
    d = diagnosis.diagnose("extraction", None, _rows([{}] * 5, [{}] * 5), {"score": 0.5, "ci": [0, 1], "metrics": m})
    assert d["schema_invalid"] == 0.4 and "constrained" in d["next"][0]


def test_disagreements_table():
    a = _rows(["p", "n", "p"], ["p", "p", "n"])
    b = _rows(["p", "p", "n"], ["p", "p", "n"])
    dis = diagnosis.disagreements({"zero-shot": a, "lora": b})
    assert [x["id"] for x in dis] == ["1", "2"] and dis[0]["preds"] == {"zero-shot": "n", "lora": "p"}


class _Biased(nn.Module):
    """A model with a planted label bias: +``b`` on one token's logit at every position."""

    def __init__(self, model, token_id, b):
        super().__init__()
        self.m, self.token_id, self.b = model, token_id, b

    @property
    def config(self):
        return self.m.config

    def forward(self, **kw):
        out = self.m(**kw)
        out.logits = out.logits.clone()
        out.logits[..., self.token_id] += self.b
        return out


def test_calibration_removes_a_planted_label_bias(tiny_dir, toy_data, tmp_path):
    from lmladder.rungs.calibrated import Calibrated
    from lmladder.rungs.zero_shot import ZeroShot

    train, test = toy_data
    cfg = config.build({"data": {"train": str(train), "test": str(test)}, "model": str(tiny_dir),
                        "zero-shot": {"prompt_format": "chat"}, "calibrated": {"prompt_format": "chat"}})
    ds = ladder.validate(cfg)
    ctx = ladder.Context(cfg, ds, make_task(cfg.task, ds.info["labels"], cfg.eval, 0), tmp_path)
    base, tok = ctx.base()

    def run(cls, model):
        ctx.set_base(model)
        r = cls(ctx, cfg.rung_config(cls.name), tmp_path / cls.name)
        r.name = cls.name
        r.prepare()
        preds, info = r.predict()
        ctx.set_base(base)
        info["margins"] = [p["scores"]["pos"] - p["scores"]["neg"] for p in preds]
        return [p["pred"] for p in preds], info

    pos = tok("pos", add_special_tokens=False).input_ids[0]
    biased = _Biased(base, pos, 12.0)
    plain_preds, raw = run(ZeroShot, biased)
    assert plain_preds == ["pos"] * 8 and min(raw["margins"]) > 5  # the planted bias decides every example
    fixed, info = run(Calibrated, biased)
    clean, clean_info = run(Calibrated, base)
    # the label bias cancels exactly: calibrated margins with and without it are the same
    assert fixed == clean
    # (up to the bias on later label positions, which the per-position normaliser absorbs)
    assert info["margins"] == pytest.approx(clean_info["margins"], abs=5e-3)
    assert max(abs(m) for m in info["margins"]) < 1.0  # no longer decided by the bias
    assert info["calibration"]["log_prior"]["pos"] > info["calibration"]["log_prior"]["neg"]
    # the target is the train label distribution (add-one smoothed), here 12 + 1 of 24 + 2 each
    import math

    assert info["calibration"]["log_train_prior"] == pytest.approx({"neg": math.log(0.5), "pos": math.log(0.5)}, abs=1e-6)


def test_calibrate_on_a_generative_task_is_a_clear_error(run_cli, toy_data, tmp_path):
    train, test = toy_data
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "zero-shot",
                           "--set", "zero-shot.calibrate=true", "--set", "zero-shot.constrained=true",
                           "--out", str(tmp_path / "r"), "-q")
    assert code == 2 and "zero-shot.calibrate" in err and not (tmp_path / "r").exists()
    json.dumps(err)
