"""Merged model export: the run's LoRA merged into the base with PEFT ``merge_and_unload()``
(a prompt rung: the base model as it is), saved as a plain transformers model
(model.safetensors + config.json, --dtype f32 or f16) with the tokenizer and its chat
template. The merged model is also what the GGUF writer writes.

The merge rounds differently from the unmerged source, ``(W + BA)x`` against
``Wx + B(Ax)``: that is the f32 difference verification measures (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path


def merged_model(source, model, adapter: Path | None):
    """``source`` (base + unmerged adapter) merged into a plain model; ``model`` when no adapter.
    PEFT merges in place: take the source's logits before."""
    plain = source.merge_and_unload() if adapter is not None else model
    plain.eval()
    return plain


def write_merged(tmp: Path, plain, tok, dtype: str) -> None:
    import torch

    if dtype == "f16":
        plain = plain.to(torch.float16)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
