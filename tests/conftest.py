"""Shared fixtures: a tiny randomly initialised Llama with a byte-level tokenizer and a
ChatML chat template, built here with no network.

The tokenizer ships ``pad == eos`` on purpose (like SmolLM2): lmladder must still
train EOS. Every byte is one token, so multi-token labels are the norm; single
characters are single tokens (for the one-token scoring path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # the trap: pad == eos
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny model folder (safetensors + tokenizer + chat template)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = make_model(len(tok))
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded through lmladder's own loader."""
    from lmladder.models import load_causal_lm

    model, tok, _ = load_causal_lm(str(tiny_dir))
    return model, tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TRAIN_ROWS = [
    {"text": f"{w} movie number {i}", "label": lab}
    for i in range(12)
    for w, lab in (("great", "pos"), ("awful", "neg"))
]
TEST_ROWS = [
    {"text": f"{w} film {i}", "label": lab}
    for i in range(4)
    for w, lab in (("lovely", "pos"), ("boring", "neg"))
]


@pytest.fixture
def toy_data(tmp_path) -> tuple[Path, Path]:
    return (
        write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS),
        write_jsonl(tmp_path / "test.jsonl", TEST_ROWS),
    )


@pytest.fixture
def run_cli(tiny_dir, capsys):
    """Run ``lmladder`` in-process with the tiny model; returns (exit code, stdout, stderr)."""
    from lmladder.cli import main

    def _run(*args: str, model: bool = True):
        argv = list(args)
        if model and argv and argv[0] == "run" and "--model" not in argv:
            argv += ["--model", str(tiny_dir)]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return _run
