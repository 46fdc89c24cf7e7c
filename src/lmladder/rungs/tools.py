"""tools: the model calls tools (a calculator, user callables) in a loop, then answers.

Two call formats:

* ``template``: the chat template's own tool format (``apply_chat_template(tools=...)``),
  used when the template renders the tool list (Qwen / Hermes style, calls written as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``); results go back as
  ``tool`` turns.
* ``json``: the prompt lists the tools and the model writes a line like
  ``{"tool": "calculator", "arguments": {"expression": "2+3"}}``; results go back as
  user turns (``Result of calculator: 5``). ``auto`` picks ``template`` when the chat
  template supports tools (SmolLM2's does not) and ``json`` otherwise.

The loop (:func:`run_loop`) asks the model for a turn per active example (batched), runs
the first call it finds, appends the result and asks again; a turn without a call is
the final one, whose answer ``task.extract`` reads. At most ``tools.max_steps`` calls
per example run: a further call stops the example there. Tool errors (exceptions, bad
arguments, unknown tool, unreadable call) are returned to the model as text. The model
step is injectable: anything with ``generate(conversations) -> list[str]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from lmladder import tools as tools_mod
from lmladder.errors import LadderError
from lmladder.io import atomic_write_jsonl
from lmladder.rungs.base import Rung
from typing import Literal
from pydantic import Field
from lmladder.options import ConfigModel


class ToolsConfig(ConfigModel):
    tools: list[str] = Field(
        default_factory=lambda: ["calculator"],
        description="Tools: built-in names (calculator) or Python callables 'module:function'.",
    )
    max_steps: int = Field(4, ge=1, description="Most tool calls per example.")
    format: Literal["auto", "template", "json"] = Field(
        "auto", description="template = the chat template's tool format; json = a JSON call line; auto picks."
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest model turn.")


FINAL = "When you are done, give the final answer on the last line as 'Answer: <answer>'."


def json_hint(tools: dict[str, tools_mod.Tool]) -> str:
    lines = ["You can use these tools:"]
    for t in tools.values():
        args = ", ".join(f"{k}: {v.get('type', 'string')}" for k, v in t.parameters.get("properties", {}).items())
        lines.append(f"- {t.name}({args}): {t.description}")
    ex = next(iter(tools.values()))
    arg0 = next(iter(ex.parameters.get("properties", {})), None)
    example = {"tool": ex.name, "arguments": {arg0: "2+3"} if arg0 else {}}
    lines.append(
        "To call a tool, write only one line of JSON like " + json.dumps(example)
        + " and wait for the result. " + FINAL
    )
    return "\n".join(lines)


TEMPLATE_HINT = "Call a tool when it helps. " + FINAL

_DECODER = json.JSONDecoder()


def parse_call(text: str) -> tuple[dict | None, str | None]:
    """The first tool call in a model turn: ({"tool", "arguments"}, None); (None, None)
    when the turn has no call; (None, reason) for a call that cannot be read."""
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = _DECODER.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        if "function" in obj and isinstance(obj["function"], dict):  # {"type": "function", "function": {...}}
            obj = obj["function"]
        name = obj.get("tool", obj.get("name") if ("arguments" in obj or "parameters" in obj) else None)
        if name is None:
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # OpenAI style: arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None, f"the arguments of {name} are not valid JSON"
        return {"tool": str(name), "arguments": args}, None
    if re.search(r"<tool_call>|\"tool\"\s*:", text):
        return None, "the tool call is not valid JSON"
    return None, None


class ModelStep(Protocol):
    def generate(self, conversations: Sequence[list[dict]]) -> list[str]: ...


@dataclass
class Trace:
    calls: list[dict] = field(default_factory=list)
    errors: int = 0
    steps: int = 0  # model turns
    final: str = ""
    stopped: str | None = None  # "max_steps" when the call budget ran out


def run_loop(step: ModelStep, conversations: Sequence[list[dict]], tools: dict[str, tools_mod.Tool],
             max_steps: int, tool_role: str = "user") -> list[Trace]:
    """Run every conversation to its final turn; ``tool_role``: 'tool' (chat-template
    tool turns) or 'user' (JSON format)."""
    convs = [list(c) for c in conversations]
    traces = [Trace() for _ in convs]
    active = list(range(len(convs)))
    while active:
        outs = step.generate([convs[i] for i in active])
        if len(outs) != len(active):
            raise RuntimeError(f"model step returned {len(outs)} turns for {len(active)} conversations")
        nxt = []
        for i, out in zip(active, outs):
            tr = traces[i]
            tr.steps += 1
            call, perr = parse_call(out)
            if call is None and perr is None:
                tr.final = out
                continue
            if len(tr.calls) >= max_steps:
                tr.final, tr.stopped = out, "max_steps"
                continue
            name = call["tool"] if call else None
            if perr is not None:
                result, err = f"error: {perr}", "unreadable call"
            elif name not in tools:
                result, err = f"error: unknown tool '{name}' (tools: {', '.join(tools)})", "unknown tool"
            else:
                result, err = tools[name].call(call["arguments"])
            tr.calls.append({"tool": name, "arguments": call["arguments"] if call else None,
                             "result": result, "error": err})
            tr.errors += err is not None
            convs[i].append({"role": "assistant", "content": out})
            if tool_role == "tool":
                convs[i].append({"role": "tool", "name": name or "unknown", "content": result})
            else:
                convs[i].append({"role": "user", "content": f"Result of {name or 'the call'}: {result}"})
            nxt.append(i)
        active = nxt
    return traces


def template_supports_tools(tokenizer) -> bool:
    """True when the chat template renders a tool list and a tool turn."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = {"type": "function", "function": {"name": "lmladder_probe_tool", "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
            {"role": "tool", "name": "lmladder_probe_tool", "content": "lmladder_probe_result"}]
    try:
        text = tokenizer.apply_chat_template(msgs, tools=[probe], tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    return "lmladder_probe_tool" in text.split("lmladder_probe_result")[0] and "lmladder_probe_result" in text


class HFStep:
    """The real model step: render each conversation with the chat template (with the
    tool list in template format), generate one greedy turn per conversation, batched."""

    def __init__(self, model, tokenizer, *, tool_specs: list[dict] | None, system: str | None,
                 max_new_tokens: int, batch_size: int, seed: int):
        self.model, self.tok, self.tool_specs, self.system = model, tokenizer, tool_specs, system
        self.max_new_tokens, self.batch_size, self.seed = max_new_tokens, batch_size, seed
        self.prompt_tokens = self.generated_tokens = self.calls = 0

    def render(self, conv: list[dict]) -> str:
        msgs = ([{"role": "system", "content": self.system}] if self.system is not None else []) + conv
        if not getattr(self.tok, "chat_template", None):
            return "".join(f"{m['role']}: {m['content']}\n\n" for m in msgs) + "assistant:"
        kw = {"tools": self.tool_specs} if self.tool_specs else {}
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)

    def generate(self, conversations):
        from lmladder.inference.generate import generate

        templ = bool(getattr(self.tok, "chat_template", None))
        ids = [self.tok(self.render(c), add_special_tokens=not templ).input_ids for c in conversations]
        texts, stats = generate(self.model, self.tok, ids, max_new_tokens=self.max_new_tokens,
                                batch_size=self.batch_size, seed=self.seed + self.calls, desc="tools")
        self.calls += 1
        self.prompt_tokens += stats.prompt_tokens
        self.generated_tokens += stats.generated_tokens
        return [t[0] for t in texts]


