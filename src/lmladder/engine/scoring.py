"""Log-likelihood scoring of continuations (label choices) after prompts.

As lm-eval-harness does for choices: the score of a continuation is the sum of its
token log-probabilities given the prompt. Two things make it cheap here:

* **Shared-prefix KV cache.** Every prompt of a rung starts with the same tokens
  (system message, instruction, and for few-shot the k examples). That prefix is run
  once; each batch reuses its key/value cache, so an 8-shot prompt costs little more
  than a zero-shot one.
* **One row per example when every choice is a single token**: the next-token
  distribution at the end of the prompt scores all choices at once, and only the last
  position's logits are computed (``logits_to_keep``). Otherwise one row per
  (example, choice), with only the choice positions' logits computed.

Rows are left-padded after the shared prefix: ``[prefix][pad…][suffix]``, with an
attention mask hiding pads and explicit position ids, so every row ends at the last
column and the logits we need are the last few.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


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
) -> tuple[list[list[float]], ScoreStats]:
    """Return ``ll[i][j]`` = log p(choice_ids[i][j] | prompt_ids[i]) and cost stats."""
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
    # row = (example index, choice index or -1 for "all single-token choices", tokens, targets)
    rows: list[tuple[int, int, list[int], list[int]]] = []
    for i, (p, cs) in enumerate(zip(prompt_ids, choice_ids)):
        suffix = p[P:]
        if single:
            rows.append((i, -1, suffix, [c[0] for c in cs]))
        else:
            for j, c in enumerate(cs):
                rows.append((i, j, suffix + c[:-1], c))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][2]))
    result: list[list[float]] = [[0.0] * len(cs) for cs in choice_ids]
    computed = P
    bar = tqdm(total=len(prompt_ids), desc=desc, unit="ex", leave=False, disable=None)
    done_examples: set[int] = set()
    for start in range(0, len(order), batch_size):
        batch = [rows[r] for r in order[start : start + batch_size]]
        B, T = len(batch), max(len(r[2]) for r in batch)
        keep = 1 if single else max(len(r[3]) for r in batch)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, (_, _, toks, _) in enumerate(batch):
            ids[b, T - len(toks) :] = torch.tensor(toks)
            mask[b, T - len(toks) :] = 1
            computed += len(toks)
        pos = P + (mask.cumsum(1) - 1).clamp(min=0)
        attn = torch.cat([torch.ones((B, P), dtype=torch.long), mask], 1) if P else mask
        kwargs = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(B)
            kwargs["past_key_values"] = cache
        out = model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            position_ids=pos.to(device),
            use_cache=prefix_cache is not None,
            logits_to_keep=keep,
            **kwargs,
        )
        logp = out.logits.float().log_softmax(-1).cpu()  # (B, keep, V)
        for b, (i, j, _, targets) in enumerate(batch):
            if single:
                result[i] = [logp[b, -1, t].item() for t in targets]
            else:
                m = len(targets)
                lp = logp[b, keep - m :, :]
                result[i][j] = float(lp[torch.arange(m), torch.tensor(targets)].sum())
            if i not in done_examples:
                done_examples.add(i)
                bar.update(1)
    bar.close()
    return result, ScoreStats(prefix_tokens=P, computed_tokens=computed, rows=len(rows))
