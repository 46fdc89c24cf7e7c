"""Exact loss masks through the chat template, the pad == eos trap, the pre-flight check."""

import pytest
import torch

from lmladder.rungs.lora import LoraConfig
from lmladder.training import sft
from lmladder.errors import LadderError
from lmladder.prompts import ChatFormat

from conftest import make_model, make_tokenizer


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_exact_loss_mask_chat_template():
    tok = make_tokenizer()
    fmt = ChatFormat(tok)
    f = sft.build_feature(fmt, "Input: x\nLabel:", "positive", 512, "t.jsonl:1", {tok.eos_token_id})
    prompt = ids(tok, fmt.prompt("Input: x\nLabel:"))
    answer = ids(tok, "positive")
    # the prompt is masked; the answer and the end-of-turn token are trained;
    # the template's trailing newline after <|im_end|> is not part of the sequence
    assert f.input_ids == prompt + answer + [tok.eos_token_id]
    assert f.labels == [-100] * len(prompt) + answer + [tok.eos_token_id]
    assert f.expected == "positive<|im_end|>"


def test_plain_format_appends_eos():
    tok = make_tokenizer(chat_template=None)
    fmt = ChatFormat(tok)
    f = sft.build_feature(fmt, "Input: x\nLabel:", "neg", 512, "t:1", {tok.eos_token_id})
    n_prompt = len(ids(tok, "Input: x\nLabel:"))
    assert f.labels[:n_prompt] == [-100] * n_prompt
    assert f.labels[n_prompt:] == ids(tok, " neg") + [tok.eos_token_id]


def test_pad_equal_to_eos_still_trains_eos():
    tok = make_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id  # the trap, on purpose
    fmt = ChatFormat(tok)
    eos = {tok.eos_token_id}
    short = sft.build_feature(fmt, "a", "no", 512, "t:1", eos)
    long = sft.build_feature(fmt, "a much longer message", "yes", 512, "t:2", eos)
    batch = sft.Collator(tok.pad_token_id)(
        [{"input_ids": f.input_ids, "labels": f.labels} for f in (short, long)]
    )
    n = len(short.input_ids)
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id  # EOS trained
    assert (batch["labels"][0, n:] == -100).all()  # padding never trained
    assert (batch["attention_mask"][0, n:] == 0).all()
    sft.preflight(batch, tok, [short, long], ["no", "yes"])  # passes


def test_preflight_catches_off_by_one_mask():
    tok = make_tokenizer()
    fmt = ChatFormat(tok)
    f = sft.build_feature(fmt, "m", "positive", 512, "t.jsonl:7", {tok.eos_token_id})
    batch = sft.Collator(0)([{"input_ids": f.input_ids, "labels": f.labels}])
    first = (batch["labels"][0] != -100).nonzero()[0].item()
    batch["labels"][0, first] = -100  # mask one answer token too many
    with pytest.raises(LadderError, match=r"t.jsonl:7: pre-flight check failed"):
        sft.preflight(batch, tok, [f], ["positive"])


def test_too_long_sequence_is_an_error_not_a_truncation():
    tok = make_tokenizer()
    with pytest.raises(LadderError, match=r"d.jsonl:3: training sequence has \d+ tokens, more than max_length=20"):
        sft.build_feature(ChatFormat(tok), "x" * 50, "y", 20, "d.jsonl:3", {tok.eos_token_id})


def _train_once(tmp_path, seed):
    from peft import LoraConfig as PeftLora, get_peft_model

    tok = make_tokenizer()
    fmt = ChatFormat(tok)
    model = make_model(len(tok))
    data = [(f"item {i} is {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(16)]
    feats = [sft.build_feature(fmt, m, a, 512, f"t:{i}", {tok.eos_token_id}) for i, (m, a) in enumerate(data)]
    pm = get_peft_model(model, PeftLora(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    cfg = LoraConfig(lr=5e-3, max_steps=8, batch_size=4, warmup_ratio=0.0)
    stats = sft.train(pm, tok, feats, [a for _, a in data], cfg, tmp_path / f"w{seed}", seed)
    weights = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    return stats, weights


def test_lora_training_lowers_loss_and_is_seeded(tmp_path):
    s1, w1 = _train_once(tmp_path, seed=0)
    s2, w2 = _train_once(tmp_path, seed=0)
    assert s1["steps"] == 8
    assert s1["loss_curve"][-1] < s1["loss_curve"][0]
    assert s1["loss_curve"] == s2["loss_curve"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
