"""The grpo rung and the built-in rewards on the tiny model: exact reward values on known
completions, one-line errors for bad reward settings, GRPO raising a toy reward (with the
prompts TRL samples from being exactly our chat-templated prompts and completions ending
at the end-of-turn token), the shared base handed back untouched, and the report's
training-curves figure."""

import json
import textwrap

import pytest
import torch

from conftest import write_jsonl
from lmladder.config import EvalConfig, TaskConfig
from lmladder.data import Example

MATH_TRAIN = [{"question": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(16)]
MATH_TEST = [{"question": f"What is {i} plus 2?", "answer": str(i + 2)} for i in (0, 2, 3)]  # 1 plus 2 is in train


def _ex(i, label, **kw):
    return Example(id=str(i), input=f"q{i}", label=label, source=f"t.jsonl:{i + 1}", **kw)


def test_builtin_math_reward_exact_values():
    """1.0 exactly when the number the math metric parses from the completion equals the gold."""
    from lmladder.rewards import builtin
    from lmladder.tasks.math import MathTask

    task = MathTask(TaskConfig(kind="math"), [], EvalConfig(bootstrap=100), 0)
    exs = [_ex(0, "42"), _ex(1, "Half of 2,000 is 1,000.\n#### 1,000"), _ex(2, "12")]
    reward = builtin(task, exs)
    assert reward.__name__ == "exact_numeric"  # logged as rewards/exact_numeric/mean
    cases = [
        ("42", 0, 1.0),
        ("The answer is 42.", 0, 1.0),
        ("42\nand then 17 more", 0, 1.0),  # direct answers: the first line's number first
        ("41", 0, 0.0),
        ("", 0, 0.0),
        ("no idea", 0, 0.0),
        ("$1,000", 1, 1.0),
        ("1000.00", 1, 1.0),
        ("100", 1, 0.0),
        ("12.0", 2, 1.0),
        ("-12", 2, 0.0),
    ]
    got = reward(completions=[c for c, _, _ in cases], example_index=[i for _, i, _ in cases],
                 prompts=["p"] * len(cases), gold=["unused"] * len(cases))
    assert got == [want for _, _, want in cases]


def test_builtin_label_match_and_schema_validity():
    from lmladder.rewards import builtin
    from lmladder.tasks.classification import ClassificationTask
    from lmladder.tasks.extraction import ExtractionTask

    cls = ClassificationTask(TaskConfig(kind="classification"), ["neg", "pos"], EvalConfig(bootstrap=100), 0)
    exs = [_ex(0, "pos"), _ex(1, "neg")]
    r = builtin(cls, exs)
    assert r.__name__ == "label_match"
    assert r(completions=["pos", "Pos.", "neg", "positive", "pos"], example_index=[0, 0, 0, 0, 1]) == [
        1.0, 1.0, 0.0, 0.0, 0.0]
    ext = ExtractionTask(TaskConfig(kind="extraction", schema=["name"]), [], EvalConfig(bootstrap=100), 0)
    r = builtin(ext, [_ex(0, '{"name": "Ann"}')])
    assert r.__name__ == "schema_valid"
    outs = ['{"name": "Bob"}', '```json\n{"name": null}\n```', '{"nam": "Ann"}', "Ann", '{"name": ["x"]}']
    assert r(completions=outs, example_index=[0] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def _math_cli(tmp_path, out, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", MATH_TRAIN)
    test = write_jsonl(tmp_path / "test.jsonl", MATH_TEST)
    return ("run", "--train", str(train), "--test", str(test), "--task", "math", "--input-field", "question",
            "--label-field", "answer", "--out", str(out), "-q", "--set", "eval.bootstrap=100",
            "--set", "eval.max_new_tokens=4", "--set", "grpo.forgetting_text=null",
            "--set", "grpo.max_completion_length=16", *extra)


@pytest.mark.parametrize("sets,msg", [
    (["grpo.rewards=[no_such_module_xyz:score]"], "grpo.rewards: 'no_such_module_xyz:score': cannot import"),
    (["grpo.rewards=[json:no_such_fn]"], "grpo.rewards: 'json:no_such_fn': 'json' has no function 'no_such_fn'"),
    (["grpo.rewards=[bogus]"], "grpo.rewards: 'bogus' is not builtin, reward-model[:folder] or module:function"),
    (["grpo.rewards=[reward-model]"], "grpo.rewards: 'reward-model' scores with the reward-model rung of this run"),
    (["grpo.rewards=[builtin, builtin]"], "grpo.rewards: a reward is listed twice"),
    (["grpo.batch_size=3"], "grpo: batch_size x grad_accum = 3 completions per step must be a multiple of "
                            "num_generations=4"),
    (["grpo.reward_weights=[1, 2]"], "grpo.reward_weights: 2 weights for 1 rewards"),
    (["grpo.max_length=16"], "grpo.max_length=16 must exceed max_completion_length=16"),
])
def test_bad_reward_settings_are_one_line_errors(run_cli, tmp_path, sets, msg):
    extra = [x for s in sets for x in ("--set", s)]
    out = tmp_path / "run"
    code, _, err = run_cli(*_math_cli(tmp_path, out, "--rungs", "grpo", *extra))
    assert code == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # stopped before anything was written


def test_no_builtin_reward_for_generation(run_cli, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"hi {i}", "label": "hello"} for i in range(4)])
    code, _, err = run_cli("run", "--train", str(train), "--task", "generation", "--rungs", "grpo",
                           "--out", str(tmp_path / "r"))
    assert code == 2 and "grpo.rewards: no built-in reward for task kind generation" in err


REWARD_PY = textwrap.dedent('''
    import json, os

    def digits(prompts, completions, completion_ids, message, gold, example_index, **kw):
        """Toy reward: the share of digit characters in the completion; records its inputs."""
        with open(os.environ["GRPO_TEST_LOG"], "a") as f:
            for p, c, ids, m, g, i in zip(prompts, completions, completion_ids, message, gold, example_index):
                f.write(json.dumps({"prompt": p, "completion": c, "ids": ids, "message": m, "gold": g,
                                    "index": i}) + "\\n")
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
''')


def test_grpo_raises_a_toy_reward(run_cli, tmp_path, tiny, monkeypatch):
    """GRPO (full weights, high lr) on 'share of digits': the mean reward of the last steps
    beats the first steps'. The reward sees exactly our chat-templated prompt and the
    gold; every completion stops at the first end-of-turn token or at the length cap.
    The report draws the reward curve."""
    from lmladder.inference.generate import stop_ids
    from lmladder.prompts import ChatFormat
    from lmladder.tasks.math import gold_number

    (tmp_path / "toyreward.py").write_text(REWARD_PY)
    log = tmp_path / "seen.jsonl"
    monkeypatch.setenv("GRPO_TEST_LOG", str(log))
    out = tmp_path / "run"
    code, _, err = run_cli(*_math_cli(
        tmp_path, out, "--rungs", "grpo", "--set", f"grpo.rewards=[{tmp_path / 'toyreward.py'}:digits]",
        "--set", "grpo.method=full", "--set", "grpo.lr=0.05", "--set", "grpo.max_steps=12",
        "--set", "grpo.num_generations=8", "--set", "grpo.batch_size=8", "--set", "grpo.checkpoints=false"))
    assert code == 0, err
    r = json.loads((out / "rungs/grpo/result.json").read_text())
    d = r["details"]
    assert d["trainer"] == "trl.LadderGRPOTrainer" and d["steps"] == 12 and d["method"] == "full"
    reward = [v for _, v in d["curves"]["reward"]]
    assert len(reward) == 12 and [s for s, _ in d["curves"]["reward"]] == list(range(1, 13))
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.05
    assert d["reward_last"] > d["reward_first"]
    assert d["curves"]["rewards/digits/mean"] == d["curves"]["reward"]  # one reward: the sum is it
    assert "exact_match" in r["metrics"] and r["cost"]["trainable_params"] == d["trainable_params"] > 0

    model, tok = tiny
    fmt = ChatFormat(tok)
    stops = set(stop_ids(tok, model))
    assert tok.convert_tokens_to_ids("<|im_end|>") in set(d["stop_ids"]) and stops <= set(d["stop_ids"])
    seen = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(seen) == 12 * 8
    for s in seen:
        assert s["prompt"] == fmt.prompt(s["message"])  # the chat template's text, as inference rungs send
        assert s["message"].endswith(f"Input: {MATH_TRAIN[s['index']]['question']}\nAnswer:")
        assert s["gold"] == gold_number(MATH_TRAIN[s["index"]]["answer"])
        ids = s["ids"]
        assert 1 <= len(ids) <= 16
        assert not any(t in stops for t in ids[:-1])  # nothing after the first end of turn
        assert ids[-1] in stops or len(ids) == 16
        assert s["completion"] == tok.decode(ids, skip_special_tokens=True)

    assert (out / "curves-grpo.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Training curves" in md and "![grpo training curves](curves-grpo.png)" in md
    assert f"Mean reward {d['reward_first']:.3f} (first steps)" in md
    assert "grpo training curves" in (out / "report.html").read_text()


def test_grpo_lora_builtin_hands_the_base_back_untouched(tmp_path, tiny_dir):
    """The rung's whole life (prepare, fit with the built-in math reward, predict, close)
    on a shared base: afterwards its weights, forward, EOS / pad ids and frozen state are
    as before; the adapter is saved, and a rerun with the same fingerprint reuses it."""
    from lmladder import config as C
    from lmladder.run import ladder
    from lmladder.rungs.grpo import Grpo
    from lmladder.tasks import make_task

    write_jsonl(tmp_path / "train.jsonl", MATH_TRAIN[:8])
    write_jsonl(tmp_path / "test.jsonl", MATH_TEST)
    cfg = C.build({"task": {"kind": "math"}, "model": str(tiny_dir), "rungs": ["grpo"],
                   "data": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl"),
                            "input_field": "question", "label_field": "answer"},
                   "eval": {"max_new_tokens": 4, "bootstrap": 100},
                   "grpo": {"max_steps": 2, "max_completion_length": 8, "forgetting_text": None, "lr": 1e-3}})
    dataset = ladder.validate(cfg)
    task = make_task(cfg.task, dataset.info["labels"], cfg.eval, cfg.seed, dataset)
    ctx = ladder.Context(cfg, dataset, task, tmp_path / "run")
    base, _ = ctx.base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    eos, pad = base.generation_config.eos_token_id, base.generation_config.pad_token_id

    def life():
        rung = Grpo(ctx, cfg.grpo, tmp_path / "run/rungs/grpo")
        rung.prepare()
        stats = rung.fit()
        preds, _ = rung.predict()
        rung.close()
        return stats, preds

    stats, preds = life()
    assert stats["steps"] == 2 and stats["rewards"] == ["builtin"] and "rewards/exact_numeric/mean" in stats["curves"]
    assert len(preds) == len(MATH_TEST) and (tmp_path / "run/rungs/grpo/adapter/adapter_config.json").is_file()
    b, _ = ctx.base()
    assert b is base and "forward" not in vars(b)  # TRL's fused-LM-head patch removed
    assert (b.generation_config.eos_token_id, b.generation_config.pad_token_id) == (eos, pad)
    assert not any(p.requires_grad for p in b.parameters()) and not b.training
    after = b.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    stats2, preds2 = life()
    assert stats2["reused_adapter"] is True and preds2 == preds


def test_reward_model_reward_scores_message_and_completion(tmp_path, monkeypatch):
    """'reward-model' / 'reward-model:<folder>': the reward-model rung's scorer gets the user
    messages and the completions, in order; a missing folder is a one-line error."""
    from lmladder import rewards
    from lmladder.errors import LadderError
    from lmladder.rungs import reward_model as rm

    calls = []

    class FakeScorer:
        def __call__(self, messages, responses):
            calls.append((messages, responses))
            return [len(r) / 10 for r in responses]

    monkeypatch.setattr(rm.RewardScorer, "from_folder", classmethod(lambda cls, folder, fmt: FakeScorer()))
    folder = rm.default_folder(tmp_path)
    folder.mkdir(parents=True)
    [fn] = rewards.resolve(["reward-model"], None, [], fmt=None, run_dir=tmp_path)
    assert fn.__name__ == "reward_model"
    assert fn(prompts=["p1", "p2"], completions=["abc", "abcdef"], message=["m1", "m2"]) == [0.3, 0.6]
    assert calls == [(["m1", "m2"], ["abc", "abcdef"])]
    [fn2] = rewards.resolve([f"reward-model:{folder}"], None, [], fmt=None, run_dir=tmp_path / "elsewhere")
    assert fn2(completions=["a"], message=["m"]) == [0.1]
    with pytest.raises(LadderError, match=r"grpo.rewards: 'reward-model:/no/such': /no/such: no such folder"):
        rewards.check(["reward-model:/no/such"], "math", ["grpo"])


def test_interrupted_grpo_resumes_from_its_checkpoint(run_cli, tmp_path, monkeypatch):
    """Stopped right after its step-2 checkpoint, a rerun with the same config resumes there
    (sampler position and RNG state come back with the checkpoint) and ends like the
    uninterrupted run: same rewards per step, same weights."""
    from safetensors.torch import load_file

    from lmladder.training import checkpoints

    (tmp_path / "toyreward.py").write_text(REWARD_PY)
    monkeypatch.setenv("GRPO_TEST_LOG", str(tmp_path / "seen.jsonl"))
    args = ("--rungs", "grpo", "--set", "grpo.max_steps=4", "--set", "grpo.save_steps=2",
            "--set", "grpo.lr=1e-2", "--set", "grpo.max_completion_length=8",
            "--set", f"grpo.rewards=[{tmp_path / 'toyreward.py'}:digits]")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    code, _, err = run_cli(*_math_cli(tmp_path, whole, *args))
    assert code == 0, err
    save = checkpoints.AtomicCheckpoints._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 2:
            raise RuntimeError("killed after checkpoint 2")

    monkeypatch.setattr(checkpoints.AtomicCheckpoints, "_save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed after checkpoint 2"):
        run_cli(*_math_cli(tmp_path, stopped, *args))
    monkeypatch.setattr(checkpoints.AtomicCheckpoints, "_save_checkpoint", save)
    code, _, err = run_cli(*_math_cli(tmp_path, stopped, *args))
    assert code == 0, err
    a, b = (json.loads((o / "rungs/grpo/result.json").read_text())["details"] for o in (whole, stopped))
    assert a["resumed_from"] is None and b["resumed_from"] == 2 and a["steps"] == b["steps"] == 4
    ra, rb = a["curves"]["reward"], b["curves"]["reward"]
    assert len(ra) == len(rb) == 4 and max(abs(x[1] - y[1]) for x, y in zip(ra, rb)) < 1e-6
    assert a["curves"]["completions/mean_length"] == b["curves"]["completions/mean_length"]
    wa, wb = (load_file(o / "rungs/grpo/adapter/adapter_model.safetensors") for o in (whole, stopped))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    assert max(v.abs().max().item() for k, v in wa.items() if "lora_B" in k) > 0  # it did train
    assert not (stopped / "rungs/grpo/checkpoints").exists()


def test_report_curves_figure_per_rung_with_curves(tmp_path):
    """The report draws a curves figure for each rung with details.curves (reward for an RL
    rung; loss and reward margin for a preference rung) and none for a rung without."""
    from lmladder import report

    assert report.curve_series({"loss": [[1, 0.1]], "reward": [[1, 0.5]], "reward_std": [[1, 0.1]]}) == ["reward"]
    dpo = {"loss": [[1, 0.69], [2, 0.6]], "rewards/margins": [[1, 0.0], [2, 0.1]], "rewards/chosen": [[1, 0.0]]}
    assert report.curve_series(dpo) == ["loss", "rewards/margins"]
    assert report.curve_series({"grad_norm": [[1, 1.0]]}) == [] and report.curve_series({}) == []
    assert report.curves_file("lora@cpt") == "curves-lora_cpt.png"
    assert report.plot_curves({"name": "dpo", "details": {"curves": dpo}}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert not report.plot_curves({"name": "zero-shot", "details": {}}, tmp_path / "z.png")
    assert not (tmp_path / "z.png").exists()


def test_rlhf_loop_reward_model_then_grpo(run_cli, tmp_path):
    """rungs [reward-model, grpo] with grpo.rewards [reward-model] on preference pairs: the
    reward model trains first and its scores are grpo's reward (the RLHF loop)."""
    rows = [{"prompt": f"Say something about item {i}.", "chosen": "yes good", "rejected": "zq xv"} for i in range(12)]
    train = write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--task", "preference", "--input-field", "prompt",
                           "--rungs", "grpo,reward-model", "--out", str(out), "-q", "--set", "judge.n=0",
                           "--set", "grpo.rewards=[reward-model]", "--set", "grpo.max_steps=2",
                           "--set", "grpo.max_completion_length=8", "--set", "grpo.forgetting_text=null",
                           "--set", "reward-model.max_steps=2", "--set", "reward-model.forgetting_text=null",
                           "--set", "eval.bootstrap=100")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rungs"]] == ["reward-model", "grpo"]
    d = res["rungs"][1]["details"]
    scores = [v for _, v in d["curves"]["rewards/reward_model/mean"]]
    assert len(scores) == 2 and all(v != 0.0 for v in scores)  # real reward-model scores
    assert d["curves"]["reward"] == d["curves"]["rewards/reward_model/mean"]
