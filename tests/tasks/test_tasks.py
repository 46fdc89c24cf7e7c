"""Task kinds beyond classification: math, qa, extraction, multiple-choice, generation.
Parsing and metrics on known strings, gold conversion on real rows, config errors, and a
CLI-only zero-shot run of every kind on the tiny model."""

import json
import re
import string
from collections import Counter
from types import SimpleNamespace

import pytest

from conftest import write_jsonl
from lmladder import metrics
from lmladder.config import EvalConfig, TaskConfig
from lmladder.data import Dataset, Example
from lmladder.errors import LadderError
from lmladder.tasks import make_task
from lmladder.tasks.extraction import bio_to_entities, gold_value
from lmladder.tasks.math import check_equations, find_answer

EVAL = EvalConfig(bootstrap=200)

# Real rows (GSM8K train line 1; WNUT-16 train lines 1-2), copied verbatim.
GSM8K_ROW = {
    "question": "Coach brought one bag filled with basketballs to practice and dumped them all out onto the gym floor before practice began.  After the practice time was over, he asked Jordan, Jason, and Jeffrey to pick up the balls and carry them over to the bag.  The three boys picked up and carried all of the balls in one trip.  Jordan carried twice as many balls as Jason, and Jason carried twice as many balls as Jeffrey. If Jason had picked up and carried 2 balls, what is the total number of balls that the coach brought to practice?",  # noqa: E501
    "solution": "Since Jordan carried twice as many balls as Jason, Jordan carried 2*2=<<2*2=4>>4 balls.\nSince Jason carried twice as many balls as Jeffrey, Jeffrey carried 2/2=<<2/2=1>>1 ball.\nIn total, the three boys carried 4+2+1=<<4+2+1=7>>7 balls, which were all the balls the coach brought to practice.\n#### 7",  # noqa: E501
    "answer": "7",
}
WNUT_ROWS = [
    {"tokens": ["@TomCruise", "I'm", "from", "Brazil", "....", "and", "I", "love", "you", ".", "You're", "my", "favorite", "actor", "!", "Knight", "and", "Day", "is", "so", "cool", "...", "My", "dream", "is", "to", "meet", "you", "!"], "tags": ["O", "O", "O", "B-geo-loc", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O", "B-movie", "I-movie", "I-movie", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O", "O"]},  # noqa: E501
    {"tokens": ["On", "My", "Own", "Time", "-", "Gym", "Class", "Heroes"], "tags": ["B-other", "I-other", "I-other", "I-other", "O", "B-musicartist", "I-musicartist", "I-musicartist"]},  # noqa: E501
]


def task_of(kind, **cfg):
    return make_task(TaskConfig(kind=kind, **cfg), [], EVAL, 0)


def ex(input="q", target="x", **kw):
    label = target if isinstance(target, str) else json.dumps(target)
    return Example(id="t:1", input=input, label=label, source="t.jsonl:1", target=target, **kw)


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize("text,want", [
    ("#### 1,234", "1234"),
    ("so the total is \\boxed{12}.", "12"),
    ("The answer is $5.50.", "5.5"),
    ("She pays 3 * 4 = 12 dollars, then 12 + 8 = 20.\nAnswer: 20.0", "20"),
    ("It was -4 degrees", "-4"),
    ("5-3 = 2", "2"),
    ("Answer: 1,000,000 dollars", "1000000"),
    ("He has 3 apples and 4 pears, so 7 in all.", "7"),
])
def test_math_parse(text, want):
    assert task_of("math").extract(text) == (want, None)


def test_math_parse_errors_and_direct_answers():
    t = task_of("math")
    assert t.parse("I do not know.") == (None, "no number in the output")
    # a direct answer that rambles on: the number on its first line
    assert t.parse("1\n\nRozanne uses 4 x 5 = 20 eggs") == ("1", None)
    assert t.extract("1\n\nRozanne uses 4 x 5 = 20 eggs") == ("20", None)
    assert t.correct("5.5", "5.5") and not t.correct(None, "5.5")
    assert t.grammar().kind == "regex" and re.fullmatch(t.grammar().value, "-12.5")


