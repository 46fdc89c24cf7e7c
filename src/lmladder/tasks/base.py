"""The task interface: how a target is rendered, parsed and scored.

A task kind knows its data (what the gold is, how an answer is written), how a free-text
output is turned into a prediction (``parse`` for a direct answer, ``extract`` for the
final part of a reasoning text), how predictions are scored (metrics with bootstrap CIs),
its grammar for constrained decoding and, when it has one, a programmatic verifier.
It never knows which rung built the prompt.

Predictions are dicts: ``{"pred": value or None, "raw": model text, "error": reason or
None, ...}``; an unparseable output is ``pred=None`` with the reason, counted wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from lmladder import prompts

ANSWER_RE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:：]\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Grammar:
    """What constrained decoding enforces: ``choice`` (a list of strings), ``regex``
    (a pattern string) or ``json_schema`` (a schema dict)."""

    kind: str
    value: Any


def mean_ci(values: Sequence[float], n_boot: int, seed: int) -> dict:
    """Mean of per-example values with a 95% CI, ``{"value", "ci", "interval"}``: the
    Wilson interval when every value is 0 or 1 (a proportion: accuracy, exact match,
    valid-JSON rate, reward accuracy), else a seeded percentile bootstrap (F1, margins)."""
    from lmladder import metrics

    return metrics.mean_ci(values, n_boot, seed)


def continuations(task, fmt, message: str, answers, eos_ids: set[int]) -> list[list[int]]:
    """Token ids of each answer as scored after the prompt of ``message``: what training
    supervises, i.e. the answer through the chat template's end-of-turn token as the
    template renders the assistant turn (so a thinking template's empty think block comes
    first, and "1" cannot win merely by being a prefix of "10"). A plain-text prompt
    (``fmt.plain``) scores ``" " + answer + task.plain_end`` instead: the line end that the
    prompt's own examples show ("\n" for labels; nothing for multiple-choice, as lm-eval)."""
    tok = fmt.tokenizer
    if getattr(fmt, "plain", False):
        return [tok(fmt.answer_prefix() + a + task.plain_end, add_special_tokens=False).input_ids for a in answers]
    from lmladder.prompts import response_ids

    return [response_ids(fmt, message, a, eos_ids) for a in answers]


def continuation_texts(task, fmt, message: str, answers, eos_ids: set[int] | None = None) -> list[str]:
    """The same continuations as text, for a remote backend that scores text (one with no
    tokenizer, hence no end-of-turn token, scores them as plain text)."""
    tok = getattr(fmt, "tokenizer", None)
    if getattr(fmt, "plain", False) or tok is None or (not fmt.has_template and tok.eos_token_id is None):
        return [fmt.answer_prefix() + a + task.plain_end for a in answers]
    eos = eos_ids if eos_ids is not None else ({tok.eos_token_id} - {None})
    return [tok.decode(ids) for ids in continuations(task, fmt, message, answers, eos)]


def final_part(text: str) -> str:
    """The text after the last 'Answer:' marker (reasoning outputs), else the last
    non-empty line."""
    ms = list(ANSWER_RE.finditer(text))
    if ms:
        return text[ms[-1].end():].strip()
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""


