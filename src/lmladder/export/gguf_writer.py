"""lmladder's own GGUF writer: a plain (merged) Llama model and its tokenizer to one GGUF file,
following llama.cpp's convert_hf_to_gguf.py, so no llama.cpp checkout is needed.

* check_gguf_supported: the architectures written (GGUF_ARCHITECTURES: llama), plain RoPE
  only, no attention / MLP biases; anything else fails at once, before any work, pointing
  to --format merged and llama.cpp's converter.
* llama_tensors: HF names -> llama.cpp names (token_embd, blk.N.*, output_norm, output; no
  output tensor when the embeddings are tied), q/k rows permuted from HF's rotary halves to
  GGML's interleaved pairs (permute_qk), 1-D tensors (norms) kept F32 as llama.cpp does.
* llama_metadata: the llama.* keys and general.file_type.
* tokenizer_metadata: tokenizer.ggml.* for a byte-level BPE (gpt2) vocabulary: tokens with
  their types (CONTROL / USER_DEFINED / NORMAL, [PAD<i>] UNUSED up to vocab_size), merges,
  the pre-tokenizer name llama.cpp picks its split regex by, special ids, chat template.

The file is read back by verify.check_gguf_file (gguf.GGUFReader) and rebuilt by
transformers' GGUF loader (verify.verify_gguf), which undoes the q/k permutation itself,
so a wrong layout shows up as a logit difference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmladder.errors import LadderError

# Architectures lmladder's GGUF writer supports: transformers model_type -> (class, GGUF arch).
GGUF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama")}


def gguf_name(model_spec: str, rung: str) -> str:
    """general.name of the file, ``<model>-<rung>``; the file is ``<model>-<rung>-<dtype>.gguf``."""
    return f"{_slug(model_spec)}-{rung}"


def check_gguf_supported(config) -> str:
    """Return the GGUF architecture name for a transformers config or raise LadderError."""
    mt = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    supported = ", ".join(f"{k} ({v[0]})" for k, v in GGUF_ARCHITECTURES.items())
    if mt not in GGUF_ARCHITECTURES:
        cls = f" ({archs[0]})" if archs else ""
        raise LadderError(
            f"GGUF export does not support model type '{mt}'{cls}; supported: {supported}. "
            "Use --format merged (any architecture) and llama.cpp's convert_hf_to_gguf.py"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type not in (None, "default"):
        raise LadderError(
            f"GGUF export: rope scaling '{rope_type}' is not supported by lmladder's writer "
            "(only plain RoPE); use --format merged"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise LadderError(f"GGUF export: {flag}=true is not supported by lmladder's writer; use --format merged")
    return GGUF_ARCHITECTURES[mt][1]


def _rope_theta(config) -> float:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _head_dim(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd or config.hidden_size // config.num_attention_heads)


def permute_qk(w, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's row permutation of q/k projections (convert_hf_to_gguf.py LlamaModel.permute):
    HF stores rotary halves [x0..x{d/2}, y0..], GGML wants interleaved pairs. transformers'
    GGUF loader (LlamaTensorProcessor._reverse_permute_weights) undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_tensors(state_dict: dict, config, dtype: str):
    """Yield (gguf_name, numpy array) for a Llama state dict, in llama.cpp's naming."""
    import numpy as np

    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    half = dtype == "f16"
    for hf_name, t in state_dict.items():
        if "rotary_emb" in hf_name:
            continue
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            if tied:
                continue
            name = "output.weight"
        else:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
            if not m or m.group(2) not in _LAYER_MAP:
                raise LadderError(f"GGUF export: unexpected tensor '{hf_name}' for a llama model")
            name = f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
        a = t.detach().to("cpu").float().numpy()
        if name.endswith("attn_q.weight"):
            a = permute_qk(a, n_head, n_head)
        elif name.endswith("attn_k.weight"):
            a = permute_qk(a, n_head, n_kv)
        # llama.cpp keeps 1-D tensors (norms) in f32 whatever the output type
        a = np.ascontiguousarray(a.astype(np.float16 if half and a.ndim > 1 else np.float32))
        yield name, a


