
from lmladder import prompts
"""Integration tests on the real embedded model (SmolLM2-135M-Instruct, offline).

Budget: about a minute on 2 cores once the GGUF has been converted (the first
conversion adds ~20 s). Marked `integration`; deselect with `-m "not integration"`.
"""

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def smol():
    from lmladder.models import load_causal_lm

    model, tok, ref = load_causal_lm("smollm2-135m")
    return model, tok, ref


def test_converted_weights_equal_the_gguf_load(smol):
    import torch
    from transformers import AutoModelForCausalLM

    model, tok, ref = smol
    src = Path(ref.gguf)
    gg = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ids = tok("The movie was", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(gg(ids).logits, model(ids).logits)
    assert (Path(ref.path) / "model.safetensors").is_file()
    assert not hasattr(model.config, "quantization_config")


def test_smollm2_loss_mask_and_pad(smol):
    from lmladder.training import sft
    from lmladder.prompts import ChatFormat

    model, tok, _ = smol
    assert tok.pad_token_id != tok.eos_token_id  # pad moved off EOS (<|im_end|>)
    fmt = ChatFormat(tok)
    f = sft.build_feature(fmt, "Input: great\nLabel:", "positive", 512, "x:1", prompts.eos_token_ids(tok, model))
    trained = [t for t in f.labels if t != -100]
    assert tok.decode(trained) == "positive<|im_end|>"
    assert trained[-1] == tok.eos_token_id
    assert fmt.prompt("m").startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_three_rungs_on_the_embedded_model(tmp_path):
    from lmladder.cli import main

    out = tmp_path / "run"
    code = main([
        "run", str(Path(__file__).resolve().parents[1] / "examples" / "sst2.yaml"),
        "--limit-train", "16", "--limit-test", "12", "--out", str(out), "-q",
        "--set", "lora.max_steps=3", "--set", "few-shot.k=4", "--set", "eval.bootstrap=200",
    ])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rungs"]] == ["zero-shot", "few-shot", "lora"]
    assert res["model"]["parameters"] == 134_515_008
    lora = res["rungs"][2]
    assert lora["cost"]["trainable_params"] > 0 and lora["details"]["steps"] == 3
    # 12 test examples: the verdict may well be "cannot be told apart from majority"
    assert res["recommendation"]["rung"] in {None, "zero-shot", "few-shot", "lora"}
    assert "only 12 test examples" in res["recommendation"]["reason"]
    # zero-shot on SmolLM2 is far from random only if prompts and scoring are right;
    # with 12 examples we only require that predictions are not all one label.
    preds = [json.loads(l)["pred"] for l in (out / "rungs/zero-shot/predictions.jsonl").read_text().splitlines()]
    assert len(set(preds)) == 2
    # serve the demo's rungs as the task (POST /v1/predict): the same answers as the ladder's
    from fastapi.testclient import TestClient

    from lmladder.serving import cli as serve
    from lmladder.models import load_causal_lm

    spec = serve.resolve_target(str(out))
    loaded = load_causal_lm(spec.base_spec)[:2]
    for rung in ("few-shot", "lora"):
        ladder_preds = [json.loads(l) for l in (out / f"rungs/{rung}/predictions.jsonl").read_text().splitlines()]
        predictor, _ = serve.task_predictor(spec, rung)
        app, engine = serve.build(spec, model_tok=loaded, predictor=predictor)
        try:
            r = TestClient(app).post("/v1/predict", json={"inputs": [{"text": p["input"]} for p in ladder_preds]})
        finally:
            engine.stop()
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [g["pred"] for g in got] == [p["pred"] for p in ladder_preds]
        for g, p in zip(got, ladder_preds):
            assert g["scores"] == pytest.approx(p["scores"], abs=2e-3)


def _lm_eval_style(model, tok, rows) -> list[int]:
    """lm-eval's multiple-choice recipe, written independently of lmladder's scorer:
    context "Question: <stem>\nAnswer:", continuation " <choice>", summed log-probs."""
    import torch

    out = []
    for r in rows:
        ctx = f"Question: {r['question_stem']}\nAnswer:"
        n_ctx = len(tok(ctx, add_special_tokens=False).input_ids)
        lls = []
        for c in r["choices"]["text"]:
            whole = tok(ctx + " " + c, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole))))
        out.append(int(r["choices"]["label"][max(range(len(lls)), key=lls.__getitem__)] == r["answerKey"]))
    return out


def test_openbookqa_from_flags_alone_matches_an_lm_eval_style_prompt(tmp_path, smol):
    """HF's nested multiple-choice shape loads from three flags; zero-shot (prompt_format
    auto) is not worse than the lm-eval-style plain prompt on the same questions."""
    from lmladder.cli import main

    out = tmp_path / "obqa"
    code = main([
        "run", "--task", "multiple-choice", "--train", str(DATA / "openbookqa.train.jsonl"),
        "--test", str(DATA / "openbookqa.test.jsonl"), "--input-field", "question_stem",
        "--choices-field", "choices", "--label-field", "answerKey", "--rungs", "zero-shot",
        "--limit-test", "100", "--limit-train", "100", "--out", str(out), "-q",
    ])
    assert code == 0
    zs = json.loads((out / "rungs/zero-shot/result.json").read_text())
    preds = [json.loads(l) for l in (out / "rungs/zero-shot/predictions.jsonl").read_text().splitlines()]
    rows = (DATA / "openbookqa.test.jsonl").read_text().splitlines()
    chosen = [json.loads(rows[int(p["source"].rpartition(":")[2]) - 1]) for p in preds]
    assert [p["gold"] for p in preds] == [r["choices"]["label"].index(r["answerKey"]) for r in chosen]
    model, tok, _ = smol
    ref = sum(_lm_eval_style(model, tok, chosen)) / len(chosen)
    # not handicapped: the lm-eval-style prompt does not beat zero-shot beyond its interval
    # (on this set the chat format, with the choices listed, scores higher and auto keeps it)
    assert ref <= zs["ci"][1], (zs["score"], zs["ci"], ref)
    assert set(zs["details"]["prompt_format"]["dev_scores"]) == {"chat", "plain"}
