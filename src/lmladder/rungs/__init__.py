"""Rung registry: name -> class. Add a rung by adding a module and a line here."""

from __future__ import annotations

from lmladder.rungs.few_shot import FewShot
from lmladder.rungs.lora import Lora
from lmladder.rungs.zero_shot import ZeroShot

RUNGS = {r.name: r for r in (ZeroShot, FewShot, Lora)}


def get(name: str):
    return RUNGS[name]
