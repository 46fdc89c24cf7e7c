"""Forgetting check: perplexity of a general text sample before and after training.

Every weight-update rung scores the same text (default: a WikiText-2 sample shipped in
``lmladder/data_files``) with the model it starts from and with the trained model, and
reports both in its result (``details.forgetting``). A large rise means the adaptation
damaged general language modelling.

A rung calls :func:`before` with the model it starts from (before any adapter goes in) and
:func:`after` with the model it predicts with; the seconds both take are reported apart
(``details.forgetting_seconds``): they are not training cost.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lmladder.errors import LadderError

BUILTIN = "builtin"
BUILTIN_NAME = "wikitext2 sample"


def load_texts(spec: str) -> tuple[list[str], str]:
    """(paragraphs, display name) from ``'builtin'`` or a JSONL file of ``{"text": ...}`` rows."""
    if spec == BUILTIN:
        raw = resources.files("lmladder").joinpath("data_files/wikitext2_sample.jsonl").read_text("utf-8")
        source, name = "lmladder/data_files/wikitext2_sample.jsonl", BUILTIN_NAME
    else:
        p = Path(spec).expanduser()
        if not p.is_file():
            raise LadderError(f"forgetting_text: {spec}: file not found (give a JSONL file, 'builtin' or null)")
        raw, source, name = p.read_text("utf-8"), str(p), p.name
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise LadderError(f"{source}:{i}: forgetting_text: not valid JSON") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise LadderError(f"{source}:{i}: text: missing or not a string")
        if text.strip():
            texts.append(text)
    if not texts:
        raise LadderError(f"{source}: forgetting_text: no text rows")
    return texts, name


def token_chunks(tokenizer, texts: list[str], max_tokens: int, max_len: int = 256) -> list[list[int]]:
    """Paragraphs as token sequences (at most ``max_len`` each) until ``max_tokens`` in all."""
    chunks, total = [], 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False).input_ids[:max_len]
        ids = ids[: max_tokens - total]
        if len(ids) >= 2:
            chunks.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    return chunks


def perplexity(model, chunks: list[list[int]], pad_id: int, batch_size: int = 1) -> float:
    """exp(mean next-token NLL) over every token but each chunk's first.

    One chunk per forward by default, the targets' padding ignored by the loss itself (no
    boolean-indexed copy of the logits), every tensor dropped before the next forward: the
    check's transient memory is one chunk's ``length x vocab`` logits and their log-softmax
    (~100 MB for a 49k vocabulary), not four chunks' logits three times over (issue 16)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(chunks), batch_size):
            batch = chunks[s : s + batch_size]
            T = max(map(len, batch))
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for b, c in enumerate(batch):
                ids[b, : len(c)] = torch.tensor(c)
                mask[b, : len(c)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logits = logits[:, -T:][:, :-1]
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(device)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
            count += int(mask[:, 1:].sum())
            del logits, target
    if was_training:
        model.train()
    return math.exp(nll / max(count, 1))


# --------------------------------------------------------------------------- before / after training


@dataclass
class Check:
    """A forgetting check under way: the text's token chunks, the result so far
    (``text``, ``tokens``, ``ppl_before``) and the seconds spent on it."""

    chunks: list[list[int]]
    pad_id: int
    info: dict[str, Any]
    seconds: float


def before(model, tokenizer, cfg) -> Check | None:
    """Perplexity of ``cfg.forgetting_text`` (its first ``forgetting_max_tokens`` tokens) under
    ``model``, the model training starts from; None when the check is off
    (``forgetting_text: null``) or on a rank other than 0 (rank 0 alone evaluates)."""
    from lmladder.run import distributed

    spec = cfg.forgetting_text
    if not spec or not distributed.is_main():
        return None
    t0 = time.perf_counter()
    texts, name = load_texts(spec)
    chunks = token_chunks(tokenizer, texts, cfg.forgetting_max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    info = {"text": name, "tokens": sum(map(len, chunks)), "ppl_before": perplexity(model, chunks, pad)}
    return Check(chunks, pad, info, time.perf_counter() - t0)


def after(check: Check | None, model, stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with ``forgetting`` (``ppl_after`` under ``model``, the trained model as it
    predicts) and ``forgetting_seconds`` (before and after together) when ``check`` ran."""
    if check is None:
        return stats
    t0 = time.perf_counter()
    check.info["ppl_after"] = perplexity(model, check.chunks, check.pad_id)
    stats["forgetting"] = check.info
    stats["forgetting_seconds"] = round(check.seconds + time.perf_counter() - t0, 3)
    return stats
