"""rag: retrieve top-k passages from a corpus and put them in the prompt's # Context.

prepare() reads and chunks the corpus and builds (or reads from its cache) the index:
BM25, dense (sentence embeddings) or hybrid (reciprocal-rank fusion), see
inference/retrieval.py. predict() optionally lets the model write a short search query
first (``rag.query_writing``), retrieves ``top_k`` chunks per test example, writes
them as ``[d3] text`` paragraphs into ``task.user_message(example, context=...)`` and
runs the task's own prediction. When the test rows carry the gold passage id
(``rag.gold_field``, default ``doc_id``) the info reports passage-level recall@k.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lmladder.inference import retrieval
from lmladder.errors import LadderError
from lmladder.io import atomic_write_jsonl
from lmladder.rungs.base import Rung
from typing import Literal
from pydantic import Field
from lmladder.options import Constrainable


class RagConfig(Constrainable):
    corpus: str | None = Field(None, description="Passages: JSONL (id, text), a text file, or a folder of .txt/.md.")
    text_field: str = Field("text", description="Corpus JSONL field with the passage text.")
    id_field: str = Field("id", description="Corpus JSONL field with the passage id.")
    chunk_words: int = Field(200, ge=10, description="Chunk size in words (long passages are split).")
    chunk_overlap: int = Field(40, ge=0, description="Words shared by consecutive chunks.")
    top_k: int = Field(3, ge=1, description="Passages put in the prompt.")
    retriever: Literal["bm25", "dense", "hybrid"] = Field("hybrid", description="Retrieval method.")
    rrf_k: int = Field(60, ge=1, description="Reciprocal-rank-fusion constant (hybrid).")
    embedder: str = Field("all-minilm-l6-v2", description="Dense retrieval embedder.")
    query_writing: bool = Field(False, description="Let the model write the search query first.")
    gold_field: str | None = Field(
        "doc_id", description="Test field with the gold passage id (for recall@k), if present."
    )


log = logging.getLogger(__name__)

QUERY_PROMPT = (
    "Write a short search query (a few keywords) to find a passage that helps answer the "
    "input below. Reply with the query only, on one line.\n\nInput: {query}"
)


def _corpus_path(rc) -> Path:
    if not rc.corpus:
        raise LadderError("rag: no corpus given (set rag.corpus in the config or --corpus FILE)")
    p = Path(rc.corpus).expanduser()
    if not p.exists():
        raise LadderError(f"{p}: rag corpus not found (rag.corpus)")
    return p


def clean_query(text: str, fallback: str) -> str:
    """The first non-empty line of a written query, without a 'Query:' label or quotes."""
    for line in text.strip().splitlines():
        line = line.strip()
        if line.lower().startswith("query:"):
            line = line[6:].strip()
        line = line.strip("\"'`*").strip()
        if line:
            return line
    return fallback


class Rag(Rung):
    name = "rag"
    cost_rank = 4
    summary = "top-k retrieved passages in the prompt"

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        rc = cfg.rag
        p = _corpus_path(rc)
        if rc.chunk_overlap >= rc.chunk_words:
            raise LadderError(
                f"rag.chunk_overlap ({rc.chunk_overlap}) must be smaller than rag.chunk_words ({rc.chunk_words})"
            )
        if not retrieval.read_corpus(p, rc.id_field, rc.text_field):
            raise LadderError(f"{p}: rag corpus is empty (no passages with text)")
        if rc.retriever != "bm25":
            from lmladder.inference import embed

            embed.resolve(rc.embedder)

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        p = Path(cfg.rag.corpus) if cfg.rag.corpus else None
        return {"corpus_digest": retrieval.corpus_digest(p)} if p is not None and p.exists() else {}

    def _cache_dir(self, key: str) -> Path:
        root = os.environ.get("LMLADDER_CACHE")
        base = Path(root) / "rag-index" if root else self.ctx.run_dir / "cache" / "rag-index"
        return base / key

    def prepare(self) -> None:
        from lmladder.inference import embed

        rc = self.cfg
        p = _corpus_path(rc)
        passages = retrieval.read_corpus(p, rc.id_field, rc.text_field)
        chunks = retrieval.chunk(passages, rc.chunk_words, rc.chunk_overlap)
        counts: dict[str, int] = {}
        for c in chunks:
            counts[c.passage_id] = counts.get(c.passage_id, 0) + 1
        self.single = {pid for pid, n in counts.items() if n == 1}
        dense = rc.retriever != "bm25"
        self.embed = embed.get(rc.embedder) if dense else None
        key = retrieval.Index.cache_key(
            retrieval.corpus_digest(p), rc.chunk_words, rc.chunk_overlap, rc.retriever,
            embed.identity(rc.embedder) if dense else None,
        )
        self.index = retrieval.Index.build(chunks, rc.retriever, self.embed, self._cache_dir(key), rc.rrf_k)
        self.n_passages = len(passages)

    def _write_queries(self, model, fmt) -> tuple[list[str], dict]:
        from lmladder.inference.generate import generate

        task = self.ctx.task
        if hasattr(model, "label_loglikelihoods"):
            raise LadderError("rag.query_writing needs text generation, which the openai: backend does not offer yet")
        raw = [task.query(e) for e in self.ctx.data.test]
        ids = [fmt.encode(fmt.prompt(QUERY_PROMPT.format(query=q))) for q in raw]
        texts, stats = generate(model, fmt.tokenizer, ids, max_new_tokens=32,
                                batch_size=task.eval_cfg.gen_batch_size, seed=self.ctx.cfg.seed,
                                desc="rag: query writing")
        queries = [clean_query(t[0], q) for t, q in zip(texts, raw)]
        return queries, {"prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens}

    def predict(self):
        rc, task, test = self.cfg, self.ctx.task, self.ctx.data.test
        model, _ = self.ctx.base()
        fmt = self.ctx.fmt()
        qinfo = None
        if rc.query_writing:
            queries, qinfo = self._write_queries(model, fmt)
        else:
            queries = [task.query(e) for e in test]
        hits = self.index.search_many(queries, rc.top_k)
        messages = [
            task.user_message(ex, context=retrieval.format_context(h, self.single))
            for ex, h in zip(test, hits)
        ]
        preds, info = task.predict(model, fmt, messages, test, desc=self.name,
                                   constrained=rc.constrained, engine=self.ctx.cfg.constrained.engine)
        retrieved_pids = []
        for p, h in zip(preds, hits):
            pids = list(dict.fromkeys(x.chunk.passage_id for x in h))
            retrieved_pids.append(pids)
            p["retrieved"] = [x.chunk.id for x in h]
        rows = [
            {"id": ex.id, "query": q, "retrieved": [{"id": x.chunk.id, "passage_id": x.chunk.passage_id,
                                                    "score": round(x.score, 6)} for x in h]}
            for ex, q, h in zip(test, queries, hits)
        ]
        atomic_write_jsonl(self.out_dir / "retrieved.jsonl", rows)
        gold = [ex.fields.get(rc.gold_field) if rc.gold_field else None for ex in test]
        for p, g, pids in zip(preds, gold, retrieved_pids):  # retrieval vs reading misses (diagnosis)
            if g is not None and g != "":
                gs = {str(x) for x in (g if isinstance(g, (list, tuple)) else [g])}
                p["gold_retrieved"] = bool(gs & {str(x) for x in pids})
        rinfo = {
            "retriever": rc.retriever, "top_k": rc.top_k, "passages": self.n_passages,
            "chunks": len(self.index.chunks), "index_cache_hit": self.index.cache_hit,
            "index_path": str(self.index.path) if self.index.path else None,
            "query_writing": rc.query_writing,
            **retrieval.recall_at_k(retrieved_pids, gold),
        }
        if "recall_at_k" in rinfo:
            log.info("rag: recall@%d %.3f over %d examples with a gold passage", rc.top_k,
                     rinfo["recall_at_k"], rinfo["n_with_gold"])
        if qinfo is not None:  # the query-writing call is part of the cost per example
            n = max(len(test), 1)
            rinfo["query_prompt_tokens_per_example"] = qinfo["prompt_tokens"] / n
            rinfo["query_generated_tokens_per_example"] = qinfo["generated_tokens"] / n
            info["prompt_tokens_per_example"] += qinfo["prompt_tokens"] / n
            info["calls_per_example"] = 2
        info["retrieval"] = rinfo
        if "recall_at_k" in rinfo:
            info["recall_at_k"] = rinfo["recall_at_k"]
        return preds, info

    def artifacts(self):
        return {"retrieved": "retrieved.jsonl"}