def test_math_gold_reasoning_answer_and_verify():
    t = task_of("math")
    e = ex(GSM8K_ROW["question"], GSM8K_ROW["answer"], fields=GSM8K_ROW)
    assert t.gold(e) == "7" and t.answer(e) == "7"
    assert t.gold(ex(target="$1,200.00")) == "1200"
    assert t.gold(ex(target=GSM8K_ROW["solution"])) == "7"  # label_field: solution works too
    assert t.reasoning_answer(e) == (
        "Since Jordan carried twice as many balls as Jason, Jordan carried 2*2=4 balls.\n"
        "Since Jason carried twice as many balls as Jeffrey, Jeffrey carried 2/2=1 ball.\n"
        "In total, the three boys carried 4+2+1=7 balls, which were all the balls the coach brought to practice.\n"
        "Answer: 7"
    )
    assert t.reasoning_answer(ex(target="7", fields={"question": "q", "answer": "7"})) is None
    assert check_equations("30 x 2 = 60, 3.5 * 8 = 28, 2+2=5, 10/3 = 3.33, <<52-8-28=16>>") == (4, 5)
    assert t.verify({"pred": "7", "raw": "2*2=4 and 4+2+1=8", "error": None}, e) == 0.5
    assert t.verify({"pred": "7", "raw": "seven", "error": None}, e) is None
    s = t.score(["7", "5", "3", "1"], ["7", None, "3", "2"])
    assert list(s) == ["exact_match"] and s["exact_match"]["value"] == 0.5


def test_math_gold_that_is_not_a_number_is_an_error(tmp_path):
    t = task_of("math")
    bad = ex(target="seven apples")
    bad.source = "data/gsm.jsonl:3"
    with pytest.raises(LadderError, match=r"data/gsm.jsonl:3: the gold answer 'seven apples' is not a number"):
        t.setup(Dataset(train=[bad], test=[], info={}))


# --------------------------------------------------------------------------- qa


def squad_official_normalize(s):
    """evaluate-v1.1.py, verbatim."""
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_official_f1(prediction, ground_truth):
    p, g = squad_official_normalize(prediction).split(), squad_official_normalize(ground_truth).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0
    pr, rc = same / len(p), same / len(g)
    return 2 * pr * rc / (pr + rc)


STRINGS = ["The Denver Broncos!", "Levi's Stadium.", "  an apple a day ", "Theatre of the absurd",
           "1,000 (approx.)", "Broncos of Denver", "Santa Clara, California"]


def test_squad_normalisation_and_scores_match_the_official_script():
    for s in STRINGS:
        assert metrics.normalize_answer(s) == squad_official_normalize(s)
    for p in STRINGS:
        for g in STRINGS:
            assert metrics.token_f1(p, [g]) == pytest.approx(squad_official_f1(p, g))
            assert metrics.exact_match(p, [g]) == float(squad_official_normalize(p) == squad_official_normalize(g))
    # hand-computed: 2 shared tokens, precision 2/3, recall 1
    assert metrics.token_f1("Broncos of Denver", ["Denver Broncos"]) == pytest.approx(0.8)
    # max over the gold answers
    assert metrics.token_f1("23", ["twenty three", "23 years"]) == pytest.approx(2 / 3)
    assert metrics.exact_match("the Denver Broncos", "Denver Broncos") == 1.0


