"""The core shared by the generative task kinds: structured golds and choices in the data
reader, per-example instructions and groups, FLAN-style training templates, per-group
scores, and the batched generator (shared-prompt sampling equals separate greedy runs)."""

import json

import pytest

from lmladder.config import DataConfig, TaskConfig, EvalConfig
from lmladder.data import load, read_examples
from lmladder.errors import LadderError

from conftest import make_model, make_tokenizer, write_jsonl


def test_structured_golds_and_token_inputs(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [
        {"q": "Who?", "answers": ["Ann", "Ann B."]},
        {"q": ["New", "York", "rocks"], "answers": "x"},
    ])
    exs = read_examples(f, DataConfig(input_field="q", label_field="answers"), "train", kind="qa")
    assert exs[0].target == ["Ann", "Ann B."] and exs[0].label == '["Ann", "Ann B."]'
    assert exs[1].input == "New York rocks" and exs[1].target == "x"
    # classification keeps refusing structured labels, naming file:line:field
    with pytest.raises(LadderError, match=r"q\.jsonl:1: field 'answers' must be text, got list"):
        read_examples(f, DataConfig(input_field="q", label_field="answers"), "train")


@pytest.mark.parametrize("answer,expected", [(1, 1), ("1", 1), ("B", 1), ("c", 2), ("blue", 1)])
def test_choice_answers_resolve_to_an_index(tmp_path, answer, expected):
    f = write_jsonl(tmp_path / "mc.jsonl", [{"q": "sky?", "ch": ["red", "blue", "green"], "a": answer}])
    cfg = DataConfig(input_field="q", label_field="a", choices_field="ch", answer_base=0)  # one row: 1 is ambiguous
    (ex,) = read_examples(f, cfg, "test", kind="multiple-choice")
    assert ex.choices == ["red", "blue", "green"] and ex.target == expected


def test_choice_errors_name_the_line(tmp_path):
    f = write_jsonl(tmp_path / "mc.jsonl", [{"q": "a", "ch": ["x", "y"], "a": 0}, {"q": "b", "ch": ["x", "y"], "a": 5}])
    cfg = DataConfig(input_field="q", label_field="a", choices_field="ch")
    with pytest.raises(LadderError, match=r"mc\.jsonl:2: field 'a': answer index 5 is out of range for 2 choices"):
        read_examples(f, cfg, "test", kind="multiple-choice")
    f2 = write_jsonl(tmp_path / "mc2.jsonl", [{"q": "a", "ch": ["x"], "a": 0}])
    with pytest.raises(LadderError, match=r"mc2\.jsonl:1: field 'ch' must be a list of at least two"):
        read_examples(f2, cfg, "test", kind="multiple-choice")


def test_instruction_and_group_fields(tmp_path):
    rows = [{"i": f"in{n}", "o": f"out{n}", "ins": "Do X.", "task": f"t{n % 2}"} for n in range(4)]
    f = write_jsonl(tmp_path / "ni.jsonl", rows)
    cfg = DataConfig(train=str(f), test=str(f), input_field="i", label_field="o",
                     instruction_field="ins", group_field="task", allow_overlap=True)
    ds = load(cfg, 0, kind="generation")
    assert [e.group for e in ds.test] == ["t0", "t1", "t0", "t1"]
    assert ds.test[0].instruction == "Do X."
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:1] + [{"i": "x", "o": "y", "task": "t"}])
    with pytest.raises(LadderError, match=r"bad\.jsonl:2: field 'ins' missing or empty"):
        load(DataConfig(train=str(bad), input_field="i", label_field="o", instruction_field="ins"), 0,
             kind="generation")


def test_templates_are_validated():
    with pytest.raises(ValueError, match="no {input} placeholder"):
        TaskConfig(templates=["{instruction} only"])
    with pytest.raises(ValueError, match="only {instruction} and {input}"):
        TaskConfig(templates=["{input} {oops}"])


