"""zero-shot: the instruction and the input, through the model's chat template or as plain
text (``prompt_format``; ``auto`` picks the better on a dev split carved from train)."""

from __future__ import annotations

from lmladder.rungs.base import PromptRung
from lmladder.options import PromptFormatOptions


class ZeroShotConfig(PromptFormatOptions):
    """Instruction + input through the chat template; no examples."""


class ZeroShot(PromptRung):
    name = "zero-shot"
    cost_rank = 0
    summary = "instruction + input, no examples"
    kinds = PromptRung.kinds + ("preference",)  # scores chosen vs rejected (tasks/preference.py)

    def prepare(self) -> None:
        no_shots = lambda e: ()  # noqa: E731
        self.format = self.choose_format(no_shots)
        self.messages = self.messages_for(self.format, self.ctx.data.test, no_shots)
        self.calibration_setup(self.format, no_shots)

    def predict(self):
        model, _ = self.ctx.base()
        preds, info = self.ctx.task.predict(
            model, self.ctx.fmt(plain=self.format == "plain"), self.messages, self.ctx.data.test, desc=self.name,
            constrained=self.cfg.constrained, engine=self.ctx.cfg.constrained.engine,
        )
        info = {**info, "prompt_format": self.format_info}
        if self.calibration:
            preds, info["calibration"] = self.calibrated(preds), self.calibration
        return preds, info
