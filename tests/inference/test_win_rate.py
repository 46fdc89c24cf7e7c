"""The preference win rate (inference/judge.py): the pairwise judge asks both orders with the
exact prompts, turns order-disagreement into a tie and consistent preferences into 1 / 0;
the reference is the starting model's responses (zero-shot's records, the base model's
generated once and cached, or the from: parent's); judge config errors are one line."""

import json
from types import SimpleNamespace

import pytest

from conftest import write_jsonl
from lmladder.config import JUDGE_PROMPT, EvalConfig, JudgeConfig, RunConfig, TaskConfig
from lmladder.inference import judge as judge_mod
from lmladder.inference.judge import PairwiseJudge
from lmladder.tasks.base import mean_ci
from lmladder.tasks.preference import PreferenceTask

PREF_TRAIN = [{"prompt": f"Say something about item {i}.", "chosen": "yes good", "rejected": "zq xv"}
              for i in range(12)]
PREF_TEST = [{"prompt": f"Tell me about thing {i}.", "chosen": "yes good", "rejected": "zq xv"} for i in range(5)]


def scripted(outcomes: dict):
    """A scorer answering each judge message from ``outcomes[message] = (lp_A, lp_B)``;
    records the messages it was asked."""
    asked: list[str] = []

    def score(messages):
        asked.extend(messages)
        return [outcomes[m] for m in messages]

    return score, asked


def test_judge_asks_both_orders_with_exact_prompts_and_scores_verdicts():
    tpl = "Q: {prompt}\nA) {response_a}\nB) {response_b}\nWhich? ({instruction})"
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    tuned = ["t0", "t1", "t2", "same", "t4"]
    ref = ["r0", "r1", "r2", " same ", "r4"]
    j = PairwiseJudge(tpl, None, instruction="be kind")
    m = lambda p, a, b: f"Q: {p}\nA) {a}\nB) {b}\nWhich? (be kind)"  # noqa: E731
    outcomes = {
        m("p0", "t0", "r0"): (-0.1, -2.0), m("p0", "r0", "t0"): (-3.0, -0.5),  # tuned preferred twice: win
        m("p1", "t1", "r1"): (-2.0, -0.1), m("p1", "r1", "t1"): (-0.2, -1.0),  # reference twice: loss
        m("p2", "t2", "r2"): (-0.1, -0.9), m("p2", "r2", "t2"): (-0.1, -0.9),  # always "A": tie
        m("p4", "t4", "r4"): (-1.0, -1.0), m("p4", "r4", "t4"): (-2.0, -0.5),  # exact tie one way: tie
    }
    j.scorer, asked = scripted(outcomes)
    v = j.compare(prompts, tuned, ref)
    # both orders asked, tuned-as-A first for every judged example, then swapped; identical
    # responses (after stripping) are not judged
    assert asked == [m("p0", "t0", "r0"), m("p1", "t1", "r1"), m("p2", "t2", "r2"), m("p4", "t4", "r4"),
                     m("p0", "r0", "t0"), m("p1", "r1", "t1"), m("p2", "r2", "t2"), m("p4", "r4", "t4")]
    assert [x.win for x in v] == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert [(x.ab, x.ba) for x in v] == [(1.0, 1.0), (0.0, 0.0), (1.0, 0.0), (None, None), (0.5, 1.0)]
    assert [x.consistent for x in v] == [True, True, False, None, False]
    assert v[3].identical and not any(x.identical for x in v[:3])
    # P(tuned): A/B renormalised, averaged over the two orders
    import math
    sig = lambda d: 1 / (1 + math.exp(-d))  # noqa: E731
    assert v[0].p_tuned == pytest.approx((sig(1.9) + sig(2.5)) / 2)
    assert v[2].p_tuned == pytest.approx(0.5)
    task = PreferenceTask(TaskConfig(kind="preference"), [], EvalConfig(bootstrap=200), 0)
    wr = task.mean_metrics({"win_rate": [x.win for x in v]})["win_rate"]
    assert wr["value"] == pytest.approx(0.5) and wr == mean_ci([1, 0, 0.5, 0.5, 0.5], 200, 0)


