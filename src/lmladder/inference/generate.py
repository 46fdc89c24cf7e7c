"""Batched text generation: a KV-cache decode loop in which finished rows leave the batch.

What we add over ``model.generate``:

* **Batches sorted by prompt length** and left-padded, so a batch wastes few pad columns;
  results come back in the caller's order.
* **N samples share their prompt.** ``n > 1`` runs each prompt's prefill once, then
  repeats its KV cache and its last logits N times (``DynamicCache.batch_repeat_interleave``);
  each path draws its own first token from those logits.
* **Finished rows leave the batch.** A row that produced a stop id, or whose text ends a
  complete answer line (``stop_at``, below), is taken out of the batch, out of the KV cache
  (``batch_select_indices``) and out of the grammar processor's per-row state
  (``select_rows``); pad columns that no remaining row needs are dropped with it.
  ``model.generate`` keeps decoding finished rows (as pads) until the last row is done.
  Rows leave in groups (:func:`compact_threshold`): a removal copies the cache once, about
  what one decode step's ``torch.cat`` copies, so one removal per finished row would cost
  more than it saves when rows finish one by one.
* **Stop at the answer**: ``stop_at(prompt_index, text)`` is asked each time a path writes
  a newline; when it returns a position the path is finished and its text is cut there
  (tasks/base.py: the reasoning rungs stop a path once its ``Answer:`` line is complete).
* **Stop at the end of the turn**: EOS ids come from the tokenizer, the model's generation
  config and the chat template's end-of-turn token.
* **Grammar-constrained decoding** via a per-batch logits processor factory
  (inference/constrain.py), so every rung can turn it on.

Greedy decoding makes the forward passes ``model.generate`` makes (left padding, attention
mask, position ids from the mask, float32 logits of the last position; processors, then
argmax), so greedy tokens are ``model.generate``'s (tests/inference/test_generate.py).
Sampling applies the processors, then temperature and top-p (the tokens transformers'
warpers keep, :class:`TopP`), in ``generate``'s order; then **each path draws with its own generator**, seeded from
(``seed``, prompt index, sample index): a path's text depends on the seed, its prompt and
its sample number only, not on the batch size or on what else is in the batch. (The drawn
tokens are not ``model.generate``'s, whose one global generator draws for the whole batch.)
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
    decode_row_steps: int = 0  # rows run through decode forward passes, summed over steps
    answer_stops: int = 0  # paths stopped by ``stop_at`` (their answer line was complete)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        keys = ("prompts", "sequences", "prompt_tokens", "prefill_tokens", "generated_tokens", "decode_row_steps",
                "answer_stops")
        d = {k: getattr(self, k) for k in keys}
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


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``model.generate`` computes them."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill_(mask == 0, 1)


# --------------------------------------------------------------------------- the KV cache


def compact_threshold(rows: int) -> int:
    """Finished rows that make a batch of ``rows`` drop them: an eighth of the batch (at
    least one). A removal copies the whole cache once (as each decode step's concatenation
    does); a finished row left in costs ~1/rows of every step until the next removal."""
    return max(1, -(-rows // 8))


def _layers(cache):
    return getattr(cache, "layers", None) or []


def cache_selectable(cache) -> bool:
    """Rows of this cache can be selected out (every transformers cache layer with a batch
    dimension can); its leading columns can be dropped and it can be padded / concatenated
    only when every layer is a plain ``DynamicLayer`` (:func:`cache_plain`)."""
    return hasattr(cache, "batch_select_indices")


def cache_plain(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = _layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def cache_width(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def select_rows(cache, mask: torch.Tensor, keep: torch.Tensor) -> tuple[object, torch.Tensor]:
    """Keep rows ``keep`` (a long tensor of batch indices) of ``cache`` and of its attention
    ``mask``; with a plain dynamic cache, also drop the leading columns that no kept row
    attends to (a finished long prompt's padding). One copy of the cache."""
    mask = mask.index_select(0, keep)
    used = mask.any(0).nonzero()
    drop = int(used[0, 0]) if used.numel() else 0
    if drop and cache_plain(cache):
        for layer in cache.layers:
            if layer.is_initialized and layer.keys.numel():
                layer.keys = layer.keys[keep, :, drop:]
                layer.values = layer.values[keep, :, drop:]
        return cache, mask[:, drop:]
    cache.batch_select_indices(keep)
    return cache, mask


def _padded(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([t.new_zeros(t.shape[:2] + (width,) + t.shape[3:]), t], dim=2) if width > 0 else t


def concat(a, mask_a: torch.Tensor, b, mask_b: torch.Tensor) -> tuple[object, torch.Tensor]:
    """One batch from two plain dynamic caches (rows of ``a`` first, in ``a``): the narrower
    one is left-padded with masked columns. Every row keeps its own position ids (rotary
    positions are in the cached keys), so the column a token sits in does not matter.
    ``a`` changes only once every new tensor exists (an error leaves it as it was)."""
    wa, wb = mask_a.shape[1], mask_b.shape[1]
    new = [(torch.cat([_padded(la.keys, wb - wa), _padded(lb.keys, wa - wb)], dim=0),
            torch.cat([_padded(la.values, wb - wa), _padded(lb.values, wa - wb)], dim=0))
           for la, lb in zip(a.layers, b.layers)]
    mask = torch.cat([torch.cat([mask_a.new_zeros((mask_a.shape[0], max(wb - wa, 0))), mask_a], dim=1),
                      torch.cat([mask_b.new_zeros((mask_b.shape[0], max(wa - wb, 0))), mask_b], dim=1)], dim=0)
    for layer, (k, v) in zip(a.layers, new):
        layer.keys, layer.values = k, v
    return a, mask


# --------------------------------------------------------------------------- sampling


def path_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of sample ``sample`` of prompt ``prompt`` (its own generator)."""
    return ((int(seed) * 1_000_003 + int(prompt)) * 1_009 + int(sample)) % (2**63)


class TopP:
    """Nucleus (top-p) filtering, the tokens transformers' ``TopPLogitsWarper`` keeps, without
    sorting the whole vocabulary: a token is kept when the probability of the tokens
    ranked above it is below ``top_p`` (the most likely token always). The ``k`` most
    likely tokens are found with ``topk``; a row whose top ``k`` already hold ``top_p`` of
    the mass has its whole nucleus among them (a token outside has at least that much
    above it); the other rows (flat distributions) are sorted in full. On a 49k
    vocabulary a full sort was a sixth of a sampled decode step's time on CPU."""

    def __init__(self, top_p: float, k: int = 256):
        self.top_p, self.k = float(top_p), k

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        probs = torch.softmax(scores.float(), dim=-1)
        vals, idx = probs.topk(k, dim=-1)
        if k < scores.shape[-1]:
            short = (vals.sum(-1) < self.top_p).nonzero().flatten()
            if short.numel():  # flat rows: the nucleus may reach past the top k
                vals_s, idx_s = probs.index_select(0, short).sort(dim=-1, descending=True)
                return self._keep(scores, vals, idx, rows_full=(short, vals_s, idx_s))
        return self._keep(scores, vals, idx)

    def _keep(self, scores, vals, idx, rows_full=None):
        keep = torch.zeros_like(scores, dtype=torch.bool)
        above = vals.cumsum(-1) - vals  # mass ranked above each token
        inside = above < self.top_p
        inside[:, 0] = True
        keep.scatter_(1, idx, inside)
        if rows_full is not None:
            short, vals_s, idx_s = rows_full
            above_s = vals_s.cumsum(-1) - vals_s
            inside_s = above_s < self.top_p
            inside_s[:, 0] = True
            keep[short] = torch.zeros_like(inside_s).scatter_(1, idx_s, inside_s)
        return scores.masked_fill(~keep, float("-inf"))


def _warpers(do_sample: bool, temperature: float, top_p: float) -> list:
    """Temperature (transformers' warper), then top-p (:class:`TopP`), in ``generate``'s order."""
    if not do_sample:
        return []
    from transformers.generation.logits_process import TemperatureLogitsWarper

    out = []
    if temperature is not None and temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(temperature)))
    if top_p is not None and top_p < 1.0:
        out.append(TopP(top_p))
    return out


