"""The preference task kind and the dpo rung (TRL DPOTrainer) on the tiny model: bad
preference rows, exact masking of the batches TRL trains on, the DPO loss and margin on a
toy separable set, resume from a checkpoint, LoRA and full, and zero-shot -> lora -> dpo
(from lora) end to end."""

import json

import pytest
import torch

from conftest import write_jsonl
from lmladder.config import DataConfig, EvalConfig, TaskConfig
from lmladder.rungs.dpo import DpoConfig
from lmladder.data import read_examples
from lmladder.errors import LadderError
from lmladder.tasks.preference import PreferenceTask, pair_prediction

PREF_TRAIN = [{"prompt": f"Say something about item {i}.", "chosen": "yes good", "rejected": "zq xv"}
              for i in range(16)]
PREF_TEST = [{"prompt": f"Tell me about thing {i}.", "chosen": "yes good", "rejected": "zq xv"} for i in range(6)]


def _cfg(**kw):
    return DataConfig(input_field="prompt", **kw)


@pytest.mark.parametrize("row,msg", [
    ({"prompt": "hi", "chosen": "a"}, ":2: field 'rejected' missing"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, ":2: field 'rejected' is identical to chosen"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, ":2: field 'prompt' is empty"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, ":2: field 'chosen' is empty"),
    ({"prompt": "hi", "chosen": None, "rejected": "b"}, ":2: field 'chosen' missing"),
])
def test_bad_preference_rows(tmp_path, row, msg):
    p = write_jsonl(tmp_path / "p.jsonl", [PREF_TRAIN[0], row])
    with pytest.raises(LadderError) as e:
        read_examples(p, _cfg(), "train", "preference")
    assert f"{p}{msg}" in str(e.value)
    assert "\n" not in str(e.value)


def test_preference_rows_plain_and_conversational(tmp_path):
    rows = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "user", "content": "Hi?"}],
         "good": [{"role": "assistant", "content": "Hello!"}], "bad": [{"role": "assistant", "content": "No."}]},
    ]
    write_jsonl(tmp_path / "a.jsonl", rows[:1])
    write_jsonl(tmp_path / "b.jsonl", rows[1:])
    a = read_examples(tmp_path / "a.jsonl", _cfg(), "train", "preference")[0]
    b = read_examples(tmp_path / "b.jsonl", _cfg(chosen_field="good", rejected_field="bad"), "train", "preference")[0]
    assert (a.input, a.label, a.target, a.fields["rejected"]) == ("Hi?", "Hello!", True, "Go away.")
    assert (b.input, b.label, b.fields["chosen"], b.fields["rejected"]) == ("Hi?", "Hello!", "Hello!", "No.")
    task = PreferenceTask(TaskConfig(kind="preference"), [], EvalConfig(bootstrap=100), 0)
    assert task.answer(b) == "Hello!" and task.rejected(b) == "No." and task.gold(b) is True


def test_reward_accuracy_and_margin_on_known_predictions():
    task = PreferenceTask(TaskConfig(kind="preference"), [], EvalConfig(bootstrap=200), 0)
    preds = [pair_prediction(m)["pred"] for m in (2.0, 1.0, -1.0, 0.0)]
    assert [task.correct(p, True) for p in preds] == [True, True, False, False]  # a tie is not a win
    s = task.score([True] * 4, preds)
    assert s["reward_accuracy"]["value"] == pytest.approx(0.5)
    assert s["margin"]["value"] == pytest.approx(0.5)
    lo, hi = s["margin"]["ci"]
    assert -1.0 <= lo <= 0.5 <= hi <= 2.0
    assert task.score([True], [None])["reward_accuracy"]["value"] == 0.0



def _task():
    return PreferenceTask(TaskConfig(kind="preference"), [], EvalConfig(bootstrap=100), 0)


