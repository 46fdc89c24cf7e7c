"""Log-likelihood scoring of continuations (label choices) after prompts.

As lm-eval-harness does for choices: the score of a continuation is the sum of its
token log-probabilities given the prompt. Two things make it cheap here:

* **Shared-prefix KV cache.** Every prompt of a rung starts with the same tokens
  (system message, instruction, and for few-shot the k examples). That prefix is run
  once; each batch reuses its key/value cache, so an 8-shot prompt costs little more
  than a zero-shot one.
* **Each prompt is run once**: the next-token distribution at the end of the prompt
  scores every choice's first token at once (only the last position's logits are
  computed, ``logits_to_keep``); longer choices (a label and its end-of-turn token)
  continue that prompt's KV cache with their own tokens, one row per choice, so a
  prompt's tokens are not recomputed per choice.

Rows are left-padded after the shared prefix: ``[prefix][pad…][suffix]``, with an
attention mask hiding pads and explicit position ids, so every row ends at the last
column and the logits we need are the last few.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from lmladder import progress


@dataclass
class ScoreStats:
    prefix_tokens: int  # tokens computed once and shared by every row
    computed_tokens: int  # tokens actually run through the model (incl. the prefix once)
    rows: int


def common_prefix_len(seqs: list[list[int]]) -> int:
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


DEFAULT_MAX_BATCH_TOKENS = 8192  # eval.max_batch_tokens


def token_batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Cut ``order`` (indices, longest first) into batches of at most ``batch_size`` rows
    whose padded size (rows x the batch's longest) stays within ``max_tokens``: short
    prompts batch fully, a very long one runs alone, so memory is bounded by the budget
    rather than by the longest input times the batch size."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and (
                max_tokens is None or (len(out[-1]) + 1) * max(lengths[j] for j in out[-1] + [i]) <= max_tokens):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _fork(cache):
    """A cache that can be selected from / repeated / extended without touching ``cache``.
    Dynamic layers replace their tensors on every such operation (never write into them),
    so sharing the tensors is enough: a long prompt's cache is not copied once per batch
    of choices. Other layer kinds are deep-copied."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return copy.deepcopy(cache)
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in layers]
    return out


def _continue_choices(model, stage1, batch, choice_ids, attn, last_pos, ctx_len, result, batch_size,
                      max_batch_tokens, pad_id, device) -> tuple[int, int]:
    """Stage 2: the choices longer than one token (a label and its end-of-turn token)
    continue their example's stage-1 cache (selected once per choice row) with their own
    tokens; each choice's remaining log-probs are added to ``result``. Returns (rows run,
    tokens computed)."""
    # (row in batch, example, choice) for every choice with more tokens to score
    rows = [(b, i, j) for b, i in enumerate(batch) for j, c in enumerate(choice_ids[i]) if len(c) > 1]
    need = [ctx_len + len(choice_ids[i][j]) for _, i, j in rows]  # each row holds its prompt's cache
    n_rows = computed = 0
    for part_idx in token_batches(list(range(len(rows))), need, batch_size, max_batch_tokens):
        part = [rows[k] for k in part_idx]
        L = max(len(choice_ids[i][j]) - 1 for _, i, j in part)
        R = len(part)
        cids = torch.full((R, L), pad_id, dtype=torch.long)
        cmask = torch.zeros((R, L), dtype=torch.long)
        for k, (_, i, j) in enumerate(part):
            c = choice_ids[i][j][:-1]
            cids[k, : len(c)] = torch.tensor(c)
            cmask[k, : len(c)] = 1
            computed += len(c)
        sel = torch.tensor([b for b, _, _ in part])
        cache = _fork(stage1)
        cache.batch_select_indices(sel.to(device))
        cout = model(
            input_ids=cids.to(device),
            attention_mask=torch.cat([attn[sel], cmask], 1).to(device),
            position_ids=(last_pos[sel, None] + 1 + torch.arange(L)[None]).to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=L,
        )
        n_rows += R
        logp = cout.logits.float().log_softmax(-1).cpu()  # (R, L, V)
        for k, (_, i, j) in enumerate(part):
            targets = torch.tensor(choice_ids[i][j][1:])
            result[i][j] += float(logp[k, torch.arange(len(targets)), targets].sum())
    return n_rows, computed


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def loglikelihoods(
    model,
    prompt_ids: list[list[int]],
    choice_ids: list[list[list[int]]],
    batch_size: int = 16,
    pad_id: int = 0,
    desc: str = "scoring",
    share_prefix: bool = True,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
) -> tuple[list[list[float]], ScoreStats]:
    """Return ``ll[i][j]`` = log p(choice_ids[i][j] | prompt_ids[i]) and cost stats.
    A batch holds at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens
    (:func:`token_batches`)."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt")
    if any(len(c) == 0 for cs in choice_ids for c in cs):
        raise ValueError("a choice tokenises to nothing")
    device = _device(model)
    # The last prompt token must stay in every row: its logits score the first choice token.
    P = 0
    if share_prefix and len(prompt_ids) > 1:
        P = min(common_prefix_len(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    prefix_cache = None
    if P > 0:
        out = model(input_ids=torch.tensor([prompt_ids[0][:P]], device=device), use_cache=True)
        prefix_cache = out.past_key_values

    single = all(len(c) == 1 for cs in choice_ids for c in cs)
    # Stage 1, one row per example: [prefix][pad...][prompt suffix]. Its last logits score
    # every choice's first token at once. Stage 2 (choices longer than one token, e.g. a
    # label and its end-of-turn token): the stage-1 cache of each example, selected once
    # per choice, is continued by the choice's tokens, so a prompt is run once however
    # many choices it has.
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) - P))
    result: list[list[float]] = [[0.0] * len(cs) for cs in choice_ids]
    computed = P
    n_rows = 0
    bar = progress.bar(len(prompt_ids), desc)  # tqdm on a terminal, a line every ~30 s elsewhere
    # the budget counts each row's own tokens: the shared prefix is computed once
    for batch in token_batches(order, [len(p) - P for p in prompt_ids], batch_size, max_batch_tokens):
        B, T = len(batch), max(len(prompt_ids[i]) - P for i in batch)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, i in enumerate(batch):
            toks = prompt_ids[i][P:]
            ids[b, T - len(toks) :] = torch.tensor(toks)
            mask[b, T - len(toks) :] = 1
            computed += len(toks)
        pos = P + (mask.cumsum(1) - 1).clamp(min=0)
        attn = torch.cat([torch.ones((B, P), dtype=torch.long), mask], 1) if P else mask
        kwargs = {}
        if prefix_cache is not None:
            cache = _fork(prefix_cache)
            cache.batch_repeat_interleave(B)
            kwargs["past_key_values"] = cache
        out = model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            position_ids=pos.to(device),
            use_cache=not single,
            logits_to_keep=1,
            **kwargs,
        )
        n_rows += B
        first = out.logits[:, -1, :].float().log_softmax(-1).cpu()  # (B, V)
        for b, i in enumerate(batch):
            result[i] = [first[b, c[0]].item() for c in choice_ids[i]]
        if not single:
            c_rows, c_tokens = _continue_choices(model, out.past_key_values, batch, choice_ids, attn, pos[:, -1],
                                                 P + T, result, batch_size, max_batch_tokens, pad_id, device)
            n_rows += c_rows
            computed += c_tokens
        bar.update(B)
    bar.close()
    return result, ScoreStats(prefix_tokens=P, computed_tokens=computed, rows=n_rows)