def test_qa_task_parse_gold_and_score():
    t = task_of("qa")
    assert t.parse("Answer: Levi's Stadium.\nIt is in Santa Clara.") == ("Levi's Stadium.", None)
    assert t.parse("  \n") == (None, "empty output")
    assert t.gold(ex(target=["23", "23 years"])) == ["23", "23 years"]
    assert t.gold(ex(target="Paris")) == ["Paris"]
    s = t.score([["Denver Broncos"], ["23", "23 years"], ["outdoors"]], ["the Denver Broncos", "23 years ago", None])
    assert list(s) == ["exact_match", "f1"]
    assert s["exact_match"]["value"] == pytest.approx(1 / 3)
    assert s["f1"]["value"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert s["f1"]["ci"][0] <= s["f1"]["value"] <= s["f1"]["ci"][1]
    assert t.vote_key("The Paris.") == t.vote_key("paris")


# --------------------------------------------------------------------------- extraction


def _wnut_examples(tmp_path):
    from lmladder.config import DataConfig
    from lmladder.data import read_examples

    f = write_jsonl(tmp_path / "wnut.jsonl", WNUT_ROWS)
    return read_examples(f, DataConfig(input_field="tokens", label_field="tags"), "train", "extraction")


def test_bio_to_entities_on_real_wnut_rows(tmp_path):
    e1, e2 = _wnut_examples(tmp_path)
    assert gold_value(e1) == [{"text": "Brazil", "type": "geo-loc"}, {"text": "Knight and Day", "type": "movie"}]
    assert gold_value(e2) == [{"text": "On My Own Time", "type": "other"},
                              {"text": "Gym Class Heroes", "type": "musicartist"}]
    # an I- tag that does not continue its type starts an entity
    assert bio_to_entities(list("abcde"), ["I-x", "I-y", "I-y", "O", "I-x"]) == [
        {"text": "a", "type": "x"}, {"text": "b c", "type": "y"}, {"text": "e", "type": "x"}]
    assert gold_value(ex(target='[{"text": "Paris", "type": "city"}]')) == [{"text": "Paris", "type": "city"}]


def test_extraction_default_schema_prompt_and_parse(tmp_path):
    exs = _wnut_examples(tmp_path)
    t = task_of("extraction")
    t.setup(Dataset(train=exs, test=exs[:1], info={}))
    assert t.types == ["geo-loc", "movie", "musicartist", "other"]
    assert t.schema["items"]["properties"]["type"]["enum"] == t.types
    # the grammar's schema is the scored one, bounded by the train golds (longest list, longest text)
    g = t.grammar().value
    assert t.grammar().kind == "json_schema" and g == {**t.schema, "maxItems": 2, "items": {
        **t.schema["items"], "properties": {**t.schema["items"]["properties"],
                                            "text": {"type": "string", "maxLength": 16}}}}
    assert t.hints() == ['Answer with a JSON list of the entities, each {"text": ..., "type": ...} with type one of: '
                         "geo-loc, movie, musicartist, other; answer [] when there are none."]
    assert t.answer(exs[1]) == ('[{"text": "On My Own Time", "type": "other"}, '
                                '{"text": "Gym Class Heroes", "type": "musicartist"}]')
    assert t.parse('```json\n[{"text": "Brazil", "type": "geo-loc"}]\n```') == ([{"text": "Brazil", "type": "geo-loc"}], None)
    assert t.parse('Sure: [] and more') == ([], None)
    p, err = t.parse("[{'text': 'Brazil'}]")
    assert p is None and err.startswith("invalid JSON: ")
    assert t.verify({"pred": [{"text": "Brazil", "type": "geo-loc"}]}, exs[0]) == 1.0
    assert t.verify({"pred": [{"text": "Brazil", "type": "city"}]}, exs[0]) == 0.0
    assert t.verify({"pred": None}, exs[0]) == 0.0


def test_extraction_metrics_on_known_predictions(tmp_path):
    t = task_of("extraction")
    t.setup(Dataset(train=[ex(target=[{"text": "a", "type": t_}]) for t_ in "xyz"], test=[], info={}))
    E = lambda text, typ: {"text": text, "type": typ}  # noqa: E731
    golds = [[E("Knight and Day", "x"), E("B", "y")], [E("D", "z")], [], [E("F", "x")]]
    preds = [[E("knight and  day", "x"), E("C", "y")],  # 1 right (case, spaces), 1 wrong
             None,  # invalid JSON
             [E("E", "x")],  # a spurious entity
             {"text": "F"}]  # JSON, but not the schema's array
    s = t.score(golds, preds)
    assert list(s) == ["f1", "precision", "recall", "valid_json", "schema_valid"]
    # tp = 1, predicted items = 2 + 0 + 1 + 1 = 4, gold items = 2 + 1 + 0 + 1 = 4
    assert s["precision"]["value"] == pytest.approx(0.25)
    assert s["recall"]["value"] == pytest.approx(0.25)
    assert s["f1"]["value"] == pytest.approx(0.25)
    assert s["valid_json"]["value"] == pytest.approx(0.75)
    assert s["schema_valid"]["value"] == pytest.approx(0.5)
    assert t.correct([E("d", "z")], [E("D", "z")]) and not t.correct(None, [])
    assert t.vote_key([E("A", "x"), E("B", "y")]) == t.vote_key([E("b", "y"), E("a", "x")])


def test_extraction_schema_from_file_fields_and_errors(tmp_path):
    good = tmp_path / "schema.json"
    good.write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}))
    t = task_of("extraction", schema=str(good))
    assert t.schema["required"] == ["name"] and not t.entities
    assert "matching this JSON Schema" in t.hints()[0]
    bad = ex(target={"nom": "x"})
    bad.source = "d.jsonl:4"
    with pytest.raises(LadderError, match=r"d.jsonl:4: the gold label does not match task.schema"):
        t.setup(Dataset(train=[bad], test=[], info={}))
    t2 = task_of("extraction", schema=["name", "date"])
    assert t2.schema["required"] == ["name", "date"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"type": "arrayy"}))
    with pytest.raises(LadderError, match=r"broken.json \(task.schema\): not a valid JSON Schema: .*arrayy"):
        task_of("extraction", schema=str(broken))
    (tmp_path / "nojson.json").write_text("{type: object")
    with pytest.raises(LadderError, match=r"nojson.json: the schema file is not valid JSON"):
        task_of("extraction", schema=str(tmp_path / "nojson.json"))
    with pytest.raises(LadderError, match=r"missing.json: schema file not found"):
        task_of("extraction", schema=str(tmp_path / "missing.json"))
    with pytest.raises(LadderError, match=r"task.schema: not a valid JSON Schema"):
        task_of("extraction", schema={"type": 5})


