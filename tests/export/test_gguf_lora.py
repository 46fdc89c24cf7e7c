"""export/gguf_lora.py: a PEFT LoRA written as a GGUF LoRA adapter in llama.cpp's format
(read back with gguf.GGUFReader; that llama.cpp applies it as PEFT does is checked in
tests/serving/test_llamacpp.py), and the adapters it refuses (served merged instead)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import make_model, make_tokenizer


def _adapter(tmp_path, name="ad", **lora_kw):
    import torch
    from peft import LoraConfig, get_peft_model

    tok = make_tokenizer()
    model = make_model(len(tok))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora_kw)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g))
    out = tmp_path / name
    pm.save_pretrained(out, safe_serialization=True)
    return out, model.config


def test_gguf_lora_layout_names_shapes_and_qk_permutation(tmp_path):
    import gguf
    from safetensors.numpy import load_file

    from lmladder.export.gguf_lora import write_gguf_lora
    from lmladder.export.gguf_writer import permute_qk

    ad, cfg = _adapter(tmp_path)
    out = tmp_path / "ad.gguf"
    info = write_gguf_lora(out, ad, cfg, "ad")
    r = gguf.GGUFReader(str(out))

    def kv(key):
        f = r.fields[key]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(v[0])

    assert kv("general.type") == "adapter" and kv("adapter.type") == "lora"
    assert kv("general.architecture") == "llama" and kv("adapter.lora.alpha") == 8.0
    assert info["rank"] == 4 and info["alpha"] == 8.0
    names = {t.name for t in r.tensors}
    # 2 layers x 7 projections x (lora_a, lora_b), named after the base GGUF's tensors
    assert len(names) == 2 * 7 * 2
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names
    sd = load_file(str(ad / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.0."
    t = {x.name: np.array(x.data) for x in r.tensors}
    a, b = sd[pre + "self_attn.q_proj.lora_A.weight"], sd[pre + "self_attn.q_proj.lora_B.weight"]
    # lora_a as PEFT's A (rank x in: ggml ne[0] = in = the base's ne[0]); lora_b permuted like W_q
    np.testing.assert_array_equal(t["blk.0.attn_q.weight.lora_a"], a)
    np.testing.assert_array_equal(t["blk.0.attn_q.weight.lora_b"], permute_qk(b, cfg.num_attention_heads))
    assert not np.array_equal(permute_qk(b, cfg.num_attention_heads), b)  # the permutation is not a no-op here
    kb = sd[pre + "self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(t["blk.0.attn_k.weight.lora_b"],
                                  permute_qk(kb, cfg.num_attention_heads, cfg.num_key_value_heads))
    vb = sd[pre + "self_attn.v_proj.lora_B.weight"]
    np.testing.assert_array_equal(t["blk.0.attn_v.weight.lora_b"], vb)  # v: no permutation


def test_rslora_alpha_gives_peft_scale(tmp_path):
    from lmladder.export.gguf_lora import write_gguf_lora

    ad, cfg = _adapter(tmp_path, use_rslora=True)
    info = write_gguf_lora(tmp_path / "rs.gguf", ad, cfg)
    # llama.cpp scales by alpha / rank; PEFT's rsLoRA by lora_alpha / sqrt(r) = 8 / 2
    assert info["alpha"] / info["rank"] == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("change,reason", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_alpha": 0}, "lora_alpha is 0"),
    ({"peft_type": "IA3"}, "peft_type IA3"),
])
def test_adapters_llamacpp_cannot_apply_say_why(tmp_path, change, reason):
    from lmladder.errors import LadderError
    from lmladder.export.gguf_lora import lora_problem, write_gguf_lora

    ad, cfg = _adapter(tmp_path)
    assert lora_problem(ad, cfg) is None
    c = json.loads((ad / "adapter_config.json").read_text())
    c.update(change)
    (ad / "adapter_config.json").write_text(json.dumps(c))
    assert reason in lora_problem(ad, cfg)
    with pytest.raises(LadderError, match="cannot be written as a GGUF LoRA"):
        write_gguf_lora(tmp_path / "x.gguf", ad, cfg)


def test_embedding_lora_is_refused(tmp_path):
    from lmladder.export.gguf_lora import lora_problem

    ad, cfg = _adapter(tmp_path)
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(ad / "adapter_model.safetensors"))
    sd["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((4, 8), np.float32)
    save_file(sd, str(ad / "adapter_model.safetensors"))
    assert "embed_tokens" in lora_problem(ad, cfg)
