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
* **Packing, loss on supervised positions only, dev split / early stopping, atomic
  checkpoints and resume, truncation** (issue 4): see docs/training.md; the checkpoints
  themselves (atomic saves, fingerprint scope, resume point) are training/checkpoints.py.

``train`` reads as its steps, in order: the batch layout over the processes, the
pre-flight check, the data (dev carve, rows, sampler, collator), the plan (steps,
evaluation, checkpoints, resume), Trainer's arguments, the callbacks (dev task metric,
early stopping), the trainer, its run (hf_train.run_trainer), the stats returned.

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
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from lmladder import tracking
from lmladder.errors import LadderError
from lmladder.prompts import ChatFormat, response_ids
from lmladder.run.distributed import SHARDING_ERROR, dist_env, sharding_requested, split_global_batch
from lmladder.training.checkpoints import AtomicCheckpoints, checkpoint_step, prepare_checkpoint_dir
from lmladder.training import lean, memory
from lmladder.training.hf_train import common_args, run_trainer, total_steps

IGNORE = -100

log = logging.getLogger(__name__)


class GlobalBatchSampler:
    """Seeded, length-grouped order of the train set at global-batch granularity, the
    same in every process and for every world size (see the module docstring). The
    length-grouped batches come in a seeded random order, not longest first.

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
            # transformers orders each megabatch (50 batches) longest first, so a run
            # shorter than an epoch would see only the longest examples; shuffle the full
            # batches (similar lengths within each stay together), keeping the first (it
            # holds the longest sequence: out-of-memory shows at once) and the partial last
            n_full = len(idx) // self.G
            batches = [idx[i * self.G : (i + 1) * self.G] for i in range(n_full)]
            if n_full > 2:
                perm = torch.randperm(n_full - 1, generator=g).tolist()
                batches = batches[:1] + [batches[1 + i] for i in perm]
            idx = [i for b in batches for i in b] + idx[n_full * self.G :]
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


@dataclass
class Feature:
    input_ids: list[int]
    labels: list[int]
    expected: str  # decoded text the unmasked labels must equal (pre-flight)
    source: str
    truncated: int = 0  # prompt tokens cut from the left to fit max_length


def build_feature(
    fmt: ChatFormat,
    message: str,
    answer: str,
    max_length: int,
    source: str,
    eos_ids: set[int],
    truncation: str = "error",
) -> Feature:
    """One training sequence: prompt (masked) + answer + end-of-turn (trained).

    A sequence longer than ``max_length``: ``truncation="error"`` stops the run;
    ``"truncate"`` cuts the prompt from the left (the answer and the end-of-turn token
    are kept whole) and records how many tokens went; an answer too long to fit beside
    half of ``max_length`` of prompt is cut from the end too (its end-of-turn token with
    it, as TRL's ``max_completion_length``)."""
    tok = fmt.tokenizer
    answer_ids = tok(answer, add_special_tokens=False).input_ids
    if not answer or not answer_ids:
        raise LadderError(f"{source}: label: the answer {answer!r} tokenises to nothing")
    prompt_ids = fmt.encode(fmt.prompt(message))
    suffix_ids = response_ids(fmt, message, answer, eos_ids)
    truncated = 0
    if len(prompt_ids) + len(suffix_ids) > max_length:
        n = len(prompt_ids) + len(suffix_ids)
        if truncation != "truncate":
            raise LadderError(
                f"{source}: training sequence has {n} tokens, more than max_length="
                f"{max_length} (raise max_length, shorten the input, or set truncation: truncate)"
            )
        keep_p = max_length - len(suffix_ids)
        if keep_p < min(len(prompt_ids), max_length // 2):  # the answer must give way too
            keep_p = min(len(prompt_ids), max_length // 2)
            suffix_ids = suffix_ids[: max_length - keep_p]
        truncated = n - keep_p - len(suffix_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - keep_p:]
    ids = prompt_ids + suffix_ids
    return Feature(
        input_ids=ids,
        labels=[IGNORE] * len(prompt_ids) + suffix_ids,
        expected=tok.decode(suffix_ids),
        source=source,
        truncated=truncated,
    )


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit packing of sequences (in the given order) into rows of at most
    ``capacity`` tokens; a longer sequence gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        j = next((k for k, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[j].append(i)
            room[j] -= n
    return rows


class Collator:
    """Builds a batch from features; labels are padded with -100, never derived from pad.

    * ``packing=False``: one right-padded row per sequence, with an attention mask.
    * ``packing=True``: the micro-batch's sequences are packed into rows of at most
      ``pack_length`` tokens with ``position_ids`` restarting at 0 for each sequence and
      no 2-D attention mask: transformers then builds a block-diagonal causal mask from
      the position ids (``masking_utils.find_packed_sequence_indices``; needs
      ``use_cache=False``, which the batch sets), so no token attends across a sequence
      boundary. Row padding is a sequence of its own (masked, never attended by real
      tokens). Every sequence starts with a masked prompt token, so the causal shift
      never trains a token on its neighbour's start.
    * ``keep_logits``: adds ``logits_to_keep`` (a boolean mask of the positions whose next
      token is supervised): the model projects only those hidden states on the
      vocabulary, instead of batch x length x vocab logits. ``n_virtual`` leading
      positions (prompt tuning's soft prompt) are never kept.
    * ``token_fields``: per-feature tensors with one row per supervised token (distill's
      teacher top-k log-probs), concatenated in the order of the kept logits (row by row,
      sequence by sequence, position by position).
    """

    def __init__(self, pad_id: int, packing: bool = False, pack_length: int = 2048,
                 keep_logits: bool = False, n_virtual: int = 0, token_fields: tuple[str, ...] = ()):
        self.pad_id, self.packing, self.pack_length = pad_id, packing, pack_length
        self.keep_logits, self.n_virtual = keep_logits, n_virtual
        self.token_fields = tuple(token_fields)

    def __call__(self, feats: list[dict]) -> dict[str, Any]:
        import torch

        if self.packing:
            groups = pack_rows([len(f["input_ids"]) for f in feats], self.pack_length)
            seqs = [[feats[i] for i in g] for g in groups]
        else:
            seqs = [[f] for f in feats]
        T = max(sum(len(f["input_ids"]) for f in row) for row in seqs)
        B = len(seqs)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        for b, row in enumerate(seqs):
            at = 0
            for f in row:
                n = len(f["input_ids"])
                ids[b, at : at + n] = torch.tensor(f["input_ids"])
                labels[b, at : at + n] = torch.tensor(f["labels"])
                mask[b, at : at + n] = 1
                pos[b, at : at + n] = torch.arange(n)
                at += n
            pos[b, at:] = torch.arange(T - at)  # padding: a separate (masked) sequence
        out: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if self.packing:
            out["position_ids"] = pos
            out["use_cache"] = False  # a cache object disables packed-sequence detection
        else:
            out["attention_mask"] = mask
        if self.keep_logits:
            keep = torch.zeros((B, self.n_virtual + T), dtype=torch.bool)
            keep[:, self.n_virtual : self.n_virtual + T - 1] = labels[:, 1:] != IGNORE
            out["logits_to_keep"] = keep
        for k in self.token_fields:
            out[k] = torch.cat([torch.as_tensor(f[k]) for row in seqs for f in row])
        return out


def token_loss(outputs, labels, num_items_in_batch=None):
    """Sum of the supervised tokens' cross-entropy over ``num_items_in_batch`` (the whole
    accumulated, all-rank step's supervised token count; the batch's own when None).

    With ``logits_to_keep`` the model returned logits for the supervised positions only,
    flattened in row order; the targets are the shifted labels in the same order. A model
    that ignored the mask returns full logits: the supervised positions are picked here."""
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    shift = labels[:, 1:]
    keep = shift != IGNORE
    targets = shift[keep]
    if logits.dim() == 3:
        logits = logits[:, -labels.shape[1] :][:, :-1][keep]
    loss = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    return loss / denom


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


# --------------------------------------------------------------------------- dev split, step plan

DEV_MIN_TRAIN = 20  # below this many train examples no dev set is carved


def carve_dev(n: int, fraction: float, dev_max: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices): a seeded sample of ``round(n * fraction)`` examples
    (at least 1, at most ``dev_max``) held out for the dev loss; none when ``fraction``
    is 0 or fewer than ``DEV_MIN_TRAIN`` examples."""
    import random

    if fraction <= 0 or n < DEV_MIN_TRAIN:
        return list(range(n)), []
    k = min(dev_max, max(1, round(n * fraction)))
    dev = sorted(random.Random(seed).sample(range(n), k))
    held = set(dev)
    return [i for i in range(n) if i not in held], dev


def _auto_steps(total: int, times: int) -> int:
    return max(1, total // times)


def step_plan(cfg, n_train: int, n_dev: int, global_batch: int, name: str, checkpoints: bool = True) -> dict:
    """Optimizer steps, evaluation and checkpoint intervals of an SFT run on ``n_train``
    rows with ``n_dev`` dev examples; LadderError when the checkpoints cannot hold the best
    evaluated step. Computed from counts alone, so ``training/steps.check_step_plan`` checks it before
    anything is written and ``train`` uses the same numbers."""
    total = total_steps(cfg, n_train, global_batch)
    evaluate = n_dev > 0
    eval_steps = cfg.eval_steps or _auto_steps(total, 5)
    save_steps = cfg.save_steps or (eval_steps if evaluate else _auto_steps(total, 5))
    best = evaluate and checkpoints
    if best and save_steps % eval_steps:
        raise LadderError(
            f"{name}.save_steps={save_steps} must be a multiple of {name}.eval_steps={eval_steps} "
            f"(the best checkpoint is chosen among the evaluated ones)"
        )
    return {"total": total, "evaluate": evaluate, "eval_steps": eval_steps, "save_steps": save_steps, "best": best}


# --------------------------------------------------------------------------- train(), step by step


def train(
    model,
    tokenizer,
    feats: list[Feature],
    answers: list[str],
    cfg,
    work_dir,
    seed: int,
    *,
    checkpoint_dir=None,
    fingerprint: str | None = None,
    no_packing_reason: str | None = None,
    n_virtual: int = 0,
    name: str = "lora",
    extra: list[dict] | None = None,
    loss_fn=None,
    dev_metric=None,
) -> dict:
    """Train ``model`` (already PEFT-wrapped, or a full model) on features with HF Trainer.

    Works the same in one process and under ``torchrun`` / ``accelerate launch``: every
    rank calls this with the same features; the global batch is the config's.

    * A dev set is carved from ``feats`` (seeded, ``cfg.dev_fraction``); the dev loss is
      logged every ``eval_steps``; with checkpoints on, training stops after
      ``early_stopping_patience`` evaluations without improvement and the best
      checkpoint is loaded at the end.
    * With ``checkpoint_dir`` (one process only), a checkpoint is written atomically every
      ``save_steps`` (training/checkpoints.py); a run with the same ``fingerprint`` resumes
      from the newest one.
    * Packing (``cfg.packing``) unless ``no_packing_reason`` says why the rung cannot.
    * ``dev_metric(model, dev_indices) -> float`` (label-scoring tasks): the task metric on
      the dev examples, computed at every evaluation; the best checkpoint and early stopping
      then follow it instead of the dev loss (a loss averaged over a label's tokens can look
      fine while only its first token, the one that decides, is still wrong).
    * ``extra`` (one dict of per-supervised-token tensors per feature) and ``loss_fn(outputs,
      labels, fields, num_items_in_batch)``: a loss that needs more than the labels (distill's
      logit KD); the fields reach it batched like the kept logits (Collator.token_fields).
    """
    from transformers import set_seed

    batch = _batch_layout(cfg)
    set_seed(seed)
    _check_first_batch(tokenizer, feats, answers, cfg.batch_size)
    data = _data(feats, extra, cfg, seed, batch.size, _pad_id(tokenizer),
                 n_virtual=n_virtual, no_packing_reason=no_packing_reason, name=name)
    mem = _memory_plan(model, cfg, data, batch, n_virtual, name)
    batch = _Batch(rank=batch.rank, world=batch.world, micro=mem.micro, accum=mem.accum, size=batch.size)
    plan = _plan(cfg, data, batch, checkpoint_dir, fingerprint, work_dir, dev_metric, name)
    args = _training_args(cfg, plan, batch, seed)
    if batch.world > 1:
        log.info("%s: %d processes x micro-batch %d x grad_accum %d = global batch %d",
                 name, batch.world, batch.micro, batch.accum, batch.size)
    metric_curve: list[list] = []  # [step, dev task metric], filled at each evaluation
    callbacks = _callbacks(cfg, plan, dev_metric, data.dev_idx, metric_curve)
    trainer = _trainer(model, args, data, plan, callbacks, loss_fn, drop_mask=_mask_droppable(model, n_virtual))
    if plan.resume:
        log.info("%s: resuming from %s", name, plan.resume)
    # the lean pieces (training/lean.py) are undone on the way out: the model goes back as it came
    # large freed blocks go back to the system where micro-batches are long (they are checkpointed then)
    long = bool(mem.checkpoint_layers)
    with lean.fused_lora_dropout(model) as n_fused, lean.large_blocks_returned() if long else nullcontext(), \
            lean.checkpoint_layers(model, mem.layers_for if mem.checkpoint_layers else 0) as ck:
        out, seconds = run_trainer(trainer, plan.run, tracking.label(plan.out_dir, name), data.tokens_per_step,
                                   resume=plan.resume)
    model.eval()
    stats = _stats(out, seconds, trainer, feats, data, plan, batch, metric_curve, no_packing_reason)
    stats["memory_plan"] = memory.report(mem, ck, n_fused)
    return stats


def _memory_plan(model, cfg, data: "_Data", batch: "_Batch", n_virtual: int, name: str):
    """The micro-batch and checkpointed layers for ``cfg.memory_budget_mb`` (training/memory.py),
    at the config's global batch; the longest micro-batch row counts (packed or not)."""
    lengths = [r["length"] + n_virtual for r in data.rows] or [1]
    # prefix tuning's prefix travels in past_key_values, which a checkpointed layer drops: micro-batches only
    mem = memory.plan(model, lengths, batch.micro, batch.accum, getattr(cfg, "memory_budget_mb", None),
                      full_checkpointing=bool(cfg.gradient_checkpointing), layers=not _prompt_learning(model))
    log.info("%s: memory budget %d MB%s: micro-batch %d x grad_accum %d%s (planned peak ~%d MB)", name,
             mem.budget_mb, " (auto)" if mem.auto_budget else "", mem.micro, mem.accum,
             f", {mem.checkpoint_layers} layer(s) checkpointed" if mem.checkpoint_layers else "", mem.estimate_mb)
    return mem


def _prompt_learning(model) -> bool:
    """A PEFT prompt-learning model (prompt / prefix tuning): virtual tokens in front, or a
    prefix in ``past_key_values`` (which a checkpointed layer would drop)."""
    peft = getattr(model, "peft_config", None) or {}
    return isinstance(peft, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft.values())


def _mask_droppable(model, n_virtual: int) -> bool:
    """Right-padded batches may go without their attention mask (lean.causal_padding_ok checks
    each batch): a decoder-only model without prompt-learning tokens."""
    cfg = getattr(model, "config", None)
    return (not n_virtual and not _prompt_learning(model) and cfg is not None
            and not getattr(cfg, "is_encoder_decoder", False))


@dataclass
class _Batch:
    """The config's global batch (``cfg.batch_size x cfg.grad_accum``) over the processes."""

    rank: int
    world: int
    micro: int  # sequences per micro-batch, per process
    accum: int  # micro-batches per optimizer step, per process
    size: int  # the global batch


@dataclass
class _Data:
    """What the trainer reads: the train / dev rows (indices into the features), their
    order and their batching."""

    train_idx: list[int]
    dev_idx: list[int]
    rows: list[dict]
    dev_rows: list[dict]
    sampler: GlobalBatchSampler
    collator: Collator
    packing: bool
    fields: tuple[str, ...]  # ``extra``'s per-token fields: handed to loss_fn, not to the model
    tokens_per_step: float  # mean train row length x global batch


@dataclass
class _Plan:
    """Steps, evaluation, checkpoints and the best-checkpoint choice of one run."""

    total: int
    evaluate: bool
    eval_steps: int
    save_steps: int
    save: bool  # checkpoints written: checkpoint_dir given, cfg.checkpoints, one process
    best: bool  # the best evaluated checkpoint loaded at the end; early stopping
    by_metric: bool  # the dev task metric (dev_metric) chooses, not the dev loss
    resume: str | None  # the checkpoint this run resumes from
    out_dir: Any  # Trainer's output_dir: the checkpoint folder, else work_dir
    run: str | None  # the --report-to run (tracking.run_name)


def _batch_layout(cfg) -> _Batch:
    """Per-process micro-batch and accumulation giving the config's global batch."""
    rank, world, _ = dist_env()
    micro, accum = split_global_batch(cfg.batch_size, cfg.grad_accum, world)
    return _Batch(rank=rank, world=world, micro=micro, accum=accum, size=cfg.batch_size * cfg.grad_accum)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _check_first_batch(tokenizer, feats: list[Feature], answers: list[str], batch_size: int) -> None:
    """The pre-flight check on the first ``batch_size`` features, padded into one batch."""
    n_check = min(len(feats), batch_size)
    preflight(
        Collator(_pad_id(tokenizer))([{"input_ids": f.input_ids, "labels": f.labels} for f in feats[:n_check]]),
        tokenizer, feats[:n_check], answers[:n_check],
    )


def _data(feats: list[Feature], extra: list[dict] | None, cfg, seed: int, global_batch: int, pad_id: int, *,
          n_virtual: int, no_packing_reason: str | None, name: str) -> _Data:
    """The dev carve, the train / dev rows, the global-batch sampler and the collator
    (packing unless ``no_packing_reason``)."""
    packing = bool(cfg.packing) and no_packing_reason is None
    if cfg.packing and no_packing_reason:
        log.info("%s: packing off: %s", name, no_packing_reason)
    fields = tuple(extra[0]) if extra else ()
    collator = Collator(pad_id, packing=packing, pack_length=cfg.pack_length, keep_logits=True,
                        n_virtual=n_virtual, token_fields=fields)
    train_idx, dev_idx = carve_dev(len(feats), cfg.dev_fraction, cfg.dev_max, seed)

    def rows_of(idx):
        return [{"input_ids": feats[i].input_ids, "labels": feats[i].labels,
                 "length": len(feats[i].input_ids), **(extra[i] if extra else {})} for i in idx]

    rows, dev_rows = rows_of(train_idx), rows_of(dev_idx)
    sampler = GlobalBatchSampler([r["length"] for r in rows], global_batch, seed, cfg.group_by_length)
    avg_len = sum(r["length"] for r in rows) / max(len(rows), 1)
    return _Data(train_idx=train_idx, dev_idx=dev_idx, rows=rows, dev_rows=dev_rows, sampler=sampler,
                 collator=collator, packing=packing, fields=fields, tokens_per_step=avg_len * global_batch)


def _plan(cfg, data: _Data, batch: _Batch, checkpoint_dir, fingerprint: str | None, work_dir, dev_metric,
          name: str) -> _Plan:
    """Steps and intervals (``step_plan``), whether checkpoints are written and the best
    one chosen, and on what; the checkpoint folder made ready for this fingerprint (the
    checkpoint to resume from)."""
    save = checkpoint_dir is not None and cfg.checkpoints and batch.world == 1
    if checkpoint_dir is not None and cfg.checkpoints and batch.world > 1:
        log.info("%s: checkpoints and early stopping are single-process only; off under %d processes",
                 name, batch.world)
    steps = step_plan(cfg, len(data.rows), len(data.dev_rows), batch.size, name, checkpoints=save)
    resume = prepare_checkpoint_dir(checkpoint_dir, fingerprint or "") if save else None
    out_dir = checkpoint_dir if save else work_dir
    return _Plan(
        total=steps["total"], evaluate=steps["evaluate"], eval_steps=steps["eval_steps"],
        save_steps=steps["save_steps"], save=save, best=steps["best"],
        by_metric=steps["evaluate"] and dev_metric is not None,
        resume=resume, out_dir=out_dir, run=tracking.run_name(out_dir, name),  # --report-to: the rung's own run
    )


def _training_args(cfg, plan: _Plan, batch: _Batch, seed: int):
    """Trainer's arguments: the batch layout, the step plan, checkpoints and the choice of
    the best one (loaded at the end), and what every lmladder trainer shares (common_args)."""
    from transformers import TrainingArguments

    best, best_key = plan.best, "eval_task_metric" if plan.by_metric else "eval_loss"
    return TrainingArguments(
        output_dir=str(plan.out_dir),
        per_device_train_batch_size=batch.micro,
        per_device_eval_batch_size=batch.micro,
        gradient_accumulation_steps=batch.accum,
        max_steps=plan.total,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps or _auto_steps(plan.total, 20),
        eval_strategy="steps" if plan.evaluate else "no",
        eval_steps=plan.eval_steps if plan.evaluate else None,
        prediction_loss_only=True,
        save_strategy="steps" if plan.save else "no",
        save_steps=plan.save_steps,
        save_total_limit=2 if plan.save else None,
        load_best_model_at_end=best,
        metric_for_best_model=best_key if best else None,
        greater_is_better=plan.by_metric if best else None,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        remove_unused_columns=False,
        disable_tqdm=batch.rank != 0,  # the bar or progress lines: quiet_progress
        # the loss is the per-token mean over the whole global batch, on every world size
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
        log_level="error" if batch.rank else "passive",
        **common_args(cfg, seed, plan.run),
    )


def _callbacks(cfg, plan: _Plan, dev_metric, dev_idx: list[int], metric_curve: list[list]) -> list:
    """The dev task metric at every evaluation (when it chooses the best checkpoint), then
    early stopping (when a best checkpoint is chosen), in that order: early stopping reads
    the metric the first one adds."""
    from transformers import EarlyStoppingCallback

    callbacks = [_dev_metric_callback(dev_metric, dev_idx, metric_curve)] if plan.by_metric else []
    if plan.best and cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return callbacks


def _dev_metric_callback(dev_metric, dev_idx: list[int], metric_curve: list[list]):
    """A TrainerCallback: ``dev_metric(model, dev_idx)`` at every evaluation, as the
    ``eval_task_metric`` early stopping and the best-checkpoint choice read, and appended
    to ``metric_curve`` as ``[step, value]``."""
    from transformers import TrainerCallback

    class _DevMetric(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
            was = model.training
            model.eval()
            try:
                v = float(dev_metric(model, dev_idx))
            finally:
                if was:
                    model.train()
            if metrics is not None:  # ties on the metric go to the lower dev loss (a later, trained step)
                metrics["eval_task_metric"] = v - 1e-6 * float(metrics.get("eval_loss", 0.0))
            metric_curve.append([state.global_step, v])

    return _DevMetric()


def _trainer(model, args, data: _Data, plan: _Plan, callbacks: list, loss_fn, drop_mask: bool = False):
    """Trainer with atomic checkpoints, the global-batch sampler, and the loss on the
    supervised tokens (``token_loss``, or ``loss_fn`` with ``extra``'s fields)."""
    from transformers import Trainer

    sampler, fields = data.sampler, data.fields
    stash: dict = {}  # this micro-batch's extra fields, for loss_fn

    class _Trainer(AtomicCheckpoints, Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler

        def compute_loss(self, model, inputs, *args, **kwargs):
            if fields:  # not model inputs: handed to loss_fn
                stash.update({k: inputs.pop(k) for k in fields})
            if drop_mask and "attention_mask" in inputs and lean.causal_padding_ok(model, inputs):
                inputs.pop("attention_mask")  # SDPA's causal kernel, no T x T mask per layer
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _loss(outputs, labels, num_items_in_batch=None):
        return loss_fn(outputs, labels, stash, num_items_in_batch)

    trainer = _Trainer(
        model=model, args=args, train_dataset=_ListDataset(data.rows),
        eval_dataset=_ListDataset(data.dev_rows) if plan.evaluate else None,
        data_collator=data.collator, compute_loss_func=_loss if loss_fn else token_loss, callbacks=callbacks,
    )
    _refuse_sharding(trainer)
    return trainer


def _refuse_sharding(trainer) -> None:
    """Rank 0 saves and evaluates the in-memory model: a sharded one (FSDP, DeepSpeed) would be wrong."""
    sharded = sharding_requested()
    if sharded or getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        raise LadderError(SHARDING_ERROR.format(what=" / ".join(sharded) or "FSDP / DeepSpeed"))


def _stats(out, seconds: float, trainer, feats: list[Feature], data: _Data, plan: _Plan, batch: _Batch,
           metric_curve: list[list], no_packing_reason: str | None) -> dict:
    """What ``train`` returns (a rung's ``details``): time, losses and tokens, the dev
    curves and the chosen step, resume, packing, truncation, the batch layout."""
    hist = trainer.state.log_history
    losses = [h["loss"] for h in hist if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    steps = out.global_step
    tokens = data.tokens_per_step * steps
    best = plan.best
    return {
        "train_seconds": seconds,
        "steps": steps,
        "train_loss": float(sum(losses) / len(losses)) if losses else float(out.training_loss),
        "final_train_loss": losses[-1] if losses else None,
        "loss_curve": losses,
        "train_tokens": int(tokens),
        "train_tokens_per_second": tokens / seconds if seconds else None,
        "supervised_tokens": sum(sum(1 for l in feats[i].labels if l != IGNORE) for i in data.train_idx),
        "train_examples": len(data.rows),
        "dev_examples": len(data.dev_rows),
        "eval_curve": [[s_, l_] for s_, l_ in evals],
        "best_eval_loss": min((l_ for _, l_ in evals), default=None),
        "selected_on": ("dev task metric" if plan.by_metric else "dev loss") if best else None,
        **({"dev_metric_curve": metric_curve, "best_dev_metric": max(v for _, v in metric_curve)}
           if metric_curve else {}),
        "best_step": int(trainer.state.best_global_step) if best and trainer.state.best_global_step else None,
        "stopped_early": bool(best and steps < plan.total),
        "resumed_from": checkpoint_step(plan.resume) if plan.resume else None,
        "packing": data.packing,
        **({"packing_off": no_packing_reason} if no_packing_reason else {}),
        "truncated": sum(1 for f in feats if f.truncated),
        "world_size": batch.world,
        "global_batch": batch.size,
        "per_device_batch": batch.micro,
        "grad_accum_per_device": batch.accum,
    }
