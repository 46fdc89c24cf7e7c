"""Label scoring scores what training supervises: the answer through the end-of-turn
token (so a label that is a prefix of another can win), at the boundary the chat template
renders (thinking templates included); plain-text prompts score ``" " + answer + end``."""

from __future__ import annotations

import json

import pytest

from lmladder import config
from lmladder.run import ladder
from lmladder.data import Example
from lmladder.training import sft
from lmladder.prompts import ChatFormat
from lmladder.tasks import make_task
from lmladder.tasks.base import continuations
from lmladder import prompts
from tests.conftest import make_tokenizer, write_jsonl

# Qwen3's template, reduced to what matters here: the last assistant turn gets an empty
# think block; enable_thinking=false puts that block in the generation prompt instead.
QWEN3_LIKE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% if loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def _task(labels, kind="classification"):
    cfg = config.build({"task": {"kind": kind, "labels": labels} if kind == "classification" else {"kind": kind}})
    return make_task(cfg.task, labels or [], cfg.eval, 0)


def _trained_ids(fmt, msg, answer, eos):
    f = sft.build_feature(fmt, msg, answer, 512, "t:1", eos)
    return [i for i, l in zip(f.input_ids, f.labels) if l != -100]


def test_scored_continuation_is_the_trained_one_on_a_thinking_template():
    tok = make_tokenizer(QWEN3_LIKE)
    fmt = ChatFormat(tok)
    eos = prompts.eos_token_ids(tok)
    task = _task(["negative", "positive"])
    msg = task.user_message("a fine film")
    got = continuations(task, fmt, msg, ["positive"], eos)[0]
    assert got == _trained_ids(fmt, msg, "positive", eos)
    assert tok.decode(got) == "<think>\n\n</think>\n\npositive<|im_end|>"
    # the prompt ends at the assistant header: the think block is scored, as it is trained
    assert fmt.prompt(msg).endswith("<|im_start|>assistant\n")


def test_scored_continuation_on_chatml_ends_with_end_of_turn(tiny):
    _, tok = tiny
    fmt = ChatFormat(tok)
    eos = prompts.eos_token_ids(tok)
    task = _task(["1", "10"])
    msg = task.user_message("x")
    c1, c10 = continuations(task, fmt, msg, ["1", "10"], eos)
    assert tok.decode(c1) == "1<|im_end|>" and tok.decode(c10) == "10<|im_end|>"
    assert c1 == _trained_ids(fmt, msg, "1", eos)


def test_plain_prompt_text_and_continuation(tiny):
    _, tok = tiny
    fmt = ChatFormat(tok, plain=True)
    task = _task(["negative", "positive"])
    msg = task.plain_message(Example(id="0", input="a fine film", label="positive", source="t:1"))
    assert fmt.prompt(msg) == (
        "# General instructions\nClassify the input.\nAnswer with exactly one of: negative, positive.\n\n"
        "# Target question\nInput: a fine film\nLabel:"
    )
    (c,) = continuations(task, fmt, msg, ["positive"], prompts.eos_token_ids(tok))
    assert tok.decode(c) == " positive\n"


def test_multiple_choice_plain_is_lm_eval_style(tiny):
    _, tok = tiny
    fmt = ChatFormat(tok, plain=True)
    task = _task(None, kind="multiple-choice")
    shot = Example(id="s", input="Sun is a?", label="0", source="t:1", target=0, choices=["star", "moon"])
    ex = Example(id="q", input="Water is?", label="1", source="t:2", target=1, choices=["dry", "wet"])
    msg = task.plain_message(ex, [shot])
    assert fmt.prompt(msg) == "Question: Sun is a?\nAnswer: star\n\nQuestion: Water is?\nAnswer:"
    cs = continuations(task, fmt, msg, ex.choices, prompts.eos_token_ids(tok))
    assert [tok.decode(c) for c in cs] == [" dry", " wet"]
    # chat: the choices are listed and each full answer is scored through end-of-turn
    chat = ChatFormat(tok)
    m = task.user_message(ex)
    assert "A. dry\nB. wet" in m
    assert tok.decode(continuations(task, chat, m, ex.choices, prompts.eos_token_ids(tok))[1]) == "wet<|im_end|>"


def test_scores_equal_hand_computed_label_plus_end_of_turn(tiny):
    import torch

    model, tok = tiny
    fmt = ChatFormat(tok)
    task = _task(["1", "10"])
    msgs = [task.user_message(f"item {i}") for i in range(3)]
    preds, _ = task.predict(model, fmt, msgs)
    eos = prompts.eos_token_ids(tok)
    for m, p in zip(msgs, preds):
        prompt = fmt.encode(fmt.prompt(m))
        for label in ("1", "10"):
            cont = continuations(task, fmt, m, [label], eos)[0]
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logp = model(input_ids=ids).logits.log_softmax(-1)[0]
            want = sum(float(logp[len(prompt) - 1 + t, tok_id]) for t, tok_id in enumerate(cont))
            assert p["scores"][label] == pytest.approx(want, abs=1e-4)


def test_a_label_that_is_a_prefix_of_another_can_win(tiny_dir, tmp_path):
    """On a 1-10 label set, a model trained on "10" predicts "10": scoring the label with
    nothing after it gave log p("10") <= log p("1"), so "10" could never win."""
    labels = [str(i) for i in range(1, 11)]
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"case {i}", "label": "10"} for i in range(24)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": f"case {i} again", "label": "10"} for i in range(6)])
    cfg = config.build({
        "task": {"labels": labels}, "model": str(tiny_dir), "rungs": ["full"],
        "data": {"train": str(train), "test": str(test)},
        "full": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "forgetting_text": None},
        "eval": {"bootstrap": 200},
    })
    ladder.run(cfg, tmp_path / "run")
    preds = [json.loads(l) for l in (tmp_path / "run/rungs/full/predictions.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in preds] == ["10"] * 6
    assert all(p["scores"]["10"] > p["scores"]["1"] for p in preds)