# --------------------------------------------------------------------------- multiple choice


def test_multiple_choice_query_parse_and_grammar():
    t = task_of("multiple-choice")
    e = ex("Capital of France?", 1, choices=["Lyon", "Paris", "Nice"])
    assert t.query(e) == "Capital of France?\nA. Lyon\nB. Paris\nC. Nice"
    assert t.answer(e) == "Paris" and t.gold(e) == 1
    for out in ("Paris", "B", "B. Paris", "(B)", "paris.", "Answer: B", "The answer is B.", "I think it is Paris"):
        assert t.parse(out, e) == ({"choice": 1, "choice_norm": 1}, None), out
    assert t.parse("Berlin", e) == (None, "no choice (A-C or a choice text) in the output")
    assert t.grammar(e).value == ["Lyon", "Paris", "Nice"]
    msg = t.user_message(e, [ex("Capital of Italy?", 0, choices=["Rome", "Milan"])])
    assert "Input: Capital of Italy?\nA. Rome\nB. Milan\nAnswer: Rome\n\n" in msg
    assert msg.endswith("Input: Capital of France?\nA. Lyon\nB. Paris\nC. Nice\nAnswer:")


def test_multiple_choice_acc_and_acc_norm_on_the_tiny_model(tiny):
    from lmladder.prompts import ChatFormat

    model, tok = tiny
    t = task_of("multiple-choice")
    # Per-token log-probs of the random tiny model are all about -5.5, so the raw sum
    # always picks the shortest choice while the per-character one need not.
    exs = [ex(f"question {i}", 1, choices=["z", long_]) for i, long_ in
           enumerate(["the longer right answer", "another long answer", "yes indeed", "qwertyuiop", "ab"])]
    fmt = ChatFormat(tok)
    preds, info = t.predict(model, fmt, [t.user_message(e) for e in exs], exs)
    assert info["prompt_tokens_per_example"] > 0
    for p, e in zip(preds, exs):
        raw, norm = p["scores"], [s / len(c) for s, c in zip(p["scores"], e.choices)]
        assert p["pred"]["choice"] == max(range(2), key=raw.__getitem__)
        assert p["pred"]["choice_norm"] == max(range(2), key=norm.__getitem__)
        assert p["answer"] == e.choices[p["pred"]["choice"]]
    assert all(p["pred"]["choice"] == 0 for p in preds)  # the one-letter choice wins by raw sum
    s = t.score([1] * 5, [p["pred"] for p in preds])
    assert s["accuracy"]["value"] == 0.0
    assert s["accuracy_norm"]["value"] == sum(p["pred"]["choice_norm"] == 1 for p in preds) / 5 > 0


