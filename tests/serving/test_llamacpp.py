"""llama.cpp: lmladder's GGUF exports load in llama.cpp and answer as transformers does, and
``lmladder serve --engine llamacpp`` serves the same OpenAI-compatible API.

Skipped when llama-cpp-python is not installed (``pip install 'lmladder[llamacpp]'``; the
``dev`` extra that CI installs includes it).

* a tiny random Llama (a byte-level BPE tokenizer with a few merges: llama.cpp needs
  merges; an output head at std 1 so top-1 margins are far above float noise), exported by
  lmladder's GGUF writer (f32), loaded by llama-cpp-python's own ``Llama``: greedy tokens
  and the top-1 token / logit of 5 prompts equal transformers';
* a PEFT LoRA over it, written as a GGUF LoRA (export/gguf_lora.py) and applied by
  llama.cpp: logits equal PEFT's;
* the server (uvicorn, in a thread) with the llamacpp engine, base + a GGUF-LoRA adapter +
  a DoRA adapter (llama.cpp cannot apply DoRA: served merged): greedy answers, alone and
  concurrent with mixed adapters, equal transformers ``generate``; streaming, stop strings,
  max_tokens, seeded sampling, logprobs and echo scoring; /v1/predict says it needs the
  built-in engine;
* integration: the embedded SmolLM2 exported to GGUF f32, the same 5-prompt comparison.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'lmladder[llamacpp]')")

import httpx  # noqa: E402
import torch  # noqa: E402

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROMPTS = ["hello there", "Classify: a great movie", "the sky is", "x", "Why is the sky blue? Answer briefly."]
KEY = "k-llama"


def make_bpe_tokenizer():
    """Byte-level BPE with a few merges (a GGUF BPE vocabulary needs merges) and ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def make_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # logits of std ~8: top-1 margins far above float noise
        m.lm_head.weight.normal_(0, 1.0)
        for layer in m.model.layers:  # and attention / MLP that matter
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.up_proj):
                lin.weight.normal_(0, 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny model folder, its GGUF (f32, lmladder's writer), a LoRA and a DoRA adapter (PEFT),
    LMLADDER_CACHE pointed at a temporary folder."""
    from peft import LoraConfig, get_peft_model

    from lmladder.export.gguf_writer import write_gguf

    d = tmp_path_factory.mktemp("llamacpp")
    old_cache = os.environ.get("LMLADDER_CACHE")
    os.environ["LMLADDER_CACHE"] = str(d / "cache")
    tok = make_bpe_tokenizer()
    model = make_llama(len(tok))
    model.save_pretrained(d / "tiny", safe_serialization=True)
    tok.save_pretrained(d / "tiny")
    write_gguf(d / "tiny.gguf", model, tok, "f32", "tiny")
    adapters = {}
    for name, extra, seed in (("lora", {}, 1), ("dora", {"use_dora": True}, 2)):
        base = make_llama(len(tok))
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **extra))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(d / name, safe_serialization=True)
        adapters[name] = d / name
    yield {"dir": d, "tok": tok, "model": model, "gguf": d / "tiny.gguf", "adapters": adapters}
    if old_cache is None:
        os.environ.pop("LMLADDER_CACHE", None)
    else:
        os.environ["LMLADDER_CACHE"] = old_cache


def _ids(tok, text):
    return tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False).input_ids


def hf_greedy(model, ids, n, eos=()):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=list(eos) or None, pad_token_id=0)
    gen = out[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(gen) if t in eos), None)
    return gen if cut is None else gen[: cut + 1]


def compare_with_transformers(gguf_path, model, tok, n_new=12, lora_path=None):
    """5 prompts: greedy tokens of llama.cpp's Llama vs transformers, top-1 token and logit at
    the end of each prompt. Returns the largest top-1 logit difference."""
    # K and V in f32 (llama.cpp's default f16 cache moves logits by ~1e-3 relative): the GGUF itself is compared
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False,
                          lora_path=str(lora_path) if lora_path else None, type_k=0, type_v=0)
    worst = 0.0
    try:
        for text in PROMPTS:
            ids = _ids(tok, text)
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            llm.reset()
            llm.eval(ids)
            got = torch.tensor(llm.scores[len(ids) - 1])
            assert int(got.argmax()) == int(ref.argmax()), text
            worst = max(worst, abs(float(got.max()) - float(ref.max())))
            exp = hf_greedy(model, ids, n_new)
            toks = []
            for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
                toks.append(int(t))
                if len(toks) == n_new:
                    break
            assert toks == exp, text
    finally:
        llm.close()
    return worst


def test_lmladder_gguf_in_llamacpp_matches_transformers(env):
    worst = compare_with_transformers(env["gguf"], env["model"], env["tok"])
    assert worst < 1e-3, worst


def test_gguf_lora_in_llamacpp_matches_peft(env):
    from peft import PeftModel

    from lmladder.export.gguf_lora import write_gguf_lora

    model = env["model"]
    lora = env["dir"] / "lora.gguf"
    write_gguf_lora(lora, env["adapters"]["lora"], model.config, "lora")
    peft = PeftModel.from_pretrained(make_llama(len(env["tok"])), str(env["adapters"]["lora"])).eval()
    ids = _ids(env["tok"], PROMPTS[1])
    with torch.no_grad():  # the adapter changes the logits by far more than the tolerance
        assert (peft(input_ids=torch.tensor([ids])).logits - model(input_ids=torch.tensor([ids])).logits).abs().max() > 0.5
    worst = compare_with_transformers(env["gguf"], peft, env["tok"], lora_path=lora)
    assert worst < 1e-3, worst


# ---------------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(env):
    import uvicorn

    from lmladder.serving.cli import ServeSpec
    from lmladder.serving.engines import build_llamacpp

    spec = ServeSpec(str(env["dir"] / "tiny"), "tiny", {k: str(v) for k, v in env["adapters"].items()})
    app, engine, served = build_llamacpp(spec, gguf_dtype="f32", kv_cache="f32", batch_size=4, batch_wait_ms=30,
                                         ctx_size=1024, threads=2, max_tokens_limit=64, api_key=KEY)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started and time.time() - t0 < 20:
        time.sleep(0.05)
    assert srv.started
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "served": served}
    srv.should_exit = True
    th.join(10)
    engine.close()


@pytest.fixture(scope="module")
def refs(env):
    from peft import PeftModel

    tok = env["tok"]
    res = {"base": env["model"]}
    for name, path in env["adapters"].items():
        res[name] = PeftModel.from_pretrained(make_llama(len(tok)), str(path)).eval()
    return res


def _post(server, path, body, key=KEY):
    return httpx.post(server["url"] + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def direct(refs, tok, model, text, n):
    from lmladder.prompts import eos_token_ids

    eos = eos_token_ids(tok)
    gen = hf_greedy(refs[model], _ids(tok, text), n, eos)
    out = tok.decode([t for t in gen if t not in eos], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return out, ("stop" if gen and gen[-1] in eos else "length"), len(gen)


def chat(server, model, text, max_tokens=12, **kw):
    r = _post(server, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}],
                                               "max_tokens": max_tokens, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    b = r.json()
    return b["choices"][0]["message"]["content"], b["choices"][0]["finish_reason"], b["usage"]["completion_tokens"]


def test_adapters_served_as_gguf_lora_and_merged(server):
    ad = server["served"]["adapters"]
    assert ad["lora"]["kind"] == "lora" and ad["dora"]["kind"] == "merged" and "DoRA" in ad["dora"]["why"]
    r = httpx.get(server["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert {m["id"] for m in r.json()["data"]} == {"tiny", "base", "lora", "dora"}


@pytest.mark.parametrize("model", ["base", "lora", "dora"])
def test_greedy_chat_equals_transformers(server, refs, env, model):
    for text in PROMPTS[:3]:
        assert chat(server, model, text) == direct(refs, env["tok"], model, text, 12), (model, text)


def test_concurrent_mixed_adapters_equal_solo(server, refs, env):
    jobs = [("base", 0, 10), ("lora", 1, 7), ("dora", 2, 12), ("base", 3, 5), ("lora", 4, 9), ("dora", 0, 11),
            ("base", 1, 12), ("lora", 2, 6)]  # more requests than the 4 sequences: rows wait and join
    expected = [direct(refs, env["tok"], m, PROMPTS[k], n) for m, k, n in jobs]
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        m, k, n = jobs[i]
        barrier.wait(timeout=30)
        results[i] = chat(server, m, PROMPTS[k], max_tokens=n)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected
    m = server["engine"].metrics
    assert sum(m.batch_counts[1:]) > 0  # decode steps with several rows


def test_streaming_stop_length_and_seed(server, refs, env):
    full, finish, n = chat(server, "lora", PROMPTS[4], max_tokens=20)
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "lora", "messages": [{"role": "user", "content": PROMPTS[4]}], "max_tokens": 20,
                            "temperature": 0, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    import json

    parts = [c["delta"].get("content") or "" for line in lines for c in json.loads(line[6:])["choices"]]
    assert "".join(parts) == full and len([p for p in parts if p]) > 2
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    text, reason, _ = chat(server, "lora", PROMPTS[4], max_tokens=20, stop=[stop])
    assert (text, reason) == (full[: full.find(stop)], "stop")
    assert chat(server, "base", PROMPTS[2], max_tokens=3)[1:] == ("length", 3)
    body = {"model": "base", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8,
            "temperature": 1.0, "seed": 7}
    a = _post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert a == _post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    greedy = chat(server, "base", PROMPTS[0], max_tokens=8)[0]
    tiny_p = _post(server, "/v1/chat/completions", {**body, "top_p": 1e-6}).json()["choices"][0]["message"]["content"]
    assert tiny_p == greedy


def test_logprobs_and_echo_scoring_match_log_softmax(server, refs, env):
    tok = env["tok"]
    prompt = "Input: a great film\nLabel: positive"
    r = _post(server, "/v1/completions", {"model": "lora", "prompt": prompt, "echo": True, "logprobs": 2,
                                          "max_tokens": 0}).json()
    lp = r["choices"][0]["logprobs"]
    ids = tok(prompt).input_ids
    with torch.no_grad():
        ref = torch.log_softmax(refs["lora"](input_ids=torch.tensor([ids])).logits[0].float(), -1)
    exp = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert r["choices"][0]["text"] == prompt and lp["token_logprobs"][0] is None
    # llama.cpp applies a GGUF LoRA as its own (x A) B matmuls in ggml's order: on this
    # tiny model's large log-probs (-20..-30) that is ~0.3% off PEFT's merged path, far from
    # what an off-by-one position would give (a different token's log-prob)
    assert lp["token_logprobs"][1:] == pytest.approx(exp, rel=5e-3, abs=1e-3)
    assert max(lp["top_logprobs"][1].values()) == pytest.approx(ref[0].max().item(), abs=1e-3)
    # generated-token logprobs (chat, top 3)
    body = {"model": "dora", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    c = _post(server, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    ids = _ids(tok, PROMPTS[1])
    with torch.no_grad():
        first = torch.log_softmax(refs["dora"](input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    assert c[0]["logprob"] == pytest.approx(first.max().item(), abs=1e-3)
    assert len(c[0]["top_logprobs"]) == 3 and len(c) == 4


def test_predict_needs_builtin_engine_and_bad_requests(server):
    r = httpx.post(server["url"] + "/v1/predict", json={"inputs": [{"text": "x"}]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "--engine builtin" in r.json()["error"]["message"]
    assert _post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
                 ).status_code == 404
    assert _post(server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 65}).status_code == 400
    h = httpx.get(server["url"] + "/health").json()
    assert h["status"] == "ok" and set(h["adapters_loaded"]) == {"lora", "dora"}


def test_kv_cache_smaller_than_the_burst_queues_rows(env, refs):
    """A KV cache of 96 cells holds only a few rows of (prompt + 20): the rest wait for cells
    and still get their solo answers (greedy, with llama.cpp's default f16 KV cache)."""
    from lmladder.prompts import eos_token_ids
    from lmladder.serving.engine import Job, Params, Row
    from lmladder.serving.llamacpp_engine import LlamaCppEngine

    tok = env["tok"]
    eng = LlamaCppEngine(str(env["gguf"]), tok, slots=8, ctx_size=96, threads=2, eos_ids=eos_token_ids(tok)).start()
    try:
        done = threading.Event()
        jobs, left = [], [8]

        def notify(ev):
            if ev[0] in ("done", "error"):
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        for k in range(8):
            jobs.append(Job(None, [Row(_ids(tok, PROMPTS[k % 5]), Params(max_tokens=20, temperature=0))], notify))
            eng.submit(jobs[-1])
        assert done.wait(60)
        for k, j in enumerate(jobs):
            r = j.rows[0]
            assert not j.failed and (r.text, r.finish_reason, len(r.ids)) == direct(refs, tok, "base", PROMPTS[k % 5], 20)
        assert eng.base.reserved == 0 and len(eng.base.free_ids) == 8
    finally:
        eng.close()


def test_engine_flags_belong_to_their_engine():
    import argparse

    from lmladder.errors import LadderError
    from lmladder.serving import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    from lmladder.serving.engines import check_engine_flags

    check_engine_flags(p.parse_args(["x", "--engine", "llamacpp", "--gguf", "f.gguf", "--threads", "2"]))
    for argv, msg in ((["x", "--gguf", "f.gguf"], "--gguf is an --engine llamacpp flag"),
                      (["x", "--engine", "vllm", "--threads", "2"], "--threads is an --engine llamacpp flag"),
                      (["x", "--engine", "llamacpp", "--vllm-arg=--x"], "--vllm-arg is an --engine vllm flag"),
                      (["x", "--engine", "llamacpp", "--rung", "lora"], "needs --engine builtin"),
                      (["x", "--engine", "llamacpp", "--ctx-size", "0"], "--ctx-size must be >= 1")):
        with pytest.raises(LadderError, match=msg):
            check_engine_flags(p.parse_args(argv))


# ---------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_embedded_smollm2_gguf_f32_in_llamacpp_matches_transformers(tmp_path):
    """The embedded SmolLM2 (dequantised, fp32) exported by lmladder to GGUF f32: llama.cpp's
    greedy tokens and top-1 token / logit on 5 chat prompts equal transformers'."""
    from lmladder.export.gguf_writer import tokenizer_metadata, write_gguf
    from lmladder.models import load_causal_lm

    model, tok, ref = load_causal_lm("smollm2-135m", device="cpu", dtype=torch.float32)
    path = tmp_path / "smol-f32.gguf"
    write_gguf(path, model, tok, "f32", "smollm2-135m", ref.gguf, tokenizer_metadata(tok, model.config, ref.gguf))
    worst = compare_with_transformers(path, model, tok, n_new=16)
    print(f"max top-1 logit difference llama.cpp vs transformers: {worst:.2e}")
    assert worst < 2e-2
