"""Retrieval for the rag rung: corpus reading, chunking, BM25, dense, hybrid (RRF).

* **Corpus**: a JSONL / CSV / Parquet file (one passage per row: ``id``, ``text``), a text file
  (passages separated by blank lines; ids ``<stem>-1``, ``<stem>-2``, ...) or a folder of
  ``.txt`` / ``.md`` files (one passage per file; id = the path inside the folder without
  its suffix).
* **Chunks**: passages longer than ``chunk_words`` words are split into windows of
  ``chunk_words`` words sharing ``overlap`` words; every chunk keeps its passage id and
  is named ``<passage id>#<n>`` (1-based), so recall is measured on passage ids.
* **BM25** (``bm25s``, Lucene variant, k1=1.5, b=0.75) over lower-cased word tokens with
  English stop words removed; **dense**: normalised sentence embeddings, dot product;
  **hybrid**: reciprocal-rank fusion ``sum 1 / (rrf_k + rank)`` of both rankings.
* **Cache**: an index folder keyed by a hash of the corpus content, the chunking and the
  embedder; a second build with the same key only reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lmladder.errors import LadderError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
INDEX_VERSION = 1


@dataclass(frozen=True)
class Passage:
    id: str
    text: str


@dataclass(frozen=True)
class Chunk:
    id: str  # "<passage id>#<n>"
    passage_id: str
    text: str


# --------------------------------------------------------------------------- corpus


def _corpus_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    return [path]


def corpus_digest(path: str | Path) -> str:
    """sha256 of the corpus content (a folder: its files' relative names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in _corpus_files(path):
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_corpus(path: str | Path, id_field: str = "id", text_field: str = "text") -> list[Passage]:
    """Read passages; problems are LadderErrors naming ``file:line: field``."""
    path = Path(path)
    if not path.exists():
        raise LadderError(f"{path}: corpus not found")
    out: list[Passage] = []
    if path.is_dir():
        for f in _corpus_files(path):
            text = f.read_text(encoding="utf-8").strip()
            if text:
                out.append(Passage(str(f.relative_to(path).with_suffix("")), text))
    elif path.suffix.lower() in TABLE_SUFFIXES:
        from lmladder.data import _rows  # the data readers: file:line errors, JSONL / CSV / Parquet

        seen: dict[str, int] = {}
        for lineno, row in _rows(path):
            for fld in (id_field, text_field):
                if fld not in row or row[fld] is None:
                    raise LadderError(f"{path}:{lineno}: field '{fld}' is missing")
            text = row[text_field]
            if not isinstance(text, str):
                raise LadderError(f"{path}:{lineno}: field '{text_field}' must be text")
            pid = str(row[id_field])
            if pid in seen:
                raise LadderError(
                    f"{path}:{lineno}: field '{id_field}': duplicate passage id '{pid}' (first on line {seen[pid]})"
                )
            seen[pid] = lineno
            if text.strip():
                out.append(Passage(pid, text.strip()))
    else:
        text = path.read_text(encoding="utf-8")
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        out = [Passage(f"{path.stem}-{i}", p) for i, p in enumerate(paras, 1)]
    return out


def chunk(passages: Sequence[Passage], words: int, overlap: int) -> list[Chunk]:
    """Split passages into windows of ``words`` words, consecutive windows sharing
    ``overlap`` words; a passage that fits is one chunk."""
    if overlap >= words:
        raise LadderError(f"chunk overlap ({overlap}) must be smaller than the chunk size ({words} words)")
    step = words - overlap
    out: list[Chunk] = []
    for p in passages:
        toks = p.text.split()
        starts = [0]
        while starts[-1] + words < len(toks):
            starts.append(starts[-1] + step)
        for n, s in enumerate(starts, 1):
            out.append(Chunk(f"{p.id}#{n}", p.id, " ".join(toks[s:s + words])))
    return out


# --------------------------------------------------------------------------- ranking

_WORD = re.compile(r"\w+", re.UNICODE)


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def tokenize(text: str, stopwords: frozenset[str] | None = None) -> list[str]:
    sw = _stopwords() if stopwords is None else stopwords
    return [w for w in _WORD.findall(text.lower()) if w not in sw]


class BM25:
    """BM25 over chunk texts (bm25s, Lucene scoring)."""

    def __init__(self, retriever):
        self.retriever = retriever
        self._sw = _stopwords()

    @classmethod
    def build(cls, texts: Sequence[str]) -> "BM25":
        import bm25s

        sw = _stopwords()
        r = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        # an empty token list would break the index; keep a placeholder
        r.index([tokenize(t, sw) or ["\x00"] for t in texts], show_progress=False)
        return cls(r)

    def save(self, d: Path) -> None:
        self.retriever.save(str(d), show_progress=False)

    @classmethod
    def load(cls, d: Path) -> "BM25":
        import bm25s

        return cls(bm25s.BM25.load(str(d), show_progress=False))

    def scores(self, query: str) -> np.ndarray:
        q = [t for t in tokenize(query, self._sw) if t in self.retriever.vocab_dict]
        if not q:
            return np.zeros(self.retriever.scores["num_docs"], dtype=np.float32)
        return np.asarray(self.retriever.get_scores(q), dtype=np.float32)


def rank(scores: np.ndarray, depth: int | None = None, positive_only: bool = False) -> list[int]:
    """Indices by descending score (ties: lower index first)."""
    idx = np.lexsort((np.arange(len(scores)), -scores))
    if positive_only:
        idx = [i for i in idx if scores[i] > 0]
    return [int(i) for i in idx[: depth if depth is not None else len(idx)]]


def rrf(rankings: Sequence[Sequence[int]], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: score(d) = sum over rankings of 1 / (k + rank(d)), rank
    1-based; returns (doc, score) by descending score (ties: first seen)."""
    fused: dict[int, float] = {}
    for r in rankings:
        for pos, d in enumerate(r, 1):
            fused[d] = fused.get(d, 0.0) + 1.0 / (k + pos)
    return sorted(fused.items(), key=lambda kv: -kv[1])


def recall_at_k(retrieved: Sequence[Sequence[str]], gold: Sequence) -> dict:
    """Passage-level recall@k and hit@k over examples whose gold is known.
    ``retrieved``: per example the passage ids retrieved (top-k); ``gold``: per example
    a passage id, a list of them, or None (unknown)."""
    rec, hit = [], []
    for got, g in zip(retrieved, gold):
        if g is None or g == [] or g == "":
            continue
        gs = {str(x) for x in (g if isinstance(g, (list, tuple, set)) else [g])}
        found = gs & {str(x) for x in got}
        rec.append(len(found) / len(gs))
        hit.append(1.0 if found else 0.0)
    if not rec:
        return {"n_with_gold": 0}
    return {"recall_at_k": float(np.mean(rec)), "hit_at_k": float(np.mean(hit)), "n_with_gold": len(rec)}


# --------------------------------------------------------------------------- index


@dataclass
class Hit:
    chunk: Chunk
    score: float


class Index:
    """Chunks with a BM25 and / or dense index; ``search(query, k)`` -> hits."""

    def __init__(self, chunks: list[Chunk], bm25: BM25 | None, dense: np.ndarray | None,
                 embed: Callable | None, retriever: str, rrf_k: int = 60, cache_hit: bool = False,
                 path: Path | None = None):
        self.chunks, self.bm25, self.dense, self.embed = chunks, bm25, dense, embed
        self.retriever, self.rrf_k, self.cache_hit, self.path = retriever, rrf_k, cache_hit, path

    @staticmethod
    def cache_key(digest: str, words: int, overlap: int, retriever: str, embedder_id: str | None) -> str:
        payload = {"v": INDEX_VERSION, "corpus": digest, "words": words, "overlap": overlap,
                   "retriever": retriever, "embedder": embedder_id if retriever != "bm25" else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def build(cls, chunks: list[Chunk], retriever: str, embed: Callable | None = None,
              cache_dir: Path | None = None, rrf_k: int = 60) -> "Index":
        """Build (or read from ``cache_dir`` when it holds a finished index)."""
        need_bm25, need_dense = retriever in ("bm25", "hybrid"), retriever in ("dense", "hybrid")
        if need_dense and embed is None:
            raise LadderError(f"retriever {retriever} needs an embedder")
        if cache_dir is not None and (Path(cache_dir) / "done.json").is_file():
            d = Path(cache_dir)
            rows = [json.loads(l) for l in (d / "chunks.jsonl").read_text(encoding="utf-8").splitlines() if l]
            cached = [Chunk(r["id"], r["passage_id"], r["text"]) for r in rows]
            if cached == list(chunks):
                log.info("rag: index read from cache %s", d)
                bm25 = BM25.load(d / "bm25") if need_bm25 else None
                dense = np.load(d / "dense.npy") if need_dense else None
                return cls(chunks, bm25, dense, embed, retriever, rrf_k, cache_hit=True, path=d)
        texts = [c.text for c in chunks]
        bm25 = BM25.build(texts) if need_bm25 else None
        dense = embed(texts) if need_dense else None
        if cache_dir is not None:
            d = Path(cache_dir)
            d.mkdir(parents=True, exist_ok=True)
            (d / "chunks.jsonl").write_text(
                "".join(json.dumps({"id": c.id, "passage_id": c.passage_id, "text": c.text}) + "\n" for c in chunks),
                encoding="utf-8",
            )
            if bm25 is not None:
                bm25.save(d / "bm25")
            if dense is not None:
                np.save(d / "dense.npy", dense)
            (d / "done.json").write_text(json.dumps({"chunks": len(chunks), "retriever": retriever}))
        return cls(chunks, bm25, dense, embed, retriever, rrf_k, cache_hit=False,
                   path=Path(cache_dir) if cache_dir else None)

    def search_many(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        depth = min(len(self.chunks), max(100, 10 * k))
        qv = self.embed(list(queries)) if self.dense is not None and queries else None
        out = []
        for i, q in enumerate(queries):
            rankings, scored = [], {}
            if self.bm25 is not None:
                s = self.bm25.scores(q)
                rankings.append(rank(s, depth, positive_only=True))
                scored = {j: float(s[j]) for j in rankings[-1]}
            if qv is not None:
                s = self.dense @ qv[i]
                rankings.append(rank(s, depth))
                scored = {j: float(s[j]) for j in rankings[-1]}
            if len(rankings) == 2:
                pairs = rrf(rankings, self.rrf_k)[:k]
            else:
                pairs = [(j, scored[j]) for j in rankings[0][:k]]
            out.append([Hit(self.chunks[j], sc) for j, sc in pairs])
        return out


def format_context(hits: Sequence[Hit], single_chunk: set[str] | None = None) -> str:
    """Passages for the prompt, one per paragraph: ``[d3] text``; a chunk of a passage
    that was split keeps its chunk id (``[d3#2] text``)."""
    single = single_chunk or set()
    return "\n\n".join(
        f"[{h.chunk.passage_id if h.chunk.passage_id in single else h.chunk.id}] {h.chunk.text}" for h in hits
    )