def test_default_prompt_renders_the_responses():
    j = PairwiseJudge(JUDGE_PROMPT, None)
    msg = j.message("How do I boil an egg?", " Put it in boiling water.\n", "No.")
    assert msg == ("You are comparing two assistant responses to the same user message.\n\n"
                   "# User message\nHow do I boil an egg?\n\n# Response A\nPut it in boiling water.\n\n"
                   "# Response B\nNo.\n\n# Question\nWhich response is more helpful, honest and harmless? "
                   "Answer with a single letter: A or B.")


def test_lm_scorer_reads_next_token_logprobs(tiny):
    """The real scorer: log p('A'), log p('B') as the first assistant token after the judge's
    chat template, exactly as a manual forward pass gives them."""
    import torch

    model, tok = tiny
    score = judge_mod.lm_scorer(model, tok)
    msgs = ["Which? A or B.", "Pick one: A or B"]
    got = score(msgs)
    for msg, (la, lb) in zip(msgs, got):
        ids = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
        ids = tok(ids, add_special_tokens=False).input_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        a, b = tok("A", add_special_tokens=False).input_ids[0], tok("B", add_special_tokens=False).input_ids[0]
        assert (la, lb) == (pytest.approx(float(lp[a]), abs=1e-4), pytest.approx(float(lp[b]), abs=1e-4))
    assert score.prompt_tokens > 0


def test_no_win_rate_without_responses_or_for_zero_shot():
    cfg = RunConfig(task=TaskConfig(kind="preference"))
    ctx = SimpleNamespace(cfg=cfg, data=SimpleNamespace(test=[object()] * 3))
    preds = [{"pred": {"chosen_better": True, "margin": 1.0}} for _ in range(3)]  # reward-model: no responses
    assert judge_mod.win_rate(ctx, "reward-model", None, preds, None) is None
    with_resp = [{**p, "response": "hi"} for p in preds]
    assert judge_mod.win_rate(ctx, "zero-shot", None, with_resp, None) is None  # its own reference
    off = SimpleNamespace(cfg=RunConfig(task=TaskConfig(kind="preference"), judge=JudgeConfig(n=0)), data=ctx.data)
    assert judge_mod.win_rate(off, "lora", None, with_resp, None) is None


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _args(train, test, out, rungs, *extra):
    return ("run", "--train", str(train), "--test", str(test), "--task", "preference", "--input-field", "prompt",
            "--rungs", rungs, "--out", str(out), "-q", "--set", "eval.bootstrap=100",
            "--set", "judge.n=4", "--set", "judge.max_new_tokens=12",
            "--set", "lora.max_steps=2", "--set", "lora.batch_size=4", "--set", "lora.lr=5e-2",
            "--set", "lora.forgetting_text=null", *extra)


def test_reference_selection_end_to_end(run_cli, tmp_path, monkeypatch):
    """zero-shot + lora + lora@b (from: lora) with a scripted judge that prefers the
    alphabetically smaller response: lora is judged against zero-shot's responses, lora@b
    against lora's; zero-shot gets no win rate; the report shows the column."""
    train = write_jsonl(tmp_path / "train.jsonl", PREF_TRAIN)
    test = write_jsonl(tmp_path / "test.jsonl", PREF_TEST)
    out = tmp_path / "run"
    import re

    def fake_scorer(model, tok, batch_size=16):
        def score(messages):
            out = []
            for msg in messages:
                a = re.search(r"# Response A\n(.*)\n\n# Response B\n", msg, re.S).group(1)
                b = re.search(r"# Response B\n(.*)\n\n# Question\n", msg, re.S).group(1)
                out.append((0.0, -1.0) if a < b else (-1.0, 0.0))
            return out
        return score

    monkeypatch.setattr(judge_mod, "lm_scorer", fake_scorer)
    code, _, err = run_cli(*_args(train, test, out, "zero-shot,lora,lora@b", "--set", "copies={lora@b: {from: lora}}"))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    by = {r["name"]: r for r in res["rungs"]}
    assert "win_rate" not in by["zero-shot"]["metrics"] and "judge" not in by["zero-shot"]["details"]
    resp = {n: [r.get("response") for r in _rows(out / "rungs" / n / "predictions.jsonl")] for n in by}
    for n in by:  # the first judge.n test prompts get a response, the rest none
        assert all(isinstance(t, str) for t in resp[n][:4]) and resp[n][4:] == [None]
        d = by[n]["details"]
        assert d["responses"]["n"] == 4 and "response_seconds" not in d  # kept out of eval_seconds
    for n, ref in (("lora", "zero-shot"), ("lora@b", "lora")):
        j = by[n]["details"]["judge"]
        assert j["reference"] == ref and j["n"] == 4
        expect = [0.5 if t.strip() == r.strip() else (1.0 if t.strip() < r.strip() else 0.0)
                  for t, r in zip(resp[n][:4], resp[ref][:4])]
        assert by[n]["metrics"]["win_rate"]["value"] == pytest.approx(sum(expect) / 4)
        verdicts = _rows(out / "rungs" / n / "judgements.jsonl")
        assert [v["reference"] for v in verdicts] == resp[ref][:4] and [v["win"] for v in verdicts] == expect
        judged = [e for e, v in zip(expect, verdicts) if not v["identical"]]
        assert j["position_consistency"] == (1.0 if judged else None)  # a content-only judge is consistent
        assert (j["wins"], j["ties"], j["losses"]) == (expect.count(1.0), expect.count(0.5), expect.count(0.0))
    assert by["lora@b"]["metric"] == "reward_accuracy"  # win rate is never the primary metric
    md = (out / "report.md").read_text()
    head = next(l for l in md.splitlines() if l.startswith("| rung |"))
    assert "win_rate" in head.split(" | ")
    zs = next(l for l in md.splitlines() if l.startswith("| zero-shot |"))
    assert zs.split(" | ")[head.split(" | ").index("win_rate")] == "-"
    assert "| lora@b | lora |" in md


