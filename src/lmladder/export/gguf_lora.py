"""A PEFT LoRA adapter as a GGUF LoRA adapter for llama.cpp (the format of llama.cpp's
``convert_lora_to_gguf.py``), so llama.cpp applies it over the base GGUF at run time
instead of serving a merged copy of the whole model per adapter.

The file: ``general.type = "adapter"``, ``general.architecture`` (llama.cpp refuses an
adapter whose architecture differs from its model's), ``adapter.type = "lora"``,
``adapter.lora.alpha``, and per adapted weight two tensors named after the base tensor,
``blk.N.attn_q.weight.lora_a`` (PEFT's ``lora_A``, rows = rank, columns = in features) and
``.lora_b`` (``lora_B``, rows = out features, columns = rank), F32. llama.cpp computes
``W x + alpha / rank * B (A x)`` with the rank read from ``lora_b``: PEFT's ``lora_alpha /
r``. For q and k, the base tensors' rows are permuted from HF's rotary halves to GGML's
interleaved pairs (gguf_writer.permute_qk); ``W' = P W`` so ``P (W + s B A) = P W + s (P B)
A``: lora_b's rows get the same permutation, lora_a is unchanged.

What llama.cpp cannot apply (``lora_problem`` says why, and the server merges instead):
DoRA, per-module ranks or alphas (``rank_pattern`` / ``alpha_pattern``: llama.cpp has one
alpha per file), ``modules_to_save`` (whole trained copies of a module), bias training,
adapted embeddings or lm_head, ``lora_alpha = 0`` (llama.cpp reads 0 as "scale 1").
rsLoRA (``alpha / sqrt(r)``) is written as ``alpha * sqrt(r)`` so llama.cpp's ``alpha / r``
gives the same scale.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from lmladder.errors import LadderError
from lmladder.export.gguf_writer import _LAYER_MAP, check_gguf_supported, permute_qk

_KEY = re.compile(r"^base_model\.model\.(model\.layers\.\d+\.[a-z_]+\.[a-z_]+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def _config(adapter: Path) -> dict:
    try:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise LadderError(f"{adapter}: adapter_config.json is not readable ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise LadderError(f"{adapter}: adapter_config.json is not a JSON object")
    return cfg


def lora_problem(adapter: str | Path, base_config=None) -> str | None:
    """Why llama.cpp cannot apply this PEFT adapter as a GGUF LoRA (None: it can)."""
    cfg = _config(Path(adapter))
    if cfg.get("peft_type") != "LORA":
        return f"peft_type {cfg.get('peft_type')} (llama.cpp applies LoRA adapters only)"
    if cfg.get("use_dora"):
        return "DoRA (use_dora) is not supported by llama.cpp"
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        return "per-module ranks or alphas (rank_pattern / alpha_pattern): llama.cpp has one alpha per adapter"
    if cfg.get("modules_to_save"):
        return f"modules_to_save {cfg['modules_to_save']} (whole trained modules, not low-rank updates)"
    if cfg.get("bias", "none") != "none":
        return f"bias={cfg.get('bias')} (trained biases)"
    if not cfg.get("lora_alpha"):
        return "lora_alpha is 0"
    if base_config is not None:
        try:
            check_gguf_supported(base_config)
        except LadderError as e:
            return str(e)
    from safetensors import safe_open

    st = Path(adapter) / "adapter_model.safetensors"
    if not st.is_file():
        return "no adapter_model.safetensors"
    with safe_open(str(st), framework="numpy") as f:
        for k in f.keys():
            m = _KEY.match(k)
            if not m or m.group(1).split(".", 3)[3] + ".weight" not in _LAYER_MAP:
                return f"tensor '{k}' is not a LoRA of a llama attention / MLP projection"
    return None


def gguf_alpha(cfg: dict, rank: int) -> float:
    """adapter.lora.alpha such that llama.cpp's alpha / rank equals PEFT's scale."""
    alpha = float(cfg["lora_alpha"])
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha


def write_gguf_lora(path: Path, adapter: str | Path, base_config, name: str = "lora") -> dict:
    """Write the PEFT adapter folder ``adapter`` (for a llama base with ``base_config``) as a
    GGUF LoRA file. Returns {"alpha", "rank", "tensors": {name: shape}}."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    adapter = Path(adapter)
    problem = lora_problem(adapter, base_config)
    if problem:
        raise LadderError(f"{adapter}: cannot be written as a GGUF LoRA: {problem}")
    cfg = _config(adapter)
    arch = check_gguf_supported(base_config)
    n_head, n_kv = base_config.num_attention_heads, base_config.num_key_value_heads
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="numpy") as f:
        for k in f.keys():
            m = _KEY.match(k)
            hf = m.group(1)  # model.layers.N.self_attn.q_proj
            layer, sub = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf).groups()
            tname = f"blk.{layer}.{_LAYER_MAP[sub + '.weight']}"
            pairs.setdefault(tname, {})[m.group(2)] = f.get_tensor(k).astype(np.float32)
    ranks = set()
    out = {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("adapter")
    w.add_name(name)
    w.add_string("adapter.type", "lora")
    tensors = []
    for tname, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LadderError(f"{adapter}: {tname} has lora_{'A' if 'A' in ab else 'B'} only")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise LadderError(f"{adapter}: {tname}: lora_A {a.shape} and lora_B {b.shape} disagree on the rank")
        if tname.endswith("attn_q.weight"):
            b = permute_qk(b, n_head, n_head)
        elif tname.endswith("attn_k.weight"):
            b = permute_qk(b, n_head, n_kv)
        ranks.add(a.shape[0])
        tensors += [(f"{tname}.lora_a", np.ascontiguousarray(a)), (f"{tname}.lora_b", np.ascontiguousarray(b))]
    if not tensors:
        raise LadderError(f"{adapter}: no LoRA tensors")
    if len(ranks) != 1:
        raise LadderError(f"{adapter}: several ranks {sorted(ranks)}; llama.cpp has one alpha per adapter")
    rank = ranks.pop()
    alpha = gguf_alpha(cfg, rank)
    w.add_float32("adapter.lora.alpha", alpha)
    for tname, arr in tensors:
        w.add_tensor(tname, arr)
        out[tname] = tuple(arr.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"alpha": alpha, "rank": rank, "tensors": out}
