"""Grammar-constrained decoding: the answer can only be what the task's grammar allows.

A task exposes ``task.grammar(example) -> Grammar(kind, value)``:

* ``choice``: a list of strings (classification's label set),
* ``regex``: a pattern (a math answer),
* ``json_schema``: a JSON Schema (extraction).

Two maintained engines do the work: **xgrammar** (default) and **llguidance**
(``constrained.engine: llguidance``). Each distinct grammar is compiled once per
tokenizer (cached by ``(kind, json value, reasoning)``); each generated row gets
its own matcher. At every step the matcher of a row accepts the token sampled last,
fills the row of a token bitmask, and the disallowed logits are set to -inf in place.

``reasoning=True`` lets the model think first: free text in which the string
``Answer:`` cannot appear, then the line ``Answer: `` followed by the constrained
answer, then end-of-turn. With a token budget (``max_new_tokens``, passed by
inference/generate.py) a row still thinking when only the answer's reserve is left gets
``"\nAnswer: "`` forced (one token per step, through the same mask), so the answer fits.

JSON is compact-ish (``", "`` / ``": "`` separators, no free whitespace), so a small
model cannot wander into endless blank lines inside an object. With a token budget, a
JSON answer still open when only the closing reserve is left (``close_reserve``: enough
for the required keys still to come) is steered shut: inside an open string only a
token that starts with the closing quote, outside strings only tokens of braces and
brackets (each where the grammar allows it), and once the document is complete only the
stop tokens; so every output within the budget is complete, valid JSON that matches the
schema (the grammar still decides every token).

Validation needs no tokenizer and no model: :func:`check` parses the grammar with the
chosen engine and returns a one-line error (a bad regex, a broken schema).
"""

from __future__ import annotations

import json
import re
import time
import weakref
from typing import Any, Sequence

import torch
from transformers import LogitsProcessor

ENGINES = ("xgrammar", "llguidance")
ANSWER_PREFIX = "Answer: "
KINDS = ("choice", "regex", "json_schema")
# Tokens kept for the answer when a reasoning budget cuts the free text.
_ANSWER_RESERVE = {"choice": 16, "regex": 48, "json_schema": 160}
_JSON_SEPARATORS = (", ", ": ")


def grammar_key(g) -> tuple[str, str]:
    return g.kind, json.dumps(g.value, sort_keys=True, ensure_ascii=False)


def _one_line(err: Exception | str) -> str:
    """Engine errors come with timestamps, C++ file names and carets: keep the message."""
    lines = [l.strip() for l in str(err).strip().splitlines() if l.strip()]
    text = lines[0] if lines else type(err).__name__
    text = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text)  # "[23:03:16] /x/y.cc:83: "
    return text


def _require(engine: str):
    from lmladder.errors import LadderError

    if engine not in ENGINES:
        raise LadderError(f"constrained.engine: unknown grammar engine '{engine}' (known: {', '.join(ENGINES)})")
    try:
        if engine == "xgrammar":
            import xgrammar as mod
        else:
            import llguidance as mod
    except ImportError:
        pin = "xgrammar==0.2.8" if engine == "xgrammar" else "llguidance==1.9.1"
        raise LadderError(
            f"constrained.engine: {engine} is not installed (pip install -c constraints.txt {pin})"
        ) from None
    return mod


def _shape_error(g) -> str | None:
    if g.kind not in KINDS:
        return f"unknown grammar kind '{g.kind}' (known: {', '.join(KINDS)})"
    if g.kind == "choice":
        if not isinstance(g.value, (list, tuple)) or not g.value or not all(isinstance(v, str) and v for v in g.value):
            return "a choice grammar needs a non-empty list of non-empty strings"
    elif g.kind == "regex":
        if not isinstance(g.value, str) or not g.value:
            return "a regex grammar needs a non-empty pattern string"
    elif not isinstance(g.value, (dict, bool)):
        return "a json_schema grammar needs a schema mapping"
    return None


# --------------------------------------------------------------------------- xgrammar


def _xgr_answer_grammar(g):
    """The answer grammar as an xgrammar Grammar (raises on a bad regex / schema)."""
    import xgrammar as xgr

    if g.kind == "choice":
        alts = " | ".join(json.dumps(v, ensure_ascii=False) for v in g.value)
        return xgr.Grammar.from_ebnf(f"root ::= {alts}")
    if g.kind == "regex":
        return xgr.Grammar.from_regex(g.value)
    schema = _bounded_strings_as_patterns(g.value) if isinstance(g.value, dict) else json.dumps(g.value)
    return xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=_JSON_SEPARATORS)


