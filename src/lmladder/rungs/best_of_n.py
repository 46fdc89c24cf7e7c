"""best-of-n: N sampled candidates, the one a verifier prefers wins.

Candidates are the self-consistency samples (cot prompt, one prefill per prompt, each
path stopped at its answer line with ``stop_at_answer``). The
verifier is, per ``best-of-n.verifier``:

* **programmatic** — the task's own checker ``task.verify(candidate, example)`` (math:
  the share of ``a op b = c`` equations in the reasoning that are right; extraction:
  schema-valid JSON); ``auto`` uses it for an example when it returns a score for at
  least one candidate, else falls back to the judge;
* **judge** — an LM (``best-of-n.judge_model``, default the model itself):
  ``pointwise`` asks for a 1-10 score per candidate and reads the *expected* score from
  the next-token distribution over the score tokens (one forward pass per candidate, no
  generation; when the tokenizer splits "10" the scale is 1-9 so every score is one
  token); ``ranking`` shows all candidates numbered and reads the distribution over
  their numbers (one forward pass per example);
* **reward-model** — a trained reward model (rungs/reward_model.py) scores each
  candidate: ``reward-model`` uses this run's reward-model rung (it runs first and its
  fingerprint is part of best-of-n's), ``reward-model:<folder>`` a saved one (e.g.
  ``runs/hhh/rungs/reward-model/model``). It scores the chat-templated generation prompt
  followed by the candidate's full text and end-of-turn, the way it was trained; the
  highest reward wins. (The reward-model rung trains on ``preference`` data, a kind
  best-of-n does not run on, so across task kinds use the folder form.)

Unparseable candidates never win; ties in the verifier score go to the answer with more
votes among the candidates, then to the earliest sample. Judge prompts of all examples
are scored in batches with a shared-prefix KV cache (inference/scoring.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from lmladder.rungs.cot import ReasoningRung, StopAtAnswer, reasoning_predict
from lmladder.rungs.self_consistency import _hashable
from typing import Literal
from pydantic import Field, field_validator
from lmladder.options import SampledOptions


class BestOfNConfig(SampledOptions, StopAtAnswer):
    n: int = Field(4, ge=1, description="Candidates per example.")
    verifier: str = Field(
        "auto",
        description="auto = the task's programmatic checker when it has one, else an LM judge; "
        "programmatic; judge; reward-model = the highest score of this run's reward-model rung "
        "(it runs first); reward-model:<folder> = a saved reward model (rungs/reward-model/model).",
    )
    judge_model: str | None = Field(None, description="Judge model (default: the model itself).")
    judge_mode: Literal["pointwise", "ranking"] = Field(
        "pointwise", description="pointwise: score each candidate 1-10; ranking: pick the best of all at once."
    )

    @field_validator("verifier")
    @classmethod
    def _verifier_valid(cls, v: str) -> str:
        if v in ("auto", "programmatic", "judge", "reward-model") or (v.startswith("reward-model:") and v[13:].strip()):
            return v
        raise ValueError("give auto, programmatic, judge, reward-model or reward-model:<folder>")


POINTWISE = (
    "You are grading a candidate answer.\n\n"
    "# Task\n{instruction}\n\n"
    "# Input\n{query}\n\n"
    "# Candidate answer\n{candidate}\n\n"
    "# Grading\nHow likely is the candidate's final answer to be correct? "
    "Reply with one number from 1 (certainly wrong) to {top} (certainly correct)."
)
RANKING = (
    "You are comparing candidate answers.\n\n"
    "# Task\n{instruction}\n\n"
    "# Input\n{query}\n\n"
    "# Candidates\n{candidates}\n\n"
    "# Grading\nWhich candidate's final answer is most likely correct? "
    "Reply with the number of the best candidate only (1 to {k})."
)


def has_verifier(task_cls) -> bool:
    from lmladder.tasks.base import Task

    return getattr(task_cls, "verify", None) is not getattr(Task, "verify", None)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


class Judge:
    """An LM judge reading score / choice distributions (no generation)."""

    def __init__(self, model, fmt, batch_size: int = 16):
        self.model, self.fmt, self.batch_size = model, fmt, batch_size
        tok = fmt.tokenizer
        self._ids = lambda s: tok(fmt.answer_prefix() + s, add_special_tokens=False).input_ids
        self.top = 10 if len(self._ids("10")) == 1 else 9
        self.calls = 0
        self.prompt_tokens = 0

    def pointwise_prompt(self, instruction: str, query: str, candidate: str) -> str:
        return POINTWISE.format(instruction=instruction.strip(), query=query, candidate=candidate.strip(), top=self.top)

    def ranking_prompt(self, instruction: str, query: str, candidates: list[str]) -> str:
        block = "\n\n".join(f"Candidate {i}:\n{c.strip()}" for i, c in enumerate(candidates, 1))
        return RANKING.format(instruction=instruction.strip(), query=query, candidates=block, k=len(candidates))

    def _distributions(self, messages: list[str], labels: list[list[str]]) -> list[list[float]]:
        """P(label | prompt) renormalised over each prompt's labels."""
        from lmladder.inference.scoring import loglikelihoods

        if not messages:
            return []
        tok = self.fmt.tokenizer
        ids = [self.fmt.encode(self.fmt.prompt(m)) for m in messages]
        self.calls += len(ids)
        self.prompt_tokens += sum(map(len, ids))
        lls, _ = loglikelihoods(
            self.model, ids, [[self._ids(l) for l in ls] for ls in labels], batch_size=self.batch_size,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, desc="judge",
        )
        return [_softmax(row) for row in lls]

    def pointwise(self, messages: list[str]) -> list[float]:
        """Expected score (1..top) of each judge prompt."""
        scale = [str(d) for d in range(1, self.top + 1)]
        return [sum(p * (d + 1) for d, p in enumerate(ps)) for ps in self._distributions(messages, [scale] * len(messages))]

    def ranking(self, messages: list[str], ks: list[int]) -> list[list[float]]:
        """P(candidate j is best) for each ranking prompt with ks[i] candidates."""
        return self._distributions(messages, [[str(j) for j in range(1, k + 1)] for k in ks])


