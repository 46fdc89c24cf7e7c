"""reward-model: a scalar reward model trained on preference pairs (Bradley-Terry).

The model is the run's base model (or the ``from:`` rung's model) with its language-model
head replaced by a one-output linear ``score`` head (a Hugging Face
``*ForSequenceClassification`` with ``num_labels=1``). Its reward for a (prompt, response)
is the score at the sequence's last token. Training minimises
``-log sigmoid(r(chosen) - r(rejected))`` over the train pairs.

What TRL does: ``trl.RewardTrainer`` runs the loss, the pair collator (chosen and
rejected in one right-padded batch) and logs accuracy / margin / reward statistics.

What we add:

* **the rendering**: each side is tokenised here, exactly as the policy sees it — the
  chat-templated prompt (``ChatFormat.prompt``), the response, and the template's
  end-of-turn token (``render_ids``) — and handed to TRL pre-tokenised
  (``chosen_ids`` / ``rejected_ids``), so TRL's own text path (which appends EOS and
  re-applies templates) is never used. A too-long sequence is cut from the prompt's left
  (then the response's right, keeping the end-of-turn) and counted;
* **the pad token**: a sequence-classification model reads its score at the last token
  that is *not* the pad token, so the pad must differ from the end-of-turn token (many
  chat models ship pad == eos, which would move the score one token left on every
  sequence); we pick a distinct pad and put it on the model config;
* LoRA (PEFT ``SEQ_CLS``, the ``score`` head trained in full via ``modules_to_save``) or
  all weights; atomic checkpoints and resume through :mod:`training.trl_train`;
* the trained model is saved **merged** (safetensors, with the tokenizer and
  ``lmladder_reward.json``) in ``rungs/reward-model/model``; a later run with the same
  fingerprint reuses it instead of retraining;
* :class:`RewardScorer`: loads such a folder and scores (message, response) lists — the
  verifier of ``best-of-n`` (``verifier: reward-model``) and the reward of ``grpo``.

Evaluation on the held-out pairs: margin = r(chosen) - r(rejected), reward_accuracy =
pairwise accuracy. The forgetting check does not apply (the model is a classifier, it
has no language-model head to measure perplexity with).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from lmladder.errors import LadderError
from lmladder.options import AlignConfig
from lmladder.prompts import eos_token_ids as end_of_turn_ids  # the template's end-of-turn ids
from lmladder.prompts import response_ids
from lmladder.run import distributed
from lmladder.rungs.base import Rung
from lmladder.tasks.preference import pair_prediction
from lmladder.training import steps, weights


class RewardModelConfig(AlignConfig):
    """reward-model: a sequence-classification reward model on the pairs (TRL RewardTrainer);
    saved merged in rungs/reward-model/model for best-of-n (verifier) and grpo (reward)."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    max_length: int = Field(
        512, ge=8, description="Longest prompt+response in tokens (prompt cut from the left, see truncation)."
    )
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch.")
    forgetting_text: str | None = Field(
        None, description="Not used: a reward model is a classifier (no LM head to measure perplexity with)."
    )


log = logging.getLogger(__name__)

MODEL_DIR = "model"
META = "lmladder_reward.json"


def default_folder(run_dir) -> Path:
    """Where a run's reward-model rung saves its merged model."""
    return Path(run_dir) / "rungs" / "reward-model" / MODEL_DIR


def folder_digest(folder: Path) -> str | None:
    """What identifies a saved reward model for fingerprints: the fingerprint stamp the
    rung wrote, else the folder's file names, sizes and mtimes."""
    from lmladder.plugins import folder_digest as files_digest

    return weights.stamp_of(folder) or files_digest(folder)


def pick_pad_id(tok, eot: set[int]) -> int:
    """A pad token id that is not an end-of-turn token (the score is read at the last
    non-pad token, which must be the end-of-turn)."""
    if tok.pad_token_id is not None and tok.pad_token_id not in eot:
        return tok.pad_token_id
    vocab = tok.get_vocab()
    for cand in ("<|endoftext|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>", tok.unk_token, tok.bos_token):
        if cand and cand in vocab and vocab[cand] not in eot:
            return vocab[cand]
    raise LadderError("reward-model: the tokenizer has no token to pad with besides its end-of-turn token")


def render_ids(fmt, message: str, response: str, max_length: int, eot: set[int]) -> tuple[list[int], int]:
    """Token ids of chat-templated prompt + response + end-of-turn (what the policy sees
    and is trained on, training/sft.build_feature), and how many tokens were cut to fit
    ``max_length`` (prompt from the left first, then the response from the right; the
    end-of-turn token always stays last)."""
    prompt = fmt.encode(fmt.prompt(message))
    suffix = response_ids(fmt, message, response, eot)
    over = len(prompt) + len(suffix) - max_length
    if over <= 0:
        return prompt + suffix, 0
    keep_prompt = max(1, len(prompt) - over)
    prompt = prompt[len(prompt) - keep_prompt:]
    extra = len(prompt) + len(suffix) - max_length
    if extra > 0:  # the response alone is too long: cut it, keep the end-of-turn
        suffix = suffix[: len(suffix) - 1 - extra] + suffix[-1:]
    return prompt + suffix, over


