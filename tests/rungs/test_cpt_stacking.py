"""continued-pretraining: corpus reading, exact block packing, no attention across
documents; `from:` stacking (CPT -> lora) end to end on the tiny model, and bad `from:`."""

import json
from pathlib import Path

import pytest
import torch

from lmladder.errors import LadderError
from lmladder.rungs.continued_pretraining import IGNORE, BlockCollator, pack_blocks, read_documents

from conftest import TEST_ROWS, make_model, make_tokenizer, write_jsonl
from test_encoder import _one_thread  # noqa: F401  (autouse: train on one thread)


def test_pack_blocks_exact():
    docs = [[1, 2, 3], [4, 5]]  # stream: 1 2 3 E 4 5 E   (E = 0)
    assert pack_blocks(docs, 0, 4) == [
        {"input_ids": [1, 2, 3, 0], "position_ids": [0, 1, 2, 3], "labels": [1, 2, 3, 0]},
        {"input_ids": [4, 5, 0], "position_ids": [0, 1, 2], "labels": [4, 5, 0]},
    ]
    # a document starting inside a block: positions restart, its first token is not a target
    assert pack_blocks(docs, 0, 5) == [
        {"input_ids": [1, 2, 3, 0, 4], "position_ids": [0, 1, 2, 3, 0], "labels": [1, 2, 3, 0, IGNORE]},
        {"input_ids": [5, 0], "position_ids": [0, 1], "labels": [5, 0]},
    ]
    # a 1-token tail is dropped; a document cut by a block boundary restarts at 0
    assert pack_blocks([[7, 8, 9]], 0, 3) == [
        {"input_ids": [7, 8, 9], "position_ids": [0, 1, 2], "labels": [7, 8, 9]},
    ]
    assert pack_blocks([[7, 8, 9, 6, 5]], 0, 4)[1] == {"input_ids": [5, 0], "position_ids": [0, 1], "labels": [5, 0]}


def test_block_collator_pads_as_a_separate_sequence():
    blocks = pack_blocks([[1, 2, 3], [4, 5]], 0, 4)
    b = BlockCollator(pad_id=9)(blocks)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 9]]
    assert b["labels"].tolist() == [[1, 2, 3, 0], [4, 5, 0, IGNORE]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert "attention_mask" not in b and b["use_cache"] is False


def test_no_attention_across_documents():
    """A block holding two documents gives the second document exactly the logits it gets alone."""
    tok = make_tokenizer()
    model = make_model(len(tok))
    a, b = [5, 6, 7, 8], [9, 10, 11]
    blk = pack_blocks([a, b], 0, 16)[0]
    batch = BlockCollator(0)([blk])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([b + [0]])).logits
    start = len(a) + 1
    assert torch.allclose(packed[0, start:], alone[0], atol=1e-5)


def test_read_documents(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "one"}, {"text": "  "}, {"text": "two"}])
    assert read_documents(tmp_path / "c.jsonl") == ["one", "two"]
    (tmp_path / "c.txt").write_text("para one\nstill one\n\npara two\n")
    assert read_documents(tmp_path / "c.txt") == ["para one\nstill one", "para two"]
    d = tmp_path / "folder"
    d.mkdir()
    (d / "b.md").write_text("bee")
    (d / "a.txt").write_text("ay")
    assert read_documents(d) == ["ay", "bee"]
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(LadderError, match=r"bad.jsonl:2: field 'text' missing or not text"):
        read_documents(tmp_path / "bad.jsonl")


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def cpt_setup(tmp_path, toy_data):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"text": f"The film number {i} was {w}, said the critic."} for i in range(12) for w in ("great", "awful")
    ])
    return toy_data, corpus


CPT = ("--set", "continued-pretraining.max_steps=3", "--set", "continued-pretraining.block_size=64",
       "--set", "continued-pretraining.lr=5e-3")
LORA = ("--set", "lora.max_steps=2", "--set", "lora.batch_size=4", "--set", "lora.forgetting_max_tokens=256")


