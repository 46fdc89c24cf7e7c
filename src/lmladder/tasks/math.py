"""Math word problems (GSM8K style): a numeric answer extracted from free text, scored
by exact numeric match.

The answer in a model's text is, in order of preference: the number after the last
``####``, inside the last ``\\boxed{}``, after the last 'answer is' / 'Answer:', else
the last number anywhere. Numbers are normalised before comparing: thousands commas,
``$``, ``%`` and units dropped, ``5.50`` -> ``5.5``, ``12.0`` -> ``12``.
"""

from __future__ import annotations

import ast
import operator
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from lmladder.errors import LadderError, where
from lmladder.tasks.base import Grammar, Task

# 1,234,567.89 | 1234.5 | .5 ; a minus sign only when it is not a subtraction ("5-3")
_NUM = r"(?:(?<![\w)\]])-\s?)?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?<=\d)"
NUM_RE = re.compile(_NUM)
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_ANSWER_IS_RE = re.compile(r"(?:final answer|answer)\s*(?:is|=|:|：)\s*", re.IGNORECASE)
# "a op b (op c) = d" in a reasoning text, also GSM8K's calculator notes <<a*b=c>>
_EQ_RE = re.compile(
    r"(?<![\w.])((?:-?\d[\d,]*(?:\.\d+)?\s*[-+*/x×÷]\s*)+-?\d[\d,]*(?:\.\d+)?)\s*=\s*\$?(-?\d[\d,]*(?:\.\d+)?)"
)
_CALC_NOTE_RE = re.compile(r"<<[^<>]*>>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def normalize_number(text: str) -> str | None:
    """Canonical string of a number written in ``text`` ('$1,234.50' -> '1234.5'), or
    None when it is not a number."""
    s = re.sub(r"[\s$,]", "", str(text)).rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def last_number(text: str) -> str | None:
    nums = [m.group(0) for m in NUM_RE.finditer(text)]
    for n in reversed(nums):
        v = normalize_number(n)
        if v is not None:
            return v
    return None


def marked_number(text: str) -> str | None:
    """The number after the last ``####`` or in the last ``\\boxed{}``."""
    for pattern in (_HASH_RE, _BOXED_RE):
        ms = list(pattern.finditer(text))
        if ms:
            n = last_number(ms[-1].group(1))
            if n is not None:
                return n
    return None


def gold_number(label: str) -> str | None:
    """A gold answer: a number ('1,234', '$5.50') or a worked solution ending '#### N'."""
    n = normalize_number(label)
    return n if n is not None else marked_number(label)


def find_answer(text: str, first_line: bool = False) -> tuple[str | None, str | None]:
    """(canonical number, None) or (None, reason): ####, \\boxed{}, 'answer is', else the
    last number (``first_line``: a number on the first line first, for direct answers
    where the model answers, then rambles on)."""
    n = marked_number(text)
    if n is not None:
        return n, None
    ms = list(_ANSWER_IS_RE.finditer(text))
    if ms:
        n = _first_number(text[ms[-1].end():])
        if n is not None:
            return n, None
    lines = [l for l in text.strip().splitlines() if l.strip()]
    n = last_number(lines[0]) if first_line and lines else None
    n = n if n is not None else last_number(text)
    return (n, None) if n is not None else (None, "no number in the output")


def _first_number(text: str) -> str | None:
    m = NUM_RE.search(text)
    return normalize_number(m.group(0)) if m else None


def _eval(expr: str) -> Fraction:
    """Exact value of + - * / arithmetic on numbers (no names, no calls)."""
    expr = expr.replace(",", "").replace("×", "*").replace("÷", "/")
    expr = re.sub(r"(?<=[\d\s])x(?=[\s\d])", "*", expr)

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("not arithmetic")

    return ev(ast.parse(expr.strip(), mode="eval"))


def check_equations(text: str) -> tuple[int, int]:
    """(correct, total) over the ``a op b = c`` equations written in ``text``."""
    ok = total = 0
    for m in _EQ_RE.finditer(text):
        try:
            lhs = _eval(m.group(1))
            rhs = Fraction(m.group(2).replace(",", ""))
        except (ValueError, SyntaxError, ZeroDivisionError):
            continue
        total += 1
        decimals = len(m.group(2).partition(".")[2])  # "10/3 = 3.33" is right when rounded
        ok += abs(lhs - rhs) <= Fraction(1, 2 * 10**decimals)
    return ok, total


class MathTask(Task):
    kind = "math"
    summary = 'a numeric answer in free text (exact match)'
    metric_names = ("exact_match",)

    def default_instruction(self) -> str:
        return "Solve the math word problem. Give the final answer as a number."

    def hints(self) -> list[str]:
        return ["Answer with the final number only."]

    def setup(self, dataset) -> None:
        for e in dataset.train + dataset.test:
            if gold_number(e.label) is None:
                path, line = e.source.rsplit(":", 1)
                raise LadderError(f"{where(path, line)}: the gold answer {e.label[:40]!r} is not a number")

    def gold(self, example) -> str:
        return gold_number(example.label)

    def answer(self, example) -> str:
        return self.gold(example)

    def reasoning_answer(self, example) -> str | None:
        sol = example.fields.get("solution")
        if not isinstance(sol, str) or not sol.strip():
            return None
        text = _CALC_NOTE_RE.sub("", sol).strip()
        text = re.sub(r"\n?####\s*[^\n]*$", "", text).rstrip()
        return f"{text}\nAnswer: {self.gold(example)}"

    def parse(self, text, example=None):
        return find_answer(text, first_line=True)

    def extract(self, text, example=None):
        return find_answer(text)  # same preferences; the final number over the whole text

    def vote_key(self, pred):
        return pred

    def grammar(self, example=None):
        return Grammar("regex", r"-?[0-9]{1,15}(\.[0-9]{1,6})?")

    def verify(self, candidate, example):
        """Share of the candidate's ``a op b = c`` equations that are right; None if none."""
        ok, total = check_equations(candidate.get("raw") or "")
        return ok / total if total else None

    def correct(self, pred, gold) -> bool:
        return pred is not None and pred == gold

    def example_values(self, golds, preds):
        return {"exact_match": [float(self.correct(p, g)) for p, g in zip(preds, golds)]}

    def score(self, golds, preds):
        return self.mean_metrics(self.example_values(golds, preds))
