"""The reward-model rung and its scorer on the tiny model: exact rendering (prompt +
response + end-of-turn, pad distinct from end-of-turn, score read at the end-of-turn),
ranking a separable toy set after training (chance before), the saved model reloading
with the same scores, best-of-n picking the reward model's argmax, ordering /
fingerprints, and one-line config errors."""

import copy
import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl
from lmladder.cli import main
from lmladder.prompts import ChatFormat
from lmladder.rungs.reward_model import (
    RewardScorer, default_folder, end_of_turn_ids, pick_pad_id, render_ids, score_ids, seqcls_from_causal,
)

WORDS = ["apple", "river", "stone", "cloud", "green", "piano", "tiger", "lemon", "house", "night", "paper", "smile"]


GOOD, BAD = ["sure", "glad", "nice", "kind"], ["zzzz", "ughh", "meh.", "grrr"]


def _pairs(n, tag, seed):
    """Separable: the chosen response has a word from GOOD, the rejected one from BAD (a
    different pair of words each time, so an untrained model's preference is a coin toss)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w1, w2 = rng.sample(WORDS, 2)
        rows.append({"prompt": f"{tag} {i}: tell me about {w1}.", "chosen": f"{rng.choice(GOOD)} {w2}",
                     "rejected": f"{rng.choice(BAD)} {w2}"})
    return rows


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """One reward-model run (LoRA, 16 steps) on the toy pairs; (run folder, test rows)."""
    d = tmp_path_factory.mktemp("rm")
    train_rows = _pairs(32, "q", 0)
    train = write_jsonl(d / "train.jsonl", train_rows)
    test_rows = _pairs(12, "t", 1)
    test = write_jsonl(d / "test.jsonl", test_rows)
    out = d / "run"
    from trl.trainer.reward_trainer import DataCollatorForPreference

    batches = []
    real = DataCollatorForPreference.torch_call

    def recording(self, examples):
        batch = real(self, examples)
        batches.append(batch)
        return batch

    with pytest.MonkeyPatch.context() as mp:  # record what TRL feeds the model
        mp.setattr(DataCollatorForPreference, "torch_call", recording)
        code = main(["run", "--model", str(tiny_dir), "--train", str(train), "--test", str(test), "--task", "preference",
                     "--input-field", "prompt", "--rungs", "reward-model", "--out", str(out), "-q",
                     "--set", "eval.bootstrap=100", "--set", "reward-model.max_steps=20", "--set", "reward-model.lr=5e-3",
                     "--set", "reward-model.batch_size=8"])
    assert code == 0
    first = json.loads((out / "rungs/reward-model/result.json").read_text())  # before any rerun
    return out, test_rows, train_rows, batches, first


def test_render_ids_exact_and_pad_not_end_of_turn(tiny):
    model, tok = tiny
    fmt = ChatFormat(tok)
    eot = end_of_turn_ids(tok, model)
    ids, cut = render_ids(fmt, "Hi?", "yes sir", 512, eot)
    assert cut == 0
    assert tok.decode(ids) == "<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n" \
                              "<|im_start|>assistant\nyes sir<|im_end|>"
    assert ids[:len(fmt.encode(fmt.prompt("Hi?")))] == fmt.encode(fmt.prompt("Hi?"))
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and ids[-1] in eot
    # the fixture tokenizer ships pad == eos: the reward model must pad with something else
    tok_trap = copy.deepcopy(tok)
    tok_trap.pad_token = "<|im_end|>"
    pad = pick_pad_id(tok_trap, eot)
    assert pad not in eot and pad == tok.convert_tokens_to_ids("<|endoftext|>")
    # too long: the prompt is cut from the left, the response kept, end-of-turn last
    short, cut = render_ids(fmt, "Hi?", "yes sir", 20, eot)
    assert len(short) == 20 and cut == len(ids) - 20 and short[-9:] == ids[-9:]
    tiny_len, _ = render_ids(fmt, "Hi?", "a very long response indeed", 10, eot)
    assert len(tiny_len) == 10 and tiny_len[-1] in eot
    # empty response (a generation that stopped at once) still renders, ending in end-of-turn
    empty, _ = render_ids(fmt, "Hi?", "", 512, eot)
    assert empty[-1] in eot and tok.decode(empty).endswith("assistant\n<|im_end|>")


def test_score_is_read_at_the_end_of_turn_with_padding(tiny):
    """Batched right-padded scores == the score head on the last (end-of-turn) hidden
    state of each unpadded sequence."""
    model, tok = tiny
    fmt = ChatFormat(tok)
    eot = end_of_turn_ids(tok, model)
    torch.manual_seed(0)
    rm = seqcls_from_causal(model)
    pad = pick_pad_id(tok, eot)
    rm.config.pad_token_id = pad
    rm.eval()
    seqs = [render_ids(fmt, m, r, 512, eot)[0] for m, r in [("Hi?", "yes"), ("Tell me a long story.", "no no no no")]]
    batched = score_ids(rm, seqs, pad, batch_size=2)
    with torch.no_grad():
        for s, b in zip(seqs, batched):
            h = rm.model(torch.tensor([s])).last_hidden_state[0, -1]
            assert b == pytest.approx(float(rm.score(h)[0]), abs=1e-5)
    # the backbone is a copy of the causal LM's, not shared with it
    assert rm.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(rm.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_reward_model_ranks_separable_toy_set(trained, tiny):
    out, test_rows, _, _, r = trained
    model, tok = tiny
    fmt = ChatFormat(tok)
    # untrained (fresh score head on the base): about chance on the same held-out pairs
    eot = end_of_turn_ids(tok, model)
    torch.manual_seed(0)
    fresh = seqcls_from_causal(model)
    pad = pick_pad_id(tok, eot)
    fresh.config.pad_token_id = pad
    fresh.eval()
    seqs = [render_ids(fmt, fmt_msg, x, 512, eot)[0]
            for row in test_rows for fmt_msg in [_message(row)] for x in (row["chosen"], row["rejected"])]
    s = score_ids(fresh, seqs, pad)
    untrained = sum(s[2 * i] > s[2 * i + 1] for i in range(len(test_rows))) / len(test_rows)
    assert 0.2 <= untrained <= 0.8
    # trained: every held-out pair ranked right
    assert r["metrics"]["reward_accuracy"]["value"] == 1.0 and r["metrics"]["margin"]["value"] > 0.5
    d = r["details"]
    assert d["trainer"] == "trl.RewardTrainer" and d["steps"] == 20 and d["method"] == "lora"
    assert 0 < d["trainable_params"] == r["cost"]["trainable_params"] and r["cost"]["train_seconds"] > 0
    assert d["forgetting_check"].startswith("not applicable") and "forgetting" not in d
    assert d["curves"]["accuracy"] and d["curves"]["loss"][0][1] > d["curves"]["loss"][-1][1]
    assert d["pad_token_id"] not in eot
    folder = default_folder(out)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not (folder / "adapter_config.json").exists()  # merged, a plain classifier
    assert not (out / "rungs/reward-model/checkpoints").exists()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1
    assert cfg["pad_token_id"] == d["pad_token_id"]
    # reloaded through the scorer API: the same scores as the rung's predictions
    scorer = RewardScorer.from_folder(folder, fmt)
    rows = [json.loads(line) for line in (out / "rungs/reward-model/predictions.jsonl").read_text().splitlines()]
    msgs = [_message(row) for row in test_rows]
    got_c = scorer(msgs, [row["chosen"] for row in test_rows])
    got_r = scorer(msgs, [row["rejected"] for row in test_rows])
    for row, c, rj in zip(rows, got_c, got_r):
        assert c == pytest.approx(row["reward_chosen"], abs=1e-5)
        assert rj == pytest.approx(row["reward_rejected"], abs=1e-5)
        assert row["correct"] is True
    assert scorer.calls == 24


def test_trl_trains_on_exactly_our_rendering(trained, tiny):
    """Every row TRL's collator hands the model is one of our rendered sequences (chosen
    first, rejected second half), right-padded with a pad that is not the end-of-turn."""
    _, _, train_rows, batches, _ = trained
    model, tok = tiny
    fmt = ChatFormat(tok)
    eot = end_of_turn_ids(tok, model)
    chosen = {tuple(render_ids(fmt, _message(r), r["chosen"], 512, eot)[0]) for r in train_rows}
    rejected = {tuple(render_ids(fmt, _message(r), r["rejected"], 512, eot)[0]) for r in train_rows}
    pad = pick_pad_id(tok, eot)
    assert len(batches) >= 20
    for b in batches[:3]:
        n = b["input_ids"].shape[0] // 2
        for k, (ids, att) in enumerate(zip(b["input_ids"].tolist(), b["attention_mask"].tolist())):
            seq = tuple(ids[: sum(att)])
            assert seq in (chosen if k < n else rejected)
            assert seq[-1] in eot and all(t == pad for t in ids[sum(att):])


def _message(row):
    from lmladder.config import EvalConfig, TaskConfig
    from lmladder.tasks.preference import PreferenceTask

    task = PreferenceTask(TaskConfig(kind="preference"), [], EvalConfig(bootstrap=100), 0)
    return task.user_message(row["prompt"])


def test_rerun_reuses_saved_model(trained, tiny_dir):
    out = trained[0]
    before = (default_folder(out) / "model.safetensors").stat().st_mtime_ns
    cfg_path = out / "config.yaml"
    code = main(["run", str(cfg_path), "--out", str(out), "-q", "--force"])
    assert code == 0
    r = json.loads((out / "rungs/reward-model/result.json").read_text())
    assert r["details"]["reused_model"] is True and r["metrics"]["reward_accuracy"]["value"] == 1.0
    assert (default_folder(out) / "model.safetensors").stat().st_mtime_ns == before


def test_killed_run_resumes_from_checkpoint_and_matches(trained, tiny_dir, tmp_path, monkeypatch):
    """Killed after 12 of 20 steps, rerun: resumes from the newest complete checkpoint and
    ends with the uninterrupted run's loss and scores."""
    from trl import RewardTrainer

    out, _, _, _, first = trained
    src = out.parent
    real = RewardTrainer.training_step

    class Killed(Exception):
        pass

    def dies(self, *a, **k):
        if self.state.global_step == 12:
            raise Killed
        return real(self, *a, **k)

    run = tmp_path / "resumed"
    args = ["run", "--model", str(tiny_dir), "--train", str(src / "train.jsonl"), "--test", str(src / "test.jsonl"),
            "--task", "preference", "--input-field", "prompt", "--rungs", "reward-model", "--out", str(run), "-q",
            "--set", "eval.bootstrap=100", "--set", "reward-model.max_steps=20", "--set", "reward-model.lr=5e-3",
            "--set", "reward-model.batch_size=8"]
    monkeypatch.setattr(RewardTrainer, "training_step", dies)
    with pytest.raises(Killed):
        main(args)
    ckpts = run / "rungs/reward-model/checkpoints"
    assert (ckpts / "checkpoint-12").is_dir() and not (run / "rungs/reward-model/model").exists()
    monkeypatch.setattr(RewardTrainer, "training_step", real)
    assert main(args) == 0
    a = first["details"]
    b = json.loads((run / "rungs/reward-model/result.json").read_text())["details"]
    assert b["resumed_from"] == 12 and b["steps"] == 20 and not ckpts.exists()
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-5)
    pa = [json.loads(line) for line in (out / "rungs/reward-model/predictions.jsonl").read_text().splitlines()]
    pb = [json.loads(line) for line in (run / "rungs/reward-model/predictions.jsonl").read_text().splitlines()]
    for x, y in zip(pa, pb):
        assert y["reward_chosen"] == pytest.approx(x["reward_chosen"], abs=1e-4)
        assert y["reward_rejected"] == pytest.approx(x["reward_rejected"], abs=1e-4)


