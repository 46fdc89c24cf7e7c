"""few-shot: k labelled train examples in the prompt (seeded, balanced across labels).

The examples are the same for every test input, so the whole prompt up to
``# Target question`` is a shared prefix whose KV cache the scorer reuses.
"""

from __future__ import annotations

import random

from lmladder.io import atomic_write_json
from lmladder.rungs.base import Rung


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


class FewShot(Rung):
    name = "few-shot"
    cost_rank = 1
    summary = "k examples in the prompt"

    def prepare(self) -> None:
        task = self.ctx.task
        self.shots = select_balanced(self.ctx.data.train, self.cfg.k, self.ctx.cfg.seed, self.cfg.balanced)
        self.messages = [task.user_message(ex, self.shots) for ex in self.ctx.data.test]

    def predict(self):
        model, _ = self.ctx.base()
        atomic_write_json(
            self.out_dir / "shots.json",
            [{"id": e.id, "input": e.input, "label": e.label} for e in self.shots],
        )
        return self.ctx.task.predict(
            model, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name,
            constrained=self.cfg.constrained, engine=self.ctx.cfg.constrained.engine,
        )

    def artifacts(self):
        return {"shots": "shots.json"}
