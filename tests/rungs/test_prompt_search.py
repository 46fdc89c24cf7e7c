"""prompt-search: picks the instruction that scores best on a dev split carved from
train (scripted scorer), records every variant, and touches test only once, at the end."""

import json

from lmladder import config as C
from lmladder.data import Dataset, Example
from lmladder.run.context import Context
from lmladder.rungs.prompt_search import PromptSearch, carve_dev, clean_variant, search
from lmladder.tasks.classification import ClassificationTask


def test_search_picks_best_and_keeps_first_on_ties():
    scores = {"a": 0.5, "b": 0.75, "c": 0.75, "d": 0.1}
    best, rows = search([{"instruction": k, "source": "config"} for k in "abcd"], scores.__getitem__)
    assert best == 1 and [r["dev_score"] for r in rows] == [0.5, 0.75, 0.75, 0.1]
    assert search([{"instruction": "x", "source": "task"}, {"instruction": "y", "source": "config"}],
                  lambda s: 0.3)[0] == 0


def test_carve_dev_is_seeded_and_bounded():
    train = list(range(100))
    assert carve_dev(train, 10, 0) == carve_dev(train, 10, 0) != carve_dev(train, 10, 1)
    assert len(set(carve_dev(train, 10, 0))) == 10 and sorted(carve_dev(train[:5], 10, 0)) == train[:5]
    assert clean_variant('Instruction: "Label the review."') == "Label the review."


class ScriptedTask(ClassificationTask):
    """Scores by instruction: 'GOOD' answers every example right, 'HALF' the even ones,
    anything else wrong. Records which examples each predict call saw."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def predict(self, model, fmt, messages, examples=None, desc="", constrained=False, engine="xgrammar"):
        self.calls.append([e.id for e in examples])
        preds = []
        for i, (m, e) in enumerate(zip(messages, examples)):
            right = "GOOD" in m or ("HALF" in m and int(e.id[2:]) % 2 == 0)
            wrong = "neg" if e.label == "pos" else "pos"
            preds.append({"pred": e.label if right else wrong})
        return preds, {"prompt_tokens_per_example": 10.0}


def _ctx(tmp_path, tiny_dir, **ps):
    cfg = C.build({"model": str(tiny_dir), "task": {"labels": ["neg", "pos"], "instruction": "Classify."},
                   "prompt-search": ps, "eval": {"bootstrap": 100}})
    train = [Example(id=f"tr{i}", input=f"train {i}", label="pos" if i % 2 else "neg") for i in range(30)]
    test = [Example(id=f"te{i}", input=f"test {i}", label="pos" if i % 3 else "neg") for i in range(6)]
    task = ScriptedTask(cfg.task, ["neg", "pos"], cfg.eval, cfg.seed)
    return Context(cfg, Dataset(train, test, {"labels": ["neg", "pos"]}), task, tmp_path)


def test_prompt_search_picks_best_dev_variant_without_looking_at_test(tmp_path, tiny_dir):
    ctx = _ctx(tmp_path, tiny_dir, variants=["HALF: classify.", "GOOD: classify.", "bad one"], generate=0,
               dev_size=8)
    rung = PromptSearch(ctx, ctx.cfg.prompt_search, tmp_path)
    rung.prepare()
    preds, info = rung.predict()
    test_ids = {e.id for e in ctx.data.test}
    dev_ids = [e.id for e in rung.dev]
    # four dev evaluations (task + 3 variants), each on the dev split only, then one on test
    assert len(ctx.task.calls) == 5
    assert all(c == dev_ids for c in ctx.task.calls[:4]) and not test_ids & set(sum(ctx.task.calls[:4], []))
    assert set(dev_ids) <= {e.id for e in ctx.data.train} and len(dev_ids) == 8
    assert ctx.task.calls[4] == [e.id for e in ctx.data.test]
    assert info["chosen"] == 2 and info["chosen_instruction"] == "GOOD: classify."
    half = sum(int(i[2:]) % 2 == 0 for i in dev_ids) / 8
    assert [v["dev_score"] for v in info["variants"]] == [0.0, half, 1.0, 0.0]
    assert [v["source"] for v in info["variants"]] == ["task", "config", "config", "config"]
    assert all(p["pred"] == e.label for p, e in zip(preds, ctx.data.test))  # test ran with GOOD
    saved = json.loads((tmp_path / "variants.json").read_text())
    assert saved["chosen"] == 2 and saved["metric"] == "accuracy" and saved["dev_ids"] == dev_ids
    assert info["search_prompt_tokens"] == 4 * 8 * 10


def test_prompt_search_generated_variants_tiny_model(run_cli, toy_data, tmp_path):
    """The model writes variants itself (tiny random model: gibberish, still scored)."""
    train, test = toy_data
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out), "-q",
                           "--rungs", "prompt-search", "--set", "prompt-search.generate=2",
                           "--set", "prompt-search.dev_size=6", "--limit-test", "4", "--set", "prompt-search.variants=[Label the movie review.]",
                           "--set", "eval.bootstrap=100")
    assert code == 0, err
    v = json.loads((out / "rungs/prompt-search/variants.json").read_text())
    assert v["variants"][0]["source"] == "task" and v["variants"][1]["instruction"] == "Label the movie review."
    assert 2 <= len(v["variants"]) <= 4 and v["dev_size"] == 6
    assert all(0.0 <= r["dev_score"] <= 1.0 for r in v["variants"])
    res = json.loads((out / "rungs/prompt-search/result.json").read_text())
    assert res["details"]["chosen_instruction"] == v["variants"][v["chosen"]]["instruction"]


def test_prompt_search_needs_something_to_search(run_cli, toy_data, tmp_path):
    train, test = toy_data
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "r"),
                           "--rungs", "prompt-search", "--set", "prompt-search.generate=0")
    assert code == 2 and "nothing to search" in err
