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

from lmladder.tasks import ANSWER_KINDS


def apply_calibration(calibration: dict, labels: list[str], preds: list[dict]) -> list[dict]:
    """Each label's score less the content-free log prior plus the train log prior (the
    ``calibration`` a calibrated rung records); ``raw_scores`` / ``raw_pred`` keep the
    scores and prediction before. Also what ``serve``'s /v1/predict applies."""
    prior, target = calibration["log_prior"], calibration["log_train_prior"]
    out = []
    for p in preds:
        s = {l: v - prior[l] + target[l] for l, v in p["scores"].items()}
        best = max(labels, key=lambda l: s[l])  # ties: the first label
        out.append({**p, "pred": best, "scores": s, "raw_scores": p["scores"], "raw_pred": p["pred"]})
    return out


def validate_grammars(cfg, dataset, field: str, reasoning: bool) -> None:
    """The task's grammars compile for every test example (constrained decoding), before
    any model work: one-line LadderError naming ``field``."""
    from lmladder.inference import constrain
    from lmladder.tasks import make_task

    task = make_task(cfg.task, dataset.info.get("labels") or cfg.task.labels or [], cfg.eval, cfg.seed, dataset)
    constrain.validate_task_grammars(task, dataset.test, cfg.constrained.engine, reasoning, field=field)


class Rung:
    name: ClassVar[str]
    cost_rank: ClassVar[float]  # position on the ladder: cheaper rungs first
    trains: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    # task kinds the rung can handle (tagging needs a token-classification head)
    kinds: ClassVar[tuple[str, ...]] = ANSWER_KINDS
    uses_base: ClassVar[bool] = True  # False: the ladder need not load the causal LM for it
    # folder under rungs/<rung>/ holding a whole causal LM that `from: <rung>` can start from
    output_model: ClassVar[str | None] = None
    # True: rungs/<rung>/adapter is a PEFT adapter that merges into the model it was trained
    # on, so `from: <rung>` starts from that merged model (lora, ia3)
    mergeable: ClassVar[bool] = False
    # False: the rung's output is not a model to ship for the task (a reward model scores
    # answers); the verdict shows it and never recommends it
    policy: ClassVar[bool] = True

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
    def uses(cls, cfg, name: str) -> dict[str, str]:
        """Optional: other rungs (in or out of ``rungs``) whose predictions rung ``name``
        makes itself through ``ctx.predict_with``, as {its config field: rung name}, e.g.
        distill's {"teacher": "few-shot"}. The ladder checks they are inference rungs for the
        task (and runs their own validate); their configs are part of this rung's fingerprint."""
        return {}

    @classmethod
    def after(cls, cfg, name: str) -> list[str]:
        """Optional: rungs of this run whose outputs rung ``name`` reads (not its start
        model; that is ``from:``), e.g. best-of-n's reward-model verifier. They run first
        and their fingerprints are part of this rung's."""
        return []

    def __init__(self, ctx, cfg, out_dir: Path):
        self.ctx, self.cfg, self.out_dir = ctx, cfg, out_dir
        # what a rung holds that close() must hand back or drop; set here so that close()
        # is safe whatever step failed (prepare / fit may stop before setting anything)
        self.model = None

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
        """Undo anything done to the shared base model. Must be safe after any step
        failed, including before ``prepare`` set anything (the ladder always calls it)."""


