"""few-shot: k labelled train examples in the prompt.

``selection: random`` (default): seeded, balanced across labels; the examples are the
same for every test input, so the whole prompt up to ``# Target question`` is a shared
prefix whose KV cache the scorer reuses.

``selection: similar``: the k train examples nearest to each test input by sentence
embedding (MiniLM by default; cosine similarity), ordered from the least to the most
similar so the nearest sits next to the query. Shots differ per test input, so there
is no shared prefix: every prompt is paid (and prefilled) in full.

``k: max`` (many-shot): as many examples as fit the context window
(``few_shot.context_window``, else the model's ``max_position_embeddings`` /
``tokenizer.model_max_length``) after room for the test prompt and the answer
(``eval.max_new_tokens``). Any k that does not fit is cut the same way, with a warning
giving the count; ``shots_used`` / ``shots_requested`` are in the info.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lmladder.errors import LadderError
from lmladder.io import atomic_write_json
from lmladder.rungs.base import PromptRung
from typing import Literal
from pydantic import Field, field_validator
from lmladder.options import PromptFormatOptions


class FewShotConfig(PromptFormatOptions):
    k: int | Literal["max"] = Field(
        8, description="In-context examples; 'max' = as many as fit the context (many-shot)."
    )
    k_curve: list[int] | None = Field(
        None, description="Would more examples help? Also score these smaller k (e.g. [1, 2, 4]) on the same test split."
    )

    @field_validator("k_curve")
    @classmethod
    def _k_curve(cls, v):
        if v is not None and (not v or any(k < 1 for k in v)):
            raise ValueError(f"k values must be >= 1, got {v}")
        return sorted(set(v)) if v else v
    balanced: bool = Field(True, description="Draw examples round-robin across labels.")
    selection: Literal["random", "similar"] = Field(
        "random", description="random (seeded) or similar (k nearest train inputs by embedding)."
    )
    embedder: str = Field(
        "all-minilm-l6-v2", description="Sentence embedder for selection: similar (embedded name, path or hub id)."
    )
    context_window: int | None = Field(
        None, ge=64, description="Token budget for many-shot prompts; default: the model's context length."
    )

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("k must be >= 1 or 'max'")
        return v


log = logging.getLogger(__name__)


def select_balanced(examples, k: int, seed: int, balanced: bool = True, label_of=lambda e: e.label):
    """Pick k examples: round-robin over labels (each label's pool shuffled with the
    seed) when ``balanced``, else a seeded random sample; then a seeded shuffle of order."""
    rng = random.Random(seed)
    k = min(k, len(examples))
    if not balanced:
        chosen = rng.sample(list(examples), k)
    else:
        pools: dict[str, list] = {}
        for e in examples:
            pools.setdefault(label_of(e), []).append(e)
        for label in sorted(pools):
            rng.shuffle(pools[label])
        order = sorted(pools)
        chosen, i = [], 0
        while len(chosen) < k:
            pool = pools[order[i % len(order)]]
            if pool:
                chosen.append(pool.pop())
            i += 1
        rng.shuffle(chosen)
    return chosen


def nearest(query_vecs: np.ndarray, train_vecs: np.ndarray, k: int) -> list[list[int]]:
    """Per query, the indices of the ``k`` train vectors with the highest dot product
    (normalised vectors: cosine), most similar first; ties: lower index first."""
    sims = np.asarray(query_vecs) @ np.asarray(train_vecs).T
    k = min(k, sims.shape[1])
    idx = np.arange(sims.shape[1])
    return [[int(j) for j in np.lexsort((idx, -row))[:k]] for row in sims]


def context_window(model, tokenizer, override: int | None) -> int | None:
    """Token budget of one prompt + answer: the override, else the smaller of the
    model's ``max_position_embeddings`` and a sane ``tokenizer.model_max_length``."""
    if override:
        return override
    from lmladder.lengths import context_length

    return context_length(getattr(model, "config", None), tokenizer)


