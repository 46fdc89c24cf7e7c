"""Prompt text: the instruction/examples/target template and chat-template rendering.

The user message follows the seeds' few-shot template; zero-shot is the same template
with no ``# Examples`` section, so the two rungs differ only by their examples::

    # General instructions
    Decide whether the review is positive or negative.
    Answer with exactly one of: negative, positive.

    # Examples
    Input: a gorgeous film
    Label: positive

    # Target question
    Input: a dull mess
    Label:

The message goes through the model's chat template; the answer is the assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmladder.errors import LadderError
from typing import Sequence


def user_message(
    instruction: str,
    query: str,
    examples: Sequence[tuple[str, str]] = (),
    labels: Sequence[str] | None = None,
    *,
    answer_word: str = "Label",
    hints: Sequence[str] = (),
    context: str | None = None,
) -> str:
    """The seeds' template. ``hints`` are extra instruction lines (answer format, the
    reasoning request); ``context`` (retrieved passages) goes in its own section."""
    parts = ["# General instructions", instruction.strip()]
    if labels:
        parts.append(f"Answer with exactly one of: {', '.join(labels)}.")
    parts.extend(h.strip() for h in hints if h and h.strip())
    text = "\n".join(parts) + "\n\n"
    if context:
        text += "# Context\n" + context.strip() + "\n\n"
    if examples:
        text += "# Examples\n"
        text += "\n\n".join(f"Input: {x}\n{answer_word}: {y}" for x, y in examples) + "\n\n"
    text += f"# Target question\nInput: {query}\n{answer_word}:"
    return text


def default_instruction(labels: Sequence[str]) -> str:
    return "Classify the input."


@dataclass
class ChatFormat:
    """Renders prompts and training targets for one tokenizer.

    ``prompt(msg)`` is what the model sees before answering. ``answer_suffix(msg, ans)``
    is the exact text the chat template puts after the prompt for an assistant answer
    (e.g. ``"positive<|im_end|>\\n"``); training keeps its tokens up to and including
    the end-of-turn token so the model learns to stop.
    """

    tokenizer: object
    system_prompt: str | None = None
    thinking: bool | None = None  # enable_thinking for templates that have it; None: template default
    # True: render prompts as plain text even when the tokenizer has a chat template
    # (prompt_format: plain, the lm-eval way of prompting)
    plain: bool = False

    @property
    def has_template(self) -> bool:
        return not self.plain and bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def supports_thinking(self) -> bool:
        """The chat template has a native thinking switch (Qwen3-style ``enable_thinking``)."""
        t = getattr(self.tokenizer, "chat_template", None)
        t = "\n".join(t.values()) if isinstance(t, dict) else (t or "")
        return "enable_thinking" in t

    def _template_kwargs(self) -> dict:
        return {} if self.thinking is None or not self.supports_thinking else {"enable_thinking": self.thinking}

    def _messages(self, msg: str) -> list[dict]:
        msgs = []
        if self.system_prompt is not None:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": msg})
        return msgs

    def prompt(self, msg: str) -> str:
        if not self.has_template:
            # Base models without a chat template: plain text; answers follow a space.
            sys = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            return sys + msg
        return self.tokenizer.apply_chat_template(
            self._messages(msg), tokenize=False, add_generation_prompt=True, **self._template_kwargs()
        )

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt. Chat templates write their own special tokens
        (BOS included where the model wants it); plain prompts get the tokenizer's."""
        return self.tokenizer(prompt, add_special_tokens=not self.has_template).input_ids

    def answer_prefix(self) -> str:
        """Text between the prompt and the answer itself (a space for plain text)."""
        return "" if self.has_template else " "

    def answer_suffix(self, msg: str, answer: str) -> str:
        eos = self.tokenizer.eos_token or ""
        if not self.has_template:
            return " " + answer + eos
        prompt = self.prompt(msg)
        full = self.tokenizer.apply_chat_template(
            self._messages(msg) + [{"role": "assistant", "content": answer}], tokenize=False,
            **self._template_kwargs(),
        )
        if not full.startswith(prompt) or answer not in full[len(prompt):]:
            # Templates that rewrite earlier turns (e.g. strip reasoning) break the
            # prefix property; fall back to answer + EOS.
            return answer + eos
        return full[len(prompt):]


def eos_token_ids(tokenizer, model=None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        e = gen.eos_token_id
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids


def response_ids(fmt: ChatFormat, message: str, answer: str, eos_ids: set[int]) -> list[int]:
    """The answer as the chat template renders it after the prompt, through the template's
    end-of-turn token (the first of ``eos_ids``; EOS appended for a template without one):
    what a model is trained on to answer and stop."""
    tok = fmt.tokenizer
    suffix_ids = tok(fmt.answer_suffix(message, answer), add_special_tokens=False).input_ids
    cut = next((i for i, t in enumerate(suffix_ids) if t in eos_ids), None)
    if cut is not None:
        return suffix_ids[: cut + 1]
    if tok.eos_token_id is None:  # template without an end-of-turn token: append EOS ourselves
        raise LadderError("the tokenizer has no EOS token; cannot teach the model to stop")
    return suffix_ids + [tok.eos_token_id]
