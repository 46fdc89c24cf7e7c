"""inference/generate.py: batched generation, N samples sharing one prefill."""

from __future__ import annotations

import pytest

from lmladder.inference.generate import generate


def _ids(tok, texts):
    return [tok(f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
            for t in texts]


TEXTS = ["a", "a much longer prompt than the first one", "middle sized prompt"]


def test_greedy_n_samples_equal_one_greedy_path(tiny):
    """n > 1 prefills once and repeats the KV cache: greedy paths must be identical to
    the plain n = 1 generation, for every prompt, whatever the padding."""
    model, tok = tiny
    ids = _ids(tok, TEXTS)
    one, _ = generate(model, tok, ids, max_new_tokens=10, n=1, batch_size=3, progress=False)
    many, _ = generate(model, tok, ids, max_new_tokens=10, n=3, batch_size=9, progress=False)
    for a, b in zip(one, many):
        assert len(b) == 3 and b == [a[0]] * 3


def test_one_prefill_per_prompt(tiny):
    """N samples cost one prompt prefill, not N: count the tokens the model actually sees.
    The prefill runs every prompt token once (one row per prompt), its cache and last
    logits are repeated for the N paths, and each decode step feeds one token per path."""
    model, tok = tiny
    ids = _ids(tok, TEXTS)
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["input_ids"].shape) if kw.get("input_ids") is not None else None,
        with_kwargs=True,
    )
    try:
        _, stats = generate(model, tok, ids, max_new_tokens=4, n=4, do_sample=True, batch_size=12, progress=False)
    finally:
        hook.remove()
    width = max(map(len, ids))
    # first call: the prompts' prefill, one row per prompt (not per sample), every token
    assert seen[0] == (len(ids), width)
    # then decode steps: one new token per path (the first tokens were drawn from the
    # prefill's logits); paths that ended may have left the batch
    assert seen[1] == (len(ids) * 4, 1)
    assert all(s[1] == 1 and s[0] <= len(ids) * 4 for s in seen[1:]) and len(seen) <= 4
    assert stats.prefill_tokens == sum(map(len, ids))
    assert stats.prompt_tokens == sum(map(len, ids)) and stats.sequences == 12


def test_sampling_is_seeded_and_samples_differ(tiny):
    model, tok = tiny
    ids = _ids(tok, TEXTS[:1])
    a, _ = generate(model, tok, ids, max_new_tokens=8, n=4, do_sample=True, temperature=1.5, seed=1, progress=False)
    b, _ = generate(model, tok, ids, max_new_tokens=8, n=4, do_sample=True, temperature=1.5, seed=1, progress=False)
    assert a == b
    assert len(set(a[0])) > 1  # four random-model samples are not all the same


def test_results_in_caller_order_and_batches_of_sequences(tiny):
    """Prompts are sorted by length inside generate; results come back in input order,
    and batch_size counts sequences (prompts x n)."""
    model, tok = tiny
    ids = _ids(tok, TEXTS)
    solo = [generate(model, tok, [i], max_new_tokens=6, progress=False)[0][0] for i in ids]
    both, stats = generate(model, tok, ids, max_new_tokens=6, batch_size=2, progress=False)
    assert both == solo
    assert stats.prompts == 3 and stats.generated_tokens > 0


def test_empty_prompt_is_an_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, tok, [[]], progress=False)


def test_top_p_keeps_what_transformers_keeps():
    """TopP (topk first, full sort only for flat rows) keeps exactly the tokens
    transformers' TopPLogitsWarper keeps: peaked rows, flat rows, a one-hot row."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from lmladder.inference.generate import TopP

    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(4, 1000, generator=g) * 6
    flat = torch.randn(3, 1000, generator=g) * 0.1  # the nucleus reaches far past the top 256
    onehot = torch.full((1, 1000), -30.0)
    onehot[0, 7] = 10.0
    for scores in (peaked, flat, onehot, torch.cat([peaked, flat, onehot])):
        for p in (0.5, 0.9, 0.95):
            ref = TopPLogitsWarper(p)(None, scores.clone())
            ours = TopP(p)(None, scores.clone())
            assert torch.equal(torch.isinf(ours), torch.isinf(ref)), p
            assert torch.equal(ours[~torch.isinf(ours)], scores[~torch.isinf(ref)])