def seqcls_from_causal(causal):
    """A ``*ForSequenceClassification`` (num_labels=1) sharing nothing with ``causal``:
    its backbone weights copied from the causal LM, a fresh ``score`` head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(causal.config)
    cfg.num_labels = 1
    cfg.id2label, cfg.label2id = {0: "reward"}, {"reward": 0}
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=causal.dtype)
    src = getattr(causal, causal.base_model_prefix).state_dict()
    missing, unexpected = getattr(model, model.base_model_prefix).load_state_dict(src, strict=False)
    if missing or unexpected:
        raise LadderError(f"reward-model: cannot build a classifier from this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        model.score.weight.normal_(0.0, getattr(cfg, "initializer_range", 0.02))
    return model.to(causal.device)


def score_ids(model, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """Reward of each token sequence (right-padded batches sorted by length, no grad)."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(seqs)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            L = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
            att = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                att[r, : len(seqs[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False).logits
            for r, i in enumerate(idx):
                out[i] = float(logits[r, 0].float())
    return out


class RewardScorer:
    """Scores (user message, response) pairs with a saved reward model.

    ``RewardScorer.from_folder(folder, fmt)`` loads ``folder`` (a merged sequence-
    classification model with its tokenizer, e.g. ``default_folder(run_dir)``); ``fmt`` is
    the run's :class:`lmladder.prompts.ChatFormat` (its system prompt and thinking switch
    are used with the folder's tokenizer). ``scorer(messages, responses)`` returns one
    float per pair: the reward of the chat-templated ``messages[i]`` answered with
    ``responses[i]`` (+ end-of-turn), batched, without gradients."""

    def __init__(self, model, fmt, pad_id: int, max_length: int, batch_size: int = 16, eot: set[int] | None = None):
        model.eval()
        self.model, self.fmt, self.pad_id, self.max_length, self.batch_size = model, fmt, pad_id, max_length, batch_size
        self.eot = set(eot) if eot else end_of_turn_ids(fmt.tokenizer)
        self.calls = 0  # pairs scored
        self.tokens = 0  # tokens scored

    @classmethod
    def from_folder(cls, folder: Path, fmt, batch_size: int = 16) -> "RewardScorer":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lmladder.models import pick_device
        from lmladder.prompts import ChatFormat

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise LadderError(f"reward model: no model in {folder} (train one with the reward-model rung)")
        device, dtype = pick_device()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True
        ).to(device)
        if getattr(model.config, "num_labels", None) != 1:
            raise LadderError(f"reward model: {folder} is not a reward model (num_labels={model.config.num_labels}, needs 1)")
        meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
        pad = model.config.pad_token_id
        if pad is None:
            pad = pick_pad_id(tok, end_of_turn_ids(tok))
            model.config.pad_token_id = pad
        max_length = meta.get("max_length") or getattr(model.config, "max_position_embeddings", 2048)
        own_fmt = ChatFormat(tok, getattr(fmt, "system_prompt", None), getattr(fmt, "thinking", None))
        return cls(model, own_fmt, pad, int(max_length), batch_size, meta.get("end_of_turn_ids"))

    def encode(self, messages: list[str], responses: list[str]) -> list[list[int]]:
        if len(messages) != len(responses):
            raise ValueError(f"{len(messages)} messages but {len(responses)} responses")
        return [render_ids(self.fmt, m, r or "", self.max_length, self.eot)[0] for m, r in zip(messages, responses)]

    def __call__(self, messages: list[str], responses: list[str]) -> list[float]:
        seqs = self.encode(messages, responses)
        self.calls += len(seqs)
        self.tokens += sum(map(len, seqs))
        return score_ids(self.model, seqs, self.pad_id, self.batch_size)


class RewardModel(Rung):
    name = "reward-model"
    cost_rank = 25
    policy = False  # a scorer of answers, not a model that answers: never the recommendation
    trains = True
    summary = "reward model (sequence classifier) trained on preference pairs"
    kinds = ("preference",)

    def prepare(self) -> None:
        task, fmt = self.ctx.task, self.ctx.fmt()
        model, tok = self.ctx.base()
        self.eot = end_of_turn_ids(tok, model)
        self.pad_id = pick_pad_id(tok, self.eot)
        n = self.cfg.max_length
        self.truncated = 0

        def pair(e, message):
            (c, tc), (r, tr) = (render_ids(fmt, message, task.answer(e), n, self.eot),
                                render_ids(fmt, message, task.rejected(e), n, self.eot))
            if (tc or tr) and self.cfg.truncation == "error":
                raise LadderError(f"{e.source}: pair has more than max_length={n} tokens "
                                  "(raise max_length, or set truncation: truncate)")
            self.truncated += bool(tc or tr)
            return c, r

        self.train_pairs = [pair(e, task.train_message(e)) for e in self.ctx.data.train]
        self.test_pairs = [pair(e, task.user_message(e)) for e in self.ctx.data.test]
        self.model_dir = self.out_dir / MODEL_DIR
        self.trainable = 0

    # ---------------------------------------------------------------- training

    def fit(self) -> dict[str, Any]:
        causal, tok = self.ctx.base()  # the shared base, or the `from:` rung's model: its backbone is copied
        fp = self.ctx.fingerprint(self.name, training=True)
        # TRL sets pad on its tokenizer: leave the shared one alone
        tok_copy = copy.deepcopy(tok)
        tok_copy.pad_token = tok_copy.convert_ids_to_tokens(self.pad_id)

        def train() -> dict[str, Any]:
            from datasets import Dataset
            from transformers import set_seed
            from trl import RewardConfig, RewardTrainer

            from lmladder.training import trl_train

            set_seed(self.ctx.cfg.seed)  # the fresh score head is seeded (resume needs the same init)
            model = seqcls_from_causal(causal)
            model.config.pad_token_id = self.pad_id
            model = self._wrap(model)
            self.trainable = weights.count_trainable(model)
            train = Dataset.from_dict({"chosen_ids": [c for c, _ in self.train_pairs],
                                       "rejected_ids": [r for _, r in self.train_pairs]})
            with steps.trainer_dirs(self.out_dir) as (work, checkpoints):
                stats = trl_train.run(
                    RewardTrainer, RewardConfig, model=model, cfg=self.cfg, train_dataset=train,
                    processing_class=tok_copy, seed=self.ctx.cfg.seed, name=self.name,
                    checkpoint_dir=checkpoints, fingerprint=fp, work_dir=work,
                    method_args={"max_length": None, "remove_unused_columns": False, "dataset_num_proc": None},
                    row_tokens=[2 * max(len(c), len(r)) for c, r in self.train_pairs],  # both, padded alike
                )
            if not distributed.is_main():  # under torchrun rank 0 saves and evaluates
                return stats
            if model.config.pad_token_id != self.pad_id:
                raise LadderError(f"reward-model: the trainer changed the pad token ({model.config.pad_token_id} "
                                  f"!= {self.pad_id})")
            self.model = model.merge_and_unload() if self.cfg.method == "lora" else model  # saved merged
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
            return stats

        def save(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            tok_copy.save_pretrained(tmp)
            (tmp / META).write_text(json.dumps({"max_length": self.cfg.max_length, "pad_token_id": self.pad_id,
                                                "end_of_turn_ids": sorted(self.eot),
                                                "trainable_params": self.trainable, "method": self.cfg.method,
                                                "base_model": self.ctx.cfg.model}, indent=1) + "\n")

        def load(folder: Path) -> None:
            self._load_saved()
            self.trainable = json.loads((folder / META).read_text()).get("trainable_params", 0)

        stats = weights.reuse_or_train(self.model_dir, fp, train=train, save=save, load=load, name=self.name,
                                       flag="reused_model", checkpoints=self.out_dir / "checkpoints")
        if not distributed.is_main():
            return stats
        base_params = self.ctx.model_info.get("parameters") or sum(p.numel() for p in causal.parameters())
        return {**stats, "method": self.cfg.method, "from": self.cfg.from_, "truncated": self.truncated,
                "pad_token_id": self.pad_id,
                "forgetting_check": "not applicable: the reward model is a sequence classifier (no LM head)",
                "trainable_params": self.trainable, "trainable_share": self.trainable / base_params}

    def _wrap(self, model):
        if self.cfg.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        from peft import LoraConfig, TaskType, get_peft_model

        return get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS, r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules, modules_to_save=["score"],
        ))

    def _load_saved(self) -> None:
        self.scorer = RewardScorer.from_folder(self.model_dir, self.ctx.fmt(), self.ctx.cfg.eval.batch_size)
        self.model = self.scorer.model

    # ---------------------------------------------------------------- evaluation

    def predict(self):
        bs = self.ctx.cfg.eval.batch_size
        seqs = [s for c, r in self.test_pairs for s in (c, r)]
        scores = score_ids(self.model, seqs, self.pad_id, bs)
        preds = []
        for i in range(len(self.test_pairs)):
            c, r = scores[2 * i], scores[2 * i + 1]
            preds.append(pair_prediction(c - r, reward_chosen=c, reward_rejected=r))
        n = max(len(self.test_pairs), 1)
        return preds, {"prompt_tokens_per_example": sum(map(len, seqs)) / n, "samples_per_example": 1,
                       "margin_kind": "reward model score r(chosen) - r(rejected)"}

    def trainable_params(self) -> int:
        return self.trainable

    def artifacts(self):
        return {MODEL_DIR: MODEL_DIR}

    def close(self) -> None:
        self.model = self.scorer = None  # a private model: the shared base is untouched
