"""cot, self-consistency, best-of-n and constrained: prompts, voting, verifier ranking,
judge prompts, and the rungs end to end on the tiny model."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from lmladder.config import RunConfig
from lmladder.data import Example
from lmladder.errors import LadderError
from lmladder.prompts import ChatFormat
from lmladder.rungs import best_of_n as bon
from lmladder.rungs import cot as cot_mod
from lmladder.rungs.self_consistency import SelfConsistency, majority_vote
from lmladder.tasks.base import Grammar, Task
from lmladder.tasks.classification import ClassificationTask

COT_PROMPT = "Think step by step, then give the final answer on the last line as 'Answer: <answer>'."


class NumberTask(Task):
    """A small generative kind: the answer is an integer; verify is scripted."""

    kind = "number"
    metric_names = ("accuracy",)
    script: dict = {}

    def default_instruction(self):
        return "Answer with a number."

    def parse(self, text, example=None):
        m = re.search(r"-?\d+", text)
        return (int(m.group()), None) if m else (None, "no number in the output")

    def grammar(self, example=None):
        return Grammar("regex", r"[0-9]{1,3}")

    def verify(self, candidate, example):
        return self.script.get(candidate["pred"])


def _cfg(**rungs):
    return RunConfig.model_validate({"eval": {"max_new_tokens": 8, "gen_batch_size": 8}, **rungs})


def _ctx(task, tiny, examples, cfg):
    model, tok = tiny
    fmt = ChatFormat(tok)
    return SimpleNamespace(task=task, cfg=cfg, data=SimpleNamespace(test=examples, train=[]),
                           base=lambda: (model, tok), fmt=lambda: fmt)


EXAMPLES = [Example(id=f"t{i}", input=f"{i} plus {i}", label=str(2 * i), source=f"t.jsonl:{i + 1}") for i in range(3)]


# --------------------------------------------------------------------------- prompts


def test_cot_prompt_exact_text():
    cfg = RunConfig()
    assert cfg.cot.prompt == COT_PROMPT
    task = ClassificationTask(cfg.task, ["neg", "pos"], cfg.eval, 0)
    ex = Example(id="1", input="a dull film", label="neg")
    assert task.user_message(ex, reasoning=cfg.cot.prompt) == (
        "# General instructions\nClassify the input.\nAnswer with exactly one of: neg, pos.\n"
        f"{COT_PROMPT}\n\n# Target question\nInput: a dull film\nLabel:"
    )
    num = NumberTask(cfg.task, [], cfg.eval, 0)
    assert num.user_message(EXAMPLES[1], reasoning=cfg.cot.prompt) == (
        f"# General instructions\nAnswer with a number.\n{COT_PROMPT}\n\n# Target question\nInput: 1 plus 1\nAnswer:"
    )


def test_judge_prompts_exact_text(tiny):
    model, tok = tiny
    judge = bon.Judge(model, ChatFormat(tok))
    assert judge.top == 9  # the byte tokenizer splits "10": a 1-9 scale, one token per score
    assert judge.pointwise_prompt("Add the numbers.", "2 plus 2", "2+2=4\nAnswer: 4\n") == (
        "You are grading a candidate answer.\n\n"
        "# Task\nAdd the numbers.\n\n"
        "# Input\n2 plus 2\n\n"
        "# Candidate answer\n2+2=4\nAnswer: 4\n\n"
        "# Grading\nHow likely is the candidate's final answer to be correct? "
        "Reply with one number from 1 (certainly wrong) to 9 (certainly correct)."
    )
    assert judge.ranking_prompt("Add the numbers.", "2 plus 2", ["Answer: 4", "Answer: 5"]) == (
        "You are comparing candidate answers.\n\n"
        "# Task\nAdd the numbers.\n\n"
        "# Input\n2 plus 2\n\n"
        "# Candidates\nCandidate 1:\nAnswer: 4\n\nCandidate 2:\nAnswer: 5\n\n"
        "# Grading\nWhich candidate's final answer is most likely correct? "
        "Reply with the number of the best candidate only (1 to 2)."
    )


def test_judge_reads_expected_score_from_the_next_token(tiny):
    model, tok = tiny
    judge = bon.Judge(model, ChatFormat(tok))
    msgs = [judge.pointwise_prompt("Add.", "1 plus 1", c) for c in ("Answer: 2", "Answer: 3")]
    scores = judge.pointwise(msgs)
    assert len(scores) == 2 and all(1.0 <= s <= 9.0 for s in scores) and scores[0] != scores[1]
    probs = judge.ranking([judge.ranking_prompt("Add.", "1 plus 1", ["a", "b", "c"])], [3])[0]
    assert len(probs) == 3 and sum(probs) == pytest.approx(1.0)
    assert judge.calls == 3


# --------------------------------------------------------------------------- voting


def _c(pred, raw=None, err=None):
    return {"pred": pred, "raw": raw or f"Answer: {pred}", "error": err if pred is None else None}


def test_majority_vote_counts_and_agreement():
    task = NumberTask(RunConfig().task, [], RunConfig().eval, 0)
    v = majority_vote(task, [_c(3), _c(5), _c(5), _c(None, "??", "no number"), _c(3), _c(5)])
    assert v["pred"] == 5 and v["chosen"] == 1
    assert v["agreement"] == pytest.approx(3 / 6)  # share of all N samples
    assert v["votes"] == {"5": 3, "3": 2}


def test_majority_vote_tie_goes_to_the_earliest_sample():
    task = NumberTask(RunConfig().task, [], RunConfig().eval, 0)
    v = majority_vote(task, [_c(None, "x", "no number"), _c(7), _c(4), _c(4), _c(7)])
    assert v["pred"] == 7 and v["chosen"] == 1 and v["agreement"] == pytest.approx(2 / 5)


def test_majority_vote_all_unparseable():
    task = NumberTask(RunConfig().task, [], RunConfig().eval, 0)
    v = majority_vote(task, [_c(None, "x", "no number"), _c(None, "y", "no number")])
    assert v["pred"] is None and v["agreement"] == 0.0
    assert v["error"] == "all 2 samples unparseable (first: no number)"


def test_majority_vote_uses_vote_key():
    class Loose(NumberTask):
        def vote_key(self, pred):
            return {"items": sorted(pred)}  # unhashable keys are fine too

    task = Loose(RunConfig().task, [], RunConfig().eval, 0)
    v = majority_vote(task, [_c([2, 1]), _c([3]), _c([1, 2])])
    assert v["pred"] == [2, 1] and v["agreement"] == pytest.approx(2 / 3)


def test_self_consistency_rung_votes_and_reports_agreement(tiny, monkeypatch):
    cfg = _cfg(**{"self-consistency": {"n": 3}})
    task = NumberTask(cfg.task, [], cfg.eval, 0)
    scripted = [[_c(1), _c(2), _c(2)], [_c(4), _c(4), _c(4)], [_c(None, "?", "no number")] * 3]

    def fake(rung, rc, n, do_sample):
        assert n == 3 and do_sample
        return [{**s[0], "samples": s} for s in scripted], {"prompt_tokens_per_example": 10.0}

    monkeypatch.setattr("lmladder.rungs.self_consistency.reasoning_predict", fake)
    rung = SelfConsistency(_ctx(task, tiny, EXAMPLES, cfg), cfg.self_consistency, None)
    preds, info = rung.predict()
    assert [p["pred"] for p in preds] == [2, 4, None]
    assert info["agreement_rate"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert info["unanimous_share"] == pytest.approx(1 / 3)
    assert info["vote_changed_share"] == pytest.approx(1 / 3)  # example 0: vote 2, first sample 1
    assert info["unparseable"] == 1 and info["unparseable_sample_share"] == pytest.approx(3 / 9)


# --------------------------------------------------------------------------- best-of-n


def _run_bon(tiny, monkeypatch, task, cfg, scripted):
    monkeypatch.setattr(
        "lmladder.rungs.best_of_n.reasoning_predict",
        lambda rung, rc, n, do_sample: ([{**s[0], "samples": s} for s in scripted], {"prompt_tokens_per_example": 10.0}),
    )
    rung = bon.BestOfN(_ctx(task, tiny, EXAMPLES[: len(scripted)], cfg), cfg.best_of_n, None)
    return rung.predict()


def test_best_of_n_picks_what_the_programmatic_verifier_prefers(tiny, monkeypatch):
    cfg = _cfg(**{"best-of-n": {"n": 4, "verifier": "auto"}})
    task = NumberTask(cfg.task, [], cfg.eval, 0)
    task.script = {1: 0.0, 2: 0.5, 3: 1.0, 5: 0.5, 6: 0.5}
    scripted = [
        [_c(1), _c(2), _c(3), _c(None, "?", "no number")],  # 3 scores 1.0 -> chosen at index 2
        [_c(5), _c(6), _c(6), _c(1)],  # tie 0.5: 6 has more votes -> index 1
        [_c(9), _c(8), _c(None, "?", "x"), _c(9)],  # verifier has no opinion -> judge
    ]
    preds, info = _run_bon(tiny, monkeypatch, task, cfg, scripted)
    assert [p["pred"] for p in preds[:2]] == [3, 6]
    assert [p["chosen"] for p in preds[:2]] == [2, 1]
    assert preds[0]["samples"][2]["score"] == 1.0 and preds[0]["samples"][3]["score"] is None
    assert info["verifier"] == {"judge-pointwise": 1, "programmatic": 2}
    assert preds[2]["verifier"] == "judge-pointwise" and preds[2]["pred"] in (8, 9)
    # the judge saw the two distinct parseable texts of example 2, nothing else
    assert info["judge_calls_per_example"] == pytest.approx(2 / 3)
    assert info["chosen_rank"]["histogram"][:3] == [int(preds[2]["chosen"] == 0), 1 + int(preds[2]["chosen"] == 1), 1]
    assert info["prompt_tokens_per_example"] > info["generation_prompt_tokens_per_example"] == 10.0


def test_best_of_n_judge_ranking_mode(tiny, monkeypatch):
    cfg = _cfg(**{"best-of-n": {"n": 3, "verifier": "judge", "judge_mode": "ranking"}})
    task = NumberTask(cfg.task, [], cfg.eval, 0)
    task.script = {1: 1.0}  # ignored: verifier is judge
    scripted = [[_c(1), _c(2), _c(2)], [_c(7), _c(7), _c(7)]]
    preds, info = _run_bon(tiny, monkeypatch, task, cfg, scripted)
    assert info["verifier"] == {"judge-ranking": 2}
    assert info["judge_calls_per_example"] == pytest.approx(1 / 2)  # one prompt; example 1 has one distinct text
    assert preds[0]["pred"] in (1, 2) and preds[1]["pred"] == 7 and preds[1]["chosen"] == 0


def test_best_of_n_all_unparseable():
    assert bon.choose([_c(None, "a", "x"), _c(None, "b", "x")], [None, None], [None, None]) is None
    # unparseable candidates never win, even with the best score
    assert bon.choose([_c(None, "a", "x"), _c(2)], [1.0, 0.0], [None, 2]) == 1


# --------------------------------------------------------------------------- native thinking


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)


def test_native_thinking_is_detected_and_passed_to_the_template():
    from conftest import make_tokenizer

    tok = make_tokenizer(THINKING_TEMPLATE)
    fmt = ChatFormat(tok)
    assert fmt.supports_thinking and not ChatFormat(make_tokenizer()).supports_thinking
    native, mode = cot_mod.reasoning_format(fmt, "auto")
    assert mode == "native" and native.prompt("hi").endswith("<|im_start|>assistant\n<think>\n")
    off, mode = cot_mod.reasoning_format(fmt, "prompt")
    assert mode == "prompt" and off.prompt("hi").endswith("<think>\n\n</think>\n\n")
    plain, mode = cot_mod.reasoning_format(ChatFormat(make_tokenizer()), "native")
    assert mode == "prompt" and plain.thinking is None


def test_answer_is_read_after_the_thinking():
    task = NumberTask(RunConfig().task, [], RunConfig().eval, 0)
    rec = {"pred": 3, "raw": "<think>maybe Answer: 3?</think>\n\nIt is 4.", "error": None}
    assert cot_mod.reparse_after_thinking(task, rec, None)["pred"] == 4
    assert cot_mod.reparse_after_thinking(task, {"pred": 1, "raw": "Answer: 1"}, None)["pred"] == 1


# --------------------------------------------------------------------------- end to end


def _cli(run_cli, toy_data, out, *extra):
    train, test = toy_data
    return run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out), "-q",
                   "--set", "eval.bootstrap=200", *extra)


def test_reasoning_rungs_end_to_end_constrained(run_cli, toy_data, tmp_path):
    """Every reasoning rung with `constrained: true` on the random model: the answer line
    is forced within the token budget, so every prediction is a label."""
    out = tmp_path / "run"
    sets = []
    for r in ("cot", "self-consistency", "best-of-n"):
        sets += ["--set", f"{r}.constrained=true", "--set", f"{r}.max_new_tokens=40"]
    code, _, err = _cli(run_cli, toy_data, out, "--rungs", "constrained,cot,self-consistency,best-of-n",
                        "--set", "self-consistency.n=3", "--set", "best-of-n.n=2", *sets)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rungs"]] == ["constrained", "cot", "self-consistency", "best-of-n"]
    for r in res["rungs"]:
        preds = [json.loads(l) for l in (out / "rungs" / r["name"] / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 8 and all(p["pred"] in ("neg", "pos") for p in preds), r["name"]
        d = r["details"]
        assert d["generation"]["grammar_rejected_tokens"] == 0
        if r["name"] != "constrained":
            assert all("Answer: " in p["raw"] for p in preds)
    d = {r["name"]: r["details"] for r in res["rungs"]}
    assert d["constrained"]["generated_tokens_per_example"] <= 4  # 'neg'/'pos' + end of turn
    sc = d["self-consistency"]
    assert sc["samples_per_example"] == 3 and 1 / 3 <= sc["agreement_rate"] <= 1
    # one prefill per prompt, not per sample
    assert sc["generation"]["prefill_tokens"] == sc["generation"]["prompt_tokens"]
    assert sc["generation"]["sequences"] == 24
    b = d["best-of-n"]
    assert b["verifier"] == {"judge-pointwise": 8} and 0 < b["judge_calls_per_example"] <= 2


def test_bad_grammar_is_a_one_line_error_before_model_work(run_cli, toy_data, tmp_path, monkeypatch):
    monkeypatch.setattr(ClassificationTask, "grammar", lambda self, ex=None: Grammar("regex", "(neg|pos"))
    out = tmp_path / "run"
    code, _, err = _cli(run_cli, toy_data, out, "--rungs", "constrained")
    assert code == 2
    assert "constrained: task classification: grammar (regex '(neg|pos') does not compile" in err
    assert "parenthesis is not closed" in err
    assert not (out / "rungs").exists()


def test_cot_constrained_validates_grammars_too(toy_data):
    from lmladder.data import load
    from lmladder.inference import constrain

    cfg = _cfg(cot={"constrained": True})
    train, test = toy_data
    cfg.data.train, cfg.data.test = str(train), str(test)
    ds = load(cfg.data, 0, None, "classification")
    cot_mod.Cot.validate(cfg, ds)  # the label grammar compiles
    task = NumberTask(cfg.task, [], cfg.eval, 0)
    task.grammar = lambda ex=None: Grammar("regex", "[0-9" if ex is not None and ex.id == "t2" else "[0-9]")
    with pytest.raises(LadderError, match=r"^t.jsonl:3: cot.constrained: grammar \(regex '\[0-9'\) does not compile"):
        constrain.validate_task_grammars(task, EXAMPLES, reasoning=True, field="cot.constrained")


def test_programmatic_verifier_needs_a_checker(toy_data, monkeypatch):
    from lmladder import tasks
    from lmladder.data import load

    class NoCheck(Task):
        kind = "classification"

    cfg = _cfg(**{"best-of-n": {"verifier": "programmatic"}})
    train, test = toy_data
    cfg.data.train, cfg.data.test = str(train), str(test)
    ds = load(cfg.data, 0, None, "classification")
    assert bon.has_verifier(NumberTask) and not bon.has_verifier(NoCheck)
    monkeypatch.setitem(tasks.KINDS, "classification", NoCheck)
    with pytest.raises(LadderError, match="task kind classification has no programmatic checker"):
        bon.BestOfN.validate(cfg, ds)
