"""The files ``lmladder serve --engine llamacpp`` hands llama.cpp, made once and cached.

* the base GGUF: ``--gguf FILE`` if given; else lmladder's GGUF export of the base
  (export/gguf_writer.py, ``--gguf-dtype``, f16 by default), also for a model that came from a
  GGUF (see :func:`base_gguf`);
* each adapter: a GGUF LoRA (export/gguf_lora.py) when llama.cpp can apply it, else the
  base with the adapter merged (PEFT ``merge_and_unload``) as a full GGUF of its own;
* the transformers tokenizer (the API renders chat templates and counts tokens with it)
  and the end-of-turn ids, as the built-in engine has them.

Written files go to ``$LMLADDER_CACHE/llamacpp/`` (default ``~/.cache/lmladder``) under a
key of their inputs' content (the adapter's bytes, the base's files, the dtype), never
into the run folder: a restart, or another server of the same run, reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

from lmladder.errors import LadderError

log = logging.getLogger("lmladder.serving.cli")

FORMAT_VERSION = "1"  # bump when the written files change


def cache_dir() -> Path:
    from lmladder.models import cache_root

    return cache_root() / "llamacpp"


def _digest(*parts) -> str:
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for p in parts:
        if isinstance(p, Path):
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _files_id(folder: Path) -> list:
    """Identity of a model folder's files without reading GBs: names, sizes, mtimes, config."""
    out = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json")):
            st = f.stat()
            out.append([f.name, st.st_size, int(st.st_mtime)])
    return out


