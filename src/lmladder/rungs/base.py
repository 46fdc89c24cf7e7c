"""The one small interface every rung implements.

A rung turns (task, data, base model) into predictions on the test split:

    validate()  (classmethod, optional) config checks that need no model, before any write
    prepare()   build prompts / example choices / training features (cheap, no training)
    fit()       only rungs that train: update weights, save artifacts, return train stats
    predict()   predictions for ``ctx.data.test`` in order, plus prompt-cost stats
    close()     undo anything done to the shared base model

A rung never scores its predictions (the task does) and never writes the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar


class Rung:
    name: ClassVar[str]
    cost_rank: ClassVar[int]  # position on the ladder: cheaper rungs first
    trains: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    # task kinds the rung can handle (tagging needs a token-classification head)
    kinds: ClassVar[tuple[str, ...]] = (
        "classification", "math", "qa", "extraction", "multiple-choice", "generation"
    )
    uses_base: ClassVar[bool] = True  # False: the ladder need not load the causal LM for it
    # folder under rungs/<rung>/ holding a whole causal LM that `from: <rung>` can start from
    output_model: ClassVar[str | None] = None
    # True: rungs/<rung>/adapter is a PEFT adapter that merges into the model it was trained
    # on, so `from: <rung>` starts from that merged model (lora, ia3)
    mergeable: ClassVar[bool] = False

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        """Optional: checks that need no model (a corpus that exists, tools that import,
        a grammar that compiles); raise LadderError. Runs before anything is written."""

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        """Optional: what the rung reads besides its config that must rerun it when it
        changes (e.g. a corpus file's content digest); added to the fingerprint."""
        return {}

    @classmethod
    def after(cls, cfg, name: str) -> list[str]:
        """Optional: rungs of this run whose outputs rung ``name`` reads (not its start
        model; that is ``from:``), e.g. best-of-n's reward-model verifier. They run first
        and their fingerprints are part of this rung's."""
        return []

    def __init__(self, ctx, cfg, out_dir: Path):
        self.ctx, self.cfg, self.out_dir = ctx, cfg, out_dir

    def prepare(self) -> None:
        pass

    def fit(self) -> dict[str, Any]:
        return {}

    def predict(self) -> tuple[list[dict], dict[str, Any]]:
        raise NotImplementedError

    def trainable_params(self) -> int:
        return 0

    def artifacts(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


class PromptRung(Rung):
    """A prompt-only rung with a ``constrained: true`` switch (zero-shot, few-shot): its
    grammar is checked before any model work and its engine is part of the fingerprint."""

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        if cfg.rung_config(cls.name).constrained:  # a grammar that does not compile: one line
            from lmladder.rungs.cot import validate_grammars

            validate_grammars(cfg, dataset, f"{cls.name}.constrained", reasoning=False)

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        return {"constrained_engine": cfg.constrained.engine} if cfg.rung_config(cls.name).constrained else {}
