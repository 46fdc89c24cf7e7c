"""zero-shot: the instruction and the input through the model's chat template."""

from __future__ import annotations

from lmladder.rungs.base import Rung


class ZeroShot(Rung):
    name = "zero-shot"
    cost_rank = 0
    summary = "instruction + input, no examples"

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        if cfg.zero_shot.constrained:  # a grammar that does not compile: one line, before model work
            from lmladder.rungs.cot import validate_grammars

            validate_grammars(cfg, dataset, "zero-shot.constrained", reasoning=False)

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        return {"constrained_engine": cfg.constrained.engine} if cfg.zero_shot.constrained else {}

    def prepare(self) -> None:
        task = self.ctx.task
        self.messages = [task.user_message(ex) for ex in self.ctx.data.test]

    def predict(self):
        model, _ = self.ctx.base()
        return self.ctx.task.predict(
            model, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name,
            constrained=self.cfg.constrained, engine=self.ctx.cfg.constrained.engine,
        )