def choose(cands: list[dict], scores: list[float | None], keys: list) -> int | None:
    """Index of the winning candidate: parseable only; best score, then most votes
    among the candidates, then earliest."""
    ok = [j for j, c in enumerate(cands) if c.get("pred") is not None]
    if not ok:
        return None
    votes: dict = {}
    for j in ok:
        votes[keys[j]] = votes.get(keys[j], 0) + 1
    return min(ok, key=lambda j: (-(scores[j] if scores[j] is not None else 0.0), -votes[keys[j]], j))


class BestOfN(ReasoningRung):
    name = "best-of-n"
    cost_rank = 6
    summary = "N candidates, a verifier picks one"

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        from lmladder import models
        from lmladder.errors import LadderError
        from lmladder.tasks import KINDS

        rc = cfg.best_of_n
        super().validate(cfg, dataset)
        if rc.verifier == "programmatic" and not has_verifier(KINDS[cfg.task.kind]):
            raise LadderError(
                f"best-of-n.verifier: task kind {cfg.task.kind} has no programmatic checker; use verifier: judge or auto"
            )
        if rc.verifier == "reward-model" and "reward-model" not in cfg.rungs:
            raise LadderError(
                "best-of-n.verifier: reward-model needs the reward-model rung in rungs (it trains on preference "
                "data); or give a trained one: reward-model:<folder> (e.g. runs/<run>/rungs/reward-model/model)"
            )
        if rc.verifier.startswith("reward-model:"):
            folder = rc.verifier.partition(":")[2].strip()
            if not (Path(folder) / "config.json").is_file():
                raise LadderError(f"best-of-n.verifier: {folder}: no saved reward model there (no config.json)")
        if rc.judge_model and rc.verifier in ("auto", "judge"):
            models.check_available(models.resolve(rc.judge_model))

    @classmethod
    def after(cls, cfg, name: str) -> list[str]:
        return ["reward-model"] if cfg.rung_config(name).verifier == "reward-model" else []

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        extra = super().fingerprint_extra(cfg)
        v = cfg.best_of_n.verifier
        if v.startswith("reward-model:"):  # another saved reward model: other picks
            from lmladder.rungs.reward_model import folder_digest

            extra["reward_model"] = folder_digest(Path(v.partition(":")[2].strip()))
        return extra

    def _reward_folder(self) -> Path:
        from lmladder.rungs.reward_model import default_folder

        v = self.cfg.verifier
        return Path(v.partition(":")[2].strip()) if v.startswith("reward-model:") else default_folder(self.ctx.run_dir)

    def _judge(self) -> Judge:
        if self.cfg.judge_model:
            from lmladder.models import load_causal_lm
            from lmladder.prompts import ChatFormat

            jm, jtok, _ = load_causal_lm(self.cfg.judge_model)
            return Judge(jm, ChatFormat(jtok), self.ctx.cfg.eval.batch_size)
        model, _ = self.ctx.base()
        return Judge(model, self.ctx.fmt(), self.ctx.cfg.eval.batch_size)

    def predict(self):
        cfg, task, examples = self.cfg, self.ctx.task, self.ctx.data.test
        preds, info = reasoning_predict(self, cfg, n=cfg.n, do_sample=True)
        cands = [[{k: c.get(k) for k in ("pred", "raw", "error")} for c in rec.get("samples", [rec])] for rec in preds]
        keys = [[_hashable(task.vote_key(c["pred"])) if c["pred"] is not None else None for c in cs] for cs in cands]
        scores: list[list[float | None]] = [[None] * len(cs) for cs in cands]
        kinds: list[str] = []
        use_rm = cfg.verifier.startswith("reward-model")
        use_prog = cfg.verifier not in ("judge",) and not use_rm and has_verifier(type(task))
        scorer = self._reward_pass(cands, scores, examples) if use_rm else None
        for i, (cs, ex) in enumerate(zip(cands, examples)):
            if use_rm:
                kinds.append("reward-model")
                continue
            s = [task.verify(c, ex) if use_prog and c["pred"] is not None else None for c in cs]
            if use_prog and (cfg.verifier == "programmatic" or any(v is not None for v in s)):
                scores[i], kind = s, "programmatic"
            else:
                kind = f"judge-{cfg.judge_mode}"
            kinds.append(kind)
        judge = self._judge_pass(cands, scores, kinds, examples) if any(k.startswith("judge") for k in kinds) else None

        out, chosen_idx = [], []
        for cs, ks, sc, kind in zip(cands, keys, scores, kinds):
            j = choose(cs, sc, ks)
            chosen_idx.append(j)
            for c, v in zip(cs, sc):
                c["score"] = None if v is None else round(float(v), 4)
            if j is None:
                reason = next((c["error"] for c in cs if c.get("error")), "no answer")
                out.append({"pred": None, "raw": cs[0]["raw"], "error": f"all {len(cs)} candidates unparseable (first: {reason})",
                            "chosen": None, "verifier": kind, "samples": cs})
            else:
                out.append({"pred": cs[j]["pred"], "raw": cs[j]["raw"], "error": None, "chosen": j,
                            "verifier": kind, "samples": cs})
        n_ex = max(len(out), 1)
        picked = [j for j in chosen_idx if j is not None]
        hist = [sum(1 for j in picked if j == r) for r in range(cfg.n)]
        judge_calls = judge.calls if judge else 0
        judge_tokens = judge.prompt_tokens if judge else 0
        if scorer is not None:  # the reward model's forward passes are the verifier's cost
            judge_calls, judge_tokens = scorer.calls, scorer.tokens
            info["reward_model"] = str(self._reward_folder())
        info.update(
            samples_per_example=cfg.n,
            generation_prompt_tokens_per_example=info["prompt_tokens_per_example"],
            judge_prompt_tokens_per_example=judge_tokens / n_ex,
            prompt_tokens_per_example=info["prompt_tokens_per_example"] + judge_tokens / n_ex,
            verifier={k: kinds.count(k) for k in sorted(set(kinds))},
            judge_model=cfg.judge_model or "(the model itself)" if judge else None,
            judge_calls_per_example=judge_calls / n_ex,
            judge_scale=f"1-{judge.top}" if judge and cfg.judge_mode == "pointwise" else None,
            chosen_rank={
                "mean_index": sum(picked) / len(picked) if picked else None,
                "first_sample_share": hist[0] / len(picked) if picked else None,
                "histogram": hist,
            },
            unparseable=sum(o["pred"] is None for o in out),
        )
        return out, info

    def _reward_pass(self, cands, scores, examples):
        """Fill ``scores`` with the reward model's score of every parseable candidate
        (identical texts scored once), all in one batched pass; returns the scorer."""
        from lmladder.rungs.cot import reasoning_format
        from lmladder.rungs.reward_model import RewardScorer

        task = self.ctx.task
        scorer = RewardScorer.from_folder(self._reward_folder(), reasoning_format(self.ctx.fmt(), self.cfg.thinking)[0],
                                          batch_size=self.ctx.cfg.eval.batch_size)
        msgs, resps, where, seen = [], [], [], {}
        for i, (cs, ex) in enumerate(zip(cands, examples)):
            message = task.user_message(ex, reasoning=self.cfg.prompt)  # the prompt the candidates answer
            for j, c in enumerate(cs):
                if c["pred"] is None:
                    continue
                key = (i, c["raw"] or "")
                if key not in seen:
                    seen[key] = len(msgs)
                    msgs.append(message)
                    resps.append(c["raw"] or "")
                where.append((i, j, seen[key]))
        values = scorer(msgs, resps) if msgs else []
        for i, j, m in where:
            scores[i][j] = values[m]
        return scorer

    def _judge_pass(self, cands, scores, kinds, examples) -> Judge:
        """Fill ``scores`` for the judge examples, all judge prompts scored in one batched pass."""
        task, judge = self.ctx.task, self._judge()
        instruction = task.instruction
        if self.cfg.judge_mode == "pointwise":
            msgs, where = [], []
            for i, (cs, ex, kind) in enumerate(zip(cands, examples, kinds)):
                if not kind.startswith("judge"):
                    continue
                seen: dict[str, int] = {}
                for j, c in enumerate(cs):
                    if c["pred"] is None:
                        continue
                    raw = (c["raw"] or "").strip()
                    if raw not in seen:  # identical texts are judged once
                        seen[raw] = len(msgs)
                        msgs.append(judge.pointwise_prompt(instruction, task.query(ex), raw))
                    where.append((i, j, seen[raw]))
            values = judge.pointwise(msgs)
            for i, j, m in where:
                scores[i][j] = values[m]
        else:
            msgs, ks, groups = [], [], []
            for i, (cs, ex, kind) in enumerate(zip(cands, examples, kinds)):
                if not kind.startswith("judge"):
                    continue
                distinct: list[str] = []
                members: list[tuple[int, int]] = []
                for j, c in enumerate(cs):
                    if c["pred"] is None:
                        continue
                    raw = (c["raw"] or "").strip()
                    if raw not in distinct:
                        distinct.append(raw)
                    members.append((j, distinct.index(raw)))
                if len(distinct) > 1:
                    msgs.append(judge.ranking_prompt(instruction, task.query(ex), distinct))
                    ks.append(len(distinct))
                    groups.append((i, members))
            for (i, members), probs in zip(groups, judge.ranking(msgs, ks)):
                for j, d in members:
                    scores[i][j] = probs[d]
        return judge
