"""Retrieval (inference/retrieval.py) and the rag rung: corpus reading, chunking, BM25 order
and scores, RRF, recall@k, the on-disk index cache, validation and an end-to-end run."""

import json
import math

import numpy as np
import pytest

from lmladder.inference import retrieval as R
from lmladder.errors import LadderError

DOCS = [
    "the cat sat on the mat",
    "dogs chase cats in the park",
    "a cat and a cat and another cat",
    "stock markets fell sharply today",
]

WORDS = ["cat", "dog", "market", "park", "rain", "sun"]


def fake_embed(texts):
    """Deterministic 'embedding': counts of a few words (importable as test_retrieval:fake_embed)."""
    return np.array([[t.lower().count(w) for w in WORDS] + [0.01] for t in texts], dtype=np.float32)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_corpus_jsonl_text_and_folder(tmp_path):
    p = _write(tmp_path / "c.jsonl", [{"id": "d1", "text": "alpha"}, {"id": 2, "text": "beta"}])
    assert R.read_corpus(p) == [R.Passage("d1", "alpha"), R.Passage("2", "beta")]
    t = tmp_path / "notes.txt"
    t.write_text("first para\nstill first\n\n\nsecond para\n")
    assert R.read_corpus(t) == [R.Passage("notes-1", "first para\nstill first"), R.Passage("notes-2", "second para")]
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.md").write_text("# A\ntext a")
    (d / "sub" / "b.txt").write_text("text b")
    (d / "skip.bin").write_text("no")
    assert R.read_corpus(d) == [R.Passage("a", "# A\ntext a"), R.Passage("sub/b", "text b")]


def test_read_corpus_errors_name_file_line_field(tmp_path):
    p = _write(tmp_path / "c.jsonl", [{"id": "d1", "text": "x"}, {"id": "d2"}])
    with pytest.raises(LadderError, match=r"c\.jsonl:2: field 'text' is missing"):
        R.read_corpus(p)
    p = _write(tmp_path / "d.jsonl", [{"id": "d1", "text": "x"}, {"id": "d1", "text": "y"}])
    with pytest.raises(LadderError, match=r"d\.jsonl:2: field 'id': duplicate passage id 'd1' \(first on line 1\)"):
        R.read_corpus(p)


def test_chunking_with_overlap_keeps_passage_ids():
    words = " ".join(f"w{i}" for i in range(10))
    chunks = R.chunk([R.Passage("d3", words), R.Passage("d4", "short one")], words=4, overlap=1)
    assert [(c.id, c.passage_id, c.text) for c in chunks] == [
        ("d3#1", "d3", "w0 w1 w2 w3"),
        ("d3#2", "d3", "w3 w4 w5 w6"),
        ("d3#3", "d3", "w6 w7 w8 w9"),
        ("d4#1", "d4", "short one"),
    ]
    # exactly one window's worth: no second chunk
    assert [c.id for c in R.chunk([R.Passage("p", "a b c d")], 4, 2)] == ["p#1"]
    with pytest.raises(LadderError, match="overlap"):
        R.chunk([R.Passage("p", "a")], 4, 4)


def test_bm25_exact_order_and_lucene_scores():
    bm = R.BM25.build(DOCS)
    s = bm.scores("cat")
    assert R.rank(s, positive_only=True) == [2, 0]  # 'cats' is another word; stock has none
    toks = [R.tokenize(d) for d in DOCS]
    assert toks[0] == ["cat", "sat", "mat"]  # stop words gone
    avg = sum(map(len, toks)) / len(toks)

    def lucene(tf, dl, df, n=4, k1=1.5, b=0.75):
        return math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * dl / avg))

    assert s[0] == pytest.approx(lucene(1, 3, 2), rel=1e-5)
    assert s[2] == pytest.approx(lucene(3, 4, 2), rel=1e-5)
    assert R.rank(bm.scores("cat park"), positive_only=True) == [1, 2, 0]
    assert not bm.scores("unknownword").any()


def test_rrf_exact_scores():
    fused = R.rrf([[3, 1, 2], [1, 4]], k=60)
    assert [d for d, _ in fused] == [1, 3, 4, 2]
    sc = dict(fused)
    assert sc[1] == pytest.approx(1 / 62 + 1 / 61)
    assert sc[3] == pytest.approx(1 / 61)
    assert sc[4] == pytest.approx(1 / 62)
    assert sc[2] == pytest.approx(1 / 63)


def test_recall_at_k_on_known_ids():
    got = [["d1", "d2"], ["d3", "d4"], ["d5"], ["d9"]]
    gold = ["d2", ["d4", "d7"], None, "d1"]
    r = R.recall_at_k(got, gold)
    assert r == {"recall_at_k": pytest.approx((1 + 0.5 + 0) / 3), "hit_at_k": pytest.approx(2 / 3), "n_with_gold": 3}
    assert R.recall_at_k([["a"]], [None]) == {"n_with_gold": 0}


