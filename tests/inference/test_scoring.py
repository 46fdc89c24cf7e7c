"""Label scoring against a hand computation: full forward pass per (prompt, choice),
no cache, no batching, no padding."""

import pytest
import torch

from lmladder.inference.scoring import common_prefix_len, loglikelihoods


def hand_loglik(model, prompt, choice):
    ids = torch.tensor([prompt + choice])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(choice))


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5], [1]]) == 0
    assert common_prefix_len([[1, 2]]) == 2


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_multi_token_choices_match_hand_computation(tiny, batch_size, share_prefix):
    model, tok = tiny
    shared = tok("<|im_start|>user\nshared instruction text ", add_special_tokens=False).input_ids
    prompts = [shared + tok(x, add_special_tokens=False).input_ids for x in ["a", "quite long input here", "mid one"]]
    choices = [tok(c, add_special_tokens=False).input_ids for c in ["neg", "positive", "x"]]
    got, stats = loglikelihoods(
        model, prompts, [choices] * 3, batch_size=batch_size, pad_id=tok.pad_token_id, share_prefix=share_prefix
    )
    for i, p in enumerate(prompts):
        for j, c in enumerate(choices):
            assert got[i][j] == pytest.approx(hand_loglik(model, p, c), abs=1e-4)
    assert stats.prefix_tokens == (len(shared) if share_prefix else 0)
    assert stats.rows == 9  # one row per (example, choice) when a choice has several tokens


def test_single_token_choices_one_row_per_example(tiny):
    model, tok = tiny
    prompts = [tok(x, add_special_tokens=False).input_ids for x in ["same start: one", "same start: three three"]]
    choices = [tok(c, add_special_tokens=False).input_ids for c in ["a", "b", "c"]]
    assert all(len(c) == 1 for c in choices)
    got, stats = loglikelihoods(model, prompts, [choices] * 2, batch_size=2, pad_id=tok.pad_token_id)
    assert stats.rows == 2
    for i, p in enumerate(prompts):
        for j, c in enumerate(choices):
            assert got[i][j] == pytest.approx(hand_loglik(model, p, c), abs=1e-4)


def test_prefix_never_swallows_a_whole_prompt(tiny):
    """Identical prompts: the last prompt token must stay in each row to score choices."""
    model, tok = tiny
    p = tok("identical prompt", add_special_tokens=False).input_ids
    c = [tok("ok", add_special_tokens=False).input_ids]
    got, stats = loglikelihoods(model, [p, p], [c, c], pad_id=tok.pad_token_id)
    assert stats.prefix_tokens == len(p) - 1
    assert got[0][0] == pytest.approx(hand_loglik(model, p, c[0]), abs=1e-4)
    assert got[0] == got[1]


def test_empty_choice_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError):
        loglikelihoods(model, [[1, 2]], [[[]]])