def _atomic(path: Path, write) -> Path:
    """Call write(tmp) and rename tmp to path (so a killed server leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_tokenizer(spec: str):
    """(transformers tokenizer, end-of-turn ids) of the base model, without its weights."""
    from transformers import AutoTokenizer, GenerationConfig

    from lmladder.models import fix_pad_token, materialise, resolve
    from lmladder.prompts import eos_token_ids

    ref = resolve(spec)
    if ref.kind == "openai":
        raise LadderError(f"model '{spec}' is served elsewhere; --engine llamacpp needs local weights")
    folder = Path(ref.path)
    try:
        if ref.kind in ("embedded", "gguf") and not (folder / "tokenizer_config.json").is_file():
            g = Path(ref.gguf)
            tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
            gen_src = None
        else:
            target, local_only = materialise(ref)
            tok = AutoTokenizer.from_pretrained(target, trust_remote_code=False, local_files_only=local_only)
            gen_src = (target, local_only)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LadderError(f"model '{spec}': could not load its tokenizer ({first})") from None
    fix_pad_token(tok)
    gen = None
    if gen_src is not None:
        try:
            gen = GenerationConfig.from_pretrained(gen_src[0], local_files_only=gen_src[1])
        except (OSError, ValueError):
            gen = None
    return tok, eos_token_ids(tok, SimpleNamespace(generation_config=gen))


def gguf_config(path: str) -> SimpleNamespace:
    """The llama hyper-parameters a LoRA conversion needs, read from a GGUF's metadata by
    llama.cpp (vocabulary only: no weights are loaded)."""
    import ctypes

    from lmladder.serving.llamacpp_engine import import_llama_cpp

    L = import_llama_cpp()
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    m = L.llama_model_load_from_file(str(path).encode(), mp)
    if not m:
        raise LadderError(f"{path}: llama.cpp could not read this GGUF")
    try:
        def meta(key):
            buf = ctypes.create_string_buffer(256)
            n = L.llama_model_meta_val_str(m, key.encode(), buf, 256)
            return buf.value.decode() if n >= 0 else None

        arch = meta("general.architecture")
        heads = meta(f"{arch}.attention.head_count")
        kv = meta(f"{arch}.attention.head_count_kv") or heads
    finally:
        L.llama_model_free(m)
    if arch is None or heads is None:
        raise LadderError(f"{path}: no general.architecture / attention.head_count in the GGUF")
    return SimpleNamespace(model_type=arch, architectures=None, num_attention_heads=int(heads),
                           num_key_value_heads=int(kv))


def base_gguf(base_spec: str, gguf: str | None = None, dtype: str = "f16") -> tuple[str, str]:
    """(the base GGUF file, how it was found)."""
    from lmladder.models import resolve

    if gguf:
        p = Path(gguf).expanduser()
        if not p.is_file():
            raise LadderError(f"--gguf {gguf}: no such file")
        return str(p.resolve()), "--gguf"
    ref = resolve(base_spec)
    # A model that came from a GGUF (the embedded SmolLM2's Q4_1 file) is still served from
    # lmladder's export of its dequantised weights, not from its own quantized file: the
    # llama-cpp-python 0.3.36 build here segfaults in llama_decode on that Q4_1 file (its
    # weights are repacked for the CPU's AMX units) while f16 / f32 exports run. Pass the
    # file with --gguf to serve it anyway.
    if ref.kind == "openai":
        raise LadderError(f"model '{base_spec}' is served elsewhere; --engine llamacpp needs local weights")
    from lmladder.models import materialise

    target, local_only = materialise(ref)
    folder = Path(target)
    if not folder.is_dir():  # a hub id: its files (from the local cache when offline)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(target, local_files_only=local_only,
                                        allow_patterns=["*.json", "*.safetensors"]))
    key = _digest(ref.spec, str(folder), _files_id(folder), dtype)
    out = cache_dir() / f"{_slug(base_spec)}-{key}" / f"base-{dtype}.gguf"
    if not out.is_file():
        model, tok, _ = _load_hf(base_spec)
        log.info("writing the base model as GGUF (%s, once) -> %s", dtype, out)
        _write_gguf(out, model, tok, dtype, _slug(base_spec))
    return str(out), f"lmladder's GGUF export ({dtype})"


def _load_hf(spec: str):
    import torch

    from lmladder.models import load_causal_lm

    return load_causal_lm(spec, device="cpu", dtype=torch.float32)


def _write_gguf(out: Path, model, tok, dtype: str, name: str) -> None:
    from lmladder.export.gguf_writer import write_gguf

    _atomic(out, lambda tmp: write_gguf(tmp, model, tok, dtype, name))


def adapter_ggufs(base_spec: str, base_file: str, adapters: dict[str, str], dtype: str = "f16",
                  merge_all: bool = False) -> dict:
    """{adapter name: llamacpp_engine.AdapterSpec}: a GGUF LoRA where llama.cpp can apply
    the adapter, else (or with ``merge_all``) the base with the adapter merged, as GGUF."""
    from lmladder.export.gguf_lora import lora_problem, write_gguf_lora
    from lmladder.serving.llamacpp_engine import AdapterSpec

    if not adapters:
        return {}
    cfg = gguf_config(base_file)
    out: dict[str, AdapterSpec] = {}
    for name, folder in adapters.items():
        a = Path(folder)
        why = "--merge-adapters" if merge_all else lora_problem(a, cfg)
        if why is None:
            key = _digest(a / "adapter_model.safetensors", a / "adapter_config.json", vars(cfg))
            path = cache_dir() / "lora" / f"{_slug(name)}-{key}.gguf"
            if not path.is_file():
                _atomic(path, lambda tmp: write_gguf_lora(tmp, a, cfg, name))
            out[name] = AdapterSpec("lora", str(path))
            log.info("adapter %s: GGUF LoRA %s", name, path)
            continue
        log.warning("adapter %s: merged into a GGUF of its own (%s)", name, why)
        out[name] = AdapterSpec("merged", str(_merged_gguf(base_spec, name, a, dtype)), why)
    return out


def _merged_gguf(base_spec: str, name: str, adapter: Path, dtype: str) -> Path:
    from lmladder.export.gguf_writer import check_gguf_supported
    from lmladder.models import resolve

    ref = resolve(base_spec)
    base_id = ref.gguf or ref.path
    key = _digest(adapter / "adapter_model.safetensors", adapter / "adapter_config.json", base_id, dtype)
    path = cache_dir() / "merged" / f"{_slug(name)}-{key}-{dtype}.gguf"
    if path.is_file():
        return path
    from peft import PeftModel

    model, tok, _ = _load_hf(base_spec)
    check_gguf_supported(model.config)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    log.info("writing adapter %s merged into the base as GGUF (%s, once) -> %s", name, dtype, path)
    _write_gguf(path, merged, tok, dtype, f"{_slug(base_spec)}-{name}")
    return path


def _slug(s: str) -> str:
    from lmladder.export.gguf_writer import _slug as slug

    return slug(s)
