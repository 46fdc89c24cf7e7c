"""Grammar-constrained decoding (inference/constrain.py) on the tiny random model: whatever
the random weights prefer, the output must parse."""

from __future__ import annotations

import json
import re

import pytest

from lmladder.inference import constrain
from lmladder.inference.generate import generate
from lmladder.errors import LadderError
from lmladder.tasks.base import Grammar

ENGINES = ["xgrammar", "llguidance"]
LABELS = ["neg", "pos", "neutral"]
NUMBER = r"-?[0-9]{1,6}(\.[0-9]{1,2})?"  # bounded: the random model must finish
# ASCII strings: the random byte-level model writes invalid UTF-8, which xgrammar's
# string rules let through byte by byte (a real BPE model does not); bounded lengths so a
# random model closes its strings within the token budget.
WORD = {"type": "string", "pattern": "^[A-Za-z0-9 ]{1,8}$"}
SCHEMA = {
    "type": "object",
    "properties": {
        "person": {"type": "array", "items": WORD, "maxItems": 2},
        "location": {"type": "array", "items": WORD, "maxItems": 2},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["person", "location", "count"],
    "additionalProperties": False,
}


def _prompts(tok, n=5):
    texts = [f"<|im_start|>user\nexample {i} {'x' * i}<|im_end|>\n<|im_start|>assistant\n" for i in range(n)]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def _run(tiny, grammar, engine, n=1, do_sample=False, max_new_tokens=120, reasoning=False, prompts=5):
    model, tok = tiny
    ids = _prompts(tok, prompts)
    factory = constrain.processor_factory(tok, [grammar] * len(ids), engine=engine, reasoning=reasoning)
    texts, stats = generate(model, tok, ids, max_new_tokens=max_new_tokens, n=n, do_sample=do_sample,
                            temperature=1.3, batch_size=4, seed=3, processors=factory, progress=False)
    assert factory.counters["rejected_tokens"] == 0
    return [t for outs in texts for t in outs], stats


@pytest.mark.parametrize("engine", ENGINES)
def test_choice_output_is_a_label(tiny, engine):
    outs, _ = _run(tiny, Grammar("choice", LABELS), engine, n=2, do_sample=True, max_new_tokens=12)
    assert len(outs) == 10 and all(o in LABELS for o in outs), outs


@pytest.mark.parametrize("engine", ENGINES)
def test_regex_output_full_matches(tiny, engine):
    outs, _ = _run(tiny, Grammar("regex", NUMBER), engine, max_new_tokens=16)
    assert all(re.fullmatch(NUMBER, o) for o in outs), outs


@pytest.mark.parametrize("engine", ENGINES)
def test_json_schema_output_validates(tiny, engine):
    import jsonschema

    outs, _ = _run(tiny, Grammar("json_schema", SCHEMA), engine, n=2, do_sample=True, max_new_tokens=110)
    for o in outs:
        jsonschema.validate(json.loads(o), SCHEMA)


def test_unconstrained_tiny_model_does_not_parse(tiny):
    """Control: without the grammar the random model writes bytes, not labels."""
    model, tok = tiny
    texts, _ = generate(model, tok, _prompts(tok), max_new_tokens=12, progress=False)
    assert not any(t[0] in LABELS for t in texts)


@pytest.mark.parametrize("engine", ENGINES)
def test_reasoning_grammar_text_then_answer(tiny, engine):
    """reasoning=True: free text without 'Answer:', then 'Answer: ' + the answer. The
    budget (max_new_tokens) cuts the free text so the answer always fits."""
    outs, _ = _run(tiny, Grammar("choice", LABELS), engine, max_new_tokens=40, reasoning=True, prompts=3)
    for o in outs:
        head, sep, ans = o.rpartition("Answer: ")
        assert sep and ans in LABELS and "Answer:" not in head, o


@pytest.mark.parametrize("engine", ENGINES)
def test_reasoning_grammar_accepts_and_rejects(tiny, engine):
    model, tok = tiny
    f = constrain.processor_factory(tok, [Grammar("regex", r"[0-9]+")], engine=engine, reasoning=True)
    comp = f.engine.compiled(f.grammars[0], True)
    eos = tok.eos_token_id

    def accepts(text):
        accept, _ = f.engine.matcher(comp)
        return all(accept(t) for t in tok(text, add_special_tokens=False).input_ids + [eos])

    assert accepts("3 apples + 4 apples = 7.\nAnswer: 7")
    assert accepts("Answer: 12")
    assert not accepts("Answer: seven")
    assert not accepts("no answer line")


def test_compiled_once_per_distinct_grammar(tiny):
    model, tok = tiny
    gs = [Grammar("choice", ["a", "b"]), Grammar("choice", ["a", "b"]), Grammar("regex", "[0-9]")]
    f = constrain.processor_factory(tok, gs)
    f(3, [0, 1, 2])
    f(2, [1, 0])
    keys = [k for k in f.engine._compiled if k[0] in ("choice", "regex") and k[1] in ('["a", "b"]', '"[0-9]"')]
    assert len(keys) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_check_reports_bad_grammars_in_one_line(engine):
    assert constrain.check(Grammar("regex", NUMBER), engine) is None
    assert constrain.check(Grammar("json_schema", SCHEMA), engine) is None
    assert constrain.check(Grammar("choice", LABELS), engine, reasoning=True) is None
    err = constrain.check(Grammar("regex", "(ab"), engine)
    assert err and "\n" not in err
    assert constrain.check(Grammar("regex", "(ab"), engine, reasoning=True)
    assert "non-empty list" in constrain.check(Grammar("choice", []), engine)


def test_xgrammar_error_text_is_clean():
    err = constrain.check(Grammar("regex", "(ab"))
    assert err == "Regex parsing error at position 4: The parenthesis is not closed."


def test_unknown_engine_is_a_ladder_error():
    with pytest.raises(LadderError, match="unknown grammar engine 'outlines'"):
        constrain.check(Grammar("regex", "a"), "outlines")


def test_bounded_strings_exclude_control_characters(tiny):
    """xgrammar's minLength/maxLength strings let control characters through (invalid
    JSON); constrain rewrites such bounds as a pattern in its copy of the schema."""
    model, tok = tiny
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a"]}
    f = constrain.processor_factory(tok, [Grammar("json_schema", schema)])
    comp = f.engine.compiled(f.grammars[0], False)

    def accepts(text):
        accept, _ = f.engine.matcher(comp)
        return all(accept(t) for t in tok(text, add_special_tokens=False).input_ids)

    assert accepts('{"a": "abcd"}')
    assert not accepts('{"a": "abcde')
    assert not accepts('{"a": "a\x05')
    assert not accepts('{"a": "a\n')
    assert schema["properties"]["a"] == {"type": "string", "maxLength": 4}  # the task's schema is untouched


def test_bitmask_application_both_paths_agree():
    import torch

    torch.manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32)
    want = torch.tensor([[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 for t in range(120)] for r in range(3)]).bool()
    fast = torch.randn(3, 125)
    slow = fast.clone().double()  # float64: the torch lookup-table path
    constrain.apply_bitmask_(fast, bitmask, 120)
    constrain.apply_bitmask_(slow, bitmask, 120)
    for s in (fast, slow):
        assert torch.equal(torch.isfinite(s[:, :120]), want)
        assert torch.isinf(s[:, 120:]).all()  # past the tokenizer's vocabulary