def test_base_reference_generated_once_and_cached(run_cli, tmp_path, tiny_dir):
    """Without zero-shot in the run, the base model's responses are generated once, cached
    in judge/base.responses.json (equal to what zero-shot generates), and judged by the real
    tiny judge; a rerun with another judge prompt and a separately loaded judge.model
    reuses the cache."""
    train = write_jsonl(tmp_path / "train.jsonl", PREF_TRAIN)
    test = write_jsonl(tmp_path / "test.jsonl", PREF_TEST)
    zs = tmp_path / "zs"
    assert run_cli(*_args(train, test, zs, "zero-shot"))[0] == 0
    zs_resp = [r.get("response") for r in _rows(zs / "rungs/zero-shot/predictions.jsonl")][:4]
    out = tmp_path / "run"
    code, _, err = run_cli(*_args(train, test, out, "lora"))
    assert code == 0, err
    cache = json.loads((out / "judge/base.responses.json").read_text())
    assert list(cache["responses"].values()) == zs_resp
    r = json.loads((out / "rungs/lora/result.json").read_text())
    j = r["details"]["judge"]
    assert j["reference"] == "base (generated)" and j["judge_model"].endswith("(the base model)")
    assert j["judge_messages"] == 2 * (4 - j["identical"]) and j["wins"] + j["ties"] + j["losses"] == 4
    assert 0.0 <= r["metrics"]["win_rate"]["value"] <= 1.0
    # a changed judge prompt reruns the rung (fingerprint) but not the base generation
    code, _, err = run_cli(*_args(train, test, out, "lora", "--set", f"judge.model={tiny_dir}", "--set",
                                  "judge.prompt=Q {prompt} A {response_a} B {response_b} Answer A or B."))
    assert code == 0, err
    j2 = json.loads((out / "rungs/lora/result.json").read_text())["details"]["judge"]
    assert j2["reference"] == "base (cached)" and j2["judge_model"] == str(tiny_dir)
    assert j2["judge_prompt_tokens"] < j["judge_prompt_tokens"] or j["identical"] == 4  # the shorter prompt


@pytest.mark.parametrize("setting,msg", [
    ("judge.prompt=Compare {response_a} and {response_b}", "judge.prompt: Value error, the template has no {prompt} placeholder"),
    ("judge.prompt={prompt} {response_a} {response_b} {score}", "unknown placeholder {score}"),
    ("judge.n=-1", "judge.n: Input should be greater than or equal to 0"),
    ("judge.model=/nonexistent/judge", "judge.model: /nonexistent/judge: model path not found"),
])
def test_judge_config_errors_are_one_line(run_cli, tmp_path, setting, msg):
    train = write_jsonl(tmp_path / "train.jsonl", PREF_TRAIN)
    code, _, err = run_cli("run", "--train", str(train), "--task", "preference", "--input-field", "prompt",
                           "--rungs", "zero-shot", "--out", str(tmp_path / "r"), "--set", setting)
    assert code == 2 and msg in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
