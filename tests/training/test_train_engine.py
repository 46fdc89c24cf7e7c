"""The training engine (training/sft.py): packing without cross-contamination, loss only
on supervised logits, truncation, dev split, early stopping, atomic checkpoints."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmladder.rungs.lora import LoraConfig
from lmladder.training import checkpoints, sft
from lmladder.errors import LadderError
from lmladder.prompts import ChatFormat
from lmladder import prompts

from conftest import make_model, make_tokenizer

MSGS = ["a", "a much longer message about a film", "mid length one", "x y", "another fairly long input here"]
ANS = ["yes", "no", "positive", "neg", "maybe so"]


def _feats(tok, msgs=MSGS, answers=ANS):
    fmt = ChatFormat(tok)
    return [sft.build_feature(fmt, m, a, 512, f"t:{i}", {tok.eos_token_id}) for i, (m, a) in enumerate(zip(msgs, answers))]


def _rows(feats):
    return [{"input_ids": f.input_ids, "labels": f.labels} for f in feats]


def _token_losses(model, batch):
    """Per-token cross-entropy of the supervised positions, in row order."""
    b = dict(batch)
    labels = b.pop("labels")
    with torch.no_grad():
        logits = model(**b).logits
    targets = labels[:, 1:][labels[:, 1:] != -100]
    if logits.dim() == 3:
        logits = logits[:, :-1][labels[:, 1:] != -100]
    return F.cross_entropy(logits.float(), targets, reduction="none")


@pytest.mark.parametrize("pack_length", [4096, 120])  # one row / several rows with padding
def test_packed_batch_gives_the_same_per_token_loss_as_separate_sequences(pack_length):
    tok = make_tokenizer()
    model = make_model(len(tok))
    feats = _feats(tok)
    separate = torch.cat([_token_losses(model, sft.Collator(tok.pad_token_id)(_rows([f]))) for f in feats])
    packed_batch = sft.Collator(tok.pad_token_id, packing=True, pack_length=pack_length, keep_logits=True)(_rows(feats))
    assert "attention_mask" not in packed_batch and packed_batch["use_cache"] is False
    if pack_length == 4096:
        assert packed_batch["input_ids"].shape[0] == 1
    else:
        assert packed_batch["input_ids"].shape[0] > 1
    # pack_rows keeps each row's sequences in order, rows in first-fit order: reorder
    rows = sft.pack_rows([len(f.input_ids) for f in feats], pack_length)
    order = [i for r in rows for i in r]
    expected = torch.cat([_token_losses(model, sft.Collator(tok.pad_token_id)(_rows([feats[i]]))) for i in order])
    packed = _token_losses(model, packed_batch)
    assert packed.shape == separate.shape
    assert torch.allclose(packed, expected, atol=1e-5, rtol=0), (packed - expected).abs().max()


def test_packed_positions_restart_and_only_supervised_logits_are_kept():
    tok = make_tokenizer()
    feats = _feats(tok)[:2]
    b = sft.Collator(tok.pad_token_id, packing=True, keep_logits=True)(_rows(feats))
    n0, n1 = (len(f.input_ids) for f in feats)
    pos = b["position_ids"][0].tolist()
    assert pos == list(range(n0)) + list(range(n1))
    keep = b["logits_to_keep"][0]
    # kept positions are exactly those whose next token is trained (answer + end of turn)
    assert keep.sum().item() == sum(sum(1 for l in f.labels if l != -100) for f in feats)
    assert not keep[n0 - 1]  # the last token of sequence 0 never predicts sequence 1's start
    # the first token of every sequence is a masked prompt token
    assert b["labels"][0, 0].item() == -100 and b["labels"][0, n0].item() == -100
    # prompt tuning: n virtual positions in front are never kept
    bv = sft.Collator(tok.pad_token_id, keep_logits=True, n_virtual=3)(_rows(feats))
    assert bv["logits_to_keep"].shape[1] == bv["input_ids"].shape[1] + 3
    assert not bv["logits_to_keep"][:, :3].any()


def test_token_loss_equals_the_models_own_loss():
    tok = make_tokenizer()
    model = make_model(len(tok))
    feats = _feats(tok)
    plain = sft.Collator(tok.pad_token_id)(_rows(feats))
    with torch.no_grad():
        ref = model(**plain).loss
        b = sft.Collator(tok.pad_token_id, packing=True, keep_logits=True)(_rows(feats))
        labels = b.pop("labels")
        ours = sft.token_loss(model(**b), labels)
        full = sft.token_loss(model(**{k: v for k, v in b.items() if k != "logits_to_keep"}), labels)
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(full, ref, atol=1e-5)


def test_truncation_keeps_the_answer_and_counts():
    tok = make_tokenizer()
    fmt = ChatFormat(tok)
    f = sft.build_feature(fmt, "x" * 200, "positive", 60, "d.jsonl:4", {tok.eos_token_id}, truncation="truncate")
    assert len(f.input_ids) == 60 and f.truncated > 0
    assert tok.decode([t for t in f.labels if t != -100]) == "positive<|im_end|>"
    assert f.labels[0] == -100  # at least one prompt token stays
    with pytest.raises(LadderError, match=r"d.jsonl:4: training sequence has \d+ tokens"):
        sft.build_feature(fmt, "x" * 200, "positive", 60, "d.jsonl:4", {tok.eos_token_id}, truncation="error")
    # an answer that cannot fit beside half of max_length of prompt is cut from the end,
    # its end-of-turn token with it (TRL's max_completion_length), and counted
    long = sft.build_feature(fmt, "x", "positive" * 20, 60, "d.jsonl:5", {tok.eos_token_id}, truncation="truncate")
    n_prompt = len(fmt.encode(fmt.prompt("x")))
    assert n_prompt > 30 and len(long.input_ids) == 60
    assert long.labels[:30] == [-100] * 30  # the last half of max_length of the prompt
    assert tok.decode(long.labels[30:]) == ("positive" * 20)[:30]
    assert long.truncated == n_prompt - 30 + (160 + 1 - 30)


def test_empty_answer_names_the_file_line():
    tok = make_tokenizer()
    with pytest.raises(LadderError, match=r"^d.jsonl:7: label: the answer '' tokenises to nothing$"):
        sft.build_feature(ChatFormat(tok), "m", "", 512, "d.jsonl:7", {tok.eos_token_id})


def test_dev_split_is_seeded_disjoint_and_capped():
    tr, dev = sft.carve_dev(100, 0.1, 200, seed=3)
    assert len(dev) == 10 and not set(tr) & set(dev) and sorted(tr + dev) == list(range(100))
    assert sft.carve_dev(100, 0.1, 200, seed=3) == (tr, dev)
    assert sft.carve_dev(100, 0.1, 200, seed=4)[1] != dev
    assert len(sft.carve_dev(10_000, 0.1, 50, seed=0)[1]) == 50
    assert sft.carve_dev(12, 0.1, 200, seed=0)[1] == []  # too few to hold any out
    assert sft.carve_dev(100, 0.0, 200, seed=0)[1] == []


def _data(n=40):
    return [(f"item {i} {'very ' * (i % 3)}{'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(n)]


def _train(tmp_path, cfg, fp="fp", ckpt=True, model=None):
    from peft import LoraConfig as PeftLora, get_peft_model

    tok = make_tokenizer()
    fmt = ChatFormat(tok)
    data = _data()
    feats = [sft.build_feature(fmt, m, a, 512, f"t:{i}", {tok.eos_token_id}) for i, (m, a) in enumerate(data)]
    pm = get_peft_model(model or make_model(len(tok)),
                        PeftLora(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    stats = sft.train(pm, tok, feats, [a for _, a in data], cfg, tmp_path / "work", 0,
                      checkpoint_dir=tmp_path / "ckpt" if ckpt else None, fingerprint=fp)
    return stats, pm


def test_early_stopping_keeps_and_loads_the_best_checkpoint(tmp_path):
    from safetensors.torch import load_file

    cfg = LoraConfig(lr=0.5, max_steps=30, batch_size=4, warmup_ratio=0.0, eval_steps=1,
                     early_stopping_patience=2, dropout=0.0)
    stats, pm = _train(tmp_path, cfg)
    assert stats["dev_examples"] == 4 and stats["train_examples"] == 36
    curve = stats["eval_curve"]
    best_step, best_loss = min(curve, key=lambda x: x[1])
    assert stats["stopped_early"] and stats["steps"] < 30
    assert stats["best_step"] == best_step and stats["best_eval_loss"] == best_loss
    assert stats["steps"] == best_step + 2  # two evaluations without improvement
    saved = load_file(tmp_path / "ckpt" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert saved and all(torch.equal(params[k.replace(".weight", ".default.weight")], v) for k, v in saved.items())


def test_checkpoints_are_atomic_and_scoped_by_fingerprint(tmp_path, monkeypatch):
    from transformers import Trainer

    calls = {"n": 0}
    orig = Trainer._save_rng_state

    def dies_on_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-save")
        return orig(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_on_second_save)
    cfg = LoraConfig(lr=5e-3, max_steps=6, batch_size=4, warmup_ratio=0.0, save_steps=2, dev_fraction=0, dropout=0.0)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        _train(tmp_path, cfg)
    d = tmp_path / "ckpt"
    names = sorted(p.name for p in d.iterdir())
    # checkpoint-2 complete; checkpoint-4 was being written: only its staging folder exists
    assert "checkpoint-2" in names and "checkpoint-4" not in names
    assert any(n.startswith(".tmp-") for n in names)
    assert checkpoints.latest_checkpoint(d).endswith("checkpoint-2")
    assert json.loads((d / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    # the same fingerprint resumes from checkpoint-2 and cleans the staging folder up
    assert checkpoints.prepare_checkpoint_dir(d, "fp").endswith("checkpoint-2")
    assert not any(p.name.startswith(".tmp-") for p in d.iterdir())
    # another fingerprint (changed config or data) starts afresh
    assert checkpoints.prepare_checkpoint_dir(d, "other") is None
    assert [p.name for p in d.iterdir()] == [checkpoints.CKPT_STAMP]


@pytest.mark.integration
def test_packing_and_masks_on_smollm2():
    from lmladder.models import load_causal_lm

    model, tok, _ = load_causal_lm("smollm2-135m")
    fmt = ChatFormat(tok)
    eos = prompts.eos_token_ids(tok, model)
    feats = [sft.build_feature(fmt, m, a, 512, f"t:{i}", eos) for i, (m, a) in enumerate(zip(MSGS[:3], ANS[:3]))]
    for f, a in zip(feats, ANS):
        assert tok.decode([t for t in f.labels if t != -100]) == a + "<|im_end|>"
    separate = torch.cat([_token_losses(model, sft.Collator(tok.pad_token_id)(_rows([f]))) for f in feats])
    packed = _token_losses(model, sft.Collator(tok.pad_token_id, packing=True, keep_logits=True)(_rows(feats)))
    assert torch.allclose(packed, separate, atol=1e-4, rtol=0), (packed - separate).abs().max()