def test_cpt_then_lora_stacked(tmp_path, cpt_setup, run_cli, tiny_dir):
    """rungs: zero-shot, lora, continued-pretraining and lora@cpt (a named copy of lora that
    starts from the CPT model) in one run."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lmladder.training import forgetting

    (train, test), corpus = cpt_setup
    out = tmp_path / "run"
    code, _, err = run_cli(
        "run", "--train", str(train), "--test", str(test), "--out", str(out), "-q",
        "--rungs", "zero-shot,lora@cpt,lora,continued-pretraining",
        "--set", f"continued-pretraining.corpus={corpus}",
        "--set", "copies.lora@cpt.from=continued-pretraining", *CPT, *LORA,
    )
    assert code == 0, err
    res = {n: json.loads((out / "rungs" / n / "result.json").read_text())
           for n in ("continued-pretraining", "lora", "lora@cpt")}
    cpt, lora, stacked = res["continued-pretraining"], res["lora"], res["lora@cpt"]
    # CPT trained and saved a whole model whose weights differ from the base's
    assert cpt["details"]["steps"] == 3 and cpt["details"]["corpus"]["documents"] == 22
    assert cpt["details"]["corpus"]["dev_documents"] == 2
    saved = load_file(str(out / "rungs/continued-pretraining/model/model.safetensors"))
    base = load_file(str(Path(tiny_dir) / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(saved[key], base[key])
    assert cpt["n_test"] == len(TEST_ROWS) and cpt["cost"]["trainable_params"] > 0
    # lora@cpt ran after CPT (despite its lower cost rank); its cost includes CPT's training
    assert stacked["details"]["from"]["rung"] == "continued-pretraining"
    assert stacked["cost"]["train_seconds"] == pytest.approx(
        stacked["details"]["from"]["own_train_seconds"] + cpt["cost"]["train_seconds"], abs=0.02)
    assert stacked["rank"] > cpt["rank"] and stacked["summary"].endswith("(from continued-pretraining)")
    assert "from" not in lora["details"] and lora["fingerprint"] != stacked["fingerprint"]
    # each started from the model it should: the perplexity of the starting model is the
    # CPT model's for lora@cpt and the (restored) base's for plain lora
    tok = make_tokenizer()
    texts, _ = forgetting.load_texts("builtin")
    chunks = forgetting.token_chunks(tok, texts, 256)
    ppl_cpt = forgetting.perplexity(
        AutoModelForCausalLM.from_pretrained(out / "rungs/continued-pretraining/model"), chunks, tok.pad_token_id)
    ppl_base = forgetting.perplexity(AutoModelForCausalLM.from_pretrained(tiny_dir), chunks, tok.pad_token_id)
    assert ppl_cpt != pytest.approx(ppl_base, rel=1e-4)
    assert stacked["details"]["forgetting"]["ppl_before"] == pytest.approx(ppl_cpt, rel=1e-4)
    assert lora["details"]["forgetting"]["ppl_before"] == pytest.approx(ppl_base, rel=1e-4)
    # the report lists every rung, the stacked one after its parent
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rungs"]] == ["zero-shot", "lora", "continued-pretraining", "lora@cpt"]


def test_named_copy_needs_copies(tmp_path, toy_data, run_cli):
    train, test = toy_data
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "lora@x",
                           "--out", str(tmp_path / "r"))
    assert code == 2 and "rung 'lora@x' is a named copy: give its changes in copies.lora@x" in err
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "lora@x",
                           "--set", "copies.lora@x.rr=3", "--out", str(tmp_path / "r"))
    assert code == 2 and "copies: Value error, 'lora@x': rr: unknown key" in err


def test_push_pop_base_restores_the_shared_model(tmp_path, tiny_dir):
    from lmladder.config import RunConfig
    from lmladder.run.context import Context

    cfg = RunConfig(model=str(tiny_dir), rungs=["continued-pretraining", "lora"])
    ctx = Context(cfg, None, None, tmp_path)
    shared = ctx.base()[0]
    with pytest.raises(LadderError, match=r"from: continued-pretraining: no model in .* \(did the continued-pretraining rung fail\?\)"):
        ctx.push_base("continued-pretraining")
    shared.save_pretrained(tmp_path / "rungs/continued-pretraining/model", safe_serialization=True)
    ctx.push_base("continued-pretraining")
    assert ctx.base()[0] is not shared
    ctx.pop_base()
    assert ctx.base()[0] is shared


def test_from_an_adapter_rung_merges_it_into_a_copy(tmp_path, tiny_dir):
    """`from: lora` starts from the base with lora's saved adapter merged (a copy: the shared
    base is untouched); the merged model's logits equal the PEFT model's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lmladder.config import RunConfig
    from lmladder.run.context import Context

    cfg = RunConfig(model=str(tiny_dir), rungs=["lora", "full"], full={"from": "lora"})
    ctx = Context(cfg, None, None, tmp_path)
    shared = ctx.base()[0]
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    with pytest.raises(LadderError, match=r"from: lora: no adapter in .*rungs/lora/adapter \(did the lora rung fail\?\)"):
        ctx.push_base("lora")
    import copy

    peft = get_peft_model(copy.deepcopy(shared), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "rungs/lora/adapter", safe_serialization=True)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        want = peft(input_ids=ids).logits
    ctx.push_base("lora")
    merged = ctx.base()[0]
    assert merged is not shared and not hasattr(merged, "peft_config")
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        plain = shared(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, plain, atol=1e-3)
    ctx.pop_base()
    assert ctx.base()[0] is shared
    assert all(torch.equal(v, before[k]) for k, v in shared.state_dict().items())


