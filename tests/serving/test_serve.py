"""lmladder serve: the OpenAI-compatible server on the tiny model, through real uvicorn.

One run folder (lora rung, 2 steps) + a second adapter made by perturbing the first's
lora_B; one server (API key, max_tokens limit 64, body limit 64 KiB, 2 adapters loaded so
mixed traffic runs as PEFT mixed-adapter batches) on 127.0.0.1 in a background thread. Every
answer is checked against a direct computation on separately loaded models.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl

KEY = "test-key-123"
LIMIT = 64
BODY_LIMIT = 64 * 1024
MSGS = {
    "a": [{"role": "user", "content": "hello there"}],
    "b": [{"role": "user", "content": "Classify: a great movie"}],
    "c": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    "d": [{"role": "user", "content": "x"}],
}


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    from lmladder.cli import main

    d = tmp_path_factory.mktemp("serve")
    train = write_jsonl(d / "train.jsonl", TRAIN_ROWS)
    test = write_jsonl(d / "test.jsonl", TEST_ROWS)
    out = d / "run"
    code = main(["run", "--train", str(train), "--test", str(test), "--rungs", "lora", "--set", "lora.max_steps=2",
                 "--set", "lora.batch_size=4", "--out", str(out), "--model", str(tiny_dir), "-q"])
    assert code == 0
    # 2 training steps barely move lora_B (it starts at 0): perturb it so "lora" clearly
    # differs from the base, and make a second adapter the same way with other noise.
    from safetensors.torch import load_file, save_file

    a1 = out / "rungs/lora/adapter"
    a2 = d / "adapter2"
    shutil.copytree(a1, a2)
    for path, seed in ((a1, 2), (a2, 1)):
        sd = load_file(path / "adapter_model.safetensors")
        g = torch.Generator().manual_seed(seed)
        sd = {k: (v + 0.5 * torch.randn(v.shape, generator=g) if "lora_B" in k else v) for k, v in sd.items()}
        save_file(sd, path / "adapter_model.safetensors")
    return out, a2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir):
    import uvicorn

    from lmladder.serving import cli as serve

    out, a2 = run_dir
    spec = serve.resolve_target(str(out), None, [f"lora2={a2}"])
    app, engine = serve.build(spec, max_adapters=2, batch_size=8, batch_wait_ms=30, max_tokens_limit=LIMIT,
                              max_body_bytes=BODY_LIMIT, api_key=KEY)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started and time.time() - t0 < 20:
        time.sleep(0.05)
    assert srv.started
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "spec": spec}
    srv.should_exit = True
    th.join(10)
    engine.stop()


@pytest.fixture(scope="module")
def refs(run_dir, tiny_dir):
    """Separately loaded reference models: base, lora, lora2 (PEFT)."""
    from peft import PeftModel

    from lmladder.models import load_causal_lm

    out, a2 = run_dir
    base, tok, _ = load_causal_lm(str(tiny_dir))
    res = {"base": base}
    for name, path in (("lora", out / "rungs/lora/adapter"), ("lora2", a2)):
        m, _, _ = load_causal_lm(str(tiny_dir))
        res[name] = PeftModel.from_pretrained(m, str(path)).eval()
    return res, tok


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _http(server, method, path, key=KEY, **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    kw.setdefault("timeout", 60)
    return httpx.request(method, server["url"] + path, headers=headers, **kw)


def direct(refs, model, msgs, max_new):
    """(text, finish_reason, n_tokens) from model.generate on the same chat-template prompt."""
    from lmladder.prompts import eos_token_ids

    models, tok = refs
    m = models["base" if model == "base" else model]
    eos = eos_token_ids(tok, models["base"])
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id)
    gen = out[0, ids.shape[1]:].tolist()
    if any(t in eos for t in gen):
        gen = gen[: next(i for i, t in enumerate(gen) if t in eos) + 1]
    text = tok.decode([t for t in gen if t not in eos], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text, ("stop" if gen and gen[-1] in eos else "length"), len(gen)


def chat(client, model, msgs, max_tokens=12, **kw):
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage


def test_models_lists_base_and_adapters(client, server):
    ids = [m.id for m in client.models.list().data]
    base = server["spec"].base_name
    assert ids[:2] == [base, "base"] and set(ids) == {base, "base", "lora", "lora2"}
    assert server["spec"].adapters.keys() == {"lora", "lora2"}


@pytest.mark.parametrize("model", ["base", "lora", "lora2"])
def test_greedy_chat_matches_direct_generate(client, refs, model):
    for key in ("a", "c"):
        text, finish, usage = chat(client, model, MSGS[key], max_tokens=12)
        exp_text, exp_finish, n = direct(refs, model, MSGS[key], 12)
        assert (text, finish, usage.completion_tokens) == (exp_text, exp_finish, n)
        assert n >= 4 and text  # a real comparison, not an immediate EOS
        assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + n


def test_adapters_differ_and_base_name_alias(client, server, refs):
    outs = {m: chat(client, m, MSGS["b"], max_tokens=16)[0] for m in ("base", "lora", "lora2")}
    print(outs)
    assert len(set(outs.values())) == 3, outs
    assert chat(client, server["spec"].base_name, MSGS["b"], max_tokens=16)[0] == outs["base"]


def test_concurrent_mixed_requests_equal_solo_answers(client, server, refs):
    jobs = [(m, k, mt) for m, k, mt in [("base", "a", 10), ("lora", "b", 7), ("lora2", "c", 12), ("base", "d", 5),
                                         ("lora2", "a", 9), ("lora", "c", 11), ("base", "b", 12), ("lora2", "d", 6)]]
    expected = [direct(refs, m, MSGS[k], mt) for m, k, mt in jobs]
    before = server["engine"].metrics.batch_sum
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        m, k, mt = jobs[i]
        barrier.wait(timeout=30)
        t, f, u = chat(client, m, MSGS[k], max_tokens=mt)
        results[i] = (t, f, u.completion_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected
    met = server["engine"].metrics
    assert met.batch_sum - before == len(jobs)
    # batching happened: fewer decode batches than requests, adapters mixed in one batch
    assert sum(met.batch_counts[1:]) > 0
    assert met.counters["lmladder_mixed_adapter_batches_total"] > 0


def test_lru_of_one_adapter_evicts_and_reloads(run_dir, tiny_dir, refs):
    """Engine driven directly (no HTTP): LRU of 1, rows for lora / lora2 / base in one cycle."""
    from lmladder.serving import cli as serve
    from lmladder.models import load_causal_lm
    from lmladder.serving.api import Metrics
    from lmladder.serving.engine import Engine, Job, Params, Row

    out, a2 = run_dir
    model, tok, _ = load_causal_lm(str(tiny_dir))
    spec = serve.resolve_target(str(out), None, [f"lora2={a2}"])
    eng = Engine(model, tok, spec.adapters, max_adapters=1, batch_size=8, metrics=Metrics())
    order = ["lora", "lora2", None, "lora", "lora2"]
    ids = tok(tok.apply_chat_template(MSGS["a"], tokenize=False, add_generation_prompt=True),
              add_special_tokens=False).input_ids
    expected = {a: direct(refs, a or "base", MSGS["a"], 10)[:2] for a in set(order)}

    def make():
        return [Job(a, [Row(list(ids), Params(max_tokens=10, temperature=0))], lambda ev: None) for a in order]

    one_by_one = make()
    for j in one_by_one:  # one cycle each: forces load / evict / reload
        eng.run_jobs([j])
    together = make()
    eng.run_jobs(together)  # one cycle: 3 chunks (at most 1 adapter each)
    for j, a in zip(one_by_one + together, order + order):
        assert (j.rows[0].text, j.rows[0].finish_reason) == expected[a]
    assert eng.metrics.counters["lmladder_adapter_evictions_total"] >= 3 and len(eng.loaded) == 1


def test_streaming_concatenation_equals_non_streamed(client):
    for model, msgs, kw in (("lora2", MSGS["c"], {}), ("base", MSGS["a"], {"stream_options": {"include_usage": True}})):
        full, finish, usage = chat(client, model, msgs, max_tokens=20)
        stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0,
                                                stream=True, **kw)
        parts, reasons, usages = [], [], []
        for ch in stream:
            if ch.usage:
                usages.append(ch.usage)
            for c in ch.choices:
                parts.append(c.delta.content or "")
                reasons.append(c.finish_reason)
        assert "".join(parts) == full
        assert reasons[-1] == finish and len([r for r in reasons if r]) == 1
        assert len(parts) > 2  # really streamed, token by token
        if kw:
            assert usages[-1].completion_tokens == usage.completion_tokens


def test_completions_streaming_raw_sse(server):
    body = {"model": "lora", "prompt": "hello", "max_tokens": 8, "temperature": 0}
    full = _http(server, "POST", "/v1/completions", json=body).json()["choices"][0]["text"]
    with httpx.stream("POST", server["url"] + "/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]" and all(l.startswith("data: ") for l in lines)
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full


def _pick_stop(text):
    for i in range(3, len(text) - 2):
        s = text[i : i + 2]
        if "\ufffd" not in s and s.strip():
            return s
    pytest.skip("no usable stop string in the sample output")


def test_stop_strings_cut_output(client, refs):
    full, _, _ = direct(refs, "lora2", MSGS["a"], 24)
    stop = _pick_stop(full)
    expected = full[: full.find(stop)]
    text, finish, _ = chat(client, "lora2", MSGS["a"], max_tokens=24, stop=[stop, "never-there"])
    assert (text, finish) == (expected, "stop")
    stream = client.chat.completions.create(model="lora2", messages=MSGS["a"], max_tokens=24, temperature=0,
                                            stop=stop, stream=True)
    parts, reasons = [], []
    for ch in stream:
        for c in ch.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(parts) == expected and reasons[-1] == "stop"


def test_max_tokens_length_and_sampling(client, refs):
    text, finish, usage = chat(client, "base", MSGS["c"], max_tokens=3)
    exp = direct(refs, "base", MSGS["c"], 3)
    assert exp[1] == "length"  # precondition: no EOS in the first 3 tokens of this prompt
    assert (text, finish, usage.completion_tokens) == exp
    # sampling with a seed is reproducible; top_p tiny = greedy
    kw = dict(model="lora", messages=MSGS["b"], max_tokens=8, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    greedy = chat(client, "lora", MSGS["b"], max_tokens=8)[0]
    assert client.chat.completions.create(**{**kw, "top_p": 1e-6}).choices[0].message.content == greedy


def test_echo_logprobs_scoring_matches_log_softmax(client, refs, server):
    models, tok = refs
    prompt = "Input: a great film\nLabel: positive"
    r = client.completions.create(model="lora", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    ch = r.choices[0]
    assert ch.text == prompt and r.usage.completion_tokens == 0
    lp = ch.logprobs
    ids = tok(prompt).input_ids
    with torch.no_grad():
        logits = models["lora"](input_ids=torch.tensor([ids])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    exp = [None] + [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(exp[1:], abs=1e-4)
    assert "".join(lp.tokens) == prompt
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    assert lp.top_logprobs[0] is None and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert max(lp.top_logprobs[1].values()) == pytest.approx(ref[0].max().item(), abs=1e-4)
    # batch of prompts (label scoring), base model differs from the adapter
    r2 = client.completions.create(model="base", prompt=[prompt, "Input: x\nLabel: negative"], echo=True,
                                   logprobs=0, max_tokens=0)
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].logprobs.token_logprobs[1:] != pytest.approx(exp[1:], abs=1e-6)
    # scoring chunks are capped by logits memory: a 1-byte budget scores row by row, same numbers
    engine = server["engine"]
    budget, engine.logits_budget = engine.logits_budget, 1
    try:
        r3 = client.completions.create(model="base", prompt=[prompt, "Input: x\nLabel: negative"], echo=True,
                                       logprobs=0, max_tokens=0)
    finally:
        engine.logits_budget = budget
    for c2, c3 in zip(r2.choices, r3.choices):
        assert c3.logprobs.token_logprobs[1:] == pytest.approx(c2.logprobs.token_logprobs[1:], abs=1e-5)


def test_json_schema_rejected_with_clear_400(server):
    body = {"model": "base", "messages": MSGS["a"],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}
    r = _http(server, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert "not supported yet" in err["message"] and "constrained" in err["message"]
    assert err["param"] == "response_format"


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/v1/chat/completions", {"model": "nope", "messages": MSGS["a"]}, 404),
        ("/v1/chat/completions", {"model": "../x", "messages": MSGS["a"]}, 400),
        ("/v1/chat/completions", {"model": "/etc", "messages": MSGS["a"]}, 400),
        ("/v1/chat/completions", {"model": "../../etc/passwd", "messages": MSGS["a"]}, 400),
        ("/v1/completions", {"model": "lora/../../x", "prompt": "a"}, 400),
        ("/v1/chat/completions", {"model": "base", "messages": MSGS["a"], "max_tokens": LIMIT + 1}, 400),
        ("/v1/chat/completions", {"model": "base", "messages": MSGS["a"], "max_tokens": -1}, 400),
        ("/v1/completions", {"model": "base", "prompt": "a", "max_tokens": -5}, 400),
        ("/v1/chat/completions", {"model": "base"}, 400),
        ("/v1/chat/completions", {"model": "base", "messages": []}, 400),
        ("/v1/chat/completions", {"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("/v1/chat/completions", {"model": "base", "messages": MSGS["a"], "temperature": "hot"}, 400),
        ("/v1/chat/completions", {"messages": MSGS["a"]}, 400),
        ("/v1/completions", {"model": "base"}, 400),
        ("/v1/completions", {"model": "base", "prompt": [10**9]}, 400),
        ("/v1/completions", {"model": "base", "prompt": "a", "logprobs": 99}, 400),
        ("/v1/chat/completions", {"model": "base", "messages": MSGS["a"], "tools": [{"type": "function"}]}, 400),
        ("/v1/nothing", {}, 404),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(server, path, body, status):
    r = _http(server, "POST", path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_invalid_json_and_oversize_bodies(server):
    for data, status in ((b"{not json", 400), (b"[1, 2]", 400), (b"x" * (BODY_LIMIT + 1), 413)):
        r = _http(server, "POST", "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == status and "error" in r.json()
    # chunked upload (no Content-Length) is capped while reading
    def gen():
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    r = _http(server, "POST", "/v1/completions", content=gen())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_auth_health_and_metrics(server):
    assert _http(server, "GET", "/v1/models", key=None).status_code == 401
    r = _http(server, "GET", "/v1/models", key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _http(server, "POST", "/v1/chat/completions", key=None, json={}).status_code == 401
    assert _http(server, "GET", "/v1/models").status_code == 200
    h = _http(server, "GET", "/health", key=None)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert _http(server, "GET", "/metrics", key=None).status_code == 401
    m = _http(server, "GET", "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'lmladder_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'lmladder_requests_total{endpoint="/v1/models",status="401"}' in text
    gen = [l for l in text.splitlines() if l.startswith("lmladder_generated_tokens_total ")]
    assert gen and float(gen[0].split()[1]) > 0
    assert "lmladder_batch_size_bucket" in text and 'quantile="0.95"' in text
    assert "lmladder_adapter_evictions_total" in text


def test_internal_error_is_500_json_and_server_keeps_serving(server, monkeypatch, client):
    engine = server["engine"]

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engine, "generate_group", boom)
    r = _http(server, "POST", "/v1/chat/completions", json={"model": "lora", "messages": MSGS["a"], "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = _http(server, "POST", "/v1/chat/completions",
              json={"model": "lora", "messages": MSGS["a"], "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and '"error"' in r.text and r.text.rstrip().endswith("data: [DONE]")
    monkeypatch.undo()
    assert chat(client, "lora", MSGS["a"], max_tokens=4)[0] is not None
    assert _http(server, "GET", "/health").json()["status"] == "ok"


def test_resolve_target_and_cli_errors(run_dir, tiny_dir, tmp_path):
    from lmladder.serving import cli as serve
    from lmladder.cli import main
    from lmladder.errors import LadderError

    out, a2 = run_dir
    plain = serve.resolve_target(str(tiny_dir))
    assert plain.adapters == {} and plain.base_spec == str(tiny_dir) and "/" not in plain.base_name
    assert serve.resolve_target("smollm2-135m").base_name == "smollm2-135m"
    for target, extra in ((str(a2), []), (str(out), ["bad"]), (str(out), ["../x=" + str(a2)]),
                          (str(out), [f"y={tmp_path}"]), (str(out), [f"lora={a2}"]), (None, [])):
        with pytest.raises(LadderError):
            serve.resolve_target(target, None, extra)
    assert main(["serve", str(out), "--adapter", "nope"]) == 2
    assert main(["serve", str(out), "--batch-size", "0"]) == 2


def test_client_disconnect_cancels_queued_generation(server, monkeypatch):
    engine = server["engine"]
    orig = engine.generate_group

    def slow(rows):
        time.sleep(2.5)
        return orig(rows)

    monkeypatch.setattr(engine, "generate_group", slow)
    before = engine.metrics.counters["lmladder_generated_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        _http(server, "POST", "/v1/chat/completions", timeout=0.5,
              json={"model": "base", "messages": MSGS["a"], "max_tokens": 32, "temperature": 0})
    t0 = time.time()
    while time.time() - t0 < 10 and engine.metrics.requests[("/v1/chat/completions", 499)] == 0:
        time.sleep(0.2)
    assert engine.metrics.requests[("/v1/chat/completions", 499)] >= 1
    time.sleep(3)  # the worker wakes up and skips the cancelled rows
    assert engine.metrics.counters["lmladder_generated_tokens_total"] == before
