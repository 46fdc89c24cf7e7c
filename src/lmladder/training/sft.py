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
  checkpoints and resume, truncation** (issue 4): see docs/training.md.

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

from lmladder import progress
from lmladder.errors import LadderError
from lmladder.prompts import ChatFormat, response_ids
from lmladder.run.distributed import SHARDING_ERROR, dist_env, sharding_requested, split_global_batch

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


# --------------------------------------------------------------------------- dev split, checkpoints

DEV_MIN_TRAIN = 20  # below this many train examples no dev set is carved
CKPT_STAMP = "lmladder_fingerprint.txt"


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


def checkpoint_step(path) -> int | None:
    from pathlib import Path

    name = Path(path).name
    if not name.startswith("checkpoint-"):
        return None
    tail = name[len("checkpoint-"):]
    return int(tail) if tail.isdigit() else None


def latest_checkpoint(ckpt_dir) -> str | None:
    """The newest complete checkpoint in ``ckpt_dir``: a ``checkpoint-N`` folder (they
    appear by an atomic rename, only once fully written) with its trainer state."""
    from pathlib import Path

    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    done = [p for p in d.iterdir() if p.is_dir() and checkpoint_step(p) is not None
            and (p / "trainer_state.json").is_file()]
    return str(max(done, key=checkpoint_step)) if done else None


def prepare_checkpoint_dir(ckpt_dir, fingerprint: str) -> str | None:
    """Make ``ckpt_dir`` ready for this run and return the checkpoint to resume from.
    Leftover staging folders (a save killed half-way) are removed; checkpoints written
    under another fingerprint (other config / data) are discarded."""
    import shutil
    from pathlib import Path

    d = Path(ckpt_dir)
    stamp = d / CKPT_STAMP
    if d.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        log.info("%s: checkpoints from another configuration, starting afresh", d)
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
    from lmladder.io import atomic_write_text

    atomic_write_text(stamp, fingerprint + "\n")
    return latest_checkpoint(d)


class AtomicCheckpoints:
    """Mixin for a transformers ``Trainer`` (or a TRL trainer): each checkpoint is written
    into a staging folder and renamed into place only once complete, so a kill mid-save
    leaves no half ``checkpoint-N`` behind (``latest_checkpoint`` only sees whole ones)."""

    def _save_checkpoint(self, model, trial):
        # Atomic: Trainer writes into a staging folder, which is renamed into place
        # only once complete; a kill mid-save leaves no half checkpoint-N behind.
        import shutil
        import tempfile

        from transformers.trainer_utils import rotate_checkpoints

        run_dir = self.args.output_dir
        folder = f"checkpoint-{self.state.global_step}"
        stage = tempfile.mkdtemp(prefix=".tmp-", dir=run_dir)
        self._get_output_dir = lambda trial=None: stage
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        final = os.path.join(run_dir, folder)
        b = self.state.best_global_step
        if b and (b == self.state.global_step or os.path.isdir(os.path.join(run_dir, f"checkpoint-{b}"))):
            self.state.best_model_checkpoint = os.path.join(run_dir, f"checkpoint-{b}")
        if self.args.should_save:
            self.state.save_to_json(os.path.join(stage, folder, "trainer_state.json"))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(os.path.join(stage, folder), final)
        shutil.rmtree(stage, ignore_errors=True)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)