class Task:
    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # what an answer is and how it is scored (--help, docs)
    metric_names: ClassVar[tuple[str, ...]] = ()
    generative: ClassVar[bool] = True  # predictions come from generated text
    answer_word: ClassVar[str] = "Answer"
    plain_end: ClassVar[str] = "\n"  # what ends a scored answer in a plain-text prompt

    def __init__(self, cfg, labels: Sequence[str], eval_cfg, seed: int):
        self.cfg, self.labels, self.eval_cfg, self.seed = cfg, list(labels), eval_cfg, seed

    @classmethod
    def fingerprint_part(cls, cfg) -> dict:
        """What a rung's result depends on besides the run's task / data / rung settings, for
        this kind (run/fingerprint.py): e.g. preference's win-rate judge. Evaluation only:
        trained weights never depend on it."""
        return {}

    @classmethod
    def metrics_for(cls, task_cfg) -> tuple[str, ...]:
        """The metric names a run of this kind reports (the first is the default primary);
        a kind with a configurable metric (generation's metric_fn) adds it here."""
        return cls.metric_names

    def setup(self, dataset) -> None:
        """Learn what the task needs from the loaded data (extraction: entity types seen in
        train) and check every gold (a math answer that is not a number); raise
        LadderError naming file:line: field. Called before any model work."""

    # ------------------------------------------------------------------ prompts
    @property
    def instruction(self) -> str:
        return self.cfg.instruction or self.default_instruction()

    def default_instruction(self) -> str:
        return "Answer the question."

    def hints(self) -> list[str]:
        """Answer-format lines added to the instruction (direct answers)."""
        return []

    def query(self, example) -> str:
        """The input as shown to the model (multiple-choice adds its choices)."""
        return example.input

    def user_message(self, x, examples: Sequence = (), *, reasoning: str | None = None,
                     context: str | None = None, instruction: str | None = None) -> str:
        """``x``: an Example or the input text; ``examples``: Examples or (input, answer)."""
        q = x if isinstance(x, str) else self.query(x)
        pairs = [e if isinstance(e, tuple) else (self.query(e), self.answer(e)) for e in examples]
        hints = self.hints() if reasoning is None else [reasoning]
        return prompts.user_message(
            instruction or getattr(x, "instruction", None) or self.instruction, q, pairs, None,
            answer_word=self.answer_word, hints=hints, context=context,
        )

    def plain_message(self, x, examples: Sequence = ()) -> str:
        """The prompt for ``prompt_format: plain`` (rendered as text, no chat template):
        the same template as :meth:`user_message` unless a kind has a better-known plain
        form (multiple-choice: lm-eval's ``Question: ...\nAnswer:``)."""
        return self.user_message(x, examples)

    def train_message(self, example) -> str:
        """The prompt a training rung learns from. With ``task.templates`` (FLAN-style),
        each example gets a seeded choice among the default template and those."""
        templates = getattr(self.cfg, "templates", None)
        if not templates:
            return self.user_message(example)
        import random, zlib

        i = random.Random(zlib.crc32(f"{self.seed}:{example.id}".encode())).randrange(len(templates) + 1)
        if i == 0:
            return self.user_message(example)
        instr = example.instruction or self.instruction
        return templates[i - 1].format(instruction=instr.strip(), input=self.query(example))

    # ------------------------------------------------------------------ targets
    def answer(self, example) -> str:
        """The assistant's answer text for training and in-context examples."""
        return example.label

    def gold(self, example) -> Any:
        return example.target

    def reasoning_answer(self, example) -> str | None:
        """A worked reasoning text ending in 'Answer: <answer>' for in-context reasoning
        examples (cot / few-shot), when the data has one (math: GSM8K's solution); else None."""
        return None

    # ------------------------------------------------------------------ outputs
    def parse(self, text: str, example=None) -> tuple[Any, str | None]:
        """A direct answer -> (prediction, None) or (None, reason)."""
        t = text.strip()
        return (t, None) if t else (None, "empty output")

    def extract(self, text: str, example=None) -> tuple[Any, str | None]:
        """The answer in a reasoning text: its final part, parsed."""
        part = final_part(text)
        if not part:
            return None, "no answer found after the reasoning"
        return self.parse(part, example)

    def vote_key(self, pred) -> Any:
        """Predictions that count as the same answer in a majority vote."""
        import json

        return json.dumps(pred, sort_keys=True) if isinstance(pred, (dict, list)) else pred

    def grammar(self, example=None) -> Grammar | None:
        return None

    def verify(self, candidate: dict, example) -> float | None:
        """A programmatic check of one candidate, the prediction dict ``{"pred", "raw",
        "error"}`` (the raw text lets a checker look at the reasoning): a score in [0, 1]
        (1 = passes), or None when the task has no check for it."""
        return None

    # ------------------------------------------------------------------ scoring
    def correct(self, pred, gold) -> bool:
        return pred is not None and pred == gold

    def score(self, golds: list, preds: list) -> dict[str, dict]:
        raise NotImplementedError

    def example_values(self, golds: list, preds: list) -> dict[str, list[float]]:
        """Per-example scores of the metrics that are means over examples (accuracy,
        exact match, token F1, ...); metrics that are not (macro-F1, micro-F1) are absent."""
        return {}

    def paired_data(self, golds: list, preds: list, metric: str) -> dict | None:
        """What a paired comparison of two rungs on ``metric`` needs per test example
        (verdict.paired): ``{"kind": "mean", "binary", "values"}`` for a mean over examples;
        None when the metric cannot be taken apart by example."""
        from lmladder.metrics import is_binary

        vals = self.example_values(golds, preds)
        if metric not in vals:
            return None
        v = [float(x) for x in vals[metric]]
        return {"kind": "mean", "binary": is_binary(v), "values": v}

    def mean_metrics(self, per_example: dict[str, list[float]]) -> dict[str, dict]:
        """{name: {value, ci, interval}}: means of per-example scores with 95% CIs (Wilson
        for 0/1 scores, else the seeded percentile bootstrap; see ``mean_ci``)."""
        return {k: mean_ci(v, self.eval_cfg.bootstrap, self.seed) for k, v in per_example.items()}

    # ------------------------------------------------------------------ prediction
    def predict(self, model, fmt, messages: list[str], examples=None, desc: str = "",
                constrained: bool = False, engine: str = "xgrammar"):
        """Greedy direct answers (optionally grammar-constrained), parsed."""
        return generate_answers(self, model, fmt, messages, examples, desc=desc,
                                constrained=constrained, engine=engine)


