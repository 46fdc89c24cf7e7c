"""Tools the `tools` rung lets the model call: built-ins and user callables.

A tool is a :class:`Tool`: a name, a description, a JSON-Schema of its arguments (the
format chat templates take in ``apply_chat_template(tools=[...])``) and a function
called with keyword arguments that returns text. Built-in: ``calculator``. A user tool
is ``module:function``; its schema is read from the signature (annotations str / int /
float / bool) and its description from the docstring's first line.

``Tool.call`` never raises: an exception, a bad argument or an unknown tool becomes an
error text handed back to the model.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import operator
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from lmladder.errors import LadderError

# --------------------------------------------------------------------------- calculator

MAX_EXPONENT = 100  # |b| in a ** b
MAX_BITS = 4096  # largest integer magnitude kept (about 1233 digits)
MAX_LENGTH = 500  # characters in an expression

_BIN = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalcError(ValueError):
    pass


def _check(v):
    if isinstance(v, int) and v.bit_length() > MAX_BITS:
        raise CalcError("result too large")
    if isinstance(v, float) and not math.isfinite(v):
        raise CalcError("result is not a finite number")
    if isinstance(v, complex):
        raise CalcError("complex result")
    return v


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return node.value
        raise CalcError(f"only numbers are allowed, not {type(node.value).__name__}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(b) > MAX_EXPONENT:
                raise CalcError(f"exponent too large (at most {MAX_EXPONENT})")
            if isinstance(a, int) and isinstance(b, int) and a.bit_length() * abs(b) > MAX_BITS:
                raise CalcError("result too large")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise CalcError("division by zero")
        try:
            return _check(_BIN[type(node.op)](a, b))
        except OverflowError:
            raise CalcError("result too large") from None
    what = type(node).__name__
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        what = type(node.op).__name__
    raise CalcError(f"unsupported expression element: {what}")


def format_number(v) -> str:
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.12g}"
    return str(v)


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.
    Never uses eval: the expression is parsed with ``ast`` and only those nodes are
    evaluated; anything else raises CalcError."""
    if not isinstance(expression, str):
        raise CalcError("expression must be text")
    expr = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").replace(",", "")
    if not expr:
        raise CalcError("empty expression")
    if len(expr) > MAX_LENGTH:
        raise CalcError(f"expression too long (at most {MAX_LENGTH} characters)")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise CalcError("not an arithmetic expression") from None
    return format_number(_eval(tree))


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses)."""
    return calculate(expression)


# --------------------------------------------------------------------------- tools

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    fn: Callable[..., Any]

    def spec(self) -> dict:
        """The OpenAI / transformers tool format."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}

    def call(self, arguments: Any) -> tuple[str, str | None]:
        """(result text, error or None). Never raises."""
        if not isinstance(arguments, dict):
            return f"error: arguments must be a JSON object, got {type(arguments).__name__}", "bad arguments"
        props = self.parameters.get("properties", {})
        unknown = [k for k in arguments if k not in props]
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if unknown or missing:
            parts = ([f"unknown argument(s) {', '.join(unknown)}"] if unknown else []) + (
                [f"missing argument(s) {', '.join(missing)}"] if missing else [])
            return f"error: {'; '.join(parts)} (takes: {', '.join(props) or 'nothing'})", "bad arguments"
        try:
            out = self.fn(**arguments)
        except Exception as e:  # a tool error goes back to the model, never up
            return f"error: {type(e).__name__}: {e}", type(e).__name__
        return (out if isinstance(out, str) else str(out)), None


def _from_callable(name: str, fn: Callable) -> Tool:
    doc = (inspect.getdoc(fn) or f"The function {name}.").strip().splitlines()[0]
    props, required = {}, []
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    for p in (sig.parameters.values() if sig else []):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        props[p.name] = {"type": _JSON_TYPES.get(p.annotation, "string")}
        if p.default is p.empty:
            required.append(p.name)
    return Tool(name, doc, {"type": "object", "properties": props, "required": required}, fn)


BUILTIN = {
    "calculator": Tool(
        "calculator",
        "Evaluate an arithmetic expression with numbers, + - * / // % ** and parentheses.",
        {"type": "object",
         "properties": {"expression": {"type": "string", "description": "e.g. (12 + 3) * 4 / 5"}},
         "required": ["expression"]},
        calculator,
    ),
}


def load(spec: str, where: str = "tools.tools") -> Tool:
    """A built-in name or 'module:function'; a LadderError when it does not import."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise LadderError(
            f"{where}: unknown tool '{spec}' (built-in: {', '.join(BUILTIN)}; or a Python callable 'module:function')"
        )
    from lmladder.plugins import check_trusted

    check_trusted(spec, where)
    mod, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # the console script's path does not hold the working folder
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # ImportError, AttributeError, an error raised by the module
        raise LadderError(f"{where}: tool '{spec}' does not import ({type(e).__name__}: {e})") from None
    if not callable(obj):
        raise LadderError(f"{where}: tool '{spec}' is not callable")
    return _from_callable(attr.split(".")[-1], obj)


def load_all(specs: list[str]) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}
    for i, s in enumerate(specs):
        t = load(s, f"tools.tools[{i}]")
        if t.name in tools:
            raise LadderError(f"tools.tools[{i}]: two tools named '{t.name}'")
        tools[t.name] = t
    return tools
