"""constrained: the zero-shot prompt with grammar-constrained greedy decoding.

The task's grammar (``task.grammar(example)``: the label set, a number regex, the
extraction JSON Schema) restricts every generated token (inference/constrain.py, xgrammar
by default, llguidance with ``constrained.engine: llguidance``), so the answer always
parses unless the token budget runs out. ``constrained.reasoning: true`` lets the model
reason first (the cot prompt) and constrains only the final ``Answer: `` line.
Grammars are checked before any model work; a grammar that does not compile is a
one-line error naming the example.
"""

from __future__ import annotations

from lmladder.rungs.base import Rung
from lmladder.rungs.base import validate_grammars
from typing import Literal
from pydantic import Field
from lmladder.options import ConfigModel


class ConstrainedConfig(ConfigModel):
    engine: Literal["xgrammar", "llguidance"] = Field("xgrammar", description="Grammar engine.")
    reasoning: bool = Field(False, description="Free reasoning first, then the constrained answer.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default: eval.max_new_tokens.")


class Constrained(Rung):
    name = "constrained"
    cost_rank = 2
    summary = "zero-shot prompt, grammar-constrained decoding"

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        from lmladder.inference import openai_backend
        from lmladder.errors import LadderError

        if openai_backend.is_openai(cfg.model):
            raise LadderError("constrained: needs local generation, which the openai: backend does not offer yet")
        validate_grammars(cfg, dataset, "constrained", reasoning=cfg.constrained.reasoning)

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        # with reasoning, the cot prompt and budget shape the prompt and the output
        return {"cot_prompt": cfg.cot.prompt, "cot_max_new_tokens": cfg.cot.max_new_tokens} if cfg.constrained.reasoning else {}

    def prepare(self) -> None:
        task = self.ctx.task
        reasoning = self.ctx.cfg.cot.prompt if self.cfg.reasoning else None
        self.messages = [task.user_message(ex, reasoning=reasoning) for ex in self.ctx.data.test]

    def predict(self):
        from lmladder.tasks.base import generate_answers

        model, _ = self.ctx.base()
        budget = self.cfg.max_new_tokens or (self.ctx.cfg.cot.max_new_tokens if self.cfg.reasoning else None)
        preds, info = generate_answers(
            self.ctx.task, model, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name,
            constrained=True, engine=self.cfg.engine, reasoning=self.cfg.reasoning, max_new_tokens=budget,
        )
        info.update(grammar_engine=self.cfg.engine, reasoning=self.cfg.reasoning)
        return preds, info