def test_index_dense_hybrid_and_cache_reuse(tmp_path):
    calls = []

    def embed(texts):
        calls.append(list(texts))
        v = fake_embed(texts)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    chunks = R.chunk([R.Passage(f"d{i}", t) for i, t in enumerate(DOCS)], 50, 10)
    cache = tmp_path / "idx"
    idx = R.Index.build(chunks, "hybrid", embed, cache)
    assert not idx.cache_hit and len(calls) == 1
    dense = R.Index.build(chunks, "dense", embed, None).search_many(["market"], 1)
    assert [h.chunk.passage_id for h in dense[0]] == ["d3"]
    hits = idx.search_many(["cat"], 2)[0]
    bm_rank = R.rank(idx.bm25.scores("cat"), positive_only=True)
    dn_rank = R.rank(idx.dense @ embed(["cat"])[0])
    assert bm_rank == [2, 0] and dn_rank[:2] == [0, 2]  # d0 is exactly the 'cat' direction
    want = R.rrf([bm_rank, dn_rank], 60)[:2]
    assert [(h.chunk.id, h.score) for h in hits] == [(f"d{j}#1", pytest.approx(s)) for j, s in want]
    assert hits[0].score == pytest.approx(1 / 61 + 1 / 62)
    calls.clear()
    again = R.Index.build(chunks, "hybrid", embed, cache)
    assert again.cache_hit and calls == []  # the corpus was not embedded again
    assert [h.chunk.id for h in again.search_many(["cat"], 2)[0]] == ["d2#1", "d0#1"]
    # other chunks with the same folder: rebuilt, not silently reused
    other = R.chunk([R.Passage("x", "cat dog")], 50, 10)
    assert not R.Index.build(other, "hybrid", embed, cache).cache_hit
    k1 = R.Index.cache_key("abc", 200, 40, "hybrid", "e1")
    assert k1 != R.Index.cache_key("abd", 200, 40, "hybrid", "e1") != R.Index.cache_key("abc", 200, 30, "hybrid", "e1")
    assert R.Index.cache_key("abc", 200, 40, "bm25", "e1") == R.Index.cache_key("abc", 200, 40, "bm25", "e2")


def test_format_context_ids():
    c1, c2 = R.Chunk("d3#1", "d3", "one"), R.Chunk("d4#2", "d4", "two")
    text = R.format_context([R.Hit(c1, 1.0), R.Hit(c2, 0.5)], single_chunk={"d3"})
    assert text == "[d3] one\n\n[d4#2] two"


# --------------------------------------------------------------------------- the rung

CORPUS = [
    {"id": "p1", "text": "Reviews that praise a film as great or lovely are positive."},
    {"id": "p2", "text": "Reviews that call a film awful or boring are negative."},
    {"id": "p3", "text": "The weather today is sunny with light rain in the evening."},
]


@pytest.fixture
def rag_data(tmp_path):
    from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl

    test = [dict(r, doc_id="p1" if r["label"] == "pos" else "p2") for r in TEST_ROWS]
    return (write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS), write_jsonl(tmp_path / "test.jsonl", test),
            _write(tmp_path / "corpus.jsonl", CORPUS))


def _rag(run_cli, rag_data, out, *extra):
    train, test, corpus = rag_data
    return run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out), "-q",
                   "--rungs", "rag", "--corpus", str(corpus), "--set", "eval.bootstrap=100",
                   "--set", "rag.top_k=1", *extra)


def test_rag_end_to_end_prompt_recall_and_cache(run_cli, rag_data, tmp_path, monkeypatch):
    monkeypatch.delenv("LMLADDER_CACHE", raising=False)
    out = tmp_path / "run"
    code, _, err = _rag(run_cli, rag_data, out, "--set", "rag.retriever=hybrid",
                        "--set", "rag.embedder=test_retrieval:fake_embed")
    assert code == 0, err
    res = json.loads((out / "rungs/rag/result.json").read_text())
    d = res["details"]
    # 'lovely film' / 'boring film': p1 / p2 by BM25 ('lovely', 'boring') and tie-free fusion
    assert d["retrieval"]["recall_at_k"] == 1.0 == d["recall_at_k"]
    assert d["retrieval"]["n_with_gold"] == 8 and d["retrieval"]["index_cache_hit"] is False
    preds = [json.loads(l) for l in (out / "rungs/rag/predictions.jsonl").read_text().splitlines()]
    assert preds[0]["retrieved"] == ["p1#1"] and preds[1]["retrieved"] == ["p2#1"]
    rows = [json.loads(l) for l in (out / "rungs/rag/retrieved.jsonl").read_text().splitlines()]
    assert rows[0]["query"] == "lovely film 0" and rows[0]["retrieved"][0]["passage_id"] == "p1"
    from lmladder import config as C
    from lmladder.rungs.rag import Rag

    cfg = C.build({"rag": {"corpus": str(rag_data[2])}})
    # a second run with another setting reuses the on-disk index (same corpus/chunking/embedder)
    code, _, err = _rag(run_cli, rag_data, out, "--set", "rag.retriever=hybrid",
                        "--set", "rag.embedder=test_retrieval:fake_embed", "--set", "rag.top_k=2")
    assert code == 0, err
    d2 = json.loads((out / "rungs/rag/result.json").read_text())["details"]["retrieval"]
    assert d2["index_cache_hit"] is True and d2["top_k"] == 2
    assert Rag.fingerprint_extra(cfg)["corpus_digest"] == R.corpus_digest(rag_data[2])


