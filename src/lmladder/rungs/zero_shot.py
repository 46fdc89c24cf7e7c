"""zero-shot: the instruction and the input through the model's chat template."""

from __future__ import annotations

from lmladder.rungs.base import PromptRung


class ZeroShot(PromptRung):
    name = "zero-shot"
    cost_rank = 0
    summary = "instruction + input, no examples"
    kinds = PromptRung.kinds + ("preference",)  # scores chosen vs rejected (tasks/preference.py)

    def prepare(self) -> None:
        task = self.ctx.task
        self.messages = [task.user_message(ex) for ex in self.ctx.data.test]

    def predict(self):
        model, _ = self.ctx.base()
        return self.ctx.task.predict(
            model, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name,
            constrained=self.cfg.constrained, engine=self.ctx.cfg.constrained.engine,
        )
