"""lmladder serve under hostile input: every case a hostile tester found is a regression test.

One in-process server (real uvicorn on 127.0.0.1, a background thread) over the tiny random
model with an API key and two LoRA adapters made here with PEFT (``ad``, and ``gone``, whose
safetensors file is deleted by one test). Requests are built by hand (raw bytes where JSON
itself cannot say it: NaN, Infinity, 10**400, lone surrogates, deep nesting).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import socket
import threading
import time

import httpx
import pytest

KEY = "hostile-key"
LIMIT = 32
BODY_LIMIT = 64 * 1024
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
M = [{"role": "user", "content": "hello there"}]


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two LoRA adapters (safetensors) over the tiny model, with non-zero lora_B."""
    from peft import LoraConfig, get_peft_model

    from conftest import make_model, make_tokenizer

    d = tmp_path_factory.mktemp("hostile-adapters")
    m = get_peft_model(make_model(len(make_tokenizer()), seed=1),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    m.save_pretrained(d / "ad")
    shutil.copytree(d / "ad", d / "gone")
    assert (d / "ad" / "adapter_model.safetensors").is_file()
    return d


@pytest.fixture(scope="module")
def srv(tiny_dir, adapters):
    import uvicorn

    from lmladder.serving import cli as serve

    spec = serve.ServeSpec(str(tiny_dir), "tiny", {"ad": str(adapters / "ad"), "gone": str(adapters / "gone")})
    app, engine = serve.build(spec, batch_size=16, batch_wait_ms=20, max_tokens_limit=LIMIT,
                              max_body_bytes=BODY_LIMIT, api_key=KEY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started and time.time() - t0 < 20:
        time.sleep(0.05)
    assert server.started
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "engine": engine}
    server.should_exit = True
    th.join(10)
    engine.stop()


def req(srv, path, body=None, *, raw: bytes | str | None = None, method="POST", key=KEY, ctype="application/json",
        timeout=60, **kw):
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if ctype is not None:
        headers["Content-Type"] = ctype
    content = raw.encode() if isinstance(raw, str) else raw
    if body is not None:
        content = json.dumps(body).encode()
    return httpx.request(method, srv["url"] + path, content=content, headers=headers, timeout=timeout, **kw)


def api_error(r, status=None):
    """The OpenAI error shape; returns the error object."""
    if status is None:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    else:
        assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    return err


def chat_body(model="tiny", content="hello there", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0,
            **kw}


def answer(r):
    assert r.status_code == 200, r.text[:300]
    d = r.json()
    c = d["choices"][0]
    text = c["message"]["content"] if "message" in c else c["text"]
    return text, c["finish_reason"], d["usage"]["completion_tokens"]


def raw_with(body: dict, key: str, literal: str) -> str:
    """JSON text of ``body`` with the value of top-level ``key`` replaced by ``literal`` verbatim."""
    return json.dumps({**body, key: "@@"}).replace('"@@"', literal)


# ---- 1. non-finite numbers and out-of-range integers -------------------------------------------
@pytest.mark.parametrize("path,key,literal,param", [
    (CHAT, "temperature", "NaN", "temperature"),
    (CHAT, "temperature", "Infinity", "temperature"),
    (CHAT, "temperature", "-Infinity", "temperature"),
    (CHAT, "temperature", "1e999", "temperature"),  # parses to inf
    (CHAT, "top_p", "NaN", "top_p"),
    (CHAT, "top_p", "Infinity", "top_p"),
    (CHAT, "presence_penalty", "-Infinity", "presence_penalty"),
    (CHAT, "frequency_penalty", "NaN", "frequency_penalty"),
    (CHAT, "max_tokens", "NaN", "max_tokens"),
    (CHAT, "n", "Infinity", "n"),
    (CHAT, "seed", "NaN", "seed"),
    (CHAT, "messages", '[{"role": "user", "content": NaN}]', "messages[0].content"),
    (CHAT, "metadata", '{"a": [1, -Infinity]}', "metadata.a[1]"),  # even where the server never looks
    (COMP, "temperature", "NaN", "temperature"),
    (COMP, "logprobs", "Infinity", "logprobs"),
    (COMP, "prompt", "[1, 2, NaN]", "prompt[2]"),
])
def test_non_finite_numbers_are_a_400_naming_the_param(srv, path, key, literal, param):
    body = chat_body() if path == CHAT else {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    err = api_error(req(srv, path, raw=raw_with(body, key, literal)), 400)
    assert err["param"] == param and "finite" in err["message"], err


@pytest.mark.parametrize("path,key,literal,param", [
    (CHAT, "max_tokens", "1" + "0" * 400, "max_tokens"),
    (CHAT, "max_tokens", "1e308", "max_tokens"),
    (CHAT, "max_completion_tokens", "1" + "0" * 400, "max_completion_tokens"),
    (CHAT, "n", "1" + "0" * 400, "n"),
    (CHAT, "seed", "1" + "0" * 400, "seed"),
    (CHAT, "seed", "-1", "seed"),
    (CHAT, "temperature", "1" + "0" * 400, "temperature"),
    (CHAT, "top_p", "-1" + "0" * 400, "top_p"),
    (CHAT, "presence_penalty", "1" + "0" * 400, "presence_penalty"),
    (CHAT, "top_logprobs", "1" + "0" * 30, "top_logprobs"),
    (CHAT, "max_tokens", "2.5", "max_tokens"),
    (COMP, "logprobs", "1" + "0" * 400, "logprobs"),
    (COMP, "max_tokens", "-1" + "0" * 400, "max_tokens"),
    (COMP, "prompt", "[1, 2, 1" + "0" * 400 + "]", "prompt"),
    (COMP, "prompt", "[[1, 2], [3, -1]]", "prompt"),
    (COMP, "prompt", "[1, 2.0]", "prompt"),
    (COMP, "prompt", "[true, 2]", "prompt"),
])
def test_out_of_range_integers_are_a_400_naming_the_param(srv, path, key, literal, param):
    body = chat_body(logprobs=True) if path == CHAT else {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    err = api_error(req(srv, path, raw=raw_with(body, key, literal)), 400)
    assert err["param"] == param, err


def test_integer_too_long_to_parse_is_a_400(srv):
    err = api_error(req(srv, CHAT, raw=raw_with(chat_body(), "max_tokens", "9" * 5000)), 400)
    assert err["code"] == "invalid_json"


def _solo(srv, bodies):
    return [answer(req(srv, CHAT, b)) for b in bodies]


def _concurrently(srv, bodies, path=CHAT):
    out: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def go(i):
        barrier.wait(timeout=30)
        b = bodies[i]
        out[i] = req(srv, path, raw=b) if isinstance(b, str) else req(srv, path, b)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


VALID = [chat_body(content=c, max_tokens=mt) for c, mt in
         (("hello there", 10), ("a great movie", 7), ("why is the sky blue", 12), ("x", 5), ("tell me more", 9),
          ("what now", 11), ("ok", 6))]


def test_nan_temperature_batched_with_seven_valid_requests(srv):
    """The report: NaN batched with 7 valid requests gave 5 of them a 500. Now NaN is a 400 and
    never reaches the batch; the 7 get their solo answers."""
    solo = _solo(srv, VALID)
    bad = raw_with(chat_body(content="poison"), "temperature", "NaN")
    rs = _concurrently(srv, VALID[:3] + [bad] + VALID[3:])
    assert api_error(rs[3], 400)["param"] == "temperature"
    assert [answer(r) for r in rs[:3] + rs[4:]] == solo


def test_tiny_temperature_is_greedy_not_a_500(srv):
    greedy = answer(req(srv, CHAT, chat_body()))
    for t in (1e-300, 5e-324, 1e-6):
        assert answer(req(srv, CHAT, chat_body(temperature=t, seed=3))) == greedy


# ---- 2. one bad row never fails another request --------------------------------------------------
@pytest.fixture
def one_batch(srv, monkeypatch):
    """Make the worker gather for 1 s (8 concurrent requests land in one decode) and record
    each generate_group call's jobs."""
    engine = srv["engine"]
    monkeypatch.setattr(engine, "batch_wait", 1.0)
    calls: list[int] = []
    orig = engine.generate_group

    def rec(rows):
        calls.append(len({id(r.job) for r in rows}))
        return orig(rows)

    monkeypatch.setattr(engine, "generate_group", rec)
    return calls


def _is_poisoned(engine, rows):
    return [i for i, r in enumerate(rows) if "POISON" in engine.tok.decode(r.prompt_ids)]


MIXED = [chat_body(content="hello there", max_tokens=10),
         chat_body(model="ad", content="a great movie", max_tokens=12),
         chat_body(content="why is the sky blue", max_tokens=12, temperature=1.0, seed=11),  # seeded sampling
         chat_body(model="ad", content="x", max_tokens=5),
         chat_body(content="tell me more", max_tokens=9, stream=True),
         chat_body(model="ad", content="what now", max_tokens=11, stream=True),
         chat_body(content="ok", max_tokens=3)]


def _stream_answer(r):
    assert r.status_code == 200, r.text[:300]
    lines = [l for l in r.text.splitlines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert all("error" not in c for c in chunks), chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]


def _check_mixed(rs, solo):
    for b, r, s in zip(MIXED, rs, solo):
        if b.get("stream"):
            assert _stream_answer(r) == s[:2]
        else:
            assert answer(r) == s


def test_a_row_that_raises_mid_batch_fails_alone(srv, one_batch, monkeypatch):
    """A forward pass that raises on the 4th step of a batch holding the poisoned request: the
    chunk is run again one request at a time; the 7 others (base and adapter, greedy, seeded
    sampling, streams that had already sent text) get exactly their solo answers."""
    engine = srv["engine"]
    solo = _solo(srv, [{**b, "stream": False} for b in MIXED])
    one_batch.clear()
    orig = engine._decode

    class Proxy:
        def __init__(self, m, poisoned, alone):
            self.m, self.poisoned, self.alone, self.calls = m, poisoned, alone, 0

        def __call__(self, **kw):
            self.calls += 1
            if self.poisoned and (self.calls == 4 or self.alone):
                raise RuntimeError("poisoned row")
            return self.m(**kw)

    def decode(model, rows, extra):
        return orig(Proxy(model, bool(_is_poisoned(engine, rows)), len(rows) == 1), rows, extra)

    monkeypatch.setattr(engine, "_decode", decode)
    rs = _concurrently(srv, MIXED[:4] + [chat_body(content="POISON", max_tokens=12)] + MIXED[4:])
    assert one_batch[0] == 8, one_batch  # all 8 were in the first decode
    err = api_error(rs[4], 500)
    assert err["type"] == "server_error" and "poisoned row" in err["message"]
    _check_mixed(rs[:4] + rs[5:], solo)


def test_non_finite_logits_fail_only_their_row(srv, one_batch, monkeypatch):
    """NaN logits for one row (no exception): that row's request fails, the batch goes on."""
    engine = srv["engine"]
    solo = _solo(srv, [{**b, "stream": False} for b in MIXED])
    one_batch.clear()
    orig = engine._decode

    class Proxy:
        def __init__(self, m, idx):
            self.m, self.idx = m, idx

        def __call__(self, **kw):
            out = self.m(**kw)
            for i in self.idx:
                out.logits[i] = float("nan")
            return out

    monkeypatch.setattr(engine, "_decode", lambda model, rows, extra: orig(
        Proxy(model, _is_poisoned(engine, rows)), rows, extra))
    rs = _concurrently(srv, MIXED[:4] + [chat_body(content="POISON", max_tokens=12)] + MIXED[4:])
    assert one_batch == [8]  # one decode, nothing retried
    assert "non-finite logits" in api_error(rs[4], 500)["message"]
    _check_mixed(rs[:4] + rs[5:], solo)


def test_engine_nan_temperature_row_fails_alone(tiny):
    """Engine level (no HTTP): a job with temperature NaN in one run_jobs with 7 greedy jobs."""
    from lmladder.serving.engine import Engine, Job, Params, Row, RowFailed

    model, tok = tiny
    eng = Engine(model, tok, {}, batch_size=16)
    prompts = [tok(p).input_ids for p in ("hello", "a movie", "sky", "x", "more", "now", "ok", "poison")]
    events: dict[int, list] = {i: [] for i in range(8)}

    def jobs(params_last):
        return [Job(None, [Row(list(p), params_last if i == 7 else Params(max_tokens=6, temperature=0))],
                    lambda ev, i=i: events[i].append(ev)) for i, p in enumerate(prompts)]

    solo = []
    for j in jobs(Params(max_tokens=6, temperature=0))[:7]:
        eng.run_jobs([j])
        solo.append(j.rows[0].text)
    for i in events:
        events[i].clear()
    batch = jobs(Params(max_tokens=6, temperature=float("nan")))
    eng.run_jobs(batch)
    assert [j.rows[0].text for j in batch[:7]] == solo
    assert all(events[i][-1][0] == "done" for i in range(7))
    assert [e[0] for e in events[7]] == ["error"] and isinstance(events[7][0][1], RowFailed)


def test_missing_adapter_weights_fail_only_that_adapters_requests(srv, adapters, one_batch):
    """An adapter whose safetensors vanished after startup: its request fails (never a pickle
    fallback), the base and other-adapter requests in the same batch succeed."""
    (adapters / "gone" / "adapter_model.safetensors").unlink()
    bodies = [chat_body(content="hello there"), chat_body(model="ad", content="hello there"),
              chat_body(model="gone", content="hello there"), chat_body(content="x", max_tokens=4)]
    solo = _solo(srv, [bodies[0], bodies[1], bodies[3]])
    one_batch.clear()
    rs = _concurrently(srv, bodies)
    assert one_batch[0] == 4  # one mixed-adapter decode of all four, then one request at a time
    msg = api_error(rs[2], 500)["message"]
    assert "adapter_model.safetensors is missing" in msg and str(adapters) not in msg  # no server path
    assert [answer(rs[i]) for i in (0, 1, 3)] == solo


# ---- 3. structure: nesting, surrogates, size, content type ----------------------------------------
def test_nesting_depth(srv):
    def nested(k):
        return json.dumps(chat_body(metadata="@@")).replace('"@@"', "[" * k + "]" * k)

    assert req(srv, CHAT, raw=nested(63)).status_code == 200  # body + 63 lists = 64 levels
    for k in (64, 500, 30_000):  # 30,000: past the parser's recursion limit
        err = api_error(req(srv, CHAT, raw=nested(k)), 400)
        assert "nested more than 64 levels" in err["message"] and err["code"] == "invalid_json"
    err = api_error(req(srv, CHAT, raw='{"a":' * 70 + "1" + "}" * 70), 400)
    assert "nested" in err["message"]


@pytest.mark.parametrize("path,raw,param", [
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "\\uDFFF"}]}', "messages[0].content"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}', "stop[0]"),
    (CHAT, '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}', "messages[0]"),
    (COMP, '{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
    (COMP, '{"model": "tiny", "prompt": ["ok", "x\\udbff"]}', "prompt[1]"),
])
def test_lone_surrogates_are_a_400(srv, path, raw, param):
    err = api_error(req(srv, path, raw=raw), 400)
    assert "surrogate" in err["message"] and err["param"] == param, err


