"""Classification: pick the label with the highest log-likelihood after the prompt."""

from __future__ import annotations

from typing import Sequence

from lmladder import metrics, prompts
from lmladder.config import EvalConfig, TaskConfig


class ClassificationTask:
    kind = "classification"
    metric_names = ("accuracy", "macro_f1")

    def __init__(self, cfg: TaskConfig, labels: Sequence[str], eval_cfg: EvalConfig, seed: int):
        self.cfg, self.labels, self.eval_cfg, self.seed = cfg, list(labels), eval_cfg, seed

    @property
    def instruction(self) -> str:
        return self.cfg.instruction or prompts.default_instruction(self.labels)

    def user_message(self, query: str, examples: Sequence[tuple[str, str]] = ()) -> str:
        return prompts.user_message(self.instruction, query, examples, self.labels)

    def answer(self, example) -> str:
        """The assistant's answer text for training and in-context examples."""
        return example.label

    def predict(self, model, fmt: prompts.ChatFormat, messages: list[str], desc: str):
        """Score every label after each prompt; return (predictions, stats)."""
        if hasattr(model, "label_loglikelihoods"):  # a remote backend (engine/openai_backend.py)
            prompts = [fmt.prompt(m) for m in messages]
            conts = [fmt.answer_prefix() + l for l in self.labels]
            lls, info = model.label_loglikelihoods(prompts, conts, self.eval_cfg.batch_size)
            return self._argmax(lls), info

        from lmladder.engine.scoring import loglikelihoods

        tok = fmt.tokenizer
        prompt_ids = [fmt.encode(fmt.prompt(m)) for m in messages]
        choices = [tok(fmt.answer_prefix() + l, add_special_tokens=False).input_ids for l in self.labels]
        lls, stats = loglikelihoods(
            model,
            prompt_ids,
            [choices] * len(prompt_ids),
            batch_size=self.eval_cfg.batch_size,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            desc=desc,
        )
        preds = self._argmax(lls)
        info = {
            "prompt_tokens_per_example": sum(map(len, prompt_ids)) / max(len(prompt_ids), 1),
            "shared_prefix_tokens": stats.prefix_tokens,
            "computed_tokens": stats.computed_tokens,
        }
        return preds, info

    def _argmax(self, lls: list[list[float]]) -> list[dict]:
        preds = []
        for row in lls:
            best = max(range(len(row)), key=lambda j: row[j])  # ties: first label in the set
            preds.append({"pred": self.labels[best], "scores": dict(zip(self.labels, row))})
        return preds

    def score(self, golds: list[str], preds: list[str]) -> dict[str, dict]:
        return metrics.classification_metrics(
            preds, golds, self.labels, n_boot=self.eval_cfg.bootstrap, seed=self.seed
        )