@pytest.mark.parametrize("rungs,parent,msg", [
    ("zero-shot,lora", "continued-pretraining",
     "lora.from: 'continued-pretraining' is not in rungs (zero-shot, lora); add it to rungs"),
    ("lora", "lora", "lora.from: a rung cannot start from itself"),
    ("zero-shot,lora", "zero-shot", "lora.from: rung 'zero-shot' does not produce a model to start from"),
    ("prompt-tuning,lora", "prompt-tuning",
     "lora.from: rung 'prompt-tuning' does not produce a model to start from"),
])
def test_bad_from(tmp_path, toy_data, run_cli, rungs, parent, msg):
    train, test = toy_data
    out = tmp_path / "r"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", rungs,
                           "--set", f"lora.from={parent}", "--out", str(out))
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_empty_or_missing_corpus(tmp_path, toy_data, run_cli):
    train, test = toy_data
    (tmp_path / "empty.jsonl").write_text("\n")
    base = ("run", "--train", str(train), "--test", str(test), "--rungs", "continued-pretraining",
            "--out", str(tmp_path / "r"))
    code, _, err = run_cli(*base, "--set", f"continued-pretraining.corpus={tmp_path / 'empty.jsonl'}")
    assert code == 2 and "continued-pretraining.corpus is empty" in err
    code, _, err = run_cli(*base)
    assert code == 2 and "continued-pretraining.corpus: no corpus given" in err
    code, _, err = run_cli(*base, "--set", f"continued-pretraining.corpus={tmp_path / 'nope.txt'}")
    assert code == 2 and "corpus not found" in err


def test_export_refuses_a_stacked_rung(tmp_path):
    from lmladder.config import RunConfig
    from lmladder.export.cli import check_rung
    from lmladder.run.folder import RunFolder

    cfg = RunConfig(rungs=["continued-pretraining", "lora"], lora={"from": "continued-pretraining"})
    run = RunFolder(tmp_path, cfg, ["a", "b"], ["continued-pretraining", "lora"])
    with pytest.raises(LadderError, match="rung 'lora' starts from continued-pretraining's model"):
        check_rung(run, "lora")
    check_rung(run, "continued-pretraining")  # not stacked: fine