def test_valid_surrogate_pair_and_bad_utf8(srv):
    r = req(srv, CHAT, raw='{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], '
                           '"max_tokens": 3}')
    assert r.status_code == 200  # a pair is one character, not a lone surrogate
    for raw in (b'{"model": "tiny", "prompt": "\xed\xa0\x80"}', b'{"model": "tiny", "prompt": "\xff"}'):
        assert "UTF-8" in api_error(req(srv, COMP, raw=raw), 400)["message"]


def test_json_response_never_fails_on_a_surrogate():
    from lmladder.serving.api import json_response

    r = json_response({"error": {"message": "bad \ud800"}}, 400)
    assert json.loads(r.body) == {"error": {"message": "bad \ud800"}} and r.body.isascii()


@pytest.mark.parametrize("ctype,status", [
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    ("application/json; charset=latin-1", 415), ("", 415), ("application/jsonx", 415),
    ("application/json", 200), ("application/json; charset=utf-8", 200), ("Application/JSON; charset=UTF-8", 200),
    (None, 200),  # no Content-Type at all: read as JSON (documented)
])
def test_content_type(srv, ctype, status):
    for path, body in ((CHAT, chat_body(max_tokens=2)), (COMP, {"model": "tiny", "prompt": "hi", "max_tokens": 2})):
        r = req(srv, path, body, ctype=ctype)
        if status == 200:
            assert r.status_code == 200, r.text
        else:
            assert api_error(r, 415)["code"] == "unsupported_media_type"


