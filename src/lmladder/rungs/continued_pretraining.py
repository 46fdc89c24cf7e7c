"""continued-pretraining: next-token training on raw domain text, then the task's
zero-shot prompt on the adapted model.

The corpus (``continued-pretraining.corpus``) is a JSONL file (one document per row, in
``text_field``), a .txt/.md file (documents separated by blank lines) or a folder of
.txt/.md files (one document each). Documents are tokenised, each followed by EOS,
concatenated and cut into ``block_size`` blocks (the last, shorter block is kept).
Inside a block, ``position_ids`` restart at 0 where a document starts and no 2-D
attention mask is passed, so transformers builds a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``): no token attends to another
document, and the label of a document's first token is -100 (the previous document's
EOS is not trained to predict it). A document cut by a block boundary continues in the
next block as a fresh segment (positions from 0).

``method: lora`` trains a LoRA adapter and merges it; ``method: full`` trains every
weight. Either way a private copy of the base model is trained (the shared base stays
untouched) and the merged model is saved as safetensors in
``rungs/continued-pretraining/model`` (+ tokenizer), which ``from: continued-pretraining``
on another rung starts from. When the corpus has at least 10 documents the last 10% (at
most 50) are held out and their perplexity is reported before and after training.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

from typing import Literal

from pydantic import Field

from lmladder.errors import LadderError, where
from lmladder.options import ConfigModel
from lmladder.rungs.base import Rung
from lmladder.training import weights


class ContinuedPretrainingConfig(ConfigModel):
    """Next-token training on raw domain text, then the task's zero-shot prompt."""

    corpus: str | None = Field(
        None,
        description="Domain text: JSONL (one document per row), a .txt file (documents separated "
        "by blank lines), or a folder of .txt/.md files (one document each).",
    )
    text_field: str = Field("text", description="Corpus JSONL field with the document text.")
    method: Literal["lora", "full"] = Field(
        "lora", description="lora (adapter, merged into the saved model) or full (every weight)."
    )
    block_size: int = Field(
        512, ge=8, description="Tokens per training block (documents joined by EOS, then cut)."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Use at most the first N documents of the corpus."
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (linear decay after warmup).")
    epochs: float = Field(1.0, gt=0, description="Passes over the corpus blocks.")
    max_steps: int | None = Field(None, ge=1, description="Stop after N optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Blocks per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps used for warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    r: int = Field(16, ge=1, description="LoRA rank (method: lora).")
    alpha: int = Field(32, ge=1, description="LoRA alpha (method: lora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (method: lora).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt (PEFT syntax; method: lora)."
    )


log = logging.getLogger(__name__)

IGNORE = -100


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The corpus as a list of non-empty documents; problems name ``file:line: field``."""
    from lmladder.data import _rows
    from lmladder.inference.retrieval import _corpus_files

    path = Path(path)
    if not path.exists():
        raise LadderError(f"{path}: corpus not found (continued-pretraining.corpus)")
    docs: list[str] = []
    for f in _corpus_files(path) if path.is_dir() else [path]:
        if f.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            for lineno, row in _rows(f):
                if not isinstance(row.get(text_field), str):
                    raise LadderError(f"{where(f, lineno, text_field)} missing or not text")
                if row[text_field].strip():
                    docs.append(row[text_field].strip())
        elif path.is_dir():
            text = f.read_text(encoding="utf-8").strip()
            if text:
                docs.append(text)
        else:
            docs += [p.strip() for p in re.split(r"\n\s*\n", f.read_text(encoding="utf-8")) if p.strip()]
    return docs


def pack_blocks(docs: list[list[int]], eos_id: int, block_size: int) -> list[dict[str, list[int]]]:
    """Documents (token ids) joined with EOS and cut into blocks of ``block_size`` tokens
    (the last block may be shorter; one of fewer than 2 tokens is dropped). Each block has
    ``input_ids``, ``position_ids`` (restarting at 0 at each document start and at the
    block start) and ``labels`` (the ids, with -100 on each document's first token after
    the block's first position)."""
    ids: list[int] = []
    starts: list[bool] = []
    for d in docs:
        seq = list(d) + [eos_id]
        ids += seq
        starts += [True] + [False] * (len(seq) - 1)
    blocks = []
    for s in range(0, len(ids), block_size):
        bid, bst = ids[s : s + block_size], starts[s : s + block_size]
        if len(bid) < 2:
            continue
        pos, labels, p = [], [], 0
        for i, (t, st) in enumerate(zip(bid, bst)):
            if st or i == 0:
                p = 0
            pos.append(p)
            p += 1
            labels.append(IGNORE if st and i > 0 else t)
        blocks.append({"input_ids": bid, "position_ids": pos, "labels": labels})
    return blocks


class BlockCollator:
    """Right-pads blocks; the padding is a separate masked segment (positions from 0)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        import torch

        T = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"])
            labels[b, :n] = torch.tensor(r["labels"])
            pos[b, :n] = torch.tensor(r["position_ids"])
            pos[b, n:] = torch.arange(T - n)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}


class ContinuedPretraining(Rung):
    name = "continued-pretraining"
    cost_rank = 31
    trains = True
    output_model = "model"
    summary = "next-token training on domain text, then the zero-shot prompt"

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        c = cfg.continued_pretraining
        if not c.corpus:
            raise LadderError("continued-pretraining.corpus: no corpus given (JSONL, .txt file or folder)")
        if not read_documents(c.corpus, c.text_field):
            raise LadderError(f"{c.corpus}: continued-pretraining.corpus is empty (no non-empty documents)")

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        from lmladder.inference.retrieval import corpus_digest

        c = cfg.continued_pretraining
        return {"corpus": corpus_digest(c.corpus)} if c.corpus and Path(c.corpus).exists() else {}

    def prepare(self) -> None:
        model, tok = self.ctx.base()
        docs = read_documents(self.cfg.corpus, self.cfg.text_field)
        if self.cfg.max_documents:
            docs = docs[: self.cfg.max_documents]
        self.n_dev = min(50, len(docs) // 10) if len(docs) >= 10 else 0
        self.dev_docs = docs[len(docs) - self.n_dev :] if self.n_dev else []
        train_docs = docs[: len(docs) - self.n_dev]
        if tok.eos_token_id is None:
            raise LadderError("continued-pretraining: the tokenizer has no EOS token to separate documents")
        ids = [tok(d, add_special_tokens=False).input_ids for d in train_docs]
        self.blocks = pack_blocks(ids, tok.eos_token_id, self.cfg.block_size)
        self.corpus_stats = {
            "documents": len(train_docs),
            "dev_documents": self.n_dev,
            "tokens": sum(len(b["input_ids"]) for b in self.blocks),
            "blocks": len(self.blocks),
            "block_size": self.cfg.block_size,
        }
        self.messages = [self.ctx.task.user_message(ex) for ex in self.ctx.data.test]
        self.model_dir = self.out_dir / "model"
        self.trainable = 0

    def _dev_ppl(self, model, tok) -> float | None:
        if not self.dev_docs:
            return None
        from lmladder.training import forgetting

        chunks = forgetting.token_chunks(tok, self.dev_docs, 8192, max_len=self.cfg.block_size)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return forgetting.perplexity(model, chunks, pad)

    def fit(self) -> dict[str, Any]:
        base, tok = self.ctx.base()
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            from transformers import set_seed

            from lmladder.training import hf_train

            ppl_before = self._dev_ppl(base, tok)
            seed = self.ctx.cfg.seed
            set_seed(seed)
            model = copy.deepcopy(base)  # never train the shared base
            if self.cfg.method == "lora":
                from peft import LoraConfig, TaskType, get_peft_model

                model = get_peft_model(model, LoraConfig(
                    task_type=TaskType.CAUSAL_LM, r=self.cfg.r, lora_alpha=self.cfg.alpha,
                    lora_dropout=self.cfg.dropout, target_modules=self.cfg.target_modules))
            else:
                for p in model.parameters():
                    p.requires_grad_(True)
            self.trainable = weights.count_trainable(model)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            stats = hf_train.train(model, self.cfg, self.blocks, BlockCollator(pad), self.out_dir / ".trainer",
                                   seed, remove_unused_columns=False)
            if self.cfg.method == "lora":
                model = model.merge_and_unload()  # saved merged: `from: continued-pretraining` loads it whole
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = model
            if self.dev_docs:
                stats["dev_perplexity"] = {"before": ppl_before, "after": self._dev_ppl(model, tok)}
            return stats

        def save(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)

        def load(folder: Path) -> None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=base.dtype, use_safetensors=True).to(base.device)
            self.model.eval()

        stats = weights.reuse_or_train(self.model_dir, fp, train=train, save=save, load=load, name=self.name,
                                       flag="reused_model")
        return {"method": self.cfg.method, "corpus": self.corpus_stats, **stats}

    def trainable_params(self) -> int:
        return self.trainable

    def predict(self):
        return self.ctx.task.predict(
            self.model, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name
        )

    def artifacts(self):
        return {"model": "model"}

    def close(self) -> None:
        self.model = None  # a private copy: the shared base was never touched
