"""Batched text generation on top of transformers ``generate``.

What we add:

* **Batches sorted by prompt length** and left-padded, so a batch wastes few pad columns;
  results come back in the caller's order.
* **N samples share their prompt.** ``n > 1`` runs the prompts' prefill once, repeats the
  KV cache N times (``DynamicCache.batch_repeat_interleave``) and samples the N paths in
  one batched ``generate``, instead of N prefills (``num_return_sequences`` repeats the
  prompt before the prefill).
* **Stop at the end of the turn**: EOS ids come from the tokenizer, the model's generation
  config and the chat template's end-of-turn token.
* **Grammar-constrained decoding** via a per-batch logits processor factory
  (inference/constrain.py), so every rung can turn it on.
* Seeded sampling: each batch reseeds from ``seed`` and its position, so results do not
  depend on what ran before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lmladder import progress as _progress


@dataclass
class GenStats:
    prompts: int = 0
    sequences: int = 0
    prompt_tokens: int = 0  # prompt tokens per prompt, summed (what a caller pays per call)
    prefill_tokens: int = 0  # prompt tokens actually run through the model
    generated_tokens: int = 0  # new tokens, all sequences
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("prompts", "sequences", "prompt_tokens", "prefill_tokens", "generated_tokens")}
        d["seconds"] = round(self.seconds, 3)
        d["generated_tokens_per_second"] = round(self.generated_tokens / self.seconds, 2) if self.seconds else None
        return {**d, **self.extra}


def stop_ids(tokenizer, model=None) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def _generate_kwargs(max_new_tokens, do_sample, temperature, top_p, eos, pad) -> dict:
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos, pad_token_id=pad)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # silence the model's sampling defaults
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def _shared_prefill(model, ids, mask, n: int):
    """The KV cache of every prompt but its last token, computed once and repeated for the
    ``n`` paths (generate runs the last token, so each path samples its own first token)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if ids.shape[1] > 1:
        pos = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
    return cache


def _batch_processors(processors, rows: int, rows_idx: list[int], max_new_tokens: int) -> list:
    if getattr(processors, "accepts_budget", False):  # grammar: reasoning budget
        return processors(rows, rows_idx, max_new_tokens=max_new_tokens)
    return processors(rows, rows_idx)


def _until_stop(rows: list[list[int]], eos) -> list[list[int]]:
    """Each row's new tokens up to (not including) its first stop token."""
    out = []
    for row in rows:
        toks = []
        for t in row:
            if t in eos:
                break
            toks.append(t)
        out.append(toks)
    return out


def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    n: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    processors: Callable[[int, list[int]], list] | None = None,
    desc: str = "generate",
    progress: bool = True,
    max_batch_tokens: int | None = None,
) -> tuple[list[list[str]], GenStats]:
    """Generate ``n`` continuations per prompt. Returns texts[prompt][sample] (special
    tokens removed) in the caller's order, and stats.

    ``batch_size`` counts sequences, so with ``n`` samples a batch holds
    ``max(1, batch_size // n)`` prompts. ``processors(batch_rows, prompt_indices)``
    returns a list of logits processors for one batch (e.g. a grammar matcher per row);
    a factory with ``accepts_budget = True`` also gets ``max_new_tokens`` (the grammar's
    reasoning budget) and its ``stats()`` are added to the returned stats.
    ``max_batch_tokens`` bounds a batch's padded size, prompt plus new tokens of every
    sequence (scoring.token_batches): a very long prompt generates in a smaller batch.
    """
    if not prompt_ids:
        return [], GenStats()
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = stop_ids(tokenizer, model)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    per_batch = max(1, batch_size // max(n, 1))
    out: list[list[str]] = [[] for _ in prompt_ids]
    stats = GenStats(prompts=len(prompt_ids), sequences=len(prompt_ids) * n)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    bar = _progress.bar(len(prompt_ids), desc, enabled=progress)  # tqdm on a terminal, else lines
    try:
        from lmladder.inference.scoring import token_batches

        seq_len = [(len(p) + max_new_tokens) * max(n, 1) for p in prompt_ids]
        for b, idx in enumerate(token_batches(order, seq_len, per_batch, max_batch_tokens)):
            rows = [list(prompt_ids[i]) for i in idx]
            ids, mask = _left_pad(rows, pad)
            ids, mask = ids.to(device), mask.to(device)
            stats.prompt_tokens += sum(map(len, rows))
            stats.prefill_tokens += sum(map(len, rows))
            kwargs = _generate_kwargs(max_new_tokens, do_sample, temperature, top_p, eos, pad)
            torch.manual_seed(seed * 1_000_003 + b)
            if n > 1:  # prefill once, then repeat the cache: the N paths share the prompt
                kwargs["past_key_values"] = _shared_prefill(model, ids, mask, n)
                ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            if processors is not None:
                procs = _batch_processors(processors, ids.shape[0], [i for i in idx for _ in range(n)], max_new_tokens)
                if procs:
                    from transformers import LogitsProcessorList

                    kwargs["logits_processor"] = LogitsProcessorList(procs)
            seqs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            for r, toks in enumerate(_until_stop(seqs[:, ids.shape[1]:].tolist(), eos)):
                stats.generated_tokens += len(toks)
                out[idx[r // n]].append(tokenizer.decode(toks, skip_special_tokens=True))
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    stats.seconds = time.perf_counter() - t0
    if processors is not None and hasattr(processors, "stats"):  # grammar engine counters
        stats.extra.update(processors.stats())
    return out, stats