@pytest.mark.integration
def test_smollm2_constrained_reasoning_and_labels():
    """The real embedded model and its 49k BPE vocabulary (xgrammar; llguidance is
    covered on the tiny model): a math cot whose answer line is forced within the budget
    parses; a label choice is a label."""
    from pathlib import Path

    from lmladder.config import RunConfig
    from lmladder.data import Example
    from lmladder.models import load_causal_lm
    from lmladder.prompts import ChatFormat
    from lmladder.tasks import KINDS
    from lmladder.tasks.base import generate_answers

    model, tok, _ = load_causal_lm("smollm2-135m")
    fmt = ChatFormat(tok)
    cfg = RunConfig.model_validate({"task": {"kind": "math"}})
    task = KINDS["math"](cfg.task, [], cfg.eval, 0)
    rows = [json.loads(l) for l in (Path(__file__).parents[2] / "examples/data/gsm8k.test.jsonl").read_text().splitlines()[:1]]
    exs = [Example(id=str(i), input=r["question"], label=r["answer"]) for i, r in enumerate(rows)]
    msgs = [task.user_message(e, reasoning=cfg.cot.prompt) for e in exs]
    preds, info = generate_answers(task, model, fmt, msgs, exs, reasoning=True, constrained=True, max_new_tokens=32)
    assert info["generation"]["grammar_rejected_tokens"] == 0
    for p in preds:
        head, sep, ans = p["raw"].rpartition("Answer: ")
        assert sep and re.fullmatch(task.grammar().value, ans) and p["pred"] is not None, p["raw"]
    labels = ["negative", "positive"]
    prompts = [fmt.encode(fmt.prompt(f"Is this review positive or negative? {t}")) for t in ("Witty.", "Dull.")]
    factory = constrain.processor_factory(tok, [Grammar("choice", labels)] * 2)
    outs, _ = generate(model, tok, prompts, max_new_tokens=6, processors=factory, progress=False)
    assert all(o[0] in labels for o in outs)