def test_rag_prompt_text(tmp_path, rag_data):
    """The exact user message: passages as '[id] text' under # Context."""
    from lmladder import config as C
    from lmladder.data import load
    from lmladder.tasks import make_task

    train, test, corpus = rag_data
    cfg = C.build({"data": {"train": str(train), "test": str(test)},
                   "rag": {"corpus": str(corpus), "top_k": 2, "retriever": "bm25"}})
    ds = load(cfg.data, 0, None, "classification")
    task = make_task(cfg.task, ds.info["labels"], cfg.eval, 0)
    chunks = R.chunk(R.read_corpus(corpus), 200, 40)
    idx = R.Index.build(chunks, "bm25")
    hits = idx.search_many([task.query(ds.test[0])], 2)[0]
    msg = task.user_message(ds.test[0], context=R.format_context(hits, {"p1", "p2", "p3"}))
    assert "# Context\n[p1] Reviews that praise a film as great or lovely are positive.\n\n[p2] Reviews" in msg
    assert msg.index("# Context") < msg.index("# Target question")


def test_rag_fingerprint_follows_corpus_content(run_cli, rag_data, tmp_path):
    out = tmp_path / "run"
    assert _rag(run_cli, rag_data, out, "--set", "rag.retriever=bm25")[0] == 0
    first = json.loads((out / "rungs/rag/result.json").read_text())["fingerprint"]
    assert _rag(run_cli, rag_data, out, "--set", "rag.retriever=bm25")[0] == 0
    assert json.loads((out / "rungs/rag/result.json").read_text())["fingerprint"] == first
    corpus = rag_data[2]
    corpus.write_text(corpus.read_text().replace("sunny", "cloudy"))  # same path, new content
    assert _rag(run_cli, rag_data, out, "--set", "rag.retriever=bm25")[0] == 0
    assert json.loads((out / "rungs/rag/result.json").read_text())["fingerprint"] != first


@pytest.mark.parametrize("case", ["missing", "empty", "unset"])
def test_rag_bad_corpus_is_one_line_error_before_model_work(run_cli, rag_data, tmp_path, case):
    train, test, corpus = rag_data
    out = tmp_path / "run"
    args = ["run", "--train", str(train), "--test", str(test), "--out", str(out), "--rungs", "zero-shot,rag",
            "--model", str(tmp_path / "no-such-model")]  # never loaded: validation comes first
    if case == "missing":
        args += ["--corpus", str(tmp_path / "nope.jsonl")]
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("\n")
        args += ["--corpus", str(tmp_path / "empty.jsonl")]
    code, _, err = run_cli(*args)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert {"missing": "corpus not found", "empty": "corpus is empty", "unset": "no corpus given"}[case] in line
    assert not out.exists()


def test_clean_query():
    from lmladder.rungs.rag import clean_query

    assert clean_query('\n Query: "harvard yale regatta"\nmore', "q") == "harvard yale regatta"
    assert clean_query("   \n", "fallback") == "fallback"


def test_rag_query_writing_adds_a_call(run_cli, rag_data, tmp_path):
    out = tmp_path / "run"
    code, _, err = _rag(run_cli, rag_data, out, "--set", "rag.retriever=bm25", "--set", "rag.query_writing=true",
                        "--limit-test", "2")
    assert code == 0, err
    res = json.loads((out / "rungs/rag/result.json").read_text())
    r = res["details"]["retrieval"]
    assert r["query_writing"] is True and r["query_prompt_tokens_per_example"] > 50
    assert res["details"]["calls_per_example"] == 2
    assert res["cost"]["prompt_tokens_per_example"] > r["query_prompt_tokens_per_example"]
    rows = [json.loads(l) for l in (out / "rungs/rag/retrieved.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["query"] for row in rows)