class PromptRung(Rung):
    """A prompt-only rung with a ``constrained: true`` switch (zero-shot, few-shot): its
    grammar is checked before any model work and its engine is part of the fingerprint."""

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        return {"constrained_engine": cfg.constrained.engine} if cfg.rung_config(cls.name).constrained else {}

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        rc = cfg.rung_config(cls.name)
        if getattr(rc, "calibrate", False) and (cfg.task.kind != "classification" or rc.constrained):
            from lmladder.errors import LadderError

            raise LadderError(f"{cls.name}.calibrate: calibration needs label scoring (task kind classification, "
                              f"not constrained); this run is {cfg.task.kind}"
                              + (" with constrained: true" if rc.constrained else ""))
        if rc.constrained:  # a grammar that does not compile: one line
            validate_grammars(cfg, dataset, f"{cls.name}.constrained", reasoning=False)

    # ------------------------------------------------------------------ calibration
    CONTENT_FREE = ("N/A", "", "[MASK]")

    def calibration_setup(self, fmt_name: str, shots_for) -> None:
        """``calibrate: true``: the label log-probabilities the prompt gives content-free
        inputs (averaged in log space over ``CONTENT_FREE``) are replaced, in every test
        example's label scores, by the train split's label log-frequencies
        (:meth:`calibrated`; Zhao et al. 2021's contextual calibration, with the train prior
        as the target instead of uniform; averaging log-probabilities makes a constant label
        bias cancel exactly). Runs in prepare: its seconds are one-time cost."""
        import math
        import time

        self.calibration = None
        if not getattr(self.cfg, "calibrate", False):
            return
        from lmladder.data import Example

        t0 = time.perf_counter()
        task = self.ctx.task
        model, _ = self.ctx.base()
        cf = [Example(id=f"content-free:{i}", input=x, label=task.labels[0], source="content-free")
              for i, x in enumerate(self.CONTENT_FREE)]
        preds, _ = task.predict(model, self.ctx.fmt(plain=fmt_name == "plain"), self.messages_for(fmt_name, cf, shots_for),
                                cf, desc=f"{self.name}: calibration")
        prior = {l: 0.0 for l in task.labels}
        for p in preds:
            s = p["scores"]
            z = max(s.values())
            lse = z + math.log(sum(math.exp(v - z) for v in s.values()))
            for l in task.labels:
                prior[l] += (s[l] - lse) / len(preds)
        # a content-free input should come out as the train label distribution, not as
        # uniform (Zhao et al.'s target): on imbalanced data (spam 13%) a uniform target
        # would push most inputs to the rare label
        counts = {l: 1 for l in task.labels}  # add-one smoothing
        for e in self.ctx.data.train:
            if e.label in counts:
                counts[e.label] += 1
        total = sum(counts.values())
        self.calibration = {"method": "contextual", "content_free": list(self.CONTENT_FREE),
                            "log_prior": {l: round(v, 6) for l, v in prior.items()},
                            "log_train_prior": {l: round(math.log(c / total), 6) for l, c in counts.items()},
                            "seconds": round(time.perf_counter() - t0, 3)}

    def calibrated(self, preds: list[dict]) -> list[dict]:
        """Predictions with the content-free log prior subtracted from each label's score
        (``raw_scores`` keeps the scores before)."""
        if not getattr(self, "calibration", None):
            return preds
        return apply_calibration(self.calibration, self.ctx.task.labels, preds)

    # ------------------------------------------------------------------ prompt format
    DEV_MAX = 200  # dev examples carved from train to choose the prompt format (auto)

    def label_scoring(self) -> bool:
        """Predictions come from scoring the label set / choices (not generated text)."""
        task = self.ctx.task
        return task.kind in ("classification", "multiple-choice") and not self.cfg.constrained

    def messages_for(self, fmt_name: str, examples, shots_for) -> list[str]:
        """The prompt of each example in format ``fmt_name``; ``shots_for(example)``: its
        in-context examples (none for zero-shot)."""
        task = self.ctx.task
        if fmt_name == "plain":
            return [task.plain_message(e, shots_for(e)) for e in examples]
        return [task.user_message(e, shots_for(e)) for e in examples]

    def choose_format(self, shots_for, exclude=()) -> str:
        """``prompt_format``: chat / plain as set; ``auto``: plain for a model without a chat
        template (a base model); else for label-scoring tasks, the better
        of the two on a dev split of at most DEV_MAX train examples (seeded, never the test
        split; ``exclude``: train examples already in the prompt), ties to chat; otherwise
        chat. Records the choice, both dev scores and the seconds it took in
        ``self.format_info`` (reported in the rung's details; the time is one-time cost)."""
        import random
        import time

        setting = self.cfg.prompt_format
        self.format_info = {"setting": setting}
        if setting != "auto":
            self.format_info["chosen"] = setting
            return setting
        _, tok = self.ctx.base()
        if not getattr(tok, "chat_template", None):  # a base model: plain text is all it knows
            self.format_info.update(chosen="plain", why="the model has no chat template: plain")
            return "plain"
        if not self.label_scoring():
            self.format_info.update(chosen="chat", why="not a label-scoring task / constrained: chat")
            return "chat"
        ids = {id(e) for e in exclude}
        pool = [e for e in self.ctx.data.train if id(e) not in ids]
        dev = random.Random(self.ctx.cfg.seed + 1).sample(pool, min(self.DEV_MAX, len(pool)))
        if not dev:
            self.format_info.update(chosen="chat", why="no train examples left for a dev split: chat")
            return "chat"
        t0 = time.perf_counter()
        task, metric = self.ctx.task, self.ctx.cfg.primary_metric
        model, _ = self.ctx.base()
        golds = [task.gold(e) for e in dev]
        scores = {}
        for name in ("chat", "plain"):
            preds, _ = task.predict(model, self.ctx.fmt(plain=name == "plain"), self.messages_for(name, dev, shots_for),
                                    dev, desc=f"{self.name}: {name} format on dev")
            scores[name] = task.score(golds, [p["pred"] for p in preds])[metric]["value"]
        chosen = "plain" if scores["plain"] > scores["chat"] else "chat"
        self.format_info.update(chosen=chosen, dev_size=len(dev), dev_metric=metric,
                                dev_scores={k: round(v, 4) for k, v in scores.items()},
                                seconds=round(time.perf_counter() - t0, 2))
        import logging

        logging.getLogger(__name__).info("%s: prompt format %s (dev %s: chat %.3f, plain %.3f, %d examples)",
                                         self.name, chosen, metric, scores["chat"], scores["plain"], len(dev))
        return chosen
