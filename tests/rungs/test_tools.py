"""The tools rung: the safe calculator, tool loading, call parsing, and the tool loop
driven by a scripted fake model (tool error, unknown tool, max-steps stop)."""

import json
from types import SimpleNamespace

import pytest

from lmladder import tools as T
from lmladder.errors import LadderError
from lmladder.rungs import tools as RT


def word_count(text: str, upper: bool = False) -> int:
    """Count the words of a text."""
    return len(text.split())


def boom(x: int) -> str:
    """Always fails."""
    raise RuntimeError("kaput")


@pytest.mark.parametrize("expr,want", [
    ("2+3", "5"), ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("7 / 2", "3.5"), ("7 // 2", "3"),
    ("-7 % 3", "2"), ("2 ** 10", "1024"), ("-(3 - 5)", "2"), ("+4", "4"), ("6 / 3", "2"),
    ("1.5 * 4", "6"), ("0.1 + 0.2", "0.3"), ("2^3", "8"), ("1,000 * 3", "3000"), ("10 ** -2", "0.01"),
    ("2 ** 10 ** 2", str(2 ** 100)),
])
def test_calculator_correct(expr, want):
    assert T.calculate(expr) == want


@pytest.mark.parametrize("expr,why", [
    ('__import__("os")', "unsupported expression element: Call"),
    ("2**10**10", "exponent too large"),
    ("(2 ** 60) ** 99", "result too large"),
    ("(10 ** 100) ** 50", "result too large"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("x + 1", "unsupported expression element: Name"),
    ("'a' * 3", "only numbers are allowed, not str"),
    ("True + 1", "only numbers are allowed, not bool"),
    ("(-8) ** 0.5", "complex result"),
    ("1e308 * 10", "not a finite number"),
    ("[1]", "unsupported expression element: List"),
    ("3 < 4", "unsupported expression element: Compare"),
    ("~5", "unsupported expression element: Invert"),
    ("lambda: 1", "unsupported expression element: Lambda"),
    ("2 +", "not an arithmetic expression"),
    ("", "empty expression"),
    ("1+" * 400 + "1", "expression too long"),
])
def test_calculator_refuses(expr, why):
    with pytest.raises(T.CalcError, match=why):
        T.calculate(expr)


def test_tool_call_never_raises():
    calc = T.BUILTIN["calculator"]
    assert calc.call({"expression": "6*7"}) == ("42", None)
    assert calc.call({"expression": "os.system('x')"})[1] == "CalcError"
    assert calc.call({"expression": "os.system('x')"})[0].startswith("error: CalcError: unsupported")
    assert calc.call({"expr": "1"}) == ("error: unknown argument(s) expr; missing argument(s) expression "
                                        "(takes: expression)", "bad arguments")
    assert calc.call("1+1")[1] == "bad arguments"
    t = T.load("test_tools:boom")
    assert t.call({"x": 1}) == ("error: RuntimeError: kaput", "RuntimeError")


def test_load_tools_and_schema_from_signature():
    t = T.load("test_tools:word_count")
    assert t.name == "word_count" and t.description == "Count the words of a text."
    assert t.parameters == {"type": "object", "properties": {"text": {"type": "string"}, "upper": {"type": "boolean"}},
                            "required": ["text"]}
    assert t.call({"text": "a b c"}) == ("3", None)
    assert t.spec()["function"]["name"] == "word_count"
    with pytest.raises(LadderError, match=r"tools.tools\[1\]: tool 'nosuchmod_xyz:f' does not import \(ModuleNotFoundError"):
        T.load_all(["calculator", "nosuchmod_xyz:f"])
    with pytest.raises(LadderError, match=r"unknown tool 'abacus' \(built-in: calculator"):
        T.load_all(["abacus"])
    with pytest.raises(LadderError, match="does not import .*AttributeError"):
        T.load("json:no_such_function")
    with pytest.raises(LadderError, match="two tools named 'calculator'"):
        T.load_all(["calculator", "calculator"])


def test_parse_call_formats():
    assert RT.parse_call('Let me compute.\n{"tool": "calculator", "arguments": {"expression": "2+3"}}') == (
        {"tool": "calculator", "arguments": {"expression": "2+3"}}, None)
    assert RT.parse_call('<tool_call>\n{"name": "calculator", "arguments": {"expression": "1"}}\n</tool_call>') == (
        {"tool": "calculator", "arguments": {"expression": "1"}}, None)
    assert RT.parse_call('{"name": "calculator", "arguments": "{\\"expression\\": \\"4\\"}"}')[0]["arguments"] == {
        "expression": "4"}
    assert RT.parse_call("The answer is 5.\nAnswer: 5") == (None, None)
    assert RT.parse_call('Answer: {"name": "Bob"}') == (None, None)  # an extraction answer is not a call
    assert RT.parse_call('{"tool": "calculator", "arguments": {"expression": }') == (None, "the tool call is not valid JSON")


class Scripted:
    """A fake model: each conversation's turns come from a script keyed by its first message."""

    def __init__(self, scripts):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.seen = []
        self.prompt_tokens = 0

    def generate(self, conversations):
        self.seen.append([json.loads(json.dumps(c)) for c in conversations])
        out = []
        for c in conversations:
            key = next(k for k in self.scripts if k in c[0]["content"])
            out.append(self.scripts[key].pop(0))
            self.prompt_tokens += 10
        return out


CALL = '{{"tool": "calculator", "arguments": {{"expression": "{}"}}}}'


def test_loop_runs_tools_feeds_results_and_stops_at_max_steps():
    tools = T.load_all(["calculator"])
    step = Scripted({
        "Q1": [CALL.format("2+3"), "It is 5.\nAnswer: 5"],
        "Q2": [CALL.format("1/0"), '{"tool": "abacus", "arguments": {}}', "Answer: 0"],
        "Q3": [CALL.format("1+1")] * 5,
        "Q4": ["Answer: 9"],
    })
    convs = [[{"role": "user", "content": q}] for q in ("Q1", "Q2", "Q3", "Q4")]
    traces = RT.run_loop(step, convs, tools, max_steps=2)
    t1, t2, t3, t4 = traces
    assert (t1.final, t1.steps, t1.errors, t1.stopped) == ("It is 5.\nAnswer: 5", 2, 0, None)
    assert t1.calls == [{"tool": "calculator", "arguments": {"expression": "2+3"}, "result": "5", "error": None}]
    assert [c["error"] for c in t2.calls] == ["CalcError", "unknown tool"]
    assert t2.calls[1]["result"] == "error: unknown tool 'abacus' (tools: calculator)"
    assert (t2.errors, t2.final, t2.steps) == (2, "Answer: 0", 3)
    assert (len(t3.calls), t3.steps, t3.stopped) == (2, 3, "max_steps")  # a third call is not run
    assert (t4.steps, t4.calls, t4.final) == (1, [], "Answer: 9")
    # the model saw each result as a user turn, and finished conversations left the batch
    assert [len(b) for b in step.seen] == [4, 3, 2]
    q1_second = step.seen[1][0]
    assert q1_second[-2:] == [{"role": "assistant", "content": CALL.format("2+3")},
                              {"role": "user", "content": "Result of calculator: 5"}]
    q2_second = step.seen[1][1]
    assert q2_second[-1]["content"] == "Result of calculator: error: CalcError: division by zero"
    assert step.seen[2][0][-1]["content"] == "Result of abacus: error: unknown tool 'abacus' (tools: calculator)"
    # template format: results are tool turns
    step = Scripted({"Q1": [CALL.format("3*3"), "Answer: 9"]})
    RT.run_loop(step, [[{"role": "user", "content": "Q1"}]], tools, 3, tool_role="tool")
    assert step.seen[1][0][-1] == {"role": "tool", "name": "calculator", "content": "9"}


def test_template_tool_support_detection():
    from conftest import make_tokenizer

    assert RT.template_supports_tools(make_tokenizer()) is False  # ChatML without tools (like SmolLM2)
    tools_tmpl = (
        "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert RT.template_supports_tools(make_tokenizer(tools_tmpl)) is True
    assert RT.template_supports_tools(make_tokenizer(None)) is False


def _ctx(tmp_path, rows, **tools_cfg):
    from lmladder import config as C
    from lmladder.data import Example
    from lmladder.tasks import make_task

    cfg = C.build({"tools": tools_cfg, "task": {"labels": ["neg", "pos"]}})
    test = [Example(id=f"t{i}", input=x, label=y) for i, (x, y) in enumerate(rows)]
    task = make_task(cfg.task, ["neg", "pos"], cfg.eval, 0)
    return SimpleNamespace(cfg=cfg, task=task, data=SimpleNamespace(train=[], test=test), run_dir=tmp_path)


def test_tools_rung_predict_with_scripted_model(tmp_path):
    ctx = _ctx(tmp_path, [("good film", "pos"), ("bad film", "neg")], max_steps=1)
    rung = RT.Tools(ctx, ctx.cfg.tools, tmp_path)
    rung.prepare()
    first = rung.first_messages("json")
    assert "You can use these tools:\n- calculator(expression: string): Evaluate an arithmetic" in first[0][0]["content"]
    assert '{"tool": "calculator", "arguments": {"expression": "2+3"}}' in first[0][0]["content"]
    assert "Answer: <answer>" in first[0][0]["content"] and "Input: good film" in first[0][0]["content"]
    step = Scripted({"good film": [CALL.format("1+1"), "Answer: pos"],
                     "bad film": [CALL.format("2**1000**3"), CALL.format("1"), "never asked"]})
    preds, info = rung.predict(step=step)
    assert [p["pred"] for p in preds] == ["pos", None]
    assert preds[1]["stopped"] == "max_steps" and preds[1]["steps"] == 2
    assert preds[0]["tool_calls"][0]["result"] == "2"
    assert info["tool_calls_per_example"] == 1 and info["tool_errors"] == 1 and info["max_steps_stops"] == 1
    assert info["steps_per_example"] == 2 and info["prompt_tokens_per_example"] == 20 and info["format"] == "json"
    rows = [json.loads(l) for l in (tmp_path / "tool_calls.jsonl").read_text().splitlines()]
    assert rows[1]["calls"][0]["error"] == "CalcError"


def test_bad_tool_path_is_one_line_error_before_model_work(run_cli, toy_data, tmp_path):
    train, test = toy_data
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out),
                           "--rungs", "tools", "--set", "tools.tools=[calculator, nosuchmod_xyz:f]",
                           "--model", str(tmp_path / "no-model"))
    assert code == 2
    assert "tools.tools[1]: tool 'nosuchmod_xyz:f' does not import" in err.strip().splitlines()[-1]
    assert not out.exists()


def test_tools_rung_end_to_end_tiny_model(run_cli, toy_data, tmp_path):
    """The real model step on the tiny random model (json format): runs, scores, reports."""
    train, test = toy_data
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out), "-q",
                           "--rungs", "tools", "--set", "tools.max_new_tokens=8", "--set", "tools.max_steps=1",
                           "--set", "eval.bootstrap=100", "--limit-test", "3")
    assert code == 0, err
    res = json.loads((out / "rungs/tools/result.json").read_text())
    assert res["details"]["format"] == "json" and res["n_test"] == 3
    assert res["cost"]["prompt_tokens_per_example"] > 100
    assert (out / "rungs/tools/tool_calls.jsonl").is_file()
