"""prompt-search: hard prompt tuning. Try instruction variants on a dev split carved
from train, keep the best by the task's primary metric, then evaluate it on test.

Candidates: the task's own instruction first, then ``prompt_search.variants``, then
``prompt_search.generate`` variants written by the model itself (asked to rewrite the
instruction; sampled, seeded). Each is scored on ``dev_size`` train examples drawn with
the run's seed with ``task.score`` on their golds; the test split is used only once,
with the chosen instruction. Ties keep the earlier candidate (the task's instruction
wins a tie). Every candidate's dev score goes to variants.json and the info.
"""

from __future__ import annotations

import logging
import random
from typing import Callable, Sequence

from lmladder.errors import LadderError
from lmladder.io import atomic_write_json
from lmladder.rungs.base import Rung
from pydantic import Field
from lmladder.options import Constrainable


class PromptSearchConfig(Constrainable):
    variants: list[str] | None = Field(None, description="Instruction variants to try (besides the task's).")
    generate: int = Field(4, ge=0, description="Variants written by the model itself.")
    dev_size: int = Field(64, ge=4, description="Dev examples carved (seeded) from train for the search.")


log = logging.getLogger(__name__)

REWRITE_PROMPT = (
    "Rewrite the following instruction for a language model so that it is clearer and "
    "leads to more accurate answers. Keep its meaning and any answer format it asks for. "
    "Reply with the new instruction only.\n\nInstruction: {instruction}"
)


def carve_dev(train: Sequence, size: int, seed: int) -> list:
    """A seeded sample of ``size`` train examples (all of them when train is smaller)."""
    rng = random.Random(seed)
    return rng.sample(list(train), min(size, len(train)))


def clean_variant(text: str) -> str:
    t = text.strip()
    if t.lower().startswith("instruction:"):
        t = t[len("instruction:"):].strip()
    return t.strip("\"'`").strip()


def search(candidates: Sequence[dict], evaluate: Callable[[str], float]) -> tuple[int, list[dict]]:
    """Score each candidate ``{"instruction", "source"}`` with ``evaluate``; returns the
    index of the best (first on ties) and the rows with their ``dev_score``."""
    rows, best = [], None
    for i, c in enumerate(candidates):
        s = float(evaluate(c["instruction"]))
        rows.append({**c, "dev_score": s})
        log.info("prompt-search: variant %d (%s) dev %.4f", i, c["source"], s)
        if best is None or s > rows[best]["dev_score"]:
            best = i
    return best, rows


class PromptSearch(Rung):
    name = "prompt-search"
    cost_rank = 8
    summary = "best of M instruction variants on a dev split"

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        pc = cfg.prompt_search
        if not (pc.variants or pc.generate):
            raise LadderError("prompt-search: nothing to search (give prompt_search.variants or prompt_search.generate > 0)")
        if any(not str(v).strip() for v in pc.variants or []):
            raise LadderError("prompt_search.variants: variants must be non-empty text")
        if len(dataset.train) < 4:
            raise LadderError(f"prompt-search needs at least 4 train examples for its dev split (got {len(dataset.train)})")

    def prepare(self) -> None:
        task = self.ctx.task
        self.dev = carve_dev(self.ctx.data.train, self.cfg.dev_size, self.ctx.cfg.seed)
        if len(self.dev) < self.cfg.dev_size:
            log.warning("prompt-search: dev_size %d > train size; using all %d train examples",
                        self.cfg.dev_size, len(self.dev))
        cands = [{"instruction": task.instruction, "source": "task"}]
        for v in self.cfg.variants or []:
            cands.append({"instruction": v.strip(), "source": "config"})
        self.candidates = cands
        self.search_tokens = 0

    def _dedup(self, cands: list[dict]) -> list[dict]:
        seen, out = set(), []
        for c in cands:
            if c["instruction"] and c["instruction"] not in seen:
                seen.add(c["instruction"])
                out.append(c)
        return out

    def generate_variants(self, model, fmt) -> list[str]:
        """``generate`` rewrites of the task instruction by the model (sampled, seeded)."""
        from lmladder.inference.generate import generate

        if hasattr(model, "label_loglikelihoods"):
            raise LadderError("prompt_search.generate needs text generation (not offered by the openai: backend); "
                              "set prompt_search.generate=0 and list variants")
        ids = [fmt.encode(fmt.prompt(REWRITE_PROMPT.format(instruction=self.ctx.task.instruction)))]
        texts, stats = generate(model, fmt.tokenizer, ids, max_new_tokens=96, n=self.cfg.generate,
                                do_sample=True, temperature=0.9, top_p=0.95, seed=self.ctx.cfg.seed,
                                batch_size=self.ctx.task.eval_cfg.gen_batch_size, desc="prompt-search: variants")
        self.search_tokens += stats.prompt_tokens
        return [clean_variant(t) for t in texts[0]]

    def evaluate(self, instruction: str, examples: Sequence, desc: str = "") -> tuple[list[dict], dict]:
        task = self.ctx.task
        model, _ = self.ctx.base()
        msgs = [task.user_message(e, instruction=instruction) for e in examples]
        return task.predict(model, self.ctx.fmt(), msgs, examples, desc=desc or self.name,
                            constrained=self.cfg.constrained, engine=self.ctx.cfg.constrained.engine)

    def dev_score(self, instruction: str) -> float:
        task, metric = self.ctx.task, self.ctx.cfg.primary_metric
        preds, info = self.evaluate(instruction, self.dev, desc="prompt-search: dev")
        self.search_tokens += info.get("prompt_tokens_per_example", 0) * len(self.dev)
        scores = task.score([task.gold(e) for e in self.dev], [p["pred"] for p in preds])
        return scores[metric]["value"]

    def predict(self):
        import time

        t0 = time.perf_counter()  # the search is a one-time cost, not part of the per-call cost
        cands = list(self.candidates)
        if self.cfg.generate:
            model, _ = self.ctx.base()
            cands += [{"instruction": v, "source": "generated"} for v in self.generate_variants(model, self.ctx.fmt())]
        cands = self._dedup(cands)
        best, rows = search(cands, self.dev_score)
        chosen = rows[best]["instruction"]
        log.info("prompt-search: chose variant %d (%s), dev %s %.4f", best, rows[best]["source"],
                 self.ctx.cfg.primary_metric, rows[best]["dev_score"])
        atomic_write_json(self.out_dir / "variants.json", {
            "metric": self.ctx.cfg.primary_metric, "dev_size": len(self.dev),
            "dev_ids": [e.id for e in self.dev], "chosen": best, "variants": rows,
        })
        search_s = time.perf_counter() - t0
        preds, info = self.evaluate(chosen, self.ctx.data.test)
        info.update({
            "one_time_seconds": search_s,
            "variants": rows, "chosen": best, "chosen_instruction": chosen,
            "dev_size": len(self.dev), "search_prompt_tokens": int(self.search_tokens),
        })
        return preds, info

    def artifacts(self):
        return {"variants": "variants.json"}