def test_train_message_uses_a_seeded_template_choice(tmp_path):
    from lmladder.tasks.base import Task

    rows = [{"i": f"in{n}", "o": "y", "ins": "Do X."} for n in range(40)]
    f = write_jsonl(tmp_path / "ni.jsonl", rows)
    exs = read_examples(f, DataConfig(input_field="i", label_field="o", instruction_field="ins"), "train",
                        kind="generation")
    task = Task(TaskConfig(kind="generation", templates=["T1 {instruction} | {input}"]), [], EvalConfig(), 0)
    msgs = [task.train_message(e) for e in exs]
    assert msgs == [task.train_message(e) for e in exs]  # deterministic
    alt = [m for m in msgs if m.startswith("T1 ")]
    assert 0 < len(alt) < len(msgs)  # both the default template and the alternative are used
    assert "T1 Do X. | in" in alt[0]
    default = next(m for m in msgs if not m.startswith("T1 "))
    assert default.startswith("# General instructions\nDo X.\n")
    # evaluation always uses the default template with the example's own instruction
    assert task.user_message(exs[0]).startswith("# General instructions\nDo X.\n")


def test_group_scores_per_group():
    from lmladder.run.run_one import group_scores as _group_scores
    from lmladder.tasks.classification import ClassificationTask
    from lmladder.data import Example

    task = ClassificationTask(TaskConfig(), ["a", "b"], EvalConfig(bootstrap=100), 0)
    test = [Example(str(i), "x", g, group=grp) for i, (g, grp) in enumerate([("a", "g1"), ("b", "g1"), ("a", "g2")])]
    preds = [{"pred": "a"}, {"pred": "a"}, {"pred": "a"}]
    got = _group_scores(task, test, [e.label for e in test], preds)
    assert got["g1"]["n"] == 2 and got["g1"]["accuracy"] == 0.5
    assert got["g2"] == {"n": 1, "accuracy": 1.0, "macro_f1": 1.0}


def test_shared_prompt_sampling_matches_separate_greedy_runs():
    from lmladder.inference.generate import generate

    tok = make_tokenizer()
    model = make_model(len(tok))
    prompts = [tok(t).input_ids for t in ("hello there", "a much longer prompt, left padded", "hi")]
    single, _ = generate(model, tok, prompts, max_new_tokens=8, progress=False)
    shared, stats = generate(model, tok, prompts, max_new_tokens=8, n=3, progress=False)
    assert all(s == [one[0]] * 3 for s, one in zip(shared, single))
    assert stats.prefill_tokens == sum(map(len, prompts))  # one prefill per prompt, not per sample
    for p, expect in zip(prompts, single):  # batching and padding change nothing
        alone, _ = generate(model, tok, [p], max_new_tokens=8, progress=False)
        assert alone == [expect]


def test_instruction_tuning_end_to_end(tmp_path, run_cli):
    """FLAN-style: multi-task rows with their own instructions, trained with several
    templates (lora), scored overall and per source task."""
    import json as _json

    def rows(copy, echo):
        return [{"ins": f"Repeat the word {w}.", "x": w, "y": w, "task": t}
                for t, words in (("copy", copy), ("echo", echo)) for w in words]

    train = write_jsonl(tmp_path / "train.jsonl", rows(["cat", "dog", "owl"], ["red", "sun", "sea"]) * 2)
    test = write_jsonl(tmp_path / "test.jsonl", rows(["fox", "elk", "bee"], ["tan", "sky", "bay"]))  # no overlap
    cfg = tmp_path / "it.yaml"
    cfg.write_text(
        "task: {kind: generation, templates: ['Do: {instruction} | {input}']}\n"
        f"data: {{train: {train}, test: {test}, input_field: x, label_field: y, "
        "instruction_field: ins, group_field: task}\n"
        "eval: {max_new_tokens: 4, bootstrap: 100}\n"
        "rungs: [zero-shot, lora]\nlora: {max_steps: 2, batch_size: 4}\n"
    )
    code, out, err = run_cli("run", str(cfg), "--out", str(tmp_path / "run"))
    assert code == 0, err
    res = _json.loads((tmp_path / "run" / "results.json").read_text())
    by_group = _json.loads((tmp_path / "run" / "rungs" / "lora" / "result.json").read_text())["by_group"]
    assert set(by_group) == {"copy", "echo"} and by_group["copy"]["n"] == 3
    assert res["metric"] == "exact_match"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## exact_match per group" in md and "| copy | 3 |" in md
    assert "exact_match per group" in (tmp_path / "run" / "report.html").read_text()
