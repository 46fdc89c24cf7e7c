"""``lmladder serve --engine vllm``: vLLM's own OpenAI-compatible server (GPU) for a run's
base model and its LoRA adapters, started and supervised as a subprocess.

vLLM answers the requests itself (continuous batching, paged KV cache, prefix caching,
multi-LoRA batches, structured outputs through its guided-decoding backend), so
lmladder's serving/api.py is not in front of it; what lmladder adds is the command line,
built from the run folder the same way the built-in server reads it (serving/cli.py
resolve_target):

* ``--model``: the base as a transformers folder (the embedded SmolLM2: its dequantised
  safetensors cache) or a hub id; ``--served-model-name``: the base's public name and
  ``base``, as the built-in server lists them;
* ``--enable-lora --lora-modules NAME=PATH ...``: every adapter of the run (and
  ``--adapter NAME=PATH``), under the same names; ``--max-lora-rank``: the largest rank
  among them, rounded up to a rank vLLM accepts; ``--max-loras``: ``--max-adapters``;
* ``--max-num-seqs``: ``--batch-size``; ``--host`` / ``--port``; the API key through
  ``VLLM_API_KEY`` in the child's environment (not on its command line, where ``ps`` shows it);
* structured outputs: the guided-decoding backend (``xgrammar`` by default; the flag is
  ``--guided-decoding-backend`` before vLLM 0.11 and ``--structured-outputs-config.backend``
  since);
* anything else: ``--vllm-arg=--gpu-memory-utilization=0.8`` (repeatable), passed as is.

vLLM is not a dependency of lmladder (it needs CUDA): without it the command is a one-line
error saying so. Adapters vLLM cannot load (DoRA, ``modules_to_save``) are refused at startup.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from lmladder.errors import LadderError
from lmladder.inference.vllm_backend import require_vllm

log = logging.getLogger("lmladder.serving.cli")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank values vLLM accepts
GUIDED_BACKENDS = ("xgrammar", "guidance", "outlines", "auto")


def _version_tuple(v: str | None) -> tuple[int, ...]:
    out = []
    for part in (v or "").split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def adapter_rank(folder: str | Path) -> int:
    """The largest LoRA rank in a PEFT adapter folder (``r`` and any ``rank_pattern``)."""
    p = Path(folder) / "adapter_config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LadderError(f"{p}: not readable ({type(e).__name__})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LadderError(f"{folder}: peft_type {cfg.get('peft_type')}; vLLM serves LoRA adapters only")
    if cfg.get("use_dora"):
        raise LadderError(f"{folder}: a DoRA adapter; vLLM does not serve DoRA (merge it: lmladder export --format merged)")
    if cfg.get("modules_to_save"):
        raise LadderError(f"{folder}: modules_to_save {cfg['modules_to_save']}; vLLM does not load them "
                          "(merge it: lmladder export --format merged)")
    ranks = [int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


def max_lora_rank(adapters: dict[str, str]) -> int:
    r = max((adapter_rank(p) for p in adapters.values()), default=8)
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise LadderError(f"LoRA rank {r} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def base_model_path(base_spec: str) -> str:
    """What vLLM's ``--model`` takes for a lmladder model spec: a transformers folder or a hub id."""
    from lmladder.models import materialise, resolve

    ref = resolve(base_spec)
    if ref.kind == "openai":
        raise LadderError(f"model '{base_spec}' is served elsewhere already; --engine vllm needs weights")
    target, _ = materialise(ref)  # the embedded / .gguf model: its safetensors folder
    return target


def vllm_command(spec, *, model_path: str, host: str = "127.0.0.1", port: int = 8000, max_adapters: int = 4,
                 batch_size: int | None = None, guided_backend: str = "xgrammar", extra: list[str] = (),
                 version: str | None = None, python: str | None = None) -> list[str]:
    """The ``vllm serve`` command line for a serving.cli.ServeSpec, as
    ``python -m vllm.entrypoints.openai.api_server --model PATH ...`` (what ``vllm serve PATH``
    runs, in every vLLM version, with this interpreter)."""
    if guided_backend not in GUIDED_BACKENDS:
        raise LadderError(f"--guided-backend {guided_backend}: one of {', '.join(GUIDED_BACKENDS)}")
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--host", host, "--port", str(port), "--served-model-name", spec.base_name]
    if spec.base_name != "base":
        cmd.append("base")
    if batch_size:
        cmd += ["--max-num-seqs", str(batch_size)]
    if spec.adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank(spec.adapters)),
                "--max-loras", str(max(1, min(max_adapters, len(spec.adapters)))), "--lora-modules"]
        cmd += [f"{name}={path}" for name, path in spec.adapters.items()]
    v = _version_tuple(version)
    if v and v < (0, 11):
        cmd += ["--guided-decoding-backend", guided_backend]
    else:
        cmd += ["--structured-outputs-config.backend", guided_backend]
    return cmd + list(extra)


def child_env(api_key: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def run(spec, a, api_key: str | None) -> int:
    """Start vLLM's server for ``spec`` and wait for it (Ctrl-C / SIGTERM stop it); its exit code."""
    version = require_vllm("--engine vllm")
    cmd = vllm_command(spec, model_path=base_model_path(spec.base_spec), host=a.host, port=a.port,
                       max_adapters=a.max_adapters, batch_size=a.batch_size, guided_backend=a.guided_backend,
                       extra=a.vllm_arg, version=version)
    log.info("starting vLLM %s: %s%s", version, " ".join(cmd[1:]), " (API key from VLLM_API_KEY)" if api_key else "")
    proc = subprocess.Popen(cmd, env=child_env(api_key))

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
