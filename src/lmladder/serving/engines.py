"""The serving engines behind ``lmladder serve --engine``, and what the API needs of one.

* ``builtin``: serving/engine.Engine, transformers + PEFT in this process (batched decode,
  adapters LRU, ``/v1/predict``).
* ``llamacpp``: serving/llamacpp_engine.LlamaCppEngine, llama.cpp on CPU through
  llama-cpp-python (``pip install 'lmladder[llamacpp]'``); the run's base as GGUF, its
  adapters as GGUF LoRAs (or merged); same OpenAI-compatible API (serving/api.py).
* ``vllm``: serving/vllm_engine, vLLM's own OpenAI server as a supervised subprocess
  (GPU): base + the run's adapters as LoRA modules. Not behind serving/api.py: vLLM's
  server answers the requests itself.

The interface the API (serving/api.py) uses, which the built-in Engine and the llama.cpp
engine both satisfy (:class:`ServingEngine`): work is a ``Job`` of ``Row`` s (prompt ids,
``Params``) or a ``Call`` (``/v1/predict``), handed over with ``submit`` (``Busy`` when the
queue is full); the engine emits ("delta", i, text), ("done", i, row), ("error", exc) through
the job's ``notify`` from its worker thread. The API renders chat templates and counts
tokens with ``tok`` (a transformers tokenizer) and renders tokens with ``decode`` /
``token_str``; it checks prompt ids against ``vocab_size`` and lengths against
``context_length``; ``/health`` and ``/metrics`` read ``alive``, ``queued()``, ``loaded``;
``create_app`` sets ``metrics``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from lmladder.errors import LadderError

log = logging.getLogger("lmladder.serving.cli")

ENGINES = ("builtin", "llamacpp", "vllm")
PREDICT_NEEDS_BUILTIN = ("POST /v1/predict replays the rung's own steps on the transformers model; this server "
                         "runs {engine} (--engine {engine}): serve with --engine builtin for /v1/predict")


class ServingEngine(Protocol):
    tok: Any
    vocab_size: int
    context_length: int | None
    loaded: Any  # adapters loaded now (names)
    metrics: Any
    eos_ids: set[int]

    def submit(self, work) -> None: ...
    def start(self) -> "ServingEngine": ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def queued(self) -> int: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_str(self, tid: int) -> str: ...

    @property
    def alive(self) -> bool: ...


def build_llamacpp(spec, *, gguf: str | None = None, gguf_dtype: str = "f16", merge_adapters: bool = False,
                   ctx_size: int | None = None, threads: int | None = None, kv_cache: str = "f16", batch_size: int = 16,
                   batch_wait_ms: float = 10.0, max_queue: int = 256, max_tokens_limit: int = 1024,
                   max_body_bytes: int = 1 << 20, api_key: str | None = None,
                   on_ready: Callable[[dict], None] | None = None):
    """The llama.cpp server for a ``serving.cli.ServeSpec``: (app, engine, what was served how)."""
    from lmladder.serving import llamacpp_files as files
    from lmladder.serving.api import Metrics, Settings, create_app
    from lmladder.serving.llamacpp_engine import LlamaCppEngine, import_llama_cpp

    import_llama_cpp()  # a missing extra is a one-line error before any work
    base_file, how = files.base_gguf(spec.base_spec, gguf, gguf_dtype)
    tok, eos = files.load_tokenizer(spec.base_spec)
    adapters = files.adapter_ggufs(spec.base_spec, base_file, spec.adapters, gguf_dtype, merge_all=merge_adapters)
    metrics = Metrics()
    engine = LlamaCppEngine(base_file, tok, adapters, slots=batch_size, ctx_size=ctx_size, threads=threads, kv_type=kv_cache,
                            batch_wait_ms=batch_wait_ms, max_queue=max_queue, metrics=metrics, eos_ids=eos)
    settings = Settings(base_name=spec.base_name, adapters=list(spec.adapters),
                        api_key=api_key or None, max_body_bytes=max_body_bytes, max_tokens_limit=max_tokens_limit)
    app = create_app(engine, settings, metrics, predictor=None,
                     predict_unavailable=PREDICT_NEEDS_BUILTIN.format(engine="llamacpp"))
    engine.start()
    served = {"base": base_file, "base_from": how, "threads": engine.threads, "slots": engine.slots,
              "kv_cells": engine.base.n_ctx,
              "adapters": {n: {"kind": a.kind, "path": a.path, **({"why": a.why} if a.why else {})}
                           for n, a in adapters.items()}}
    if on_ready:
        on_ready(served)
    return app, engine, served


def check_engine_flags(a) -> None:
    """Flags that only one engine reads are errors with another (nothing is loaded yet)."""
    engine = getattr(a, "engine", "builtin")
    if engine not in ENGINES:
        raise LadderError(f"--engine {engine}: one of {', '.join(ENGINES)}")
    llama_only = [f for f, v in (("--gguf", a.gguf), ("--ctx-size", a.ctx_size), ("--threads", a.threads),
                                 ("--merge-adapters", a.merge_adapters), ("--kv-cache", a.kv_cache != "f16"),
                                 ("--gguf-dtype", a.gguf_dtype != "f16")) if v]
    if llama_only and engine != "llamacpp":
        raise LadderError(f"{llama_only[0]} is an --engine llamacpp flag (this is --engine {engine})")
    if (a.vllm_arg or a.guided_backend != "xgrammar") and engine != "vllm":
        flag = "--vllm-arg" if a.vllm_arg else "--guided-backend"
        raise LadderError(f"{flag} is an --engine vllm flag (this is --engine {engine})")
    if engine != "builtin" and getattr(a, "rung", None):
        raise LadderError(f"--rung serves a rung on /v1/predict, which needs --engine builtin (this is --engine {engine})")
    for k in ("ctx_size", "threads"):
        v = getattr(a, k)
        if v is not None and v < 1:
            raise LadderError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
