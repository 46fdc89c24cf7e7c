"""serve's POST /v1/predict: a run's rung served as the task it won. For each servable rung
of one tiny run, the predictions the server gives for the test inputs (the task's fields
only, no gold) equal what the ladder wrote in that rung's predictions.jsonl: the same
prompt format chosen on dev, the same shots, the calibration, the grammar, the adapter or
the rung's own model. Bad requests are 400s naming the row and field; rungs that cannot be
served say why at startup."""

from __future__ import annotations

import json

import pytest

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl

RUNGS = ["zero-shot", "calibrated", "few-shot", "constrained", "lora", "full"]


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    from lmladder.cli import main

    d = tmp_path_factory.mktemp("predict")
    train = write_jsonl(d / "train.jsonl", TRAIN_ROWS)
    test = write_jsonl(d / "test.jsonl", TEST_ROWS)
    out = d / "run"
    code = main(["run", "--train", str(train), "--test", str(test), "--rungs", ",".join(RUNGS),
                 "--out", str(out), "--model", str(tiny_dir), "-q", "--set", "eval.bootstrap=100",
                 "--set", "zero-shot.prompt_format=plain", "--set", "few-shot.k=4",
                 "--set", "lora.max_steps=6", "--set", "lora.lr=0.02", "--set", "lora.batch_size=4",
                 "--set", "lora.forgetting_text=null", "--set", "lora.eval_steps=2",
                 "--set", "full.max_steps=2", "--set", "full.lr=0.01", "--set", "full.batch_size=4",
                 "--set", "full.forgetting_text=null", "--set", "full.eval_steps=1",
                 "--set", "eval.max_new_tokens=8"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def tiny_loaded(tiny_dir):
    from lmladder.models import load_causal_lm

    model, tok, _ = load_causal_lm(str(tiny_dir))
    return model, tok


def _client(run, rung, tiny_loaded):
    from fastapi.testclient import TestClient

    from lmladder.serving import cli as serve

    spec = serve.resolve_target(str(run))
    predictor, why = serve.task_predictor(spec, rung)
    app, engine = serve.build(spec, model_tok=tiny_loaded, predictor=predictor, predict_unavailable=why,
                              batch_wait_ms=1)
    return TestClient(app), engine


def _ladder_preds(run, rung):
    return [json.loads(l) for l in (run / "rungs" / rung / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("rung", RUNGS)
def test_predict_replays_the_rung_as_the_ladder_scored_it(run, rung, tiny_loaded):
    client, engine = _client(run, rung, tiny_loaded)
    try:
        info = client.get("/v1/predict").json()
        assert info["rung"] == rung and info["input_fields"] == ["text"] and info["labels"] == ["neg", "pos"]
        r = client.post("/v1/predict", json={"inputs": [{"text": row["text"]} for row in TEST_ROWS]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rung"] == rung and len(body["predictions"]) == len(TEST_ROWS)
        want = _ladder_preds(run, rung)
        for got, ref in zip(body["predictions"], want):
            assert got["pred"] == ref["pred"]
            if "scores" in ref:  # label scoring: every label's score, as the ladder computed it
                assert got["scores"] == pytest.approx(ref["scores"], abs=2e-3)
                assert sum(got["probs"].values()) == pytest.approx(1.0)
            else:
                assert got["raw"] == ref["raw"]
    finally:
        engine.stop()
    details = json.loads((run / "rungs" / rung / "result.json").read_text())["details"]
    if rung == "zero-shot":
        assert info["prompt_format"] == details["prompt_format"]["chosen"] == "plain"
    if rung == "few-shot":
        assert info["shots"] == 4
    if rung == "calibrated":
        assert info["calibrated"] is True and "raw_scores" in _ladder_preds(run, rung)[0]
    if rung in ("lora", "full"):  # the weights are really the rung's: its scores are not the base's
        base = {p["id"]: p["scores"] for p in _ladder_preds(run, "zero-shot")}
        assert any(abs(p["scores"]["pos"] - base[p["id"]]["pos"]) > 1e-3 for p in _ladder_preds(run, rung))
        assert info["weights"] == ("adapter" if rung == "lora" else "model")


def test_bad_requests_are_400s_naming_the_row_and_field(run, tiny_loaded):
    client, engine = _client(run, "zero-shot", tiny_loaded)
    try:
        cases = [
            ({"inputs": [{"text": "fine"}, {"txt": "typo"}]}, "inputs:1: field 'text' missing"),
            ({"inputs": [{"text": ""}]}, "inputs:0: field 'text' is empty"),
            ({"inputs": [{"text": {"a": 1}}]}, "inputs:0: field 'text' must be text"),
            ({"inputs": ["just a string"]}, "inputs:0: expected an object of fields, got str"),
            ({"inputs": []}, "'inputs' must be a non-empty list"),
            ({"text": "no wrapper"}, "give 'inputs'"),
            ({"inputs": [{"text": "x"}] * 65}, "at most 64 inputs"),
            ({"inputs": [{"text": "x"}], "temperature": 0}, "unknown key 'temperature'"),
        ]
        for body, msg in cases:
            r = client.post("/v1/predict", json=body)
            assert r.status_code == 400, (body, r.text)
            assert msg in r.json()["error"]["message"], r.json()
        ok = client.post("/v1/predict", json={"input": {"text": "lovely film 0", "label": "ignored"}})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["pred"] in ("neg", "pos")
    finally:
        engine.stop()


def test_rungs_that_cannot_be_served_say_why_at_startup(run, tmp_path):
    from lmladder.serving import cli as serve
    from lmladder.errors import LadderError

    spec = serve.resolve_target(str(run))
    with pytest.raises(LadderError, match=r"^rung 'qlora' cannot be served by /v1/predict: its adapter was trained "
                                          r"on a 4-bit base"):
        serve.task_predictor(spec, "qlora")
    with pytest.raises(LadderError, match=r"--rung cot: not a finished rung"):
        serve.task_predictor(spec, "cot")
    # the recommended rung (none here: 8 test examples) -> /v1/predict off, with the reason
    predictor, why = serve.task_predictor(spec, None)
    res = json.loads((run / "results.json").read_text())
    if res["recommendation"]["rung"] is None:
        assert predictor is None and "no rung is recommended" in why and "--rung NAME" in why
