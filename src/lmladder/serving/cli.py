"""lmladder serve [RUN_DIR|MODEL] --host 127.0.0.1 --port 8000

OpenAI-compatible server (FastAPI + uvicorn) for a run's base model and its LoRA
adapters, or for a plain model:

  GET  /v1/models            the base (as its spec name and as "base") + each adapter
  POST /v1/chat/completions  chat through the model's chat template; stream=true -> SSE
  POST /v1/completions       plain prompts; echo + logprobs + max_tokens=0 scores a prompt
  GET  /health, GET /metrics (Prometheus text format)

"model" in a request picks the base ("base" or its spec name) or an adapter by rung
name (e.g. "lora"); --adapter NAME=PATH adds more. Adapters load on demand over the one
base model (PEFT multi-adapter) and are kept in an LRU of --max-adapters. Concurrent
requests are batched: one worker owns the model and decodes waiting requests together
(PEFT mixed-adapter batches when they ask for different adapters).

examples:
  lmladder serve runs/sst2                       # base + the lora rung's adapter
  lmladder serve smollm2-135m --port 8001        # a plain model
  lmladder serve runs/sst2 --adapter v2=runs/sst2-v2/rungs/lora/adapter --api-key "$KEY"
  lmladder serve runs/sst2 --engine llamacpp     # llama.cpp on CPU: GGUF base + GGUF LoRAs, same API
  lmladder serve runs/sst2 --engine vllm         # vLLM's OpenAI server (GPU), adapters as LoRA modules
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "lora", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}'

Security: binds 127.0.0.1 by default (a loud warning when binding elsewhere); optional
API key (--api-key or $LMLADDER_API_KEY, sent as 'Authorization: Bearer KEY'); request
bodies and max_tokens are capped; bodies must be UTF-8 JSON (415 otherwise) with finite numbers,
at most 64 levels deep (400 otherwise); adapters load as safetensors only, checked at startup.
See docs/serving.md.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmladder.errors import LadderError

log = logging.getLogger("lmladder.serving.cli")


def add_arguments(p) -> None:
    p.add_argument("target", nargs="?", metavar="RUN_DIR|MODEL",
                   help="a run folder (base model from its config.yaml + adapters under rungs/*/adapter) "
                   "or a model spec (hub id, folder, .gguf, smollm2-135m)")
    p.add_argument("--model", help="base model spec; overrides the run folder's config.yaml model")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve one more PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) "
                   "under NAME (repeatable)")
    p.add_argument("--max-adapters", type=int, default=4, metavar="N",
                   help="adapters kept loaded at once (LRU; default 4)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="most requests (rows) decoded together (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                   help="how long the worker waits for more requests to fill a batch (default 10)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting beyond this get 503 (default 256)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, metavar="N",
                   help="largest max_tokens a request may ask for (default 1024; also chat's default)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest request body (default 1 MiB)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $LMLADDER_API_KEY)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--rung", metavar="NAME",
                   help="the rung of the run folder served as the task on POST /v1/predict (default: the "
                   "recommended rung of results.json)")
    p.add_argument("--trust-run-code", action="store_true",
                   help="import Python code the run folder's config names (tools, metric functions); off by "
                   "default: a run folder may come from anyone")
    # the engine behind the API (serving/engines.py)
    p.add_argument("--engine", default="builtin", choices=["builtin", "llamacpp", "vllm"],
                   help="builtin: transformers + PEFT in this process (default); llamacpp: llama.cpp on CPU, the "
                   "base as GGUF and adapters as GGUF LoRAs (pip install 'lmladder[llamacpp]'); vllm: vLLM's "
                   "OpenAI server with the adapters as LoRA modules (GPU; pip install vllm)")
    p.add_argument("--gguf", metavar="FILE", help="llamacpp: serve this GGUF as the base (e.g. a quantized "
                   "export, or the embedded model's own Q4_1 file) instead of lmladder's f16 export of the base")
    p.add_argument("--gguf-dtype", default="f16", choices=["f16", "f32"],
                   help="llamacpp: weights of the base / merged GGUFs lmladder writes (default f16)")
    p.add_argument("--merge-adapters", action="store_true",
                   help="llamacpp: serve every adapter merged into a GGUF of its own instead of as a GGUF LoRA")
    p.add_argument("--ctx-size", type=int, metavar="N",
                   help="llamacpp: KV cache tokens shared by all parallel requests (default: the model's "
                   "context, at most 8192)")
    p.add_argument("--threads", type=int, metavar="N", help="llamacpp: CPU threads (default: all cores)")
    p.add_argument("--kv-cache", default="f16", choices=["f16", "f32"],
                   help="llamacpp: type of the KV cache (default f16, llama.cpp's: half the memory; f32: logits "
                   "as transformers' to ~1e-4)")
    p.add_argument("--guided-backend", default="xgrammar", choices=["xgrammar", "guidance", "outlines", "auto"],
                   help="vllm: its structured-output (guided decoding) backend (default xgrammar)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="vllm: one more argument for vLLM's server, as is (repeatable), e.g. "
                   "--vllm-arg=--gpu-memory-utilization=0.8")


@dataclass
class ServeSpec:
    base_spec: str
    base_name: str  # public name of the base model
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter folder
    run_dir: str | None = None


def _is_adapter_dir(p: Path) -> bool:
    return (p / "adapter_config.json").is_file() and any(
        (p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def adapter_problem(p: Path) -> str | None:
    """Why folder ``p`` cannot be served as an adapter (None: it can). Adapters load as
    safetensors only: a pickle file can run code when loaded."""
    if not p.is_dir():
        return "no such folder"
    if not (p / "adapter_config.json").is_file():
        return "not a PEFT adapter folder (no adapter_config.json)"
    try:
        if not isinstance(json.loads((p / "adapter_config.json").read_text()), dict):
            return "adapter_config.json is not a JSON object"
    except (OSError, ValueError) as e:
        return f"adapter_config.json is not readable JSON ({type(e).__name__})"
    if (p / "adapter_model.safetensors").is_file():
        return None
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        return (f"holds only pickle weights ({', '.join(pickles[:3])}); lmladder serves safetensors adapters only "
                "(pickle files can run code). Convert it once in a trusted session: PeftModel.from_pretrained(base, "
                "DIR).save_pretrained(DIR, safe_serialization=True)")
    return "no adapter_model.safetensors"


def public_name(spec: str) -> str:
    """The base's name in /v1/models: the spec if it is a valid name, else the folder/file stem."""
    from lmladder.serving.api import valid_name

    if valid_name(spec) and not Path(spec).expanduser().exists():
        return spec
    stem = Path(spec.rstrip("/")).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-")[:64]
    return stem if stem and valid_name(stem) else "model"


