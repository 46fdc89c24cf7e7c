"""preference: (prompt, chosen, rejected) pairs; the gold of every pair is "chosen is better".

A prediction is ``{"chosen_better": bool, "margin": float}``:

* the dpo rung's margin is the implicit DPO reward difference,
  ``beta * ((logp_policy(chosen) - logp_ref(chosen)) - (logp_policy(rejected) - logp_ref(rejected)))``;
* every other rung (zero-shot, few-shot, lora trained on the chosen responses, ...) goes
  through :meth:`PreferenceTask.predict`, which reports the **policy log-prob margin**
  ``logp(chosen | prompt) - logp(rejected | prompt)`` (summed over response tokens, no
  reference model) — comparable in sign (reward accuracy), not in scale, to dpo's margin.

Metrics: ``reward_accuracy`` (share of pairs with margin > 0) and ``margin`` (mean), both
with bootstrap CIs.

Win rate: when the run's judge is on (``judge.n > 0``; the ladder sets ``judge_cfg``),
:meth:`PreferenceTask.predict` also generates a greedy response (``judge.max_new_tokens``)
to each of the first ``judge.n`` test prompts and stores it as ``response`` in the
prediction record; the ladder then has inference/judge.py compare those responses with the
starting model's (``win_rate`` in the rung's metrics, not the primary metric).
"""

from __future__ import annotations

from typing import Any

from lmladder.tasks.base import Task


def pair_prediction(margin: float, **extra: Any) -> dict:
    """The prediction record for one pair from its margin (chosen minus rejected)."""
    m = float(margin)
    return {"pred": {"chosen_better": m > 0, "margin": m}, "raw": f"{m:.4f}", "error": None, **extra}


class PreferenceTask(Task):
    kind = "preference"
    summary = '(prompt, chosen, rejected) pairs (reward accuracy, margin, win rate)'
    metric_names = ("reward_accuracy", "margin")
    generative = False
    judge_cfg = None  # the run's JudgeConfig (set by the ladder): responses for the win rate

    @classmethod
    def fingerprint_part(cls, cfg) -> dict:
        return {"judge": cfg.judge.model_dump(mode="json")}  # responses / win rate follow the judge settings

    def responses(self, model, fmt, messages, desc: str = "responses"):
        """Greedy responses (``judge.max_new_tokens``) to ``messages``; (texts, GenStats)."""
        from lmladder.inference.generate import generate

        ids = [fmt.encode(fmt.prompt(m)) for m in messages]
        max_new = self.judge_cfg.max_new_tokens if self.judge_cfg is not None else self.eval_cfg.max_new_tokens
        texts, stats = generate(model, fmt.tokenizer, ids, max_new_tokens=max_new,
                                batch_size=self.eval_cfg.gen_batch_size, seed=self.seed, desc=desc)
        return [t[0] for t in texts], stats

    def default_instruction(self) -> str:
        return "Respond helpfully, honestly and harmlessly."

    def answer(self, example) -> str:
        return example.fields["chosen"]

    def rejected(self, example) -> str:
        return example.fields["rejected"]

    def gold(self, example) -> Any:
        return True

    def correct(self, pred, gold) -> bool:
        return isinstance(pred, dict) and pred.get("chosen_better") is True

    def example_values(self, golds, preds):
        return {"reward_accuracy": [1.0 if self.correct(p, g) else 0.0 for p, g in zip(preds, golds)],
                "margin": [float(p["margin"]) if isinstance(p, dict) else 0.0 for p in preds]}

    def score(self, golds: list, preds: list) -> dict[str, dict]:
        return self.mean_metrics(self.example_values(golds, preds))

    def response_ids(self, fmt, text: str) -> list[int]:
        return fmt.tokenizer(fmt.answer_prefix() + text, add_special_tokens=False).input_ids

    def score_pairs(self, model, fmt, messages, examples, desc: str = "preference"):
        """Summed log p(chosen | prompt) and log p(rejected | prompt) per example, and the
        scoring stats."""
        from lmladder.inference.scoring import loglikelihoods
        from lmladder.errors import LadderError

        if hasattr(model, "label_loglikelihoods"):
            raise LadderError("preference: the openai: backend cannot score arbitrary responses yet")
        tok = fmt.tokenizer
        prompt_ids = [fmt.encode(fmt.prompt(m)) for m in messages]
        conts = [[self.response_ids(fmt, self.answer(e)), self.response_ids(fmt, self.rejected(e))] for e in examples]
        lls, stats = loglikelihoods(
            model, prompt_ids, conts, batch_size=self.eval_cfg.batch_size,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, desc=desc,
            max_batch_tokens=self.eval_cfg.max_batch_tokens,
        )
        info = {"prompt_tokens_per_example": sum(map(len, prompt_ids)) / max(len(prompt_ids), 1),
                "samples_per_example": 1, "computed_tokens": stats.computed_tokens}
        return [(c, r) for c, r in lls], info

    def predict(self, model, fmt, messages, examples=None, desc="", constrained=False, engine="xgrammar"):
        """Policy log-likelihood of chosen vs rejected after the prompt (no reference)."""
        from lmladder.errors import LadderError

        if constrained:
            raise LadderError("preference: constrained decoding does not apply (pairs are scored, not generated)")
        lls, info = self.score_pairs(model, fmt, messages, examples, desc=desc or "preference")
        preds = [pair_prediction(c - r, logp_chosen=c, logp_rejected=r) for c, r in lls]
        info = {**info, "margin_kind": "policy log-prob (no reference)"}
        n = min(self.judge_cfg.n, len(messages)) if self.judge_cfg is not None else 0
        if n:  # greedy responses for the win rate (judged by the ladder, inference/judge.py)
            texts, stats = self.responses(model, fmt, messages[:n], desc=f"{desc or 'preference'}-responses")
            for p, t in zip(preds, texts):
                p["response"] = t
            info["responses"] = {"n": n, "generated_tokens_per_response": stats.generated_tokens / n,
                                 "seconds": round(stats.seconds, 2)}
            info["response_seconds"] = stats.seconds
        return preds, info