def test_multiple_choice_through_a_remote_backend():
    class Remote:  # inference/openai_backend.py's interface: echo log-likelihoods per continuation
        def label_loglikelihoods(self, prompts, conts, batch_size):
            assert len(prompts) == 1
            return [[-3.0 * len(c) ** 0.5 for c in conts]], {"prompt_tokens_per_example": 10.0}

    t = task_of("multiple-choice")
    exs = [ex("q", 1, choices=["ab", "abcdefghi"])]  # raw: -4.2 vs -9; per char: -2.1 vs -1
    # a plain-text format: the continuations are the choice texts as they are (lm-eval style)
    fmt = SimpleNamespace(prompt=lambda m: m, answer_prefix=lambda: "", plain=True)
    preds, info = t.predict(Remote(), fmt, ["m"], exs)
    assert preds[0]["pred"] == {"choice": 0, "choice_norm": 1} and info["prompt_tokens_per_example"] == 10.0


# --------------------------------------------------------------------------- generation


def test_generation_metric_fn(tmp_path, monkeypatch):
    from lmladder.data import Dataset

    def task_of(kind, **cfg):  # a run's task: set up on its data, which imports the metric function
        return make_task(TaskConfig(kind=kind, **cfg), [], EVAL, 0, Dataset([], [], {}))

    assert make_task(TaskConfig(kind="generation", metric_fn="no_such_metrics_mod:score"), [], EVAL, 0).metric_fn is None
    with pytest.raises(LadderError, match=r"task.metric_fn: cannot import 'no_such_metrics_mod' \(ModuleNotFoundError"):
        task_of("generation", metric_fn="no_such_metrics_mod:score")
    with pytest.raises(LadderError, match=r"task.metric_fn: 'lmladder.metrics' has no function 'nope'"):
        task_of("generation", metric_fn="lmladder.metrics:nope")
    with pytest.raises(LadderError, match=r"is not 'module:function'"):
        task_of("generation", metric_fn="just_a_name")
    (tmp_path / "mymetrics.py").write_text("def starts_same(pred, gold):\n    return float(pred[:1] == gold[:1])\n")
    monkeypatch.chdir(tmp_path)  # a module next to the user's data imports from the working folder
    t = task_of("generation", metric_fn="mymetrics:starts_same")
    assert t.metrics_for(t.cfg) == ("exact_match", "token_f1", "starts_same")
    s = t.score([["hello world"], ["abc", "xyz"], ["q"]], ["Hello, world!", "xenon", None])
    assert s["exact_match"]["value"] == pytest.approx(1 / 3)
    assert s["token_f1"]["value"] == pytest.approx(1 / 3)
    assert s["starts_same"]["value"] == pytest.approx(1 / 3)  # 'H' != 'h'; 'x' matches the 2nd gold
    t2 = task_of("generation", metric_fn=str(tmp_path / "mymetrics.py") + ":starts_same")
    assert t2.metric_fn_name == "starts_same"