def draw(scores: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row from ``softmax(scores)``, row ``i`` drawing with ``generators[i]``
    (one uniform number per row: the inverse of the row's cumulative distribution)."""
    probs = torch.softmax(scores.float(), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.tensor([float(torch.rand((), generator=g)) for g in generators], dtype=cdf.dtype, device=cdf.device)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return idx.clamp_(max=scores.shape[-1] - 1)


# --------------------------------------------------------------------------- the loop


def _batch_processors(processors, rows: int, rows_idx: list[int], max_new_tokens: int) -> list:
    if getattr(processors, "accepts_budget", False):  # grammar: reasoning budget
        return processors(rows, rows_idx, max_new_tokens=max_new_tokens)
    return processors(rows, rows_idx)


class _Newlines:
    """Which token ids write a newline (decoded once per id)."""

    def __init__(self, tokenizer):
        self.tok, self.seen = tokenizer, {}

    def __call__(self, t: int) -> bool:
        v = self.seen.get(t)
        if v is None:
            v = self.seen[t] = "\n" in self.tok.decode([t])
        return v


def decode_batch(model, tokenizer, rows: Sequence[Sequence[int]], paths: Sequence[tuple[int, int]], *,
                 max_new_tokens: int, eos: set[int], pad: int, n: int = 1, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, procs: Sequence = (),
                 stop_at: Callable[[int, str], int | None] | None = None, stats: GenStats | None = None,
                 newlines: _Newlines | None = None) -> tuple[list[list[int]], list[int | None]]:
    """Decode one batch: ``rows`` are prompts, ``paths[k] = (prompt index, sample)`` the
    ``len(rows) * n`` sequences (prompt-major). Returns each path's new tokens (up to, not
    including, its stop id) and where ``stop_at`` cut its text (None: not cut)."""
    stats = stats if stats is not None else GenStats()
    newlines = newlines or _Newlines(tokenizer)
    device = next(model.parameters()).device
    ids, mask = _left_pad(rows, pad)
    ids, mask = ids.to(device), mask.to(device)
    pos = positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)
    del out
    nxt_pos = pos[:, -1] + 1
    if n > 1:  # the N paths share the prompt's prefill: repeat its cache and its last logits
        cache.batch_repeat_interleave(n)
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        logits, nxt_pos = logits.repeat_interleave(n, 0), nxt_pos.repeat_interleave(n, 0)
    warpers = _warpers(do_sample, temperature, top_p)
    gens = [torch.Generator().manual_seed(path_seed(seed, i, j)) for i, j in paths] if do_sample else []
    seqs = ids  # what the processors see, as generate's input_ids: prompt + tokens so far
    live = list(range(len(paths)))  # batch row -> path
    done = [False] * len(paths)
    toks: list[list[int]] = [[] for _ in paths]
    cuts: list[int | None] = [None] * len(paths)
    can_leave = cache_selectable(cache) and all(hasattr(p, "select_rows") for p in procs)
    for step in range(max_new_tokens):
        scores = logits
        for p in procs:
            scores = p(seqs, scores)
        if do_sample:
            for w in warpers:
                scores = w(seqs, scores)
            nxt = draw(scores, [gens[p] for p in live])
        else:
            nxt = scores.argmax(dim=-1)
        finished = [r for r, p in enumerate(live) if done[p]]
        if finished:  # rows still in the batch after their end feed pads (as generate does)
            nxt[finished] = pad
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        for r, t in enumerate(nxt.tolist()):
            p = live[r]
            if done[p]:
                continue
            if t in eos:
                done[p] = True
                continue
            toks[p].append(t)
            if stop_at is not None and newlines(t):
                cut = stop_at(paths[p][0], tokenizer.decode(toks[p], skip_special_tokens=True))
                if cut is not None:
                    cuts[p], done[p] = cut, True
                    stats.answer_stops += 1
        left = [r for r, p in enumerate(live) if not done[p]]
        if not left or step == max_new_tokens - 1:
            break
        if can_leave and len(live) - len(left) >= compact_threshold(len(live)):
            keep = torch.tensor(left, device=device)
            cache, mask = select_rows(cache, mask, keep)
            seqs, nxt, nxt_pos = seqs.index_select(0, keep), nxt.index_select(0, keep), nxt_pos.index_select(0, keep)
            for p in procs:
                p.select_rows(left)
            live = [live[r] for r in left]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=nxt_pos[:, None],
                    past_key_values=cache, use_cache=True)
        stats.decode_row_steps += len(live)
        nxt_pos = nxt_pos + 1
        logits = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)
        del out
    return toks, cuts