def resolve_target(target: str | None, model: str | None = None, extra: list[str] = ()) -> ServeSpec:
    """Work out base model + adapters from the positional target and flags (no heavy imports)."""
    from lmladder.serving.api import valid_name

    if not target and not model:
        raise LadderError("serve: give a run folder or a model (e.g. `lmladder serve runs/sst2`)")
    adapters: dict[str, str] = {}
    run_dir = None
    base = model
    t = Path(target).expanduser() if target else None
    if t is not None and t.is_dir() and (t / "config.yaml").is_file():
        run_dir = str(t)
        if base is None:
            from lmladder.run.folder import read_run

            base = read_run(t).cfg.model
        rungs = t / "rungs"
        for d in sorted(rungs.iterdir()) if rungs.is_dir() else []:
            if _is_adapter_dir(d / "adapter"):
                problem = adapter_problem(d / "adapter")
                if problem:  # refuse now: never a 500 on the first request for it
                    raise LadderError(f"{d / 'adapter'}: {problem}")
                if not valid_name(d.name):
                    log.warning("skipping adapter %s: '%s' is not a valid model name", d / "adapter", d.name)
                    continue
                adapters[d.name] = str((d / "adapter").resolve())
    elif t is not None:
        if t.is_dir() and _is_adapter_dir(t):
            raise LadderError(f"{target}: this is an adapter folder; serve its base model and pass "
                              f"--adapter NAME={target}")
        if model is not None:
            raise LadderError(f"{target}: not a run folder (no config.yaml); --model is only for run folders")
        base = target
    for a in extra:
        if "=" not in a:
            raise LadderError(f"--adapter {a}: expected NAME=PATH")
        name, path = (x.strip() for x in a.split("=", 1))
        if not valid_name(name) or "/" in name:
            raise LadderError(f"--adapter {a}: name '{name}' must be letters, digits, '.', '_', '-'")
        problem = adapter_problem(Path(path).expanduser())
        if problem:
            raise LadderError(f"--adapter {a}: {problem}")
        if name in adapters:
            raise LadderError(f"--adapter {a}: name '{name}' is already served")
        adapters[name] = str(Path(path).expanduser().resolve())
    name = public_name(base)
    for a in adapters:
        if a in (name, "base"):
            raise LadderError(f"adapter name '{a}' clashes with the base model's name")
    return ServeSpec(base, name, adapters, run_dir)


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def task_predictor(spec: ServeSpec, rung: str | None):
    """(serving/predict.Predictor or None, why /v1/predict is off). A rung named with
    --rung must be servable (LadderError at startup); the recommended one may not be (the
    route then says why)."""
    if spec.run_dir is None:
        if rung is not None:
            raise LadderError("--rung needs a run folder to serve (lmladder serve RUN_DIR --rung NAME)")
        return None, "serve a run folder to get its rung as a task on /v1/predict"
    from lmladder.serving.predict import Predictor

    try:
        return Predictor(spec.run_dir, rung), None
    except LadderError as e:
        if rung is not None:
            raise
        log.warning("/v1/predict is off: %s", e)
        return None, str(e)