# --------------------------------------------------------------------------- CLI, every kind


def _results(out):
    res = json.loads((out / "results.json").read_text())
    (r,) = res["rungs"]
    preds = [json.loads(l) for l in (out / "rungs/zero-shot/predictions.jsonl").read_text().splitlines()]
    return r, preds


KIND_DATA = {
    "math": ([{"question": f"What is {i} + {i}?", "answer": str(2 * i), "solution": f"{i}+{i}={2*i}\n#### {2*i}"}
              for i in range(8)], ["--input-field", "question", "--label-field", "answer"],
             ["exact_match"]),
    "qa": ([{"question": f"Who wrote book {i}?", "answers": [f"author {i}", f"A{i}"]} for i in range(8)],
           ["--input-field", "question", "--label-field", "answers"], ["exact_match", "f1"]),
    "extraction": ([{"tokens": r["tokens"] + [str(i)], "tags": r["tags"] + ["O"]} for i in range(4) for r in WNUT_ROWS],
                   ["--input-field", "tokens", "--label-field", "tags"],
                   ["f1", "precision", "recall", "valid_json", "schema_valid"]),
    "multiple-choice": ([{"q": f"Pick {i}", "options": ["red", "green", "blue"], "answer": "B"} for i in range(8)],
                        ["--input-field", "q", "--label-field", "answer", "--choices-field", "options"],
                        ["accuracy", "accuracy_norm"]),
    "generation": ([{"text": f"Say {i}", "label": f"word {i}"} for i in range(8)], [],
                   ["exact_match", "token_f1"]),
}


@pytest.mark.parametrize("kind", list(KIND_DATA))
def test_cli_zero_shot_run_of_every_kind(kind, run_cli, tmp_path):
    rows, flags, names = KIND_DATA[kind]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--task", kind, "--train", str(train), *flags, "--rungs", "zero-shot",
                           "--out", str(out), "-q", "--set", "eval.max_new_tokens=6", "--set", "eval.bootstrap=100")
    assert code == 0, err
    r, preds = _results(out)
    assert list(r["metrics"]) == names and r["metric"] == names[0]
    assert r["n_test"] == len(preds) == 2  # 20% of 8
    for p in preds:
        assert {"pred", "gold", "correct"} <= set(p)
        if kind != "multiple-choice":  # generated: the raw text is kept, and why it did not parse
            assert "raw" in p and (p["pred"] is not None or p["error"])
    if kind == "multiple-choice":
        assert all(p["gold"] == 1 and set(p["pred"]) == {"choice", "choice_norm"} for p in preds)
    if kind == "extraction":
        assert preds[0]["gold"] in ([{"text": "Brazil", "type": "geo-loc"}, {"text": "Knight and Day", "type": "movie"}],
                                    [{"text": "On My Own Time", "type": "other"},
                                     {"text": "Gym Class Heroes", "type": "musicartist"}])