def test_collated_batch_masks_exactly_the_responses_and_end_of_turn(tiny, tmp_path):
    """The rows we hand TRL, as its collator batches them: the completion mask covers the
    response tokens and the template's end-of-turn token, nothing of the prompt."""
    import copy

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig

    from lmladder.prompts import eos_token_ids
    from lmladder.prompts import ChatFormat
    from lmladder.rungs.dpo import dpo_args, end_of_turn_id, pair_rows, trainer_class

    model, tok = tiny
    fmt, task = ChatFormat(tok), _task()
    rows = [{"prompt": "Hi there?", "chosen": "Hello, friend.", "rejected": "Go."},
            {"prompt": "Is it raining where you are, in general?", "chosen": "No.", "rejected": "Maybe yes"}]
    exs = read_examples(write_jsonl(tmp_path / "p.jsonl", rows), _cfg(), "train", "preference")
    eot = end_of_turn_id(fmt, eos_token_ids(tok, model), task.train_message(exs[0]), task.answer(exs[0]))
    assert eot == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    pairs, cut, cut_responses = pair_rows(task, fmt, exs, eot, 512, "truncate")
    assert cut == cut_responses == 0
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    args = DPOConfig(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, per_device_train_batch_size=2,
                     **dpo_args(DpoConfig()))
    tr = trainer_class()(model=pm, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    assert list(pm.peft_config) == ["default"]  # TRL's "ref" copy dropped: the reference is the adapter disabled
    batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])
    ids, mask, att = batch["input_ids"], batch["completion_mask"].bool(), batch["attention_mask"].bool()
    for i, e in enumerate(exs):
        prompt = fmt.prompt(task.train_message(e))
        n_p = len(fmt.encode(prompt))
        for row, text in ((i, e.fields["chosen"]), (i + 2, e.fields["rejected"])):  # chosen rows, then rejected
            n_r = len(tok(text, add_special_tokens=False).input_ids) + 1
            assert tok.decode(ids[row, :n_p]) == prompt
            assert not mask[row, :n_p].any()  # nothing of the prompt
            assert mask[row, n_p:n_p + n_r].all() and int(mask[row].sum()) == n_r  # response + <|im_end|>, no more
            assert tok.decode(ids[row][mask[row]]) == text + "<|im_end|>"
            assert int(att[row].sum()) == n_p + n_r  # and the rest is padding
    # the DPO loss at step 0 (policy == reference): log 2
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, batch)
    assert float(loss) == pytest.approx(0.6931, abs=1e-4)
    # TRL's fused-head forward is patched onto the model; the rung takes it off after training
    from lmladder.rungs.dpo import unpatch

    assert "forward" in pm.get_base_model().__dict__
    unpatch(pm)
    assert "forward" not in pm.get_base_model().__dict__


def test_too_long_pairs_cut_the_prompt_from_the_left_then_responses_from_the_end_or_stop(tiny, tmp_path):
    from lmladder.prompts import ChatFormat
    from lmladder.rungs.dpo import pair_rows

    _, tok = tiny
    fmt, task = ChatFormat(tok), _task()
    rows = [{"prompt": "short?", "chosen": "ok", "rejected": "no"},
            {"prompt": "a long question " * 10, "chosen": "fine then", "rejected": "no"}]
    p = write_jsonl(tmp_path / "p.jsonl", rows)
    exs = read_examples(p, _cfg(), "train", "preference")
    short, full = (len(fmt.encode(fmt.prompt(task.train_message(e)))) for e in exs)
    L = short + 20  # the short pair fits, the long one does not
    pairs, cut, cut_responses = pair_rows(task, fmt, exs, 7, L, "truncate")
    assert full + 10 > L and cut == 1 and cut_responses == 0
    assert pairs[0]["prompt_ids"] == fmt.encode(fmt.prompt(task.train_message(exs[0])))
    assert len(pairs[1]["prompt_ids"]) + len(pairs[1]["chosen_ids"]) == L
    assert pairs[1]["prompt_ids"] == fmt.encode(fmt.prompt(task.train_message(exs[1])))[full + 10 - L:]
    assert pairs[1]["chosen_ids"] == tok("fine then", add_special_tokens=False).input_ids + [7]
    with pytest.raises(LadderError) as e:
        pair_rows(task, fmt, exs, 7, L, "error")
    assert str(e.value).startswith(f"{p}:2: preference pair has {full + 10} tokens, more than dpo.max_length={L}")
    assert "\n" not in str(e.value)
    # a response longer than the room beside half of max_length of prompt: cut from the end
    # (its end-of-turn token with it), as TRL's max_completion_length; both keep their start
    (row,), cut, cut_responses = pair_rows(task, fmt, exs[1:], 7, 10, "truncate")
    assert cut == cut_responses == 1
    assert row["prompt_ids"] == fmt.encode(fmt.prompt(task.train_message(exs[1])))[-5:]
    assert row["chosen_ids"] == tok("fine ", add_special_tokens=False).input_ids  # 'fine then' + eot cut to 5
    assert row["rejected_ids"] == tok("no", add_special_tokens=False).input_ids + [7]  # fits whole