def test_body_size_limit(srv):
    big = json.dumps(chat_body(content="x" * BODY_LIMIT))
    assert api_error(req(srv, CHAT, raw=big), 413)["code"] == "request_too_large"
    r = req(srv, COMP, raw=(b" " * 1024 for _ in range(BODY_LIMIT // 1024 + 2)))  # chunked, no length
    assert api_error(r, 413)["code"] == "request_too_large"


# ---- 4. adapters: safetensors only, checked at startup ---------------------------------------------
def _bin_only(d):
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return d


def test_bin_only_adapter_refused_at_startup(tiny_dir, tmp_path, adapters, capsys):
    from lmladder.serving import cli as serve
    from lmladder.cli import main
    from lmladder.errors import LadderError

    binad = _bin_only(tmp_path / "binad")
    with pytest.raises(LadderError, match="pickle weights.*safetensors"):
        serve.resolve_target(str(tiny_dir), None, [f"x={binad}"])
    broken = tmp_path / "broken"
    shutil.copytree(adapters / "ad", broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(LadderError, match="adapter_config.json"):
        serve.resolve_target(str(tiny_dir), None, [f"x={broken}"])
    capsys.readouterr()
    assert main(["serve", str(tiny_dir), "--adapter", f"x={binad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pickle weights" in err and len(err.splitlines()) == 1, err  # one line, no traceback


def test_run_folder_with_bin_only_adapter_refused_at_startup(tiny_dir, tmp_path, adapters, capsys):
    from lmladder.serving import cli as serve
    from lmladder.cli import main
    from lmladder.errors import LadderError

    run = tmp_path / "run"
    (run / "rungs").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {tiny_dir}\n")
    shutil.copytree(adapters / "ad", run / "rungs/lora/adapter")
    assert serve.resolve_target(str(run), str(tiny_dir)).adapters.keys() == {"lora"}
    _bin_only(run / "rungs/ia3/adapter")
    with pytest.raises(LadderError, match=r"rungs/ia3/adapter: holds only pickle weights"):
        serve.resolve_target(str(run), str(tiny_dir))
    capsys.readouterr()
    assert main(["serve", str(run), "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "rungs/ia3/adapter" in err and len(err.splitlines()) == 1, err


def test_pickle_only_base_model_refused(tmp_path, tiny_dir, capsys):
    """Safetensors-only model loading held: a folder with only pytorch_model.bin is refused."""
    from lmladder.cli import main

    d = tmp_path / "binmodel"
    d.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    capsys.readouterr()
    assert main(["serve", str(d)]) == 2
    assert "pickle" in capsys.readouterr().err


# ---- 5. client disconnects: one INFO line, no traceback ----------------------------------------------
def _wait_for(caplog, text, timeout=10.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        hits = [r for r in caplog.records if r.name == "lmladder.serving.cli" and text in r.getMessage()]
        if hits:
            return hits
        time.sleep(0.05)
    return []


def _no_errors(caplog):
    bad = [r for r in caplog.records if r.name == "lmladder.serving.cli" and (r.levelno >= logging.WARNING or r.exc_info)]
    assert not bad, [r.getMessage() for r in bad]


def test_disconnect_while_sending_body_is_one_info_line(srv, caplog):
    caplog.set_level(logging.INFO, logger="lmladder.serving.cli")
    with socket.create_connection(("127.0.0.1", srv["port"])) as c:
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        time.sleep(0.3)
    hits = _wait_for(caplog, "client disconnected")
    assert len(hits) == 1 and hits[0].levelno == logging.INFO and not hits[0].exc_info
    assert "request body" in hits[0].getMessage()
    _no_errors(caplog)


def test_disconnect_while_waiting_is_one_info_line(srv, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="lmladder.serving.cli")
    engine = srv["engine"]
    orig = engine.generate_group
    monkeypatch.setattr(engine, "generate_group", lambda rows: (time.sleep(1.5), orig(rows))[1])
    with pytest.raises(httpx.ReadTimeout):
        req(srv, CHAT, chat_body(), timeout=0.3)
    hits = _wait_for(caplog, "client disconnected")
    assert len(hits) == 1 and hits[0].levelno == logging.INFO and "cancelled" in hits[0].getMessage()
    time.sleep(1.6)  # let the worker finish the (cancelled) batch
    _no_errors(caplog)


def test_stream_disconnect_is_one_info_line(srv, caplog):
    caplog.set_level(logging.INFO, logger="lmladder.serving.cli")
    body = json.dumps(chat_body(max_tokens=LIMIT, stream=True)).encode()
    with socket.create_connection(("127.0.0.1", srv["port"])) as c:
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert c.recv(64).startswith(b"HTTP/1.1 200")
    hits = _wait_for(caplog, "client disconnected")
    assert len(hits) == 1 and hits[0].levelno == logging.INFO and "stream" in hits[0].getMessage()
    _no_errors(caplog)


# ---- 6. what held: auth on every route but /health, localhost default ----------------------------------
def test_auth_on_every_route_but_health(srv):
    routes = [("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", CHAT), ("POST", COMP), ("GET", "/metrics"),
              ("GET", "/v1/nothing"), ("GET", "/nothing"), ("GET", "/v1"), ("PUT", CHAT)]
    for method, path in routes:
        for key in (None, "wrong", KEY[:-1]):
            r = req(srv, path, method=method, key=key, raw=b"{}" if method == "POST" else None)
            assert api_error(r, 401)["code"] == "invalid_api_key", (method, path)
    r = req(srv, "/health", method="GET", key=None)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert req(srv, "/v1/models", method="GET").status_code == 200


def test_localhost_default_and_loud_warning_elsewhere(tiny_dir, monkeypatch, caplog):
    import uvicorn

    from lmladder.serving import cli as serve

    ran = []

    class FakeEngine:
        def stop(self):
            pass

    monkeypatch.setattr(serve, "build", lambda spec, **kw: (object(), FakeEngine()))
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: ran.append(host))
    monkeypatch.delenv("LMLADDER_API_KEY", raising=False)
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    caplog.set_level(logging.INFO, logger="lmladder.serving.cli")
    assert serve.main(p.parse_args([str(tiny_dir)])) == 0
    assert ran == ["127.0.0.1"] and "WARNING: binding" not in caplog.text
    for host, key, no_key_warned in (("0.0.0.0", [], True), ("::", ["--api-key", "k"], False)):
        caplog.clear()
        assert serve.main(p.parse_args([str(tiny_dir), "--host", host, *key])) == 0
        assert ran[-1] == host
        assert f"WARNING: binding {host}" in caplog.text and "reachable from other machines" in caplog.text
        assert ("NO API KEY" in caplog.text) == no_key_warned


# ---- 7. the barrage -----------------------------------------------------------------------------------
def _count_5xx(srv) -> float:
    text = req(srv, "/metrics", method="GET").text
    return sum(float(l.split()[-1]) for l in text.splitlines()
               if l.startswith("lmladder_requests_total") and 'status="5' in l)


def test_barrage_of_malformed_requests(srv):
    """200 malformed requests of ~23 kinds (bench/serve_barrage.py's seeded generator): every
    answer a 4xx OpenAI-shaped JSON error, no 5xx; the same greedy answers afterwards."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from serve_barrage import hostile_cases

    before = [answer(req(srv, CHAT, chat_body(model=m))) for m in ("tiny", "ad")]
    fivexx = _count_5xx(srv)
    seen: dict[str, set] = {}
    with httpx.Client(base_url=srv["url"], timeout=30) as c:
        for kind, method, path, headers, body, auth in hostile_cases(random.Random(1234), 200, model="tiny",
                                                                     max_tokens_limit=LIMIT, body_limit=BODY_LIMIT):
            if auth:
                headers = {**headers, "Authorization": f"Bearer {KEY}"}
            r = c.request(method, path, content=body, headers=headers)
            try:
                api_error(r)  # 4xx, JSON, OpenAI shape
            except AssertionError:
                raise AssertionError(f"{kind}: {method} {path} {body[:200]!r} -> {r.status_code} {r.text[:300]}")
            seen.setdefault(kind, set()).add(r.status_code)
    assert len(seen) >= 20, sorted(seen)  # (nearly) every kind drawn
    assert {400, 401, 404, 405, 413, 415} <= set().union(*seen.values())
    assert _count_5xx(srv) == fivexx
    assert [answer(req(srv, CHAT, chat_body(model=m))) for m in ("tiny", "ad")] == before
    assert req(srv, "/health", method="GET", key=None).json()["status"] == "ok"


def test_retried_sampled_stream_continues_the_text_already_sent(tiny, monkeypatch):
    """Engine level: an unseeded sampled stream whose batch fails after 3 tokens is retried
    alone; the tokens it had produced are replayed, so what the client was already sent
    stays a prefix of its final text."""
    import torch

    from lmladder.serving.engine import Engine, Job, Params, Row

    model, tok = tiny
    eng = Engine(model, tok, {}, batch_size=16)
    torch.manual_seed(0)
    sent: list[str] = []
    events: list = []

    def notify(ev):
        events.append(ev)
        if ev[0] == "delta":
            sent.append(ev[2])

    stream = Job(None, [Row(tok("hello").input_ids, Params(max_tokens=12, temperature=2.0))], notify, stream=True)
    other = Job(None, [Row(tok("POISON").input_ids, Params(max_tokens=12, temperature=0))], lambda ev: None)
    orig, state = eng._decode, {"calls": 0, "failed": False}

    class Proxy:
        def __init__(self, m):
            self.m = m

        def __call__(self, **kw):
            state["calls"] += 1
            if state["calls"] == 4 and not state["failed"]:
                state["failed"] = True
                state["sent_before"] = "".join(sent)
                raise RuntimeError("batch failure")
            return self.m(**kw)

    monkeypatch.setattr(eng, "_decode", lambda m, rows, extra: orig(Proxy(m), rows, extra))
    eng.run_jobs([stream, other])
    r = stream.rows[0]
    assert state["failed"] and state["sent_before"]  # text had been streamed before the failure
    assert events[-1][0] == "done" and r.text.startswith("".join(sent)) and "".join(sent) + r.text[r.sent:] == r.text
    assert r.text.startswith(state["sent_before"])