def test_best_of_n_picks_reward_model_argmax(trained, run_cli, tmp_path, monkeypatch):
    """Scripted candidates (labels with different texts); the pick is the candidate the
    saved reward model scores highest, computed here independently with RewardScorer."""
    from lmladder.rungs import best_of_n

    out = trained[0]
    folder = default_folder(out)
    texts = ["zzzz pos", "grrr neg", "sure pos", "ughh neg, meh.", "no"]

    def scripted(rung, cfg, n=1, do_sample=False, desc=None):
        recs = []
        for k, _ in enumerate(rung.ctx.data.test):
            cs = [{"pred": ("pos" if "pos" in t else "neg") if t != "no" else None, "raw": t,
                   "error": None if t != "no" else "unparseable"} for t in texts[k:] + texts[:k]]
            recs.append({**cs[0], "samples": cs})
        return recs, {"prompt_tokens_per_example": 10.0, "generation": {"prefill_tokens": 0}}

    monkeypatch.setattr(best_of_n, "reasoning_predict", scripted)
    seen = []
    real_call = RewardScorer.__call__

    def recording(self, messages, responses):
        seen.append((list(messages), list(responses)))
        return real_call(self, messages, responses)

    monkeypatch.setattr(RewardScorer, "__call__", recording)
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", TEST_ROWS[:4])
    run = tmp_path / "bon"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "best-of-n", "--out", str(run),
                           "-q", "--set", "eval.bootstrap=100", "--set", "best-of-n.n=5",
                           "--set", f"best-of-n.verifier=reward-model:{folder}")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "rungs/best-of-n/predictions.jsonl").read_text().splitlines()]
    res = json.loads((run / "rungs/best-of-n/result.json").read_text())
    (msgs, resps), = seen  # one batched pass, unparseable candidates not scored
    assert len(msgs) == 4 * 4 and "no" not in resps
    monkeypatch.setattr(RewardScorer, "__call__", real_call)
    fresh = RewardScorer.from_folder(folder, ChatFormat(AutoTokenizer.from_pretrained(folder)))
    for k, (row, ex) in enumerate(zip(rows, TEST_ROWS[:4])):
        m = msgs[4 * k]
        assert ex["text"] in m and "step by step" in m  # the prompt the candidates answered
        cand = [c["raw"] for c in row["samples"]]
        ok = [j for j, c in enumerate(row["samples"]) if c["pred"] is not None]
        ref = fresh([m] * len(ok), [cand[j] for j in ok])
        best = ok[max(range(len(ok)), key=lambda t: ref[t])]
        assert row["chosen"] == best and row["raw"] == cand[best] and row["verifier"] == "reward-model"
        for j, v in zip(ok, ref):
            assert row["samples"][j]["score"] == pytest.approx(v, abs=1e-3)
        assert [c["score"] for c in row["samples"] if c["pred"] is None] == [None]  # unparseable: unscored
    assert len({row["chosen"] for row in rows}) > 1  # the winner moves with the candidates
    d = res["details"]
    assert d["verifier"] == {"reward-model": 4} and d["reward_model"] == str(folder)
    assert d["judge_calls_per_example"] == 4.0 and d["judge_prompt_tokens_per_example"] > 0


