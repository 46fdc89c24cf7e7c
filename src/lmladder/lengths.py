"""Every input's token length against the model's context, before any model work.

A test input of 12.5k tokens for a model with an 8k context is not a slow example: it is
wrong (positions past the context) and, batched with others, gigabytes of KV cache. The
check runs in ``ladder.run`` after the data is read and before anything is written: it
needs only the tokenizer and the model's config (no weights).

The budget of one input is the model's context minus the prompt around it (instruction,
label list, chat template; measured once on an empty input) and the answer (the longest
label or choice, or the most new tokens a rung of the run may generate), with a small
margin for tokens that merge across the joins. ``data.max_input_tokens`` sets it
directly. An input over the budget is cut to its first tokens (``data.truncation:
truncate``, the default; counted in data.json as ``truncated``, shown in the report) or
stops the run with its file:line (``data.truncation: error``).
"""

from __future__ import annotations

import logging
from typing import Any

from lmladder.errors import LadderError, where

log = logging.getLogger(__name__)

MARGIN = 8  # tokens that may merge differently where the input meets the template
MIN_BUDGET = 16  # below this the template leaves no room for an input at all


def context_length(config, tokenizer) -> int | None:
    """The model's context: ``max_position_embeddings`` (text config for multimodal
    configs), capped by a sane ``tokenizer.model_max_length``."""
    cands = []
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config  # (None: no config)
    mpe = getattr(text_cfg, "max_position_embeddings", None)
    if isinstance(mpe, int) and mpe > 0:
        cands.append(mpe)
    mml = getattr(tokenizer, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < 10_000_000:
        cands.append(mml)
    return min(cands) if cands else None


def load_tokenizer_and_context(spec: str):
    """(tokenizer, context length) of a model without loading its weights; (None, None)
    for a model served elsewhere (``openai:``) without a local tokenizer."""
    from lmladder import models

    ref = models.resolve(spec)
    if ref.kind == "openai":
        import os

        name = os.environ.get("LMLADDER_OPENAI_TOKENIZER")
        if not name:
            return None, None
        ref = models.resolve(name)
    elif ref.kind == "vllm":  # vllm:PATH: PATH's tokenizer and config
        ref = models.resolve(ref.path)
    from transformers import AutoConfig, AutoTokenizer

    target, local_only = models.materialise(ref)
    kw = dict(trust_remote_code=False, local_files_only=local_only)
    try:
        tok = AutoTokenizer.from_pretrained(target, **kw)
        config = AutoConfig.from_pretrained(target, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LadderError(f"model '{spec}': could not load its tokenizer / config ({first})") from None
    return tok, context_length(config, tok)


def answer_reserve(cfg, task, tok) -> int:
    """Tokens the answer may take: the longest label / choice (label scoring) and the most
    new tokens any rung of this run may generate."""
    n = 0
    for label in task.labels or []:
        n = max(n, len(tok(str(label), add_special_tokens=False).input_ids) + 2)
    if task.generative:
        n = max(n, cfg.eval.max_new_tokens)
    for r in cfg.rungs:
        mnt = getattr(cfg.rung_config(r), "max_new_tokens", None)
        if isinstance(mnt, int):
            n = max(n, mnt)
    return n


def check_inputs(cfg, dataset, task, tok, context: int | None) -> dict[str, Any] | None:
    """Check (and per ``data.truncation`` cut) every train and test input; return what
    was found for data.json (None when there is no context to check against)."""
    from lmladder.prompts import ChatFormat

    if tok is None or (context is None and cfg.data.max_input_tokens is None):
        return None
    fmt = ChatFormat(tok, cfg.task.system_prompt)
    empty = fmt.encode(fmt.prompt(task.user_message("")))
    overhead = len(empty) + answer_reserve(cfg, task, tok) + MARGIN
    limit = cfg.data.max_input_tokens
    if limit is None:
        limit = context - overhead
        if limit < MIN_BUDGET:
            raise LadderError(
                f"model '{cfg.model}': its context ({context} tokens) leaves {max(limit, 0)} tokens for an input "
                f"after the prompt template and the answer ({overhead} tokens); use a model with a longer "
                "context or shorten the instruction / eval.max_new_tokens"
            )
    examples = [("train", e) for e in dataset.train] + [("test", e) for e in dataset.test]
    shown = [task.query(e) for _, e in examples]
    lengths = [len(ids) for ids in tok(shown, add_special_tokens=False).input_ids] if shown else []
    over = [(split, e, n) for (split, e), n in zip(examples, lengths) if n > limit]
    info = {"model_context": context, "max_input_tokens": limit, "longest_input": max(lengths, default=0),
            "truncated": {"n": 0, "train": 0, "test": 0, "first": None}}
    if not over:
        return info
    split, e, n = over[0]
    field = "input (data.input_template)" if getattr(cfg.data, "input_template", None) else cfg.data.input_field
    if cfg.data.truncation == "error":
        path, _, line = e.source.rpartition(":")
        raise LadderError(
            f"{where(path, line, field)} has {n} tokens, more than data.max_input_tokens={limit} "
            f"(the model's context {context} less the prompt and answer); shorten it, or set "
            "data.truncation: truncate"
        )
    for split_, ex, n_ in over:
        ids = tok(ex.input, add_special_tokens=False).input_ids
        keep = len(ids) - (n_ - limit)  # the query may add text around the input (choices)
        if keep < 1:
            path, _, line = ex.source.rpartition(":")
            raise LadderError(f"{where(path, line, field)}: the rest of the prompt (choices) alone is over "
                              f"data.max_input_tokens={limit} tokens")
        ex.input = tok.decode(ids[:keep], skip_special_tokens=False)
        info["truncated"][split_] += 1
    info["truncated"].update(n=len(over), first=e.source)
    log.warning("%d input(s) longer than %d tokens (the model's context %s less the prompt and answer) cut to "
                "their first %d tokens (first: %s); data.truncation: error stops instead",
                len(over), limit, context, limit, e.source)
    return info
