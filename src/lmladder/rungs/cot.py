"""cot: reason before answering, answer taken from the final part of the text.

The user message is the task's template with the reasoning request as its answer-format
line (``cot.prompt``, default: think step by step, then ``Answer: <answer>`` on the last
line). When the chat template has a native thinking switch (``enable_thinking``, e.g.
Qwen3) and ``cot.thinking`` is ``auto`` or ``native``, the template's thinking mode is
turned on too and the answer is read after the closing ``</think>``. Greedy decoding;
``cot.constrained: true`` lets the reasoning run free and constrains the answer line
with the task's grammar (inference/constrain.py, reasoning mode).

A path stops once its answer line is complete (``stop_at_answer``, default on:
tasks/base.py ``answer_line_end``): the line holding the last ``Answer:`` marker ends with a
newline and the task reads its answer from that line alone. What the model would write
after it is not generated: a small model often goes on for the rest of the token budget
(a new question, a repeat), which cost time and, when it wrote another ``Answer:``,
changed the answer read. The text kept ends before that newline, and the task's parser
reads it unchanged. The path leaves the batch (inference/generate.py), so the paths that
go on decode in a smaller batch. With native thinking only an answer line after
``</think>`` counts. A generation answer, which may span lines, never stops early.

Shared by self-consistency and best-of-n (the same prompt, sampled N times).
"""

from __future__ import annotations

import dataclasses
import logging

from pydantic import Field

from lmladder.rungs.base import Rung, validate_grammars
from lmladder.options import ConfigModel, ReasoningOptions


class StopAtAnswer(ConfigModel):
    """The option cot, self-consistency and best-of-n share: stop a path at its answer."""

    stop_at_answer: bool = Field(
        True,
        description="Stop a path once its 'Answer:' line is complete (a newline after an answer the task reads "
        "from that line), instead of decoding to end-of-turn or max_new_tokens; the text kept ends there.",
    )


class CotConfig(ReasoningOptions, StopAtAnswer):
    """Greedy chain-of-thought, answer taken from the final part."""


log = logging.getLogger(__name__)

THINK_END = "</think>"


def reasoning_format(fmt, thinking: str):
    """(ChatFormat, mode): ``native`` turns on the template's thinking switch when it
    has one (``auto`` too); ``prompt`` turns it off on such templates."""
    if not fmt.supports_thinking:
        if thinking == "native":
            log.warning("cot: the chat template has no enable_thinking switch; reasoning by prompt only")
        return fmt, "prompt"
    native = thinking in ("auto", "native")
    return dataclasses.replace(fmt, thinking=native), "native" if native else "prompt"


def reparse_after_thinking(task, rec: dict, example) -> dict:
    """Native thinking writes ``<think>…</think>`` then the answer: read the answer from
    the text after the last ``</think>`` (a marker inside the thinking must not win)."""
    raw = rec.get("raw") or ""
    if THINK_END not in raw:
        return rec
    after = raw.rsplit(THINK_END, 1)[1]
    p, err = task.extract(after, example)
    if p is None:
        p, err = task.parse(after, example)
    return {**rec, "pred": p, "error": err}


def reasoning_predict(rung, cfg, *, n: int = 1, do_sample: bool = False, desc: str | None = None):
    """Generate ``n`` reasoning paths per test example with the cot prompt; returns
    (predictions as from tasks.base.generate_answers, info)."""
    from lmladder.tasks.base import generate_answers

    ctx, task = rung.ctx, rung.ctx.task
    model, _ = ctx.base()
    fmt, mode = reasoning_format(ctx.fmt(), cfg.thinking)
    examples = ctx.data.test
    messages = [task.user_message(ex, reasoning=cfg.prompt) for ex in examples]
    kwargs = dict(temperature=cfg.temperature, top_p=cfg.top_p) if do_sample else {}
    stop = getattr(cfg, "stop_at_answer", False)
    preds, info = generate_answers(
        task, model, fmt, messages, examples, desc=desc or rung.name,
        constrained=cfg.constrained, engine=ctx.cfg.constrained.engine,
        max_new_tokens=cfg.max_new_tokens, reasoning=True, n=n, do_sample=do_sample,
        stop_at_answer=stop, answer_after=THINK_END if mode == "native" else None, **kwargs,
    )
    if mode == "native":
        for i, (rec, ex) in enumerate(zip(preds, examples)):
            if "samples" in rec:
                rec["samples"] = [reparse_after_thinking(task, c, ex) for c in rec["samples"]]
            preds[i] = reparse_after_thinking(task, rec, ex)
    samples = [c for rec in preds for c in rec.get("samples", [rec])]
    info["reasoning"] = {
        "mode": mode,
        "answer_marker_rate": sum("answer:" in (c.get("raw") or "").lower() for c in samples) / max(len(samples), 1),
        "max_new_tokens": cfg.max_new_tokens,
        "stop_at_answer": bool(stop),
        "stopped_at_answer_share": info["generation"].get("answer_stops", 0) / max(len(samples), 1),
    }
    info["prefill_tokens_per_example"] = info["generation"]["prefill_tokens"] / max(len(examples), 1)
    return preds, info


def validate_reasoning(cfg, dataset, rung_cfg, field: str) -> None:
    """Checks shared by the reasoning rungs: a generating backend, and, when
    constrained, grammars that compile (reasoning mode)."""
    from lmladder.inference import openai_backend
    from lmladder.errors import LadderError

    if openai_backend.is_openai(cfg.model):
        raise LadderError(f"{field}: needs text generation, which the openai: backend does not offer yet")
    if getattr(rung_cfg, "constrained", False):
        validate_grammars(cfg, dataset, f"{field}.constrained", reasoning=True)


class ReasoningRung(Rung):
    """Base of cot / self-consistency / best-of-n: their config section is
    ``cfg.<rung name>``; the grammar engine they share is part of the fingerprint."""

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        validate_reasoning(cfg, dataset, cfg.rung_config(cls.name), cls.name)

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        rc = cfg.rung_config(cls.name)
        return {"constrained_engine": cfg.constrained.engine} if getattr(rc, "constrained", False) else {}


class Cot(ReasoningRung):
    name = "cot"
    cost_rank = 3
    summary = "reasoning before the answer (greedy)"

    def predict(self):
        return reasoning_predict(self, self.cfg)
