"""encoder: a separate encoder (default all-MiniLM-L6-v2, embedded) with a new head.

* ``classification``: ``AutoModelForSequenceClassification`` with one output per label
  (the run's label set), trained with cross-entropy on the input text.
* ``tagging``: ``AutoModelForTokenClassification`` with one output per BIO tag seen in the
  data. The input tokens are sub-word tokenised as pre-split words; each word's tag is
  the label of its *first* sub-token, every other position is -100 (ignored by the loss),
  and a word's predicted tag is read at its first sub-token (``align_labels``).

The causal LM is not used (``uses_base = False``: the ladder does not load it for this
rung). Training is transformers ``Trainer`` (AdamW, linear decay after warmup); inputs
longer than ``encoder.max_length`` sub-tokens are truncated and counted in the result
(tagging: the words cut off are predicted ``O``). The model is loaded from safetensors
only, never with remote code, and saved as safetensors (+ tokenizer) in
``rungs/encoder/model``; a later run with the same fingerprint reuses it.
``trainable_share`` is relative to the encoder's own size (``details.model``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from lmladder.errors import LadderError
from lmladder.options import ConfigModel
from lmladder.rungs.base import Rung
from lmladder.training import weights


class EncoderConfig(ConfigModel):
    """A separate encoder (not the causal LM) with a new classification / tagging head."""

    model: str = Field(
        "all-minilm-l6-v2",
        description="Encoder: all-minilm-l6-v2 (embedded), a local HF folder or a hub id (safetensors only).",
    )
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (linear decay after warmup).")
    epochs: float = Field(3.0, gt=0, description="Passes over the train set.")
    max_steps: int | None = Field(None, ge=1, description="Stop after N optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per optimizer step.")
    eval_batch_size: int = Field(64, ge=1, description="Examples per forward pass when predicting.")
    max_length: int = Field(
        128, ge=8, description="Longest input in sub-word tokens; longer inputs are truncated (counted)."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps used for warmup.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")


log = logging.getLogger(__name__)

IGNORE = -100


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Sub-token labels: the word's label on its first sub-token, -100 on the others and
    on special tokens (``word_ids`` as returned by a fast tokenizer's ``word_ids()``)."""
    out, prev = [], None
    for w in word_ids:
        out.append(word_labels[w] if w is not None and w != prev else IGNORE)
        if w is not None:
            prev = w
    return out


def first_subtokens(word_ids: list[int | None]) -> dict[int, int]:
    """word index -> position of its first sub-token (words cut off are absent)."""
    first: dict[int, int] = {}
    for pos, w in enumerate(word_ids):
        if w is not None and w not in first:
            first[w] = pos
    return first


