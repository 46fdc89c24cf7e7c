"""Tagging metrics (BIO -> spans, entity P/R/F1), first-sub-token label alignment, and the
encoder rung end to end on a tiny random BERT with a tiny WordPiece vocabulary."""

import json
from pathlib import Path

import pytest

from lmladder.rungs.encoder import IGNORE, align_labels, first_subtokens
from lmladder.tasks.tagging import entity_counts, entity_prf, spans, tag_set

from conftest import write_jsonl

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train 50x faster on one thread than on two busy cores (no spin-waits)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = ["alice", "bob", "paris", "rome", "visits", "likes", "great", "awful", "movie", "play", "x"]
PIECES = ["##ing", "##s"]


# --------------------------------------------------------------------------- spans and metrics


def test_spans_bio():
    assert spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert spans(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    assert spans(["O", "O"]) == []
    assert spans(["B-geo-loc", "I-geo-loc"]) == [("geo-loc", 0, 1)]  # types may contain '-'


def test_spans_i_without_b_starts_an_entity():
    assert spans(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]
    assert spans(["O", "I-LOC"]) == [("LOC", 1, 1)]


def test_spans_type_mismatch_splits():
    assert spans(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert spans(["B-PER", "I-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 1), ("LOC", 2, 3)]


def test_entity_prf_hand_computed():
    golds = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"], ["B-PER", "I-PER"]]
    preds = [["B-PER", "I-PER", "O", "O"],  # PER right, LOC missed
             ["O", "B-PER"],  # wrong type: a false positive and a miss
             ["B-PER", "O"]]  # wrong boundary: a false positive and a miss
    assert [entity_counts(p, g) for p, g in zip(preds, golds)] == [(1, 1, 2), (0, 1, 1), (0, 1, 1)]
    m = entity_prf(preds, golds, n_boot=200, seed=0)
    assert m["precision"]["value"] == pytest.approx(1 / 3)
    assert m["recall"]["value"] == pytest.approx(1 / 4)
    assert m["f1"]["value"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    lo, hi = m["f1"]["ci"]
    assert 0 <= lo <= hi <= 1
    perfect = entity_prf(golds, golds, n_boot=200)
    assert perfect["f1"]["value"] == 1.0 and perfect["f1"]["ci"] == [1.0, 1.0]
    assert entity_counts(None, ["B-X"]) == (0, 0, 1)  # no prediction: every entity missed


def test_entity_prf_matches_seqeval():
    """Values computed with seqeval 1.2.2 (default mode) on the same sequences."""
    golds = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"], ["B-PER", "I-PER"],
             ["O", "I-PER", "I-PER"], ["B-PER", "I-LOC"], ["B-PER", "I-PER"]]
    preds = [["B-PER", "I-PER", "O", "O"], ["O", "B-PER"], ["B-PER", "O"],
             ["O", "I-PER", "I-PER"], ["B-PER", "I-LOC"], ["I-PER", "I-PER"]]
    m = entity_prf(preds, golds, n_boot=100)
    assert m["precision"]["value"] == pytest.approx(0.7142857142857143)
    assert m["recall"]["value"] == pytest.approx(0.625)
    assert m["f1"]["value"] == pytest.approx(0.6666666666666666)


def test_tagging_task_score_and_token_accuracy():
    from lmladder.config import EvalConfig, TaskConfig
    from lmladder.tasks.tagging import TaggingTask

    t = TaggingTask(TaskConfig(kind="tagging"), [], EvalConfig(bootstrap=100), 0)
    s = t.score([["B-PER", "O"], ["O", "B-LOC"]], [["B-PER", "O"], ["O", "O"]])
    assert s["f1"]["value"] == pytest.approx(2 / 3)
    assert s["token_accuracy"]["value"] == pytest.approx(3 / 4)
    assert t.correct(["B-PER", "O"], ["B-PER", "O"]) and not t.correct(["O", "O"], ["B-PER", "O"])


# --------------------------------------------------------------------------- alignment


def test_align_labels_first_subtoken_exact():
    #            CLS  w0 w0  w1 w2 w2 w2 SEP
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert align_labels(word_ids, [5, 6, 7]) == [IGNORE, 5, IGNORE, 6, 7, IGNORE, IGNORE, IGNORE]
    assert first_subtokens(word_ids) == {0: 1, 1: 3, 2: 4}
    # truncated: word 2 lost entirely
    assert first_subtokens([None, 0, 1, 1, None]) == {0: 1, 1: 2}


def test_align_labels_with_a_wordpiece_tokenizer(tmp_path):
    tok = _tokenizer(tmp_path)
    enc = tok(["alice", "playing", "rome"], is_split_into_words=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "alice", "play", "##ing", "rome", "[SEP]"]
    assert align_labels(enc.word_ids(), [1, 0, 2]) == [IGNORE, 1, 0, IGNORE, 2, IGNORE]


def test_tag_set_order():
    class E:
        def __init__(self, t):
            self.target = t

    assert tag_set([E(["O", "I-PER", "B-LOC"]), E(["B-PER"])]) == ["O", "B-LOC", "B-PER", "I-PER"]


# --------------------------------------------------------------------------- end to end


def _tokenizer(d: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + PIECES
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT (safetensors) + WordPiece tokenizer, built here with no network."""
    import torch
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _result(out: Path, rung: str) -> dict:
    return json.loads((out / "rungs" / rung / "result.json").read_text())


def test_encoder_classification_end_to_end(tmp_path, tiny_bert, run_cli):
    rows = [{"text": f"{w} movie {n}", "label": lab}
            for n in ("alice", "bob", "paris", "rome")
            for w, lab in (("great", "pos"), ("awful", "neg"))]
    train = write_jsonl(tmp_path / "train.jsonl", rows * 3)
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "run"
    code, _, err = run_cli(
        "run", "--train", str(train), "--test", str(test), "--rungs", "encoder", "--out", str(out),
        "--set", f"encoder.model={tiny_bert}", "--set", "encoder.lr=3e-3", "--set", "encoder.epochs=8",
        "--set", "encoder.batch_size=8", "-q", "--set", "data.allow_overlap=true",  # tested on train rows
    )
    assert code == 0, err
    r = _result(out, "encoder")
    assert r["score"] == 1.0  # accuracy: the word great / awful decides
    model = r["details"]["model"]
    assert model["architecture"] == "BertForSequenceClassification" and model["num_labels"] == 2
    assert r["cost"]["trainable_params"] == model["parameters"]
    assert r["cost"]["trainable_share"] == 1.0  # relative to the encoder, not the causal LM
    assert r["model"] == {}  # the causal LM was never loaded
    assert (out / "rungs/encoder/model/model.safetensors").is_file()
    preds = [json.loads(l) for l in (out / "rungs/encoder/predictions.jsonl").read_text().splitlines()]
    assert {p["pred"] for p in preds} == {"pos", "neg"}
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-5 for p in preds)
    # a rerun reuses the finished rung
    code, _, _ = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "encoder",
                         "--out", str(out), "--set", f"encoder.model={tiny_bert}", "--set", "encoder.lr=3e-3",
                         "--set", "encoder.epochs=8", "--set", "encoder.batch_size=8", "-q",
                         "--set", "data.allow_overlap=true")
    assert code == 0 and _result(out, "encoder")["finished"] == r["finished"]


def _tag_rows():
    rows = []
    for a, b in (("alice", "paris"), ("bob", "rome"), ("alice", "rome"), ("bob", "paris")):
        rows.append({"tokens": [a, "visits", b], "tags": ["B-PER", "O", "B-LOC"]})
        rows.append({"tokens": [b, "likes", a, "playing"], "tags": ["B-LOC", "O", "B-PER", "O"]})
    return rows


def test_encoder_tagging_end_to_end(tmp_path, tiny_bert, run_cli):
    rows = _tag_rows()
    train = write_jsonl(tmp_path / "train.jsonl", rows * 4)
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "run"
    code, _, err = run_cli(
        "run", "--train", str(train), "--test", str(test), "--input-field", "tokens", "--label-field", "tags",
        "--rungs", "encoder", "--out", str(out), "--set", "task.kind=tagging",
        "--set", f"encoder.model={tiny_bert}", "--set", "encoder.lr=3e-3", "--set", "encoder.epochs=10",
        "--set", "encoder.batch_size=8", "-q", "--set", "data.allow_overlap=true",  # tested on train rows
    )
    assert code == 0, err
    r = _result(out, "encoder")
    assert r["metric"] == "f1" and set(r["metrics"]) == {"f1", "precision", "recall", "token_accuracy"}
    assert r["details"]["model"]["architecture"] == "BertForTokenClassification"
    assert r["details"]["labels"] == ["O", "B-LOC", "B-PER"]
    assert r["score"] >= 0.9
    preds = [json.loads(l) for l in (out / "rungs/encoder/predictions.jsonl").read_text().splitlines()]
    assert [len(p["pred"]) for p in preds] == [len(x["tokens"]) for x in rows]  # one tag per word
    assert preds[0]["gold"] == ["B-PER", "O", "B-LOC"]


def test_tagging_rejected_by_lm_rungs(tmp_path, run_cli):
    train = write_jsonl(tmp_path / "train.jsonl", _tag_rows())
    code, _, err = run_cli(
        "run", "--train", str(train), "--input-field", "tokens", "--label-field", "tags",
        "--rungs", "zero-shot,encoder", "--set", "task.kind=tagging", "--out", str(tmp_path / "r"),
    )
    assert code == 2
    assert "rung zero-shot does not support task kind tagging" in err
    assert not (tmp_path / "r").exists()


def test_tagging_bad_rows(tmp_path, tiny_bert, run_cli):
    rows = _tag_rows()
    rows[2] = {"tokens": ["alice", "visits"], "tags": ["B-PER"]}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    args = ("run", "--train", str(train), "--input-field", "tokens", "--label-field", "tags",
            "--rungs", "encoder", "--set", "task.kind=tagging", "--set", f"encoder.model={tiny_bert}",
            "--out", str(tmp_path / "r"))
    code, _, err = run_cli(*args)
    assert code == 2 and f"{train}:3: field 'tags' has 1 tags for 2 tokens" in err
    rows[2] = {"tokens": ["alice", "visits"], "tags": ["B-PER", "X-LOC"]}
    write_jsonl(train, rows)
    code, _, err = run_cli(*args)
    assert code == 2 and "tag 'X-LOC' is not O, B-<type> or I-<type>" in err


def test_encoder_model_without_safetensors(tmp_path, run_cli, toy_data):
    d = tmp_path / "enc"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"")
    train, test = toy_data
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "encoder",
                           "--set", f"encoder.model={d}", "--out", str(tmp_path / "r"))
    assert code == 2 and "no .safetensors weights" in err