OPEN = {  # no bounds anywhere: a random model left alone runs out of tokens mid-structure
    "type": "array",
    "items": {"type": "object", "properties": {"text": {"type": "string", "pattern": "^[A-Za-z0-9 ]*$"},
                                               "type": {"type": "string", "enum": ["person", "place"]}},
              "required": ["text", "type"], "additionalProperties": False},
}


@pytest.mark.parametrize("engine", ENGINES)
def test_open_schema_is_closed_within_the_budget(tiny, engine):
    """At the default budget every constrained output is complete, valid, schema-valid
    JSON: when only the closing reserve is left, the grammar's closing tokens win."""
    import jsonschema

    budget = 2 * constrain.close_reserve(OPEN) + 10  # (a byte-level tokenizer: a token per character)
    outs, stats = _run(tiny, Grammar("json_schema", OPEN), engine, n=2, do_sample=True, max_new_tokens=budget,
                       prompts=6)
    for o in outs:
        jsonschema.validate(json.loads(o), OPEN)
    assert stats.extra["grammar_closed_rows"] > 0  # the random model did need closing


def test_bounded_grammar_schema_from_train_golds():
    from lmladder.tasks.extraction import bounded_schema

    schema = {"type": "object", "properties": {"names": {"type": "array", "items": {"type": "string"}},
                                               "city": {"type": "string", "enum": ["a", "b"]}}}
    golds = [{"names": ["ann", "bo"], "city": "a"}, {"names": ["christopher"], "city": "b"}]
    b = bounded_schema(schema, golds)
    assert b["properties"]["names"]["maxItems"] == 2
    assert b["properties"]["names"]["items"]["maxLength"] == len("christopher")
    assert "maxLength" not in b["properties"]["city"]  # an enum is bounded already
    assert "maxItems" not in schema["properties"]["names"]  # the user's schema is untouched


def test_in_json_string():
    assert constrain.in_json_string('[{"text": "ab')
    assert not constrain.in_json_string('[{"text": "ab"')
    assert constrain.in_json_string('[{"text": "a\\"b')  # an escaped quote does not close it
    assert not constrain.in_json_string('[{"text": "a\\\\"')  # an escaped backslash, then the close
