"""self-consistency: N sampled reasoning paths, majority vote on the extracted answer.

The N paths of one prompt are sampled in one batched ``generate`` that runs the prompt's
prefill once and repeats its KV cache N times (inference/generate.py), so N samples cost N
decodes but one prefill. A path stops once its answer line is complete and leaves the
batch (``stop_at_answer``, as in cot); each path draws with its own seeded generator, so
its text does not depend on the batch it ran in. Each path's answer is extracted with ``task.extract``; answers
vote by ``task.vote_key`` (math: the number, extraction: the entity multiset, ...).
Ties go to the answer sampled first; unparseable samples do not vote; when every
sample is unparseable the prediction is None with the reason. ``agreement`` is the
share of the N samples that voted for the winner (its mean over examples is reported).
"""

from __future__ import annotations

import json
from typing import Any

from lmladder.rungs.cot import ReasoningRung, StopAtAnswer, reasoning_predict
from lmladder.options import SampledOptions


class SelfConsistencyConfig(SampledOptions, StopAtAnswer):
    """N sampled reasoning paths, majority vote on the extracted answer."""


def _hashable(key: Any):
    try:
        hash(key)
        return key
    except TypeError:
        return json.dumps(key, sort_keys=True, ensure_ascii=False, default=str)


def majority_vote(task, cands: list[dict]) -> dict:
    """The winning candidate of one example: ``{"pred", "raw", "error", "agreement",
    "votes", "chosen"}`` (``chosen``: index of the sample that carries the answer)."""
    counts: dict = {}
    first: dict = {}
    for j, c in enumerate(cands):
        if c.get("pred") is None:
            continue
        k = _hashable(task.vote_key(c["pred"]))
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, j)
    if not counts:
        reason = next((c.get("error") for c in cands if c.get("error")), "no answer")
        return {"pred": None, "raw": cands[0].get("raw") if cands else "", "chosen": None,
                "error": f"all {len(cands)} samples unparseable (first: {reason})",
                "agreement": 0.0, "votes": {}}
    best = min(counts, key=lambda k: (-counts[k], first[k]))  # most votes, then earliest
    win = cands[first[best]]
    return {
        "pred": win["pred"], "raw": win.get("raw"), "error": None, "chosen": first[best],
        "agreement": counts[best] / len(cands),
        "votes": {str(k): v for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], first[kv[0]]))},
    }


class SelfConsistency(ReasoningRung):
    name = "self-consistency"
    cost_rank = 5
    summary = "N sampled reasoning paths, majority vote"

    def predict(self):
        cfg, task = self.cfg, self.ctx.task
        preds, info = reasoning_predict(self, cfg, n=cfg.n, do_sample=True)
        out = []
        for rec in preds:
            samples = rec.get("samples", [rec])
            vote = majority_vote(task, samples)
            out.append({**vote, "samples": [{k: c.get(k) for k in ("pred", "raw", "error")} for c in samples]})
        n_ex = max(len(out), 1)
        info.update(
            samples_per_example=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            agreement_rate=sum(v["agreement"] for v in out) / n_ex,
            unanimous_share=sum(v["agreement"] == 1.0 for v in out) / n_ex,
            unparseable_sample_share=sum(c["pred"] is None for v in out for c in v["samples"]) / (n_ex * cfg.n),
            unparseable=sum(v["pred"] is None for v in out),
            vote_changed_share=sum(self._changed(v) for v in out) / n_ex,  # vote != first sample
        )
        return out, info

    def _changed(self, v: dict) -> bool:
        first = v["samples"][0]["pred"]
        if v["pred"] is None:
            return False
        key = self.ctx.task.vote_key
        return first is None or _hashable(key(first)) != _hashable(key(v["pred"]))
