"""The openai backend: zero-shot / few-shot scored through an OpenAI-compatible
``/v1/completions`` endpoint (echo + logprobs, vLLM semantics) equal local scoring.

The server is a small FastAPI app in a thread on 127.0.0.1 that computes the echoed
prompt log-probabilities with the tiny model (only loopback traffic)."""



import json
import socket
import threading
import time

import pytest
import torch

from lmladder.inference import openai_backend


def make_app(model, tok, seen: list, flags: dict):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @torch.no_grad()
    def echo(text: str) -> dict:
        ids = tok(text, add_special_tokens=False).input_ids
        logp = model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)[0]
        tokens = [tok.decode([i]) for i in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        assert "".join(tokens) == text
        lps = [None] + [logp[k - 1, ids[k]].item() for k in range(1, len(ids))]
        return {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets,
                "top_logprobs": [None] + [{t: v} for t, v in zip(tokens[1:], lps[1:])]}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        seen.append({k: v for k, v in body.items() if k != "prompt"} | {"n_prompts": len(body["prompt"])})
        if req.headers.get("authorization") != "Bearer sk-test":
            return JSONResponse({"error": "bad key"}, status_code=401)
        if flags.get("no_max_tokens_0") and body["max_tokens"] == 0:
            return JSONResponse({"error": "max_tokens must be at least 1"}, status_code=400)
        assert body["echo"] is True and body["max_tokens"] in (0, 1) and body["logprobs"] == 1
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            lp = echo(p)
            if body["max_tokens"] == 1:  # one generated token after the echoed prompt
                lp["tokens"].append("x")
                lp["token_logprobs"].append(-0.5)
                lp["text_offset"].append(len(p))
                lp["top_logprobs"].append({"x": -0.5})
            choices.append({"index": i, "text": p, "logprobs": lp, "finish_reason": "length"})
        n = sum(len(c["logprobs"]["tokens"]) for c in choices)
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}

    return app


@pytest.fixture(scope="module")
def server(tiny_dir):
    import uvicorn

    from lmladder.models import load_causal_lm

    model, tok, _ = load_causal_lm(str(tiny_dir))
    seen: list = []
    flags: dict = {}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(model, tok, seen, flags), log_level="warning", lifespan="off"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        assert time.time() - t0 < 30, "fake server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", seen, flags
    srv.should_exit = True
    th.join(10)
    sock.close()


@pytest.fixture
def openai_env(server, tiny_dir, monkeypatch):
    url, seen, flags = server
    flags.clear()
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("LMLADDER_OPENAI_TOKENIZER", str(tiny_dir))
    seen.clear()
    return seen


COMMON = ["--set", "few-shot.k=2", "--set", "eval.bootstrap=200", "--set", "eval.batch_size=5", "-q"]