def _dpo_cli(tmp_path, out, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", PREF_TRAIN)
    test = write_jsonl(tmp_path / "test.jsonl", PREF_TEST)
    return ("run", "--train", str(train), "--test", str(test), "--task", "preference", "--input-field", "prompt",
            "--out", str(out), "-q", "--set", "eval.bootstrap=100", "--set", "judge.n=0",
            "--set", "dpo.lr=5e-3", "--set", "dpo.batch_size=4", "--set", "dpo.forgetting_text=null", *extra)


def test_dpo_loss_decreases_and_margin_grows(run_cli, tmp_path):
    """DPO through TRL with LoRA on a separable toy set: loss from log 2 down, the train
    margin grows every step, every held-out pair ends with a positive implicit reward margin."""
    out = tmp_path / "run"
    code, _, err = run_cli(*_dpo_cli(tmp_path, out, "--rungs", "dpo", "--set", "dpo.max_steps=8",
                                     "--set", "dpo.warmup_ratio=0"))
    assert code == 0, err
    r = json.loads((out / "rungs/dpo/result.json").read_text())
    d = r["details"]
    assert d["trainer"] == "trl.PretokenizedDPOTrainer" and d["steps"] == 8 and d["method"] == "lora"
    loss = d["loss_curve"]
    assert len(loss) == 8 and loss[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert loss[-1] < loss[0] - 0.05
    margins = [v for _, v in d["curves"]["rewards/margins"]]
    assert margins[0] == pytest.approx(0.0, abs=1e-5)
    assert all(b > a for a, b in zip(margins, margins[1:]))
    assert d["train_reward_accuracy_last"] == 1.0
    assert r["metrics"]["reward_accuracy"]["value"] == 1.0 and r["metrics"]["margin"]["value"] > 0
    rows = [json.loads(x) for x in (out / "rungs/dpo/predictions.jsonl").read_text().splitlines()]
    x = rows[0]  # the margin is beta * ((pc - rc) - (pr - rr))
    want = 0.1 * ((x["logp_chosen"] - x["ref_logp_chosen"]) - (x["logp_rejected"] - x["ref_logp_rejected"]))
    assert x["pred"]["margin"] == pytest.approx(want, abs=1e-6)


def test_interrupted_dpo_resumes_from_its_checkpoint_and_matches(run_cli, tmp_path, monkeypatch):
    """Stopped right after its step-4 checkpoint, a rerun with the same config resumes there
    and ends with the uninterrupted run's losses and adapter weights."""
    from safetensors.torch import load_file

    from lmladder.training import checkpoints

    args = ("--rungs", "dpo", "--set", "dpo.max_steps=8", "--set", "dpo.save_steps=2")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    code, _, err = run_cli(*_dpo_cli(tmp_path, whole, *args))
    assert code == 0, err

    save = checkpoints.AtomicCheckpoints._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 4:
            raise RuntimeError("killed after checkpoint 4")

    monkeypatch.setattr(checkpoints.AtomicCheckpoints, "_save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed after checkpoint 4"):
        run_cli(*_dpo_cli(tmp_path, stopped, *args))
    monkeypatch.undo()
    ckpts = stopped / "rungs/dpo/checkpoints"
    assert sorted(c.name for c in ckpts.iterdir() if c.name.startswith("checkpoint-")) == ["checkpoint-2",
                                                                                          "checkpoint-4"]
    code, _, err = run_cli(*_dpo_cli(tmp_path, stopped, *args))
    assert code == 0, err
    a, b = (json.loads((o / "rungs/dpo/result.json").read_text())["details"] for o in (whole, stopped))
    assert a["resumed_from"] is None and b["resumed_from"] == 4
    assert a["steps"] == b["steps"] == 8
    # the log history of steps 1..4 comes back with the checkpoint; 5..8 are trained again
    assert len(a["loss_curve"]) == len(b["loss_curve"]) == 8
    assert max(abs(x - y) for x, y in zip(a["loss_curve"], b["loss_curve"])) < 1e-5
    assert a["loss_curve"][-1] < a["loss_curve"][3]  # steps 5..8 did train
    wa, wb = (load_file(o / "rungs/dpo/adapter/adapter_model.safetensors") for o in (whole, stopped))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    assert not ckpts.exists()  # removed once the adapter is saved


def test_zero_shot_lora_dpo_end_to_end(run_cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*_dpo_cli(
        tmp_path, out, "--rungs", "zero-shot,lora,dpo", "--set", "lora.max_steps=2", "--set", "lora.batch_size=4",
        "--set", "lora.forgetting_text=null", "--set", "dpo.forgetting_text=builtin", "--set", "dpo.from=lora",
        "--set", "dpo.max_steps=8", "--set", "judge.n=2", "--set", "judge.max_new_tokens=4",
    ))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    by = {r["name"]: r for r in res["rungs"]}
    assert list(by) == ["zero-shot", "lora", "dpo"]
    for name in by:
        m = by[name]["metrics"]
        assert set(m) >= {"reward_accuracy", "margin"}
        assert 0.0 <= m["reward_accuracy"]["value"] <= 1.0
    dpo = json.loads((out / "rungs/dpo/result.json").read_text())
    d = dpo["details"]
    assert d["steps"] == 8 and d["from"]["rung"] == "lora" and dpo["cost"]["trainable_params"] > 0
    assert d["loss_last"] < d["loss_first"]
    f = d["forgetting"]
    assert f["tokens"] > 0 and f["ppl_before"] > 0 and f["ppl_after"] > 0
    # the same chosen/rejected on every test pair: dpo learns to prefer chosen everywhere
    assert dpo["metrics"]["reward_accuracy"]["value"] == 1.0 and dpo["metrics"]["margin"]["value"] > 0
    assert (out / "rungs/dpo/adapter/adapter_model.safetensors").is_file()
    assert not (out / "rungs/dpo/adapter/ref").exists()  # only our adapter is saved
    rows = [json.loads(x) for x in (out / "rungs/dpo/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["correct"] for r in rows)


def test_dpo_from_must_be_in_rungs(run_cli, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", PREF_TRAIN)
    code, _, err = run_cli("run", "--train", str(train), "--task", "preference", "--input-field", "prompt",
                           "--rungs", "zero-shot,dpo", "--set", "dpo.from=lora", "--out", str(tmp_path / "r"))
    assert code == 2 and "dpo.from: 'lora' is not in rungs" in err


def test_dpo_full_method_without_from(run_cli, tmp_path):
    """All weights of a private copy train; the reference log-probs are precomputed by TRL
    (no second copy); the model is saved whole."""
    out = tmp_path / "run"
    code, _, err = run_cli(*_dpo_cli(tmp_path, out, "--rungs", "dpo", "--set", "dpo.method=full",
                                     "--set", "dpo.max_steps=4", "--set", "dpo.lr=1e-3"))
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())["rungs"][0]
    d = r["details"]
    assert d["method"] == "full" and d["steps"] == 4 and "precomputed" in d["reference"]
    assert d["loss_first"] == pytest.approx(0.6931, abs=1e-3) and d["loss_last"] < d["loss_first"]
    assert r["artifacts"] == {"model": "model"}
    assert (out / "rungs/dpo/model/model.safetensors").is_file()