def generate_answers(task: Task, model, fmt, messages, examples=None, *, desc="", constrained=False,
                     engine="xgrammar", max_new_tokens=None, reasoning=False, n=1,
                     do_sample=False, temperature=1.0, top_p=1.0, prefix: str = "",
                     stop_at_answer: bool = False, answer_after: str | None = None):
    """Generate for every message and parse: the path shared by direct-answer and
    reasoning rungs. Returns (predictions, info); with ``n > 1`` each prediction holds
    ``samples`` (the n parsed candidates) and ``pred`` is the first.

    ``stop_at_answer`` (reasoning): a path stops once its answer line is complete
    (:func:`answer_line_end`; ``answer_after``: only an answer line after the last
    occurrence of that text counts, e.g. ``</think>``) and its text ends there."""
    from lmladder.inference.generate import generate

    if hasattr(model, "label_loglikelihoods"):
        from lmladder.errors import LadderError

        raise LadderError(f"{task.kind} needs text generation, which the openai: backend does not offer yet")
    tok = fmt.tokenizer
    prompt_texts = [fmt.prompt(m) + prefix for m in messages]
    ids = [fmt.encode(p) for p in prompt_texts]
    processors = None
    if constrained:
        from lmladder.inference import constrain

        exs = list(examples) if examples is not None else [None] * len(messages)
        grammars = [task.grammar(e) for e in exs]
        if any(g is None for g in grammars):
            from lmladder.errors import LadderError

            raise LadderError(f"constrained decoding: task kind {task.kind} has no grammar for its answers")
        processors = constrain.processor_factory(tok, grammars, engine=engine, reasoning=reasoning)
    exs = list(examples) if examples is not None else [None] * len(messages)

    def at_answer(i: int, text: str) -> int | None:
        return answer_line_end(task, text, exs[i], after=answer_after)

    stop_at = at_answer if stop_at_answer and reasoning else None
    texts, stats = generate(
        model, tok, ids,
        max_new_tokens=max_new_tokens or task.eval_cfg.max_new_tokens,
        n=n, do_sample=do_sample, temperature=temperature, top_p=top_p,
        batch_size=task.eval_cfg.gen_batch_size, seed=task.seed, processors=processors, desc=desc,
        max_batch_tokens=getattr(task.eval_cfg, "max_batch_tokens", None), stop_at=stop_at,
    )
    parse = task.extract if reasoning else task.parse
    preds = []
    for outs, ex in zip(texts, exs):
        cands = []
        for t in outs:
            p, err = parse(t, ex)
            cands.append({"pred": p, "raw": t, "error": err})
        rec = dict(cands[0])
        if n > 1:
            rec["samples"] = cands
        preds.append(rec)
    info = {
        "prompt_tokens_per_example": stats.prompt_tokens / max(len(ids), 1),
        "samples_per_example": n,
        "generated_tokens_per_example": stats.generated_tokens / max(len(ids), 1),
        "generation": stats.as_dict(),
        "unparseable": sum(1 for p in preds if p["pred"] is None),
        "constrained": bool(constrained),
    }
    return preds, info


_NEXT_LINE = "\n\u2026"  # a line more, written after an answer line: does the task still read the same?


def answer_line_end(task: Task, text: str, example=None, after: str | None = None) -> int | None:
    """Where a reasoning text's answer line ends, once it is complete; None until then.

    The answer line holds the last ``Answer:`` marker (``ANSWER_RE``) and is complete at
    the newline that ends it, when the task reads an answer from that line alone
    (``task.parse`` gives a value) and a line more would not change what it reads (so a
    generation answer, which may span lines, never ends here; a JSON value opened on the
    line and closed lines later does not either). The position returned is that newline's:
    the text kept ends before it, and ``task.extract`` reads from it what it reads from
    the answer line. ``after``: only text after its last occurrence counts (native
    thinking: ``</think>``)."""
    start = 0
    if after:
        k = text.rfind(after)
        if k < 0:
            return None
        start = k + len(after)
    marker = None
    for marker in ANSWER_RE.finditer(text, start):
        pass
    if marker is None:
        return None
    end = text.find("\n", marker.end())
    line = text[marker.end():end] if end >= 0 else ""
    if end < 0 or not line.strip():
        return None
    try:
        value, _ = task.parse(line, example)
        if value is None:
            return None
        again, _ = task.parse(line + _NEXT_LINE, example)
    except Exception:  # noqa: BLE001 - a parser that cannot read a partial text: go on
        return None
    return end if again == value else None