def fit_count(order_for: Callable[[int], Sequence], n_max: int, shot_cost: Callable[[Sequence], int],
              exact: Callable[[Sequence], int], budget: int) -> int:
    """The largest m <= n_max whose shots ``order_for(m)`` fit ``budget``: a binary search
    on estimated costs (``shot_cost``: base prompt + per-shot tokens), then checked with
    the exact token count (``exact``) and lowered until it fits."""
    lo, hi = 0, n_max
    while lo < hi:  # largest m with estimate <= budget
        mid = (lo + hi + 1) // 2
        if shot_cost(order_for(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    m = lo
    while m > 0:
        shots = order_for(m)
        over = exact(shots) - budget
        if over <= 0:
            break
        avg = max(1.0, (shot_cost(shots) - shot_cost(order_for(0))) / m)
        m = max(0, m - max(1, math.ceil(over / avg)))
    return m


def shot_record(e) -> dict:
    """An in-context example as shots.json keeps it: enough to render it again without the
    train file (serving the rung: its choices, instruction and structured gold too)."""
    rec = {"id": e.id, "input": e.input, "label": e.label}
    for k in ("choices", "choice_labels", "instruction"):
        if getattr(e, k, None) is not None:
            rec[k] = getattr(e, k)
    if e.target is not e.label and e.target != e.label:
        rec["target"] = e.target
    if "rejected" in (e.fields or {}):
        rec["fields"] = {"chosen": e.fields.get("chosen"), "rejected": e.fields["rejected"]}
    return rec


class FewShot(PromptRung):
    name = "few-shot"
    cost_rank = 1
    summary = "k examples in the prompt"
    kinds = PromptRung.kinds + ("preference",)  # examples show the chosen responses

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        if cfg.few_shot.selection == "similar":
            from lmladder.inference import embed

            embed.resolve(cfg.few_shot.embedder)
        if not dataset.train:
            raise LadderError("few-shot needs train examples")
        super().validate(cfg, dataset)

    # ------------------------------------------------------------------ selection
    def _embed_cache(self) -> Path:
        root = os.environ.get("LMLADDER_CACHE")
        return Path(root) / "embeddings" if root else self.ctx.run_dir / "cache" / "embeddings"

    def _similar_order(self, k: int) -> list[list]:
        """Per test example: the k nearest train examples, most similar first."""
        from lmladder.inference import embed

        task, train, test = self.ctx.task, self.ctx.data.train, self.ctx.data.test
        fn = embed.get(self.cfg.embedder)
        key = embed.identity(self.cfg.embedder)
        tv = embed.encode([task.query(e) for e in train], fn, self._embed_cache(), key)
        qv = embed.encode([task.query(e) for e in test], fn, self._embed_cache(), key)
        return [[train[j] for j in row] for row in nearest(qv, tv, k)]

    # ------------------------------------------------------------------ budget
    def _fit(self, shots_for: Callable[[object, int], Sequence], n_req: int, per_example: bool):
        """Cut shots to the context budget. Returns (shots per test example, counts per
        fitted prompt or None when no budget applies)."""
        task, test, cfg = self.ctx.task, self.ctx.data.test, self.cfg
        model, tok = self.ctx.base()
        window = None if tok is None else context_window(model, tok, cfg.context_window)
        if window is None:
            if cfg.k == "max":
                raise LadderError("few-shot k=max: the model reports no context length; set few_shot.context_window")
            return [shots_for(ex, n_req) for ex in test], None
        fmt = self.ctx.fmt()
        budget = window - self.ctx.cfg.eval.max_new_tokens
        self.window, self.budget = window, budget
        cost: dict[int, int] = {}

        def shot_cost(e) -> int:
            if id(e) not in cost:
                pair = f"Input: {task.query(e)}\n{task.answer_word}: {task.answer(e)}\n\n"
                cost[id(e)] = len(tok(pair, add_special_tokens=False).input_ids)
            return cost[id(e)]

        def exact(ex, shots) -> int:
            return len(fmt.encode(fmt.prompt(task.user_message(ex, shots))))

        # random: one shared set, sized for the longest test prompt
        targets = test if per_example else [max(test, key=lambda e: exact(e, []))]
        used = []
        for ex in targets:
            if exact(ex, shots_for(ex, n_req)) <= budget:  # everything fits
                used.append(n_req)
                continue
            base = exact(ex, []) + 4  # + the "# Examples" header
            used.append(fit_count(lambda m: shots_for(ex, m), n_req,
                                  lambda shots: base + sum(shot_cost(e) for e in shots),
                                  lambda shots: exact(ex, shots), budget))
        if per_example:
            return [shots_for(ex, m) for ex, m in zip(test, used)], used
        return [shots_for(None, used[0])] * len(test), used

    def prepare(self) -> None:
        task, cfg, train, test = self.ctx.task, self.cfg, self.ctx.data.train, self.ctx.data.test
        seed = self.ctx.cfg.seed
        n_req = len(train) if cfg.k == "max" else min(cfg.k, len(train))
        per_example = cfg.selection == "similar"
        self.window = self.budget = None
        if per_example:
            ranked = self._similar_order(n_req)
            by_ex = {id(ex): r for ex, r in zip(test, ranked)}

            def shots_for(ex, m):  # nearest last: next to the query
                return list(reversed(by_ex[id(ex)][:m]))
        else:
            def shots_for(ex, m):
                return select_balanced(train, m, seed, cfg.balanced)
        self.per_test, used = self._fit(shots_for, n_req, per_example) if test else ([], None)
        counts = [len(s) for s in self.per_test] or [n_req]
        self.shots_requested, self.shots_used = n_req, min(counts)
        if used is not None and self.shots_used < n_req:
            what = "train examples" if cfg.k == "max" else f"requested examples (k={cfg.k})"
            per = f" (per test input: {min(counts)} to {max(counts)})" if per_example else ""
            log.warning(
                "few-shot: only %d of %d %s fit the %d-token context window%s, keeping room for the "
                "test prompt and %d answer tokens", self.shots_used, n_req, what, self.window, per,
                self.ctx.cfg.eval.max_new_tokens,
            )
        self.shots = [] if per_example or not self.per_test else self.per_test[0]
        # the format is chosen with the shared shots (random selection) or a balanced draw
        # (similar selection) in front of dev examples that are not among them
        dev_shots = self.shots or select_balanced(train, self.shots_used, seed, cfg.balanced)
        self.format = self.choose_format(lambda e: dev_shots, exclude=dev_shots)
        shots_of = {id(ex): s for ex, s in zip(test, self.per_test)}
        self.messages = self.messages_for(self.format, test, lambda e: shots_of[id(e)])
        self.calibration_setup(self.format, lambda e: dev_shots)

    def predict(self):
        model, _ = self.ctx.base()
        if self.cfg.selection == "similar":
            atomic_write_json(
                self.out_dir / "shots.json",
                [{"id": ex.id, "shots": [e.id for e in s]} for ex, s in zip(self.ctx.data.test, self.per_test)],
            )
        else:
            atomic_write_json(self.out_dir / "shots.json", [shot_record(e) for e in self.shots])
        preds, info = self.ctx.task.predict(
            model, self.ctx.fmt(plain=self.format == "plain"), self.messages, self.ctx.data.test, desc=self.name,
            constrained=self.cfg.constrained, engine=self.ctx.cfg.constrained.engine,
        )
        counts = [len(s) for s in self.per_test]
        info.update({
            "selection": self.cfg.selection,
            "shots_requested": self.shots_requested,
            "shots_used": self.shots_used if self.cfg.selection == "random" else (
                sum(counts) / len(counts) if counts else 0),
            "shared_prefix": self.cfg.selection == "random",
            "context_window": self.window,
            "prompt_format": self.format_info,
        })
        if self.calibration:
            preds, info["calibration"] = self.calibrated(preds), self.calibration
        if self.cfg.selection == "similar" and counts:
            info["shots_used_min"], info["shots_used_max"] = min(counts), max(counts)
        return preds, info

    def artifacts(self):
        return {"shots": "shots.json"}