class Tools(Rung):
    name = "tools"
    cost_rank = 7
    summary = "the model calls tools (calculator, ...) in a loop"

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        if not cfg.tools.tools:
            raise LadderError("tools.tools: give at least one tool (e.g. calculator)")
        tools_mod.load_all(cfg.tools.tools)

    def prepare(self) -> None:
        self.tools = tools_mod.load_all(self.cfg.tools)

    def pick_format(self, tokenizer) -> str:
        if self.cfg.format != "auto":
            return self.cfg.format
        return "template" if template_supports_tools(tokenizer) else "json"

    def first_messages(self, fmt_kind: str) -> list[list[dict]]:
        task = self.ctx.task
        hint = TEMPLATE_HINT if fmt_kind == "template" else json_hint(self.tools)
        return [[{"role": "user", "content": task.user_message(ex, reasoning=hint)}] for ex in self.ctx.data.test]

    def predict(self, step: ModelStep | None = None):
        task, test = self.ctx.task, self.ctx.data.test
        if step is None:
            model, tok = self.ctx.base()
            if hasattr(model, "label_loglikelihoods"):
                raise LadderError("tools needs text generation, which the openai: backend does not offer yet")
            fmt_kind = self.pick_format(tok)
            step = HFStep(model, tok, tool_specs=[t.spec() for t in self.tools.values()] if fmt_kind == "template" else None,
                          system=self.ctx.cfg.task.system_prompt, max_new_tokens=self.cfg.max_new_tokens,
                          batch_size=task.eval_cfg.gen_batch_size, seed=self.ctx.cfg.seed)
        else:
            fmt_kind = self.cfg.format if self.cfg.format != "auto" else "json"
        traces = run_loop(step, self.first_messages(fmt_kind), self.tools, self.cfg.max_steps,
                          tool_role="tool" if fmt_kind == "template" else "user")
        preds = []
        for tr, ex in zip(traces, test):
            p, err = task.extract(tr.final, ex)
            preds.append({"pred": p, "raw": tr.final, "error": err, "tool_calls": tr.calls,
                          "steps": tr.steps, "stopped": tr.stopped})
        n = max(len(test), 1)
        info: dict[str, Any] = {
            "format": fmt_kind,
            "tools": list(self.tools),
            "tool_calls_per_example": sum(len(t.calls) for t in traces) / n,
            "tool_errors": sum(t.errors for t in traces),
            "steps_per_example": sum(t.steps for t in traces) / n,
            "calls_per_example": sum(t.steps for t in traces) / n,
            "max_steps_stops": sum(t.stopped == "max_steps" for t in traces),
            "unparseable": sum(p["pred"] is None for p in preds),
            "prompt_tokens_per_example": getattr(step, "prompt_tokens", 0) / n,
            "generated_tokens_per_example": getattr(step, "generated_tokens", 0) / n,
        }
        atomic_write_jsonl(self.out_dir / "tool_calls.jsonl",
                           [{"id": ex.id, "steps": t.steps, "stopped": t.stopped, "calls": t.calls}
                            for ex, t in zip(test, traces)])
        return preds, info

    def artifacts(self):
        return {"tool_calls": "tool_calls.jsonl"}