def _bounded_strings_as_patterns(node):
    """xgrammar 0.2.8 lets control characters into strings with minLength/maxLength
    (invalid JSON); the same bounds as a pattern exclude them. Only our grammar's copy of
    the schema changes (such strings then have no escapes)."""
    if isinstance(node, list):
        return [_bounded_strings_as_patterns(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_strings_as_patterns(v) for k, v in node.items()}
    types = out.get("type")
    is_str = types == "string" or (isinstance(types, list) and types == ["string"])
    if is_str and ({"minLength", "maxLength"} & out.keys()) and not ({"pattern", "format", "enum", "const"} & out.keys()):
        lo, hi = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = '^[^\\x00-\\x1f"\\\\]{%d,%s}$' % (lo, "" if hi is None else int(hi))
    return out


def _xgr_reasoning_tag(g) -> str:
    """Structural tag: free text without 'Answer:', then 'Answer: ' and the answer grammar."""
    text: dict[str, Any] = {"type": "any_text", "excludes": [ANSWER_PREFIX.strip()]}
    answer = {"type": "grammar", "grammar": str(_xgr_answer_grammar(g))}
    tag = {"type": "tag", "begin": ANSWER_PREFIX, "content": answer, "end": ""}
    return json.dumps({"type": "structural_tag", "format": {"type": "sequence", "elements": [text, tag]}})


# --------------------------------------------------------------------------- llguidance

_LLG_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lark_answer(g) -> str:
    if g.kind == "choice":
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in g.value)
    if g.kind == "regex":
        return "/" + g.value.replace("/", "\\/") + "/"
    schema = dict(g.value) if isinstance(g.value, dict) else {}
    schema["x-guidance"] = {**_LLG_JSON_OPTIONS, **schema.get("x-guidance", {})}
    return "%json " + json.dumps(schema)


def _llg_grammar(g, reasoning: bool) -> str:
    import llguidance as llg

    if not reasoning:
        if g.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(g.value)
        if g.kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(g.value, defaults=dict(_LLG_JSON_OPTIONS))
        return llg.LLMatcher.grammar_from_lark("start: " + _lark_answer(g))
    # the thinking lexeme ends with (and includes) its suffix 'Answer: '
    lark = f"start: think answer\nthink[suffix={json.dumps(ANSWER_PREFIX)}]: /(?s:.*)/\nanswer: {_lark_answer(g)}\n"
    return llg.LLMatcher.grammar_from_lark(lark)


# --------------------------------------------------------------------------- checks


def check(g, engine: str = "xgrammar", reasoning: bool = False) -> str | None:
    """Parse a grammar with ``engine`` (no tokenizer needed): None when it compiles, else
    a one-line reason."""
    if g is None:
        return "no grammar"
    bad = _shape_error(g)
    if bad:
        return bad
    _require(engine)
    try:
        if engine == "xgrammar":
            import xgrammar as xgr

            if reasoning:
                xgr.Grammar.from_structural_tag(_xgr_reasoning_tag(g))
            else:
                _xgr_answer_grammar(g)
        else:
            import llguidance as llg

            msg = llg.LLMatcher.validate_grammar(_llg_grammar(g, reasoning))
            if msg:
                return _one_line(msg.split("):", 1)[-1] if msg.startswith("at ") else msg)
    except Exception as e:  # engines raise RuntimeError / ValueError / their own errors
        return _one_line(e)
    return None


def describe(g) -> str:
    if g.kind == "choice":
        return f"choice of {len(g.value)}"
    if g.kind == "regex":
        return f"regex {g.value!r}"
    return "JSON Schema"


def validate_task_grammars(task, examples: Sequence, engine: str = "xgrammar", reasoning: bool = False,
                           field: str = "constrained") -> int:
    """Check the grammar of every example before any model work (each distinct grammar
    once). Raises a one-line LadderError naming the example's file:line; returns the
    number of distinct grammars."""
    from lmladder.errors import LadderError

    _require(engine)
    seen: dict[tuple, str | None] = {}
    try:
        fixed = task.grammar(None)
    except Exception:  # kinds with per-example grammars may need the example
        fixed = None
    if fixed is not None:
        err = check(fixed, engine, reasoning)
        if err:
            raise LadderError(f"{field}: task {task.kind}: grammar ({describe(fixed)}) does not compile: {err}")
        seen[grammar_key(fixed)] = None
    for ex in examples:
        try:
            g = task.grammar(ex)
        except LadderError:
            raise
        except Exception as e:
            raise LadderError(f"{getattr(ex, 'source', '?')}: {field}: cannot build the grammar: {_one_line(e)}") from None
        if g is None:
            raise LadderError(f"{field}: task kind {task.kind} has no grammar for its answers")
        key = grammar_key(g)
        if key not in seen:
            seen[key] = check(g, engine, reasoning)
        if seen[key]:
            raise LadderError(
                f"{getattr(ex, 'source', '?')}: {field}: grammar ({describe(g)}) does not compile: {seen[key]}"
            )
    return len(seen)