def test_reward_model_ordered_before_best_of_n_and_in_its_fingerprint(tiny_dir, tmp_path):
    from lmladder import config as config_mod
    from lmladder.run.context import Context
    from lmladder.run.ladder import run_order

    cfg = config_mod.build({"rungs": ["zero-shot", "best-of-n", "reward-model"],
                            "best-of-n": {"verifier": "reward-model"}})
    assert run_order(cfg) == ["zero-shot", "reward-model", "best-of-n"]
    plain = config_mod.build({"rungs": ["zero-shot", "best-of-n", "reward-model"]})
    assert run_order(plain) == ["zero-shot", "best-of-n", "reward-model"]  # unchanged without the verifier

    def fp(c):
        return Context(c, None, None, tmp_path).fingerprint("best-of-n")

    other = config_mod.build({"rungs": ["zero-shot", "best-of-n", "reward-model"],
                              "best-of-n": {"verifier": "reward-model"}, "reward-model": {"lr": 1e-3}})
    assert fp(cfg) != fp(other)  # another reward model: best-of-n reruns
    assert fp(plain) == fp(config_mod.build({"rungs": ["zero-shot", "best-of-n", "reward-model"],
                                             "reward-model": {"lr": 1e-3}}))


@pytest.mark.parametrize("sets,msg", [
    (["--rungs", "best-of-n", "--set", "best-of-n.verifier=reward-model"],
     "best-of-n.verifier: reward-model needs the reward-model rung in rungs"),
    (["--rungs", "best-of-n", "--set", "best-of-n.verifier=reward-model:/nonexistent/rm"],
     "best-of-n.verifier: /nonexistent/rm: no saved reward model there"),
    (["--rungs", "best-of-n", "--set", "best-of-n.verifier=oracle"],
     "give auto, programmatic, judge, reward-model or reward-model:<folder>"),
    (["--rungs", "reward-model"], "rung reward-model does not support task kind classification"),
])
def test_bad_reward_model_configs_are_one_line(run_cli, toy_data, tmp_path, sets, msg):
    train, test = toy_data
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "r"), *sets)
    assert code == 2 and msg in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing written before the error