def build(spec: ServeSpec, *, max_adapters=4, batch_size=16, batch_wait_ms=10.0, max_queue=256,
          max_tokens_limit=1024, max_body_bytes=1 << 20, api_key=None, model_tok=None, predictor=None,
          predict_unavailable=None):
    """Load the model, start the worker, return (app, engine). ``model_tok`` reuses a loaded pair;
    ``predictor`` serves a rung of the run as the task on /v1/predict."""
    from lmladder.serving.api import Metrics, Settings, create_app
    from lmladder.serving.engine import Engine

    if model_tok is None:
        from lmladder.models import load_causal_lm

        model, tok, _ = load_causal_lm(spec.base_spec)
    else:
        model, tok = model_tok
    for p in model.parameters():
        p.requires_grad_(False)
    metrics = Metrics()
    engine = Engine(model, tok, spec.adapters, max_adapters=max_adapters, batch_size=batch_size,
                    batch_wait_ms=batch_wait_ms, max_queue=max_queue, metrics=metrics)
    settings = Settings(base_name=spec.base_name, adapters=list(spec.adapters), api_key=api_key or None,
                        max_body_bytes=max_body_bytes, max_tokens_limit=max_tokens_limit)
    predict_model = predictor.load_model(model) if predictor is not None else None
    app = create_app(engine, settings, metrics, predictor=predictor, predict_model=predict_model,
                     predict_unavailable=predict_unavailable)
    engine.start()
    return app, engine


def main(a) -> int:
    for k, v in (("--max-adapters", a.max_adapters), ("--batch-size", a.batch_size), ("--max-queue", a.max_queue),
                 ("--max-tokens-limit", a.max_tokens_limit), ("--max-body-bytes", a.max_body_bytes)):
        if v < 1:
            raise LadderError(f"{k} must be >= 1, got {v}")
    if a.batch_wait_ms < 0:
        raise LadderError(f"--batch-wait-ms must be >= 0, got {a.batch_wait_ms}")
    if not 0 <= a.port <= 65535:
        raise LadderError(f"--port {a.port}: not a port number")
    from lmladder.serving.engines import check_engine_flags

    check_engine_flags(a)
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="lmladder: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "peft", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations are not the user's to fix
    spec = resolve_target(a.target, a.model, a.adapter)
    engine_kind = getattr(a, "engine", "builtin")
    predictor, why_not = task_predictor(spec, getattr(a, "rung", None)) if engine_kind == "builtin" else (None, None)
    api_key = a.api_key if a.api_key is not None else os.environ.get("LMLADDER_API_KEY") or None
    if not _is_loopback(a.host):
        bar = "!" * 78
        log.warning("%s\nWARNING: binding %s: this server is reachable from other machines.%s\n%s", bar, a.host,
                    "" if api_key else " NO API KEY is set:\nanyone who can reach the port can use the model "
                    "(set --api-key or LMLADDER_API_KEY).", bar)
    if engine_kind == "vllm":  # vLLM's own server answers; lmladder builds its command and supervises it
        from lmladder.serving import vllm_engine

        return vllm_engine.run(spec, a, api_key)
    import uvicorn

    log.info("loading %s", spec.base_spec)
    if engine_kind == "llamacpp":
        from lmladder.serving.engines import build_llamacpp

        app, engine, served = build_llamacpp(
            spec, gguf=a.gguf, gguf_dtype=a.gguf_dtype, merge_adapters=a.merge_adapters, ctx_size=a.ctx_size,
            threads=a.threads, kv_cache=a.kv_cache, batch_size=a.batch_size, batch_wait_ms=a.batch_wait_ms, max_queue=a.max_queue,
            max_tokens_limit=a.max_tokens_limit, max_body_bytes=a.max_body_bytes, api_key=api_key)
        log.info("llama.cpp: base %s (%s), %d threads, %d parallel sequences, %d KV cells; adapters: %s",
                 served["base"], served["base_from"], served["threads"], served["slots"], served["kv_cells"],
                 ", ".join(f"{n} ({d['kind']})" for n, d in served["adapters"].items()) or "none")
    else:
        app, engine = build(spec, max_adapters=a.max_adapters, batch_size=a.batch_size,
                            batch_wait_ms=a.batch_wait_ms, max_queue=a.max_queue, max_tokens_limit=a.max_tokens_limit,
                            max_body_bytes=a.max_body_bytes, api_key=api_key, predictor=predictor,
                            predict_unavailable=why_not)
    if predictor is not None:
        log.info("POST /v1/predict serves rung %s as the %s task (inputs: %s)", predictor.rung,
                 predictor.cfg.task.kind, ", ".join(predictor.describe()["input_fields"]))
    names = ", ".join([spec.base_name, "base", *spec.adapters])
    log.info("serving %s on http://%s:%d/v1 (models: %s)%s", spec.base_spec, a.host, a.port, names,
             "; API key required" if api_key else "")
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_keep_alive=5,
                    limit_concurrency=max(64, a.max_queue + 32))
    finally:
        engine.stop()
    return 0