def cut_text(text: str, prompt: int, stop_at: Callable[[int, str], int | None]) -> tuple[str, bool]:
    """``text`` cut where ``stop_at`` stops it, checked at every newline as the decode loop
    checks it (for texts that come from elsewhere: an offline engine)."""
    k = text.find("\n")
    while k >= 0:
        cut = stop_at(prompt, text[: k + 1])
        if cut is not None:
            return text[:cut], True
        k = text.find("\n", k + 1)
    return text, False


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
    stop_at: Callable[[int, str], int | None] | None = None,
) -> tuple[list[list[str]], GenStats]:
    """Generate ``n`` continuations per prompt. Returns texts[prompt][sample] (special
    tokens removed) in the caller's order, and stats.

    ``batch_size`` counts sequences, so with ``n`` samples a batch holds
    ``max(1, batch_size // n)`` prompts. ``processors(batch_rows, prompt_indices)``
    returns a list of logits processors for one batch (e.g. a grammar matcher per row);
    a factory with ``accepts_budget = True`` also gets ``max_new_tokens`` (the grammar's
    reasoning budget) and its ``stats()`` are added to the returned stats. Rows leave the
    batch only when every processor has ``select_rows(kept_rows)``.
    ``max_batch_tokens`` bounds a batch's padded size, prompt plus new tokens of every
    sequence (scoring.token_batches): a very long prompt generates in a smaller batch.
    ``stop_at(prompt_index, text)``: asked when a path writes a newline; a position ends
    the path there (its text is ``text[:position]``).
    """
    if not prompt_ids:
        return [], GenStats()
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt")
    if hasattr(model, "generate_texts"):  # an offline engine holds the weights (inference/vllm_backend.py)
        texts, stats = model.generate_texts(tokenizer, prompt_ids, max_new_tokens=max_new_tokens, n=n,
                                            do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                                            stop_ids=stop_ids(tokenizer, model), processors=processors)
        if stop_at is not None:  # the same texts as stopping would give (not cheaper)
            for i, outs in enumerate(texts):
                for j, t in enumerate(outs):
                    outs[j], cut = cut_text(t, i, stop_at)
                    stats.answer_stops += cut
        return texts, stats
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = set(stop_ids(tokenizer, model))
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    n = max(n, 1)
    per_batch = max(1, batch_size // n)
    out: list[list[str]] = [[] for _ in prompt_ids]
    stats = GenStats(prompts=len(prompt_ids), sequences=len(prompt_ids) * n)
    newlines = _Newlines(tokenizer)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    bar = _progress.bar(len(prompt_ids), desc, enabled=progress)  # tqdm on a terminal, else lines
    try:
        from lmladder.inference.scoring import token_batches

        seq_len = [(len(p) + max_new_tokens) * n for p in prompt_ids]
        with torch.inference_mode():
            for idx in token_batches(order, seq_len, per_batch, max_batch_tokens):
                rows = [list(prompt_ids[i]) for i in idx]
                stats.prompt_tokens += sum(map(len, rows))
                stats.prefill_tokens += sum(map(len, rows))
                paths = [(i, j) for i in idx for j in range(n)]
                procs = []
                if processors is not None:
                    procs = _batch_processors(processors, len(paths), [i for i, _ in paths], max_new_tokens) or []
                toks, cuts = decode_batch(model, tokenizer, rows, paths, max_new_tokens=max_new_tokens, eos=eos,
                                          pad=pad, n=n, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                          seed=seed, procs=procs, stop_at=stop_at, stats=stats, newlines=newlines)
                for (i, _), t, cut in zip(paths, toks, cuts):
                    stats.generated_tokens += len(t)
                    text = tokenizer.decode(t, skip_special_tokens=True)
                    out[i].append(text if cut is None else text[:cut])
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    stats.seconds = time.perf_counter() - t0
    if processors is not None and hasattr(processors, "stats"):  # grammar engine counters
        stats.extra.update(processors.stats())
    return out, stats
