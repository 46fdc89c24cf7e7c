"""dpo: Direct Preference Optimization on (prompt, chosen, rejected) pairs, by TRL's
``DPOTrainer``.

The method is TRL's: the loss (``loss_type``, default ``sigmoid`` =
``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` with ``p*`` / ``r*`` the summed
response log-probs under the policy / the reference), the optimizer loop, the logged
rewards. The reference is the start model: the base, or with ``from: lora`` the base
with lora's adapter merged in (the ladder hands that model over as ``ctx.base()``).
No second copy of the model is ever held:

* ``method: lora`` -- a fresh LoRA adapter on the start model; the reference is the
  same model with the adapter disabled. TRL, handed a PEFT model, copies its adapter
  as a "ref" adapter (it cannot know ours is freshly initialised); we drop that copy,
  so the reference pass runs the bare start model and the saved adapter is only ours.
* ``method: full`` -- all weights of a private copy of the start model train (like
  rungs/full.py); TRL's ``precompute_ref_log_probs`` scores every train pair under the
  start model once before the first step, so no reference copy is kept.

What lmladder adds (besides what every weight-update rung has: reuse of saved weights
with the same fingerprint and their atomic save, training/weights.py; the forgetting
check, training/forgetting.py; atomic checkpoints and resume through
training/trl_train.py):

* **exact masking** -- we tokenise the pairs ourselves, the way the SFT rungs do:
  ``prompt_ids`` is the chat-template prompt the model sees at inference, ``chosen_ids``
  / ``rejected_ids`` are the response tokens plus the template's end-of-turn token (so
  the trained text ends where the model must stop, and pad == eos cannot mask it).
  TRL gets these rows as they are (its own tokenisation re-renders prompt+completion
  and keeps the completion where the two diverge). A pair longer than ``max_length``
  has its prompt cut from the left, and responses too long to fit beside half of
  ``max_length`` of prompt cut from the end as TRL's ``max_completion_length`` does
  (counted as ``truncated`` / ``truncated_responses``; ``truncation: error`` stops with
  the example's file:line instead).
* **predictions** on the held-out pairs: the margin is the implicit DPO reward
  difference ``beta * ((pc - rc) - (pr - rr))`` over the response tokens, with ``r*``
  the start model's log-probs scored before training; the other fields (and generated
  responses where the task adds them) come from the task's own ``predict`` on the
  policy.
* dropout is off during training (TRL's ``disable_dropout``: policy and reference must
  agree at step 0), so the LoRA ``dropout`` field does not apply.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmladder import prompts
from lmladder.errors import LadderError
from lmladder.options import AlignConfig
from lmladder.run import distributed
from lmladder.rungs.base import Rung
from lmladder.rungs.lora import peft_config
from lmladder.training import forgetting, steps, weights


class DpoConfig(AlignConfig):
    """dpo: Direct Preference Optimization on (prompt, chosen, rejected) pairs (TRL DPOTrainer)."""

    beta: float = Field(0.1, gt=0, description="DPO beta (strength of the KL anchor to the reference).")
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "aot", "aot_unpaired",
        "apo_zero", "apo_down", "discopop", "sigmoid_norm",
    ] = Field("sigmoid", description="TRL DPO loss type (sigmoid = the DPO paper's; ipo, hinge, ...).")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (LoRA; use ~5e-7..5e-6 for full).")
    max_length: int = Field(
        512, ge=8, description="Longest prompt + response (+ end of turn) in tokens; a longer pair has its prompt "
        "cut from the left (counted; truncation: error stops instead)."
    )
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch.")


log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def end_of_turn_id(fmt, eos_ids: set[int], message: str, answer: str) -> int:
    """The token the chat template ends an assistant answer with (the first EOS-like token
    after the answer, as training/sft.build_feature trains it); the tokenizer's EOS for a
    template without one."""
    from lmladder.prompts import response_ids

    return response_ids(fmt, message, answer, eos_ids)[-1]


def pair_rows(task, fmt, examples, eot: int, max_length: int, truncation: str, name: str = "dpo"):
    """Pre-tokenised DPO rows ``{prompt_ids, chosen_ids, rejected_ids}``, how many pairs
    were cut to fit ``max_length`` and how many of those had their responses cut.

    A pair over ``max_length`` (``truncation: truncate``): the prompt is cut from the left
    while the longer response fits whole; a response that does not fit beside at least
    half of ``max_length`` of prompt is cut from the end (its end-of-turn token with it),
    as TRL's ``max_completion_length`` does, so both responses keep the same start."""
    rows, truncated, cut_responses = [], 0, 0
    for e in examples:
        p = fmt.encode(fmt.prompt(task.train_message(e)))
        c = task.response_ids(fmt, task.answer(e)) + [eot]
        r = task.response_ids(fmt, task.rejected(e)) + [eot]
        n = len(p) + max(len(c), len(r))
        if n > max_length:
            if truncation != "truncate":
                raise LadderError(
                    f"{e.source}: preference pair has {n} tokens, more than {name}.max_length={max_length} "
                    f"(raise max_length, shorten the input, or set {name}.truncation: truncate)"
                )
            longest = max(len(c), len(r))
            keep_p = max_length - longest
            if keep_p < min(len(p), max_length // 2):  # the responses must give way too
                keep_p = min(len(p), max_length // 2)
                c, r = c[: max_length - keep_p], r[: max_length - keep_p]
                cut_responses += 1
            p = p[len(p) - keep_p:]
            truncated += 1
        rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return rows, truncated, cut_responses


@functools.cache
def trainer_class():
    """TRL's DPOTrainer, taking rows we tokenised (``PAIR_COLUMNS``) as they are, and with
    a fresh LoRA adapter's reference = the adapter disabled (no "ref" adapter copy)."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            m = self.accelerator.unwrap_model(self.model)
            if "ref" in (getattr(m, "peft_config", None) or {}):
                # TRL copied our adapter as the reference; it is freshly initialised (LoRA B = 0),
                # so the start model -- the adapter disabled -- is the same reference, for free
                m.delete_adapter("ref")
                m.set_adapter("default")

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = [c for c in PAIR_COLUMNS if c not in dataset.column_names]
            if missing:
                raise ValueError(f"{dataset_name} dataset lacks {missing}: expected pre-tokenised pairs")
            return dataset

    return PretokenizedDPOTrainer


def pair_tokens(rows: list[dict]) -> list[int]:
    """Tokens a pair puts through the model: chosen and rejected, each padded to the longer
    (training/memory.py plans the micro-batch on these)."""
    return [2 * (len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))) for r in rows]


def dpo_args(cfg) -> dict[str, Any]:
    """The DPOConfig fields of the method (trl_train.training_args gives the shared ones)."""
    return dict(
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        max_length=cfg.max_length,  # rows already fit: TRL's cut (keep_start) never fires
        truncation_mode="keep_start",
        precompute_ref_log_probs=cfg.method == "full",
        disable_dropout=True,
    )


def unpatch(model) -> None:
    """Remove TRL's fused-LM-head ``forward`` (an instance attribute it sets on the
    model under the PEFT wrapper), so the start model -- possibly the shared base --
    is the plain model again."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.__dict__.pop("forward", None)


class Dpo(Rung):
    name = "dpo"
    cost_rank = 26
    trains = True
    summary = "DPO on preference pairs (TRL DPOTrainer; LoRA or full), usually from an SFT rung"
    kinds = ("preference",)

    @property
    def artifact(self) -> str:
        """rungs/dpo/adapter (method: lora) or rungs/dpo/model (full: the whole model)."""
        return "adapter" if self.cfg.method == "lora" else "model"

    # ------------------------------------------------------------------ data

    def prepare(self) -> None:
        task, fmt = self.ctx.task, self.ctx.fmt()
        model, tok = self.ctx.base()
        train = self.ctx.data.train
        if not train:
            raise LadderError(f"{self.name}: no training pairs (data.train is empty)")
        eot = end_of_turn_id(fmt, prompts.eos_token_ids(tok, model), task.train_message(train[0]), task.answer(train[0]))
        self.rows, self.truncated, self.truncated_responses = pair_rows(
            task, fmt, train, eot, self.cfg.max_length, self.cfg.truncation, self.name)
        if self.truncated:
            log.warning("%s: %d training pair(s) longer than max_length=%d: prompt cut from the left"
                        "%s", self.name, self.truncated, self.cfg.max_length,
                        f", responses of {self.truncated_responses} cut from the end" if self.truncated_responses else "")
        self.messages = [task.user_message(ex) for ex in self.ctx.data.test]
        self.trainable = 0

    # ------------------------------------------------------------------ training

    def fit(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        start, tok = self.ctx.base()  # the shared base, or the `from:` rung's model: also the reference
        if distributed.is_main():  # the reference of the held-out pairs (rank 0 evaluates): the start model
            self.ref_test, _ = self.ctx.task.score_pairs(start, self.ctx.fmt(), self.messages, self.ctx.data.test,
                                                         desc=f"{self.name} reference")
        spent = time.perf_counter() - t0
        check = forgetting.before(start, tok, self.cfg)
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            self.model = self.wrap(start)
            self.trainable = weights.count_trainable(self.model)
            with steps.trainer_dirs(self.out_dir) as (work, checkpoints):
                return self.train_weights(self.model, tok, work, checkpoints, fp)

        def load(folder) -> dict[str, Any]:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            if self.cfg.method == "lora":
                self.model = PeftModel.from_pretrained(start, folder)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=start.dtype, use_safetensors=True).to(start.device)
            self.model.eval()
            self.trainable = weights.count_trainable(self.model, loaded=True)
            return {"truncated": self.truncated}

        stats = weights.reuse_or_train(
            self.out_dir / self.artifact, fp, train=train, load=load, name=self.name, spent=spent,
            save=lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True),
            checkpoints=self.out_dir / "checkpoints",
        )
        stats["trainable_params"] = self.trainable
        stats["trainable_share"] = weights.share_of_base(self.ctx, self.trainable, self.model)
        forgetting.after(check, self.model, stats)
        stats.setdefault("truncated", self.truncated)
        stats.setdefault("truncated_responses", self.truncated_responses)
        stats.setdefault("method", self.cfg.method)
        return stats

    def wrap(self, start):
        """What trains: ``method: lora`` -- a fresh LoRA adapter (lora's, seeded) on the start
        model, removed again in ``close()``; ``full`` -- every weight of a private copy."""
        if self.cfg.method == "full":
            model = copy.deepcopy(start)
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        from peft import get_peft_model
        from transformers import set_seed

        set_seed(self.ctx.cfg.seed)  # the adapter's initialisation
        return get_peft_model(start, peft_config(self.cfg))

    def train_weights(self, model, tok, work: Path, checkpoint_dir: Path | None, fingerprint: str) -> dict[str, Any]:
        """TRL's DPOTrainer on the pre-tokenised pairs (training/trl_train.run); the start
        model's pad ids and forward are as before afterwards."""
        from datasets import Dataset
        from trl import DPOConfig

        from lmladder.training import trl_train

        conf = model.config.get_text_config()
        gen = getattr(model, "generation_config", None)
        pads = (conf.pad_token_id, getattr(gen, "pad_token_id", None))
        try:
            stats = trl_train.run(
                trainer_class(), DPOConfig, model=model, cfg=self.cfg, train_dataset=Dataset.from_list(self.rows),
                processing_class=copy.deepcopy(tok),  # TRL may set a pad token: not on the shared tokenizer
                seed=self.ctx.cfg.seed, name=self.name, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                work_dir=work, method_args=dpo_args(self.cfg),
                row_tokens=pair_tokens(self.rows),
            )
        finally:
            unpatch(model)
            conf.pad_token_id = pads[0]  # TRL mirrors the tokenizer's pad onto the model
            if gen is not None:
                gen.pad_token_id = pads[1]
        c = stats.get("curves", {})
        last = lambda k: c[k][-1][1] if c.get(k) else None  # noqa: E731
        first = lambda k: c[k][0][1] if c.get(k) else None  # noqa: E731
        stats.update({
            "loss_first": first("loss"), "loss_last": last("loss"),
            "train_margin_first": first("rewards/margins"), "train_margin_last": last("rewards/margins"),
            "train_reward_accuracy_last": last("rewards/accuracies"),
            "truncated": self.truncated, "truncated_responses": self.truncated_responses,
            "method": self.cfg.method, "beta": self.cfg.beta,
            "loss_type": self.cfg.loss_type,
            "reference": ("start model, adapter disabled (no second copy)" if self.cfg.method == "lora" else
                          "start model, log-probs precomputed before training (no second copy)"),
        })
        return stats

    # ------------------------------------------------------------------ evaluation

    def predict(self):
        from lmladder.tasks.preference import pair_prediction

        task, fmt = self.ctx.task, self.ctx.fmt()
        policy = self.model
        records, info = task.predict(policy, fmt, self.messages, self.ctx.data.test, desc=self.name)
        if all("logp_chosen" in r and "logp_rejected" in r for r in records):
            logps = [(r["logp_chosen"], r["logp_rejected"]) for r in records]
        else:
            logps, _ = task.score_pairs(policy, fmt, self.messages, self.ctx.data.test, desc=self.name)
        b = self.cfg.beta
        preds = []
        for rec, (pc, pr), (rc, rr) in zip(records, logps, self.ref_test):
            c, r = b * (pc - rc), b * (pr - rr)
            preds.append({**rec, **pair_prediction(c - r, reward_chosen=c, reward_rejected=r, logp_chosen=pc,
                                                   logp_rejected=pr, ref_logp_chosen=rc, ref_logp_rejected=rr)})
        return preds, {**info, "margin_kind": "implicit DPO reward, beta * (policy - reference) log-prob margin"}

    def trainable_params(self) -> int:
        return self.trainable

    def artifacts(self) -> dict[str, str]:
        return {self.artifact: self.artifact}

    def close(self) -> None:
        if self.model is not None:
            model, self.model = self.model, None
            if self.cfg.method == "lora":  # the adapter's modules out of the shared base
                weights.restore_base(self.ctx, model.unload())
            # full: a private copy; dropping it leaves the start model as it was
            del model
            gc.collect()