def expected_tensor_names(config) -> list[str]:
    names = ["token_embd.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"blk.{i}.{v}" for v in _LAYER_MAP.values()]
    names.append("output_norm.weight")
    if not getattr(config, "tie_word_embeddings", False):
        names.append("output.weight")
    return names


def _tokenizer_json(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LadderError("GGUF export needs a fast (tokenizers) tokenizer; this model has a slow one")
    return json.loads(backend.to_str())


def _pre_tokenizer_name(tj: dict, source_gguf: str | None) -> tuple[str, str | None]:
    """tokenizer.ggml.pre for llama.cpp (it picks its split regex by this name)."""
    if source_gguf:  # the model came from a GGUF (embedded / .gguf): keep llama.cpp's own name
        try:
            from transformers.integrations.gguf import read_gguf_metadata

            pre = read_gguf_metadata(source_gguf)[0].get("tokenizer.ggml.pre")
            if pre:
                return str(pre), None
        except Exception:  # pragma: no cover - fall through to detection
            pass
    pre = tj.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else [pre.get("type")]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2", None  # llama.cpp's name (llama-vocab.cpp); "gpt2" is refused as unknown
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm", None
    if kinds == ["Split", "ByteLevel"]:
        regex = (pre["pretokenizers"][0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in regex:
            return "llama-bpe", None
    return "default", f"pre-tokenizer {kinds} not recognised; wrote tokenizer.ggml.pre='default' (llama.cpp may split text differently)"


def tokenizer_metadata(tok, config, source_gguf: str | None = None) -> dict:
    """The tokenizer.* metadata llama.cpp expects for a byte-level BPE (``gpt2``) vocabulary."""
    tj = _tokenizer_json(tok)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise LadderError(
            f"GGUF export supports byte-level BPE tokenizers (tokenizer.ggml.model=gpt2); this one is "
            f"{model.get('type')} with decoder {(tj.get('decoder') or {}).get('type')}; use --format merged"
        )
    n = int(config.vocab_size)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n:
        raise LadderError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {n}")
    rev = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif t in added:
            tokens.append(t)
            types.append(3 if added[t].special else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(t)
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre, warning = _pre_tokenizer_name(tj, source_gguf)
    probe = tok("a", add_special_tokens=True).input_ids
    plain = tok("a", add_special_tokens=False).input_ids
    ids = {
        "bos": tok.bos_token_id if tok.bos_token_id is not None else getattr(config, "bos_token_id", None),
        "eos": tok.eos_token_id if tok.eos_token_id is not None else getattr(config, "eos_token_id", None),
        "unk": tok.unk_token_id,
        "pad": tok.pad_token_id,
    }
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "ids": {k: v for k, v in ids.items() if isinstance(v, int)},
        "add_bos": bool(len(probe) > len(plain) and ids["bos"] is not None and probe[0] == ids["bos"]),
        "add_eos": bool(len(probe) > len(plain) and ids["eos"] is not None and probe[-1] == ids["eos"]),
        "chat_template": getattr(tok, "chat_template", None),
        "warning": warning,
    }


def llama_metadata(config, dtype: str) -> dict:
    """llama.* (and general.file_type) keys, as convert_hf_to_gguf.py writes them."""
    hd = _head_dim(config)
    md = {
        "llama.vocab_size": int(config.vocab_size),
        "llama.context_length": int(config.max_position_embeddings),
        "llama.embedding_length": int(config.hidden_size),
        "llama.block_count": int(config.num_hidden_layers),
        "llama.feed_forward_length": int(config.intermediate_size),
        "llama.attention.head_count": int(config.num_attention_heads),
        "llama.attention.head_count_kv": int(config.num_key_value_heads),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.rope.freq_base": _rope_theta(config),
        "llama.rope.dimension_count": hd,
        "general.file_type": 0 if dtype == "f32" else 1,  # ALL_F32 / MOSTLY_F16
    }
    if hd != config.hidden_size // config.num_attention_heads:
        md["llama.attention.key_length"] = hd
        md["llama.attention.value_length"] = hd
    return md


def write_gguf(path: Path, model, tok, dtype: str, name: str, source_gguf: str | None = None,
               tmeta: dict | None = None) -> dict:
    """Write ``model`` (a plain Llama) and ``tok`` to one GGUF file. Returns what was written."""
    import gguf

    config = model.config
    arch = check_gguf_supported(config)
    tmeta = tmeta or tokenizer_metadata(tok, config, source_gguf)
    meta = llama_metadata(config, dtype)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name(name)
    w.add_description("exported by lmladder")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in meta.items():
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tmeta["pre"])
    w.add_token_list(tmeta["tokens"])
    w.add_token_types(tmeta["types"])
    if tmeta["merges"]:  # GGUF cannot store an empty array
        w.add_token_merges(tmeta["merges"])
    ids = tmeta["ids"]
    if "bos" in ids:
        w.add_bos_token_id(ids["bos"])
    if "eos" in ids:
        w.add_eos_token_id(ids["eos"])
    if "unk" in ids:
        w.add_unk_token_id(ids["unk"])
    if "pad" in ids:
        w.add_pad_token_id(ids["pad"])
    w.add_add_bos_token(tmeta["add_bos"])
    w.add_add_eos_token(tmeta["add_eos"])
    if tmeta["chat_template"]:
        w.add_chat_template(tmeta["chat_template"])
    shapes = {}
    for tname, arr in llama_tensors(model.state_dict(), config, dtype):
        w.add_tensor(tname, arr)
        shapes[tname] = (tuple(arr.shape), "F16" if arr.dtype.itemsize == 2 else "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"metadata": meta, "tokenizer": tmeta, "tensors": shapes}


def _slug(s: str) -> str:
    s = Path(s.rstrip("/")).name or s
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "model"