# --------------------------------------------------------------------------- runtime


class _Engine:
    """Compiled grammars and matchers for one tokenizer and one engine."""

    def __init__(self, tokenizer, engine: str, stop: list[int]):
        self.engine, self.stop = engine, list(stop)
        self.vocab_size = len(tokenizer)
        self._compiled: dict[tuple, Any] = {}
        if engine == "xgrammar":
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        else:
            import llguidance.hf

            self._lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=list(self.stop))

    def compiled(self, g, reasoning: bool):
        key = (*grammar_key(g), reasoning)
        if key not in self._compiled:
            from lmladder.errors import LadderError

            try:
                if self.engine == "xgrammar":
                    if reasoning:
                        c = self._compiler.compile_structural_tag(_xgr_reasoning_tag(g))
                    else:
                        c = self._compiler.compile_grammar(_xgr_answer_grammar(g))
                else:
                    import llguidance as llg

                    c = _llg_grammar(g, reasoning)
                    msg = llg.LLMatcher.validate_grammar(c, self._lltok)
                    if msg:
                        raise ValueError(msg)
            except Exception as e:
                raise LadderError(f"constrained decoding: grammar ({describe(g)}) does not compile: {_one_line(e)}") from None
            self._compiled[key] = c
        return self._compiled[key]

    def matcher(self, compiled):
        if self.engine == "xgrammar":
            import xgrammar as xgr

            m = xgr.GrammarMatcher(compiled)
            return m.accept_token, lambda bm, i: m.fill_next_token_bitmask(bm, i)
        import llguidance as llg
        import llguidance.torch as llt

        m = llg.LLMatcher(self._lltok, compiled, log_level=0)
        return m.consume_token, lambda bm, i: llt.fill_next_token_bitmask(m, bm, i)


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _engine_for(tokenizer, engine: str, stop: list[int]) -> _Engine:
    per_tok = _ENGINES.setdefault(tokenizer, {})
    key = (engine, tuple(stop))
    if key not in per_tok:
        per_tok[key] = _Engine(tokenizer, engine, stop)
    return per_tok[key]


_BYTE_BITS = torch.tensor([[(b >> j) & 1 for j in range(8)] for b in range(256)], dtype=torch.bool)


def apply_bitmask_(scores: torch.Tensor, bitmask: torch.Tensor, vocab_size: int) -> None:
    """Set the logits of disallowed tokens to -inf in place (bit j of int32 word w is
    token 32*w + j); logits past the tokenizer's vocabulary (padding) are disallowed.
    xgrammar's CPU kernel for float32 on CPU, else a byte lookup table in torch."""
    V = min(vocab_size, scores.shape[-1])
    if scores.shape[-1] > V:
        scores[:, V:] = float("-inf")
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.is_contiguous():
        try:
            import xgrammar as xgr

            xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=V)
            return
        except ImportError:
            pass
    # little-endian: byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7
    allowed = _BYTE_BITS[bitmask.contiguous().view(torch.uint8).long()].reshape(bitmask.shape[0], -1)[:, :V]
    scores[:, :V].masked_fill_(~allowed.to(scores.device), float("-inf"))


def close_reserve(schema) -> int:
    """Tokens kept to close a JSON answer: a few per required property (its key, a short
    value), nested schemas included, plus the closing brackets."""
    def req(node) -> int:
        if not isinstance(node, dict):
            return 0
        n = len(node.get("required") or [])
        subs = list((node.get("properties") or {}).values())
        if isinstance(node.get("items"), dict):
            subs.append(node["items"])
        return n + sum(req(s) for s in subs)

    return 12 + 8 * req(schema)


def _closing_ids(tokenizer, vocab_size: int) -> tuple[list[int], list[int]]:
    """Token ids whose text is only JSON closing characters: (those that start with a
    quote -- they end an open string --, those without a quote -- they end objects and
    arrays outside strings)."""
    quote, plain = [], []
    for i in range(vocab_size):
        try:
            t = tokenizer.decode([i])
        except Exception:  # noqa: BLE001 - special / unused ids
            continue
        s = t.replace(" ", "")
        if s and set(s) <= set('"}]'):
            if s[0] == '"':
                quote.append(i)
            elif '"' not in s:
                plain.append(i)
    return quote, plain


