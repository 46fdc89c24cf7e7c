"""Supervised fine-tuning glue over transformers ``Trainer`` + PEFT.

What we own (the known traps):

* **Prompt-loss masking through the chat template.** Labels are -100 on every prompt
  token; the loss covers the answer tokens and the template's end-of-turn token, so the
  model learns to stop. The answer text comes from rendering the conversation with the
  chat template, not from guessing the template's markup.
* **pad vs EOS.** Labels are built explicitly per example, never by masking pad ids, so
  a tokenizer whose pad equals EOS still trains EOS.
* **Pre-flight check.** Before training, the unmasked label tokens of the first
  collated batch are decoded and compared with the expected answer text; any
  difference (off-by-one mask, truncation, a template surprise) stops the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from lmladder.errors import LadderError
from lmladder.prompts import ChatFormat

IGNORE = -100


def eos_token_ids(tokenizer, model=None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        e = gen.eos_token_id
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids


@dataclass
class Feature:
    input_ids: list[int]
    labels: list[int]
    expected: str  # decoded text the unmasked labels must equal (pre-flight)
    source: str


def build_feature(
    fmt: ChatFormat, message: str, answer: str, max_length: int, source: str, eos_ids: set[int]
) -> Feature:
    tok = fmt.tokenizer
    prompt_ids = fmt.encode(fmt.prompt(message))
    suffix_ids = tok(fmt.answer_suffix(message, answer), add_special_tokens=False).input_ids
    cut = next((i for i, t in enumerate(suffix_ids) if t in eos_ids), None)
    if cut is None:  # template without an end-of-turn token: append EOS ourselves
        if tok.eos_token_id is None:
            raise LadderError("the tokenizer has no EOS token; cannot teach the model to stop")
        suffix_ids = suffix_ids + [tok.eos_token_id]
    else:
        suffix_ids = suffix_ids[: cut + 1]
    answer_ids = tok(answer, add_special_tokens=False).input_ids
    if not answer_ids:
        raise LadderError(f"{source}: the answer '{answer}' tokenises to nothing")
    ids = prompt_ids + suffix_ids
    if len(ids) > max_length:
        raise LadderError(
            f"{source}: training sequence has {len(ids)} tokens, more than max_length="
            f"{max_length} (raise lora.max_length or shorten the input)"
        )
    return Feature(
        input_ids=ids,
        labels=[IGNORE] * len(prompt_ids) + suffix_ids,
        expected=tok.decode(suffix_ids),
        source=source,
    )


class Collator:
    """Right-pads a list of features; labels are padded with -100, never derived from pad."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict]) -> dict[str, Any]:
        import torch

        T = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(feats), T), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def preflight(batch: dict, tokenizer, feats: list[Feature], answers: list[str]) -> None:
    """Decode the unmasked label tokens of a collated batch; fail if any differs."""
    for i, f in enumerate(feats):
        lab = batch["labels"][i]
        unmasked = lab[lab != IGNORE].tolist()
        got = tokenizer.decode(unmasked)
        if got != f.expected or answers[i] not in got:
            raise LadderError(
                f"{f.source}: pre-flight check failed: the loss would train on {got!r} "
                f"but the answer is {answers[i]!r} (expected {f.expected!r})"
            )
        # every unmasked position must be a real (attended) token
        if (batch["attention_mask"][i][lab != IGNORE] == 0).any():
            raise LadderError(f"{f.source}: pre-flight check failed: loss on padding")


class _ListDataset:
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train(model, tokenizer, feats: list[Feature], answers: list[str], cfg, work_dir, seed: int) -> dict:
    """Train ``model`` (already PEFT-wrapped or full) on features with HF Trainer."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = Collator(pad_id)
    n_check = min(len(feats), cfg.batch_size)
    preflight(
        collator([{"input_ids": f.input_ids, "labels": f.labels} for f in feats[:n_check]]),
        tokenizer, feats[:n_check], answers[:n_check],
    )
    rows = [{"input_ids": f.input_ids, "labels": f.labels, "length": len(f.input_ids)} for f in feats]
    steps_per_epoch = math.ceil(len(rows) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=total_steps,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        logging_steps=max(1, total_steps // 20),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=None,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_ListDataset(rows), data_collator=collator
    )
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(r["input_ids"]) for r in rows) * (total_steps / max(steps_per_epoch, 1))
    model.eval()
    return {
        "train_seconds": seconds,
        "steps": out.global_step,
        "train_loss": float(out.training_loss),
        "loss_curve": losses,
        "train_tokens": int(tokens),
        "train_tokens_per_second": tokens / seconds if seconds else None,
        "supervised_tokens": sum(sum(1 for l in f.labels if l != IGNORE) for f in feats),
    }
