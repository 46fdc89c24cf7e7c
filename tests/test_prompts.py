"""Exact prompt text: the few-shot template, zero-shot as its k=0 case, chat rendering."""

from lmladder.prompts import ChatFormat, user_message

from conftest import make_tokenizer


def test_zero_shot_message_exact():
    msg = user_message("Decide the sentiment.", "a dull mess", labels=["negative", "positive"])
    assert msg == (
        "# General instructions\n"
        "Decide the sentiment.\n"
        "Answer with exactly one of: negative, positive.\n"
        "\n"
        "# Target question\n"
        "Input: a dull mess\n"
        "Label:"
    )


def test_few_shot_message_exact():
    msg = user_message(
        "Decide the sentiment.",
        "a dull mess",
        examples=[("a gorgeous film", "positive"), ("tedious", "negative")],
        labels=["negative", "positive"],
    )
    assert msg == (
        "# General instructions\n"
        "Decide the sentiment.\n"
        "Answer with exactly one of: negative, positive.\n"
        "\n"
        "# Examples\n"
        "Input: a gorgeous film\n"
        "Label: positive\n"
        "\n"
        "Input: tedious\n"
        "Label: negative\n"
        "\n"
        "# Target question\n"
        "Input: a dull mess\n"
        "Label:"
    )


def test_chat_prompt_and_answer_suffix_exact():
    fmt = ChatFormat(make_tokenizer())
    assert fmt.prompt("hi") == (
        "<|im_start|>system\nYou are tiny.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert fmt.answer_suffix("hi", "positive") == "positive<|im_end|>\n"
    assert fmt.answer_prefix() == ""


def test_system_prompt_replaces_template_default():
    fmt = ChatFormat(make_tokenizer(), system_prompt="Be brief.")
    assert fmt.prompt("hi").startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")


def test_plain_format_without_chat_template():
    fmt = ChatFormat(make_tokenizer(chat_template=None))
    assert fmt.prompt("Input: x\nLabel:") == "Input: x\nLabel:"
    assert fmt.answer_prefix() == " "
    assert fmt.answer_suffix("m", "positive") == " positive<|im_end|>"