def in_json_string(text: str) -> bool:
    """Whether a JSON prefix ends inside a string (quotes not escaped by a backslash)."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and inside:
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


def _bits(ids, vocab_size: int) -> torch.Tensor:
    words = (vocab_size + 31) // 32
    b = torch.zeros(words, dtype=torch.int64)
    for i in ids:
        if 0 <= i < vocab_size:
            b[i // 32] |= 1 << (i % 32)
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32)


class GrammarLogitsProcessor(LogitsProcessor):
    """One batch of ``generate``: one matcher per row. Rows are left-padded (the
    processor only looks at the last token of each row); a row that produced a stop
    token is finished and left unmasked (the decode loop feeds it pads). When rows leave
    the batch (inference/generate.py), ``select_rows`` keeps the state of those that stay.

    ``force_after`` (reasoning with a budget): at that many generated tokens, a row whose
    text has no 'Answer:' yet is steered into ``force_ids`` ("\nAnswer: "), one token per
    step, each still checked against the grammar's mask."""

    def __init__(self, engine: _Engine, compiled: list, force_after: int | None = None,
                 force_ids: Sequence[int] = (), decode=None, counters: dict | None = None,
                 close_after: Sequence[int | None] | None = None, closing_bits=None, stop_bits=None):
        # closing_bits: (tokens that start with a quote, closing tokens without one)
        self.engine = engine
        # per row: generated tokens after which a JSON answer is steered shut (None: never)
        self.close_after = list(close_after) if close_after is not None else [None] * len(compiled)
        self.closing_bits, self.stop_bits = closing_bits, stop_bits
        self.matchers = [engine.matcher(c) for c in compiled]
        self.done = [False] * len(compiled)
        self.queue: list[list[int]] = [[] for _ in compiled]
        self.force_after, self.force_ids, self.decode = force_after, list(force_ids), decode
        self.start: int | None = None
        self.stop = set(engine.stop)
        # tokens a matcher refused (should stay 0), rows steered into the answer
        self.counters = counters if counters is not None else {"rejected_tokens": 0, "forced_rows": 0, "seconds": 0.0}
        words = (engine.vocab_size + 31) // 32
        self.bitmask = torch.full((len(compiled), words), -1, dtype=torch.int32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t0 = time.perf_counter()
        if input_ids.shape[0] != len(self.matchers):
            raise RuntimeError(f"grammar processor built for {len(self.matchers)} rows, got {input_ids.shape[0]}")
        if self.start is None:
            self.start = input_ids.shape[1]
        else:
            last = input_ids[:, -1].tolist()
            for i, (accept, _) in enumerate(self.matchers):
                if self.done[i]:
                    continue
                if last[i] in self.stop:
                    self.done[i] = True
                elif not accept(last[i]):
                    self.counters["rejected_tokens"] += 1
                    self.done[i] = True
        for i, (_, fill) in enumerate(self.matchers):
            if self.done[i]:
                self.bitmask[i].fill_(-1)
            else:
                fill(self.bitmask, i)
        if self.force_after is not None and input_ids.shape[1] - self.start >= self.force_after:
            self._force(input_ids)
        step = input_ids.shape[1] - self.start
        for i, c in enumerate(self.close_after):
            if c is not None and step >= c and not self.done[i]:
                self._close(i, input_ids[i, self.start:].tolist())
        apply_bitmask_(scores, self.bitmask, self.engine.vocab_size)
        self.counters["seconds"] += time.perf_counter() - t0  # the grammar's own cost
        return scores

    def select_rows(self, keep: Sequence[int]) -> None:
        """Rows ``keep`` (their old indices, in their new order) stay in the batch, the
        others left it (inference/generate.py): every per-row state follows them."""
        keep = list(keep)
        self.matchers = [self.matchers[i] for i in keep]
        self.done = [self.done[i] for i in keep]
        self.queue = [self.queue[i] for i in keep]
        self.close_after = [self.close_after[i] for i in keep]
        self.bitmask = self.bitmask[keep].contiguous() if keep else self.bitmask[:0]

    def _close(self, i: int, generated: list[int]) -> None:
        """Row ``i`` is out of budget: stop when the document is complete; else, inside a
        string, a token that starts with its closing quote; else a token of only braces /
        brackets; each only where the grammar allows it (else the grammar's own choice:
        a required key, an enum value, a separator)."""
        row = self.bitmask[i]
        quote, plain = self.closing_bits if self.closing_bits is not None else (None, None)
        inside = in_json_string(self.decode(generated)) if self.decode is not None else False
        for bits in (self.stop_bits, quote if inside else plain):
            if bits is None:
                continue
            both = row & bits
            if bool(both.any()):
                if bits is not self.stop_bits:
                    self.counters["closed_rows"] = self.counters.get("closed_rows", 0) + 1
                self.bitmask[i] = both
                return

    def _force(self, input_ids) -> None:
        if input_ids.shape[1] - self.start == self.force_after:  # once: who is still thinking?
            for i in range(len(self.matchers)):
                if not self.done[i] and ANSWER_PREFIX.strip() not in self.decode(input_ids[i, self.start:].tolist()):
                    self.queue[i] = list(self.force_ids)
                    self.counters["forced_rows"] += 1
        for i, q in enumerate(self.queue):
            if q and not self.done[i]:
                t = q.pop(0)
                if (int(self.bitmask[i, t // 32]) >> (t % 32)) & 1:  # the grammar allows it
                    self.bitmask[i].zero_()
                    b = t % 32
                    self.bitmask[i, t // 32] = (1 << b) if b < 31 else -(1 << 31)
                else:
                    q.clear()


class ProcessorFactory:
    """``factory(batch_rows, prompt_indices, max_new_tokens=None) -> [processor]``: the
    callable inference/generate.py asks for one batch's logits processors."""

    accepts_budget = True  # generate() passes max_new_tokens (the reasoning budget)

    def __init__(self, tokenizer, grammars: Sequence, engine: str = "xgrammar", reasoning: bool = False,
                 stop: list[int] | None = None):
        from lmladder.inference.generate import stop_ids
        from lmladder.errors import LadderError

        _require(engine)
        for g in grammars:
            bad = None if g is None else _shape_error(g)
            if g is None or bad:
                raise LadderError(f"constrained decoding: {bad or 'an example has no grammar'}")
        self.tokenizer = tokenizer
        self.grammars, self.reasoning = list(grammars), reasoning
        self.engine = _engine_for(tokenizer, engine, stop or stop_ids(tokenizer))
        self.force_ids = tokenizer("\n" + ANSWER_PREFIX, add_special_tokens=False).input_ids
        self.counters = {"rejected_tokens": 0, "forced_rows": 0, "closed_rows": 0, "batches": 0, "seconds": 0.0}
        self._closing = None

    def stats(self) -> dict:
        return {"grammar_engine": self.engine.engine, "grammars_compiled": len(self.engine._compiled),
                **{f"grammar_{k}": round(v, 4) if isinstance(v, float) else v for k, v in self.counters.items()}}

    def __call__(self, batch_rows: int, prompt_indices: Sequence[int], max_new_tokens: int | None = None):
        if len(prompt_indices) != batch_rows:
            raise ValueError("one prompt index per row")
        t0 = time.perf_counter()
        gs = [self.grammars[i] for i in prompt_indices]
        force_after = None
        if self.reasoning and max_new_tokens is not None:
            reserve = max(_ANSWER_RESERVE[g.kind] for g in gs) + len(self.force_ids)
            force_after = max(max_new_tokens - min(reserve, max_new_tokens // 2), 0)
        close_after = [None] * len(gs)
        closing = stop = None
        if not self.reasoning and max_new_tokens is not None and any(g.kind == "json_schema" for g in gs):
            if self._closing is None:  # once per factory: which tokens close, which stop
                V = self.engine.vocab_size
                quote, plain = _closing_ids(self.tokenizer, V)
                self._closing = ((_bits(quote, V), _bits(plain, V)), _bits(self.engine.stop, V))
            closing, stop = self._closing
            close_after = [max(max_new_tokens - min(close_reserve(g.value), max_new_tokens // 2), 0)
                           if g.kind == "json_schema" else None for g in gs]
        proc = GrammarLogitsProcessor(
            self.engine, [self.engine.compiled(g, self.reasoning) for g in gs],
            force_after=force_after, force_ids=self.force_ids,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), counters=self.counters,
            close_after=close_after, closing_bits=closing, stop_bits=stop,
        )
        self.counters["batches"] += 1
        self.counters["seconds"] += time.perf_counter() - t0  # compiling (first use), matchers
        return [proc]


def processor_factory(tokenizer, grammars: Sequence, engine: str = "xgrammar", reasoning: bool = False,
                      stop: list[int] | None = None) -> ProcessorFactory:
    """A callable ``(batch_rows, prompt_indices) -> [LogitsProcessor]`` for
    inference/generate.py: ``grammars[i]`` constrains every row generated for prompt ``i``."""
    return ProcessorFactory(tokenizer, grammars, engine=engine, reasoning=reasoning, stop=stop)
