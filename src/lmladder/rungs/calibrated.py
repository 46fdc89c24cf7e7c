"""calibrated: zero-shot with contextual calibration (Zhao et al. 2021, "Calibrate Before
Use"). Small prompted models often favour one label whatever the input (label bias); the
rung scores the same prompt on content-free inputs ("N/A", "", "[MASK]"), averages their
label log-probabilities, and subtracts that prior from every test example's label scores.
Three extra scored prompts, once (one-time cost); per call it costs what zero-shot costs.
``calibrate: true`` gives zero-shot and few-shot the same correction."""

from __future__ import annotations

from lmladder.rungs.zero_shot import ZeroShot
from pydantic import Field
from lmladder.options import PromptFormatOptions


class CalibratedConfig(PromptFormatOptions):
    """zero-shot with contextual calibration."""

    calibrate: bool = Field(True, description="Always true for this rung (it is zero-shot + calibration).")


class Calibrated(ZeroShot):
    name = "calibrated"
    cost_rank = 0.5  # zero-shot's per-call cost, a little more one-time work; below few-shot
    summary = "zero-shot + contextual calibration (label bias removed)"
    kinds = ("classification",)