def _preds(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_zero_and_few_shot_via_endpoint_equal_local(run_cli, toy_data, tmp_path, openai_env):
    train, test = toy_data
    args = ["run", "--train", str(train), "--test", str(test), "--rungs", "zero-shot,few-shot", *COMMON]
    code, _, err = run_cli(*args, "--out", str(tmp_path / "local"))
    assert code == 0, err
    code, _, err = run_cli(*args, "--out", str(tmp_path / "remote"), "--model", "openai:tiny-served")
    assert code == 0, err
    assert openai_env and all(s["model"] == "tiny-served" and s["n_prompts"] <= 5 for s in openai_env)
    for rung in ("zero-shot", "few-shot"):
        local = _preds(tmp_path / "local/rungs" / rung / "predictions.jsonl")
        remote = _preds(tmp_path / "remote/rungs" / rung / "predictions.jsonl")
        assert [p["pred"] for p in remote] == [p["pred"] for p in local]
        for a, b in zip(local, remote):
            assert b["scores"].keys() == a["scores"].keys()
            for k in a["scores"]:
                assert b["scores"][k] == pytest.approx(a["scores"][k], abs=1e-4)
        res = json.loads((tmp_path / "remote/rungs" / rung / "result.json").read_text())
        assert res["details"]["backend"] == "openai" and res["details"]["boundary_straddles"] == 0
        assert res["model"]["kind"] == "openai" and res["model"]["path"] == "tiny-served"
        loc = json.loads((tmp_path / "local/rungs" / rung / "result.json").read_text())
        assert res["cost"]["prompt_tokens_per_example"] == loc["cost"]["prompt_tokens_per_example"]
    assert (tmp_path / "remote/rungs/few-shot/shots.json").is_file()
    assert (tmp_path / "remote/report.md").is_file()


def test_server_refusing_max_tokens_0_gets_1_and_the_generated_token_is_ignored(
    run_cli, toy_data, tmp_path, openai_env, server
):
    server[2]["no_max_tokens_0"] = True
    train, test = toy_data
    args = ["run", "--train", str(train), "--test", str(test), "--rungs", "zero-shot", *COMMON]
    assert run_cli(*args, "--out", str(tmp_path / "local"))[0] == 0
    code, _, err = run_cli(*args, "--out", str(tmp_path / "remote"), "--model", "openai:tiny-served")
    assert code == 0, err
    assert [s["max_tokens"] for s in openai_env][:2] == [0, 1]
    local = _preds(tmp_path / "local/rungs/zero-shot/predictions.jsonl")
    remote = _preds(tmp_path / "remote/rungs/zero-shot/predictions.jsonl")
    for a, b in zip(local, remote):
        assert a["pred"] == b["pred"]
        assert all(b["scores"][k] == pytest.approx(a["scores"][k], abs=1e-4) for k in a["scores"])


def test_plain_text_without_a_tokenizer(run_cli, toy_data, tmp_path, openai_env, monkeypatch):
    monkeypatch.delenv("LMLADDER_OPENAI_TOKENIZER")
    train, test = toy_data
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "zero-shot",
                           *COMMON, "--out", str(tmp_path / "r"), "--model", "openai:tiny-served")
    assert code == 0, err
    preds = _preds(tmp_path / "r/rungs/zero-shot/predictions.jsonl")
    assert len(preds) == 8 and all(set(p["scores"]) == {"neg", "pos"} for p in preds)
    assert "<|im_start|>" not in preds[0]["input"]


def test_training_rung_with_openai_is_a_clear_error(run_cli, toy_data, tmp_path, openai_env):
    train, test = toy_data
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "zero-shot,lora",
                           "--out", str(tmp_path / "r"), "--model", "openai:tiny-served")
    assert code == 2
    assert "the openai backend serves inference rungs only" in err and "'lora'" in err
    assert not (tmp_path / "r").exists()
    assert not openai_env  # nothing was sent


def test_missing_base_url_and_bad_key_are_clear_errors(run_cli, toy_data, tmp_path, openai_env, monkeypatch):
    train, test = toy_data
    args = ["run", "--train", str(train), "--test", str(test), "--rungs", "zero-shot", "--model", "openai:x"]
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    code, _, err = run_cli(*args, "--out", str(tmp_path / "a"))
    assert code == 2 and "HTTP 401" in err
    monkeypatch.delenv("OPENAI_BASE_URL")
    code, _, err = run_cli(*args, "--out", str(tmp_path / "b"))
    assert code == 2 and "OPENAI_BASE_URL" in err
    assert not (tmp_path / "b").exists()


def test_label_offsets_straddling_the_boundary():
    """A server token crossing the prompt/label boundary is counted with the label."""

    class Fake(openai_backend.OpenAIModel):
        def echo_logprobs(self, texts, batch_size=16):
            # "ab|cd" tokenised as "a", "bc", "d": "bc" straddles the boundary at 2
            return [{"tokens": ["a", "bc", "d"], "token_logprobs": [None, -1.0, -2.0], "text_offset": [0, 1, 3]}]

    ll, stats = Fake("m", "http://x").label_loglikelihoods(["ab"], ["cd"])
    assert ll == [[-3.0]] and stats["boundary_straddles"] == 1
