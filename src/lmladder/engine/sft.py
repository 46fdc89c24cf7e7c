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

Multi-process training (``torchrun`` / ``accelerate launch``, DDP) gives the same
results as one process at the same global batch (see docs/distributed.md):

* **The global batch is the config's**: ``lora.batch_size x lora.grad_accum``. Under
  N processes the per-device micro-batch and accumulation are derived so that
  ``per_device x accum x N`` equals it (``split_global_batch``); it must divide.
* **Identical global batches in the same order**: ``GlobalBatchSampler`` orders the
  examples (seeded, length-grouped at the granularity of the *global* batch, epoch
  by epoch) identically whatever the world size, and pads the last global batch of an
  epoch by wrapping round to the epoch's first examples, so every rank gets the same
  number of micro-batches. accelerate's ``BatchSamplerShard`` deals micro-batch ``i``
  to rank ``i % N``, so optimizer step ``k`` always sees the sampler's ``k``-th slice
  of ``global_batch`` examples, split differently between ranks.
* **Global token normalisation**: Trainer counts the supervised tokens of the whole
  step across ranks (``average_tokens_across_devices``, all-gathered
  ``num_items_in_batch``), each rank's loss is its token-loss sum over that global
  count times N, and DDP averages gradients over N: the gradient is the global
  per-token mean, not a mean of per-rank means.
* LoRA dropout draws different masks per rank, so exact equality needs
  ``lora.dropout=0``; with dropout the runs are statistically, not bitwise, equal.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from lmladder.errors import LadderError
from lmladder.prompts import ChatFormat

IGNORE = -100

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- distributed


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun, accelerate)."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_distributed() -> bool:
    return dist_env()[1] > 1


def is_main() -> bool:
    """Only global rank 0 writes files (adapter, predictions, results, report)."""
    return dist_env()[0] == 0


def init_distributed() -> bool:
    """Initialise the process group early (before the model loads) when launched with
    WORLD_SIZE > 1: gloo on CPU, NCCL on CUDA (and pin this process to its local GPU
    so the model loads there). Trainer / accelerate reuse the group. The timeout covers
    ranks waiting while rank 0 evaluates: ``LMLADDER_DIST_TIMEOUT`` seconds (default 4 h).
    Returns True when running distributed."""
    if not is_distributed():
        return False
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    _, _, local_rank = dist_env()
    cuda = torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get("LMLADDER_DIST_TIMEOUT", 4 * 3600)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    return True


def shutdown_distributed() -> None:
    """Final barrier, then tear the process group down. A rank that exits with the group
    still alive can abort in gloo's threads at interpreter exit (seen on a resume where
    no rung trained), so every distributed run ends here."""
    if not is_distributed():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def broadcast(obj):
    """``obj`` from rank 0 to every rank (picklable); identity when not distributed."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sharding_requested() -> list[str]:
    """FSDP / DeepSpeed asked for by the launcher (accelerate's env); not supported yet."""
    return [
        name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
        if os.environ.get(env, "").lower() in ("1", "true")
    ]


SHARDING_ERROR = (
    "lora: {what} sharding is not supported yet; launch with plain DDP (torchrun, or "
    "accelerate launch without an FSDP/DeepSpeed config), see docs/distributed.md"
)


def split_global_batch(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) so that micro x accum x world equals
    the configured global batch ``batch_size x grad_accum``; the micro-batch is the
    largest divisor not above ``batch_size`` (memory stays within the config's)."""
    G = batch_size * grad_accum
    if G % world_size:
        raise LadderError(
            f"lora.batch_size x lora.grad_accum = {batch_size} x {grad_accum} = {G} (the global "
            f"batch) is not divisible by the {world_size} processes (WORLD_SIZE); choose a "
            f"global batch that is a multiple of the number of processes"
        )
    per_rank = G // world_size
    micro = max(d for d in range(1, min(batch_size, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


class GlobalBatchSampler:
    """Seeded, length-grouped order of the train set at global-batch granularity, the
    same in every process and for every world size (see the module docstring).

    Epoch ``e`` uses ``torch.Generator().manual_seed(seed + e)``; the epoch comes from
    ``set_epoch`` (Trainer calls it) or, failing that, counts the passes. Each epoch
    yields ``ceil(N / G) * G`` indices: the last global batch is completed with the
    epoch's first examples (so every step has exactly G examples)."""

    def __init__(self, lengths: list[int], global_batch: int, seed: int, group_by_length: bool = True):
        self.lengths, self.G, self.seed, self.group = list(lengths), global_batch, seed, group_by_length
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.G) * self.G

    def order(self, epoch: int) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.group:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            idx = list(get_length_grouped_indices(self.lengths, self.G, generator=g))
        else:
            idx = torch.randperm(len(self.lengths), generator=g).tolist()
        pad = len(self) - len(idx)
        while pad > 0:  # wrap round (datasets smaller than one global batch wrap more than once)
            take = idx[: min(pad, len(self.lengths))]
            idx += take
            pad -= len(take)
        return idx

    def __iter__(self):
        epoch = self._epoch
        self._epoch += 1  # for loaders that never call set_epoch
        return iter(self.order(epoch))


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
    """Train ``model`` (already PEFT-wrapped or full) on features with HF Trainer.

    Works the same in one process and under ``torchrun`` / ``accelerate launch``: every
    rank calls this with the same features; the global batch is the config's."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    rank, world, _ = dist_env()
    micro, accum = split_global_batch(cfg.batch_size, cfg.grad_accum, world)
    global_batch = cfg.batch_size * cfg.grad_accum
    set_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = Collator(pad_id)
    n_check = min(len(feats), cfg.batch_size)
    preflight(
        collator([{"input_ids": f.input_ids, "labels": f.labels} for f in feats[:n_check]]),
        tokenizer, feats[:n_check], answers[:n_check],
    )
    rows = [{"input_ids": f.input_ids, "labels": f.labels, "length": len(f.input_ids)} for f in feats]
    steps_per_epoch = math.ceil(len(rows) / global_batch)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    cuda = torch.cuda.is_available()
    sampler = GlobalBatchSampler([r["length"] for r in rows], global_batch, seed)

    class _Trainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler

    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
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
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=None if rank == 0 else True,
        # the loss is the per-token mean over the whole global batch, on every world size
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
        log_level="error" if rank else "passive",
    )
    if world > 1:
        log.info(
            "lora: %d processes x micro-batch %d x grad_accum %d = global batch %d",
            world, micro, accum, global_batch,
        )
    trainer = _Trainer(
        model=model, args=args, train_dataset=_ListDataset(rows), data_collator=collator
    )
    sharded = sharding_requested()
    if sharded or getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        # rank 0 saves and evaluates the in-memory model: a sharded one would be wrong
        raise LadderError(SHARDING_ERROR.format(what=" / ".join(sharded) or "FSDP / DeepSpeed"))
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
        "world_size": world,
        "global_batch": global_batch,
        "per_device_batch": micro,
        "grad_accum_per_device": accum,
    }