def test_cli_config_errors_are_one_line(run_cli, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", KIND_DATA["generation"][0])
    code, _, err = run_cli("run", "--task", "generation", "--train", str(train), "--rungs", "zero-shot",
                           "--metric-fn", "no_such_mod_q:f", "--out", str(tmp_path / "r"))
    assert code == 2 and err.strip().count("\n") == 0 and "cannot import 'no_such_mod_q'" in err
    assert not (tmp_path / "r").exists()
    bad = tmp_path / "s.json"
    bad.write_text('{"type": "nope"}')
    wtrain = write_jsonl(tmp_path / "w.jsonl", WNUT_ROWS * 3)
    code, _, err = run_cli("run", "--task", "extraction", "--train", str(wtrain), "--input-field", "tokens",
                           "--label-field", "tags", "--schema", str(bad), "--rungs", "zero-shot", "--out", str(tmp_path / "r"))
    assert code == 2 and err.strip().count("\n") == 0 and f"{bad} (task.schema): not a valid JSON Schema" in err
    code, _, err = run_cli("run", "--task", "math", "--train", str(train), "--rungs", "zero-shot",
                           "--target", "accuracy=0.5", "--out", str(tmp_path / "r"))
    assert code == 2 and "unknown metric 'accuracy' for math (known: exact_match)" in err
    code, _, err = run_cli("run", "--task", "math", "--train", str(train), "--rungs", "zero-shot",
                           "--out", str(tmp_path / "r"))
    assert code == 2 and "the gold answer 'word" in err and "is not a number" in err


def test_cli_flags_map_onto_the_config(tmp_path):
    import argparse

    from lmladder.cli import _config_from_args, build_parser

    (tmp_path / "s.json").write_text("{}")
    a = build_parser().parse_args(["run", "--task", "extraction", "--train", "t.jsonl", "--schema",
                                   str(tmp_path / "s.json"), "--corpus", "c.jsonl", "--choices-field", "opts",
                                   "--metric-fn", "m:f", "--metric", "recall"])
    cfg = _config_from_args(a)
    assert isinstance(a, argparse.Namespace)
    assert cfg.task.kind == "extraction" and cfg.task.schema_ == str(tmp_path / "s.json")
    assert cfg.rag.corpus.endswith("/c.jsonl") and cfg.rag.corpus.startswith("/")
    assert cfg.data.choices_field == "opts" and cfg.task.metric_fn == "m:f" and cfg.task.metric == "recall"
    a = build_parser().parse_args(["run", "--task", "extraction", "--schema", "name,date"])
    assert _config_from_args(a).task.schema_ == ["name", "date"]



@pytest.mark.parametrize("name,kind,n_test", [("gsm8k", "math", 50), ("squad", "qa", 60), ("wnut_extraction", "extraction", 50)])
def test_example_configs_load_and_their_golds_convert(name, kind, n_test):
    from pathlib import Path

    from lmladder import config, data

    cfg = config.build(config.read_yaml(Path(__file__).parents[2] / "examples" / f"{name}.yaml"))
    ds = data.load(cfg.data, cfg.seed, cfg.task.labels, cfg.task.kind)
    task = make_task(cfg.task, ds.info["labels"], cfg.eval, cfg.seed, ds)
    assert task.kind == kind and len(ds.test) == n_test
    golds = [task.gold(e) for e in ds.test]
    if kind == "extraction":
        assert task.types == ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person",
                              "product", "sportsteam", "tvshow"]
        assert all(isinstance(g, list) for g in golds) and any(golds)
    if kind == "math":
        assert all(g is not None and task.reasoning_answer(e).endswith(f"Answer: {g}") for g, e in zip(golds, ds.test))


def test_cli_constrained_decoding_follows_each_kinds_grammar(run_cli, tmp_path):
    """zero-shot.constrained: extraction outputs are schema-valid JSON, math outputs numbers."""
    for kind in ("extraction", "math"):
        rows, flags, _ = KIND_DATA[kind]
        train = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        out = tmp_path / kind
        code, _, err = run_cli("run", "--task", kind, "--train", str(train), *flags, "--rungs", "zero-shot",
                               "--set", "zero-shot.constrained=true", "--set", "eval.max_new_tokens=160",
                               "--out", str(out), "-q", "--set", "eval.bootstrap=100")
        assert code == 0, err
        r, preds = _results(out)
        assert r["details"]["constrained"] and r["details"]["unparseable"] == 0
        if kind == "extraction":
            assert r["metrics"]["valid_json"]["value"] == 1.0 and r["metrics"]["schema_valid"]["value"] == 1.0
        else:
            assert all(re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", p["raw"]) for p in preds)