def resolve_encoder(spec: str) -> tuple[str, bool]:
    """(folder or hub id, local_files_only) for an encoder spec; checks that need no load:
    an embedded name whose package is missing, a folder without safetensors weights, a hub
    id that is neither cached nor reachable."""
    from lmladder import models
    from lmladder.inference import embed

    if embed.is_callable_spec(spec):
        raise LadderError(f"encoder.model: '{spec}' is a callable; give a model folder, hub id or all-minilm-l6-v2")
    path = embed.resolve(spec)
    p = Path(path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise LadderError(f"encoder.model: {path}: no config.json; not a Hugging Face model folder")
        if not any(p.glob("*.safetensors")):
            raise LadderError(f"encoder.model: {path}: no .safetensors weights (only safetensors are loaded)")
        return path, True
    return path, models.check_available(models.ModelRef(spec, "hub", path))


class Encoder(Rung):
    name = "encoder"
    cost_rank = 19
    trains = True
    uses_base = False
    kinds = ("classification", "tagging")
    summary = "separate encoder (MiniLM) fine-tuned with a new classification / tagging head"

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        resolve_encoder(cfg.encoder.model)
        if cfg.task.kind == "tagging":
            from lmladder.tasks import tagging

            tagging.check_rows(dataset, cfg.data)

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        from lmladder.inference import embed

        return {"encoder": embed.identity(cfg.encoder.model)}

    # ------------------------------------------------------------------ data

    def prepare(self) -> None:
        from transformers import AutoTokenizer

        self.path, self.local_only = resolve_encoder(self.cfg.model)
        self.tagging = self.ctx.cfg.task.kind == "tagging"
        try:
            self.tok = AutoTokenizer.from_pretrained(
                self.path, trust_remote_code=False, local_files_only=self.local_only
            )
        except OSError as e:
            raise LadderError(f"encoder.model '{self.cfg.model}': could not load its tokenizer ({e})") from None
        if self.tagging and not self.tok.is_fast:
            raise LadderError(f"encoder.model '{self.cfg.model}': tagging needs a fast tokenizer (word ids)")
        if self.tagging:
            from lmladder.tasks.tagging import tag_set

            self.labels = tag_set(self.ctx.data.train + self.ctx.data.test)
        else:
            self.labels = list(self.ctx.task.labels)
        self.label_id = {l: i for i, l in enumerate(self.labels)}
        self.train_rows, self.train_cut = self._encode(self.ctx.data.train, with_labels=True)
        self.test_rows, self.test_cut = self._encode(self.ctx.data.test, with_labels=False)
        self.model_dir = self.out_dir / "model"
        self.model = None

    def _encode(self, examples, with_labels: bool) -> tuple[list[dict], int]:
        """Tokenised rows (input_ids, attention_mask, labels / word positions) and the
        number of inputs truncated to max_length."""
        L = self.cfg.max_length
        fld = self.ctx.cfg.data.input_field
        rows, cut = [], 0
        for e in examples:
            if self.tagging:
                words = list(e.fields[fld])
                full = self.tok(words, is_split_into_words=True, truncation=False)
                enc = self.tok(words, is_split_into_words=True, truncation=True, max_length=L)
                wids = enc.word_ids()
                row = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                       "first": first_subtokens(wids), "n_words": len(words)}
                if with_labels:
                    row["labels"] = align_labels(wids, [self.label_id[t] for t in e.target])
            else:
                full = self.tok(e.input, truncation=False)
                enc = self.tok(e.input, truncation=True, max_length=L)
                row = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
                if with_labels:
                    row["labels"] = self.label_id[e.label]
            cut += len(full["input_ids"]) > L
            rows.append(row)
        if cut:
            log.warning("encoder: %d input(s) longer than max_length=%d sub-tokens were truncated", cut, L)
        return rows, cut

    # ------------------------------------------------------------------ model

    def _load(self, folder: str, local_only: bool, fresh_head: bool):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        cls = AutoModelForTokenClassification if self.tagging else AutoModelForSequenceClassification
        kw: dict[str, Any] = dict(use_safetensors=True, trust_remote_code=False, local_files_only=local_only)
        if fresh_head:
            kw.update(num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                      label2id=dict(self.label_id), ignore_mismatched_sizes=True)
        try:
            model = cls.from_pretrained(folder, **kw)
        except OSError as e:
            raise LadderError(f"encoder.model '{self.cfg.model}': could not load ({e})") from None
        return model.to("cuda" if torch.cuda.is_available() else "cpu")

    def _info(self) -> dict[str, Any]:
        return {
            "spec": self.cfg.model,
            "path": self.path,
            "architecture": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "num_labels": len(self.labels),
        }

    def fit(self) -> dict[str, Any]:
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding, set_seed

            from lmladder.training import hf_train

            seed = self.ctx.cfg.seed
            set_seed(seed)  # the new head's initialisation
            self.model = self._load(self.path, self.local_only, fresh_head=True)
            strip = [{k: v for k, v in r.items() if k in ("input_ids", "attention_mask", "labels")}
                     for r in self.train_rows]
            collator = (DataCollatorForTokenClassification(self.tok) if self.tagging
                        else DataCollatorWithPadding(self.tok))
            stats = hf_train.train(self.model, self.cfg, strip, collator, self.out_dir / ".trainer", seed)
            return {
                **stats,
                "train_examples": len(strip),
                "truncated_train": self.train_cut,
                "labels": self.labels,
                "model": self._info(),
            }

        def save(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tok.save_pretrained(tmp)

        def load(folder: Path) -> dict[str, Any]:
            self.model = self._load(str(folder), True, fresh_head=False)
            self.model.eval()
            return {"model": self._info()}

        return weights.reuse_or_train(self.model_dir, fp, train=train, save=save, load=load, name=self.name,
                                      flag="reused_model")

    def trainable_params(self) -> int:
        if self.model is None:
            return 0
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ predictions

    def predict(self):
        import torch
        from tqdm.auto import tqdm

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        preds: list[dict] = []
        bs = self.cfg.eval_batch_size
        with torch.no_grad():
            for s in tqdm(range(0, len(self.test_rows), bs), desc=self.name, leave=False):
                batch = self.test_rows[s : s + bs]
                T = max(len(r["input_ids"]) for r in batch)
                ids = torch.full((len(batch), T), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                for i, r in enumerate(batch):
                    ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
                    mask[i, : len(r["input_ids"])] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                probs = logits.softmax(-1).cpu()
                for i, r in enumerate(batch):
                    if self.tagging:
                        best = probs[i].argmax(-1).tolist()
                        tags = [self.labels[best[r["first"][w]]] if w in r["first"] else "O"
                                for w in range(r["n_words"])]
                        preds.append({"pred": tags, "words_cut": r["n_words"] - len(r["first"])})
                    else:
                        p = probs[i].tolist()
                        best = max(range(len(p)), key=lambda j: p[j])
                        preds.append({"pred": self.labels[best], "scores": dict(zip(self.labels, p))})
        n = max(len(self.test_rows), 1)
        info = {
            # the encoder's sub-word tokens per input (there is no LM prompt)
            "prompt_tokens_per_example": sum(len(r["input_ids"]) for r in self.test_rows) / n,
            "truncated_test": self.test_cut,
            "model": self._info(),
        }
        return preds, info

    def artifacts(self):
        return {"model": "model"}

    def close(self) -> None:
        self.model = None