def _auto_steps(total: int, times: int) -> int:
    return max(1, total // times)


def step_plan(cfg, n_train: int, n_dev: int, global_batch: int, name: str, checkpoints: bool = True) -> dict:
    """Optimizer steps, evaluation and checkpoint intervals of an SFT run on ``n_train``
    rows with ``n_dev`` dev examples; LadderError when the checkpoints cannot hold the best
    evaluated step. Computed from counts alone, so ``SftRung.validate`` checks it before
    anything is written and ``train`` uses the same numbers."""
    from lmladder.training.hf_train import total_steps as count_steps

    total = count_steps(cfg, n_train, global_batch)
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
      ``save_steps``; a run with the same ``fingerprint`` resumes from the newest one.
    * Packing (``cfg.packing``) unless ``no_packing_reason`` says why the rung cannot.
    * ``dev_metric(model, dev_indices) -> float`` (label-scoring tasks): the task metric on
      the dev examples, computed at every evaluation; the best checkpoint and early stopping
      then follow it instead of the dev loss (a loss averaged over a label's tokens can look
      fine while only its first token, the one that decides, is still wrong).
    * ``extra`` (one dict of per-supervised-token tensors per feature) and ``loss_fn(outputs,
      labels, fields, num_items_in_batch)``: a loss that needs more than the labels (distill's
      logit KD); the fields reach it batched like the kept logits (Collator.token_fields).
    """
    from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

    from lmladder import tracking
    from lmladder.training.hf_train import common_args

    rank, world, _ = dist_env()
    micro, accum = split_global_batch(cfg.batch_size, cfg.grad_accum, world)
    global_batch = cfg.batch_size * cfg.grad_accum
    set_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_check = min(len(feats), cfg.batch_size)
    preflight(
        Collator(pad_id)([{"input_ids": f.input_ids, "labels": f.labels} for f in feats[:n_check]]),
        tokenizer, feats[:n_check], answers[:n_check],
    )
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

    save = checkpoint_dir is not None and cfg.checkpoints and world == 1
    if checkpoint_dir is not None and cfg.checkpoints and world > 1:
        log.info("%s: checkpoints and early stopping are single-process only; off under %d processes",
                 name, world)
    plan = step_plan(cfg, len(rows), len(dev_rows), global_batch, name, checkpoints=save)
    total_steps, evaluate, eval_steps, save_steps, best = (
        plan["total"], plan["evaluate"], plan["eval_steps"], plan["save_steps"], plan["best"])
    by_metric = evaluate and dev_metric is not None
    best_key = "eval_task_metric" if by_metric else "eval_loss"
    resume = prepare_checkpoint_dir(checkpoint_dir, fingerprint or "") if save else None
    out_dir = checkpoint_dir if save else work_dir
    run = tracking.run_name(out_dir, name)  # --report-to: this rung's own tracked run

    stash: dict = {}

    class _Trainer(AtomicCheckpoints, Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler

        def compute_loss(self, model, inputs, *args, **kwargs):
            if fields:  # not model inputs: handed to loss_fn
                stash.update({k: inputs.pop(k) for k in fields})
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _loss(outputs, labels, num_items_in_batch=None):
        return loss_fn(outputs, labels, stash, num_items_in_batch)

    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        max_steps=total_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps or _auto_steps(total_steps, 20),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None,
        prediction_loss_only=True,
        save_strategy="steps" if save else "no",
        save_steps=save_steps,
        save_total_limit=2 if save else None,
        load_best_model_at_end=best,
        metric_for_best_model=best_key if best else None,
        greater_is_better=by_metric if best else None,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        remove_unused_columns=False,
        disable_tqdm=rank != 0,  # the bar or progress lines: quiet_progress
        # the loss is the per-token mean over the whole global batch, on every world size
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
        log_level="error" if rank else "passive",
        **common_args(cfg, seed, run),
    )
    if world > 1:
        log.info(
            "%s: %d processes x micro-batch %d x grad_accum %d = global batch %d",
            name, world, micro, accum, global_batch,
        )
    metric_curve: list[list] = []

    class _DevMetric(TrainerCallback):
        """The task metric on the dev split at every evaluation (before early stopping and
        the best-checkpoint choice read it)."""

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

    callbacks = [_DevMetric()] if by_metric else []
    if best and cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = _Trainer(
        model=model, args=args, train_dataset=_ListDataset(rows),
        eval_dataset=_ListDataset(dev_rows) if evaluate else None,
        data_collator=collator, compute_loss_func=_loss if loss_fn else token_loss, callbacks=callbacks,
    )
    sharded = sharding_requested()
    if sharded or getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        # rank 0 saves and evaluates the in-memory model: a sharded one would be wrong
        raise LadderError(SHARDING_ERROR.format(what=" / ".join(sharded) or "FSDP / DeepSpeed"))
    avg_len = sum(r["length"] for r in rows) / max(len(rows), 1)
    progress.quiet_progress(trainer, tracking.label(out_dir, name), avg_len * global_batch)
    if resume:
        log.info("%s: resuming from %s", name, resume)
    t0 = time.perf_counter()
    with tracking.training(trainer, run):
        out = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    hist = trainer.state.log_history
    losses = [h["loss"] for h in hist if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    steps = out.global_step
    tokens = avg_len * global_batch * steps
    model.eval()
    return {
        "train_seconds": seconds,
        "steps": steps,
        "train_loss": float(sum(losses) / len(losses)) if losses else float(out.training_loss),
        "final_train_loss": losses[-1] if losses else None,
        "loss_curve": losses,
        "train_tokens": int(tokens),
        "train_tokens_per_second": tokens / seconds if seconds else None,
        "supervised_tokens": sum(sum(1 for l in feats[i].labels if l != IGNORE) for i in train_idx),
        "train_examples": len(rows),
        "dev_examples": len(dev_rows),
        "eval_curve": [[s_, l_] for s_, l_ in evals],
        "best_eval_loss": min((l_ for _, l_ in evals), default=None),
        "selected_on": ("dev task metric" if by_metric else "dev loss") if best else None,
        **({"dev_metric_curve": metric_curve, "best_dev_metric": max(v for _, v in metric_curve)}
           if metric_curve else {}),
        "best_step": int(trainer.state.best_global_step) if best and trainer.state.best_global_step else None,
        "stopped_early": bool(best and steps < total_steps),
        "resumed_from": checkpoint_step(resume) if resume else None,
        "packing": packing,
        **({"packing_off": no_packing_reason} if no_packing_reason else {}),
        "truncated": sum(1 for f in feats if f.truncated),
        "world_size": world,
        "global_batch": global_batch,
        "per_device_batch": micro,
        "grad_accum_per_device": accum,
    }
