"""Classification: pick the label with the highest log-likelihood after the prompt
(as lm-eval scores choices); reasoning / constrained rungs generate and parse instead."""

from __future__ import annotations

import re

from lmladder import metrics, prompts
from lmladder.tasks.base import Grammar, Task, final_part, generate_answers


class ClassificationTask(Task):
    kind = "classification"
    metric_names = ("accuracy", "macro_f1")
    generative = False
    answer_word = "Label"

    def default_instruction(self) -> str:
        return prompts.default_instruction(self.labels)

    def user_message(self, x, examples=(), *, reasoning=None, context=None, instruction=None) -> str:
        q = x if isinstance(x, str) else self.query(x)
        pairs = [e if isinstance(e, tuple) else (self.query(e), self.answer(e)) for e in examples]
        return prompts.user_message(
            instruction or self.instruction, q, pairs, self.labels,
            answer_word=self.answer_word, hints=[reasoning] if reasoning else (), context=context,
        )

    def gold(self, example):
        return example.label

    def parse(self, text, example=None):
        t = text.strip().strip(".!\"'`*").strip()
        for l in self.labels:
            if t == l:
                return l, None
        low = {l.lower(): l for l in self.labels}
        if t.lower() in low:
            return low[t.lower()], None
        return self._last_mention(t)

    def extract(self, text, example=None):
        part = final_part(text)
        p, err = self.parse(part) if part else (None, "empty output")
        if p is None:  # no "Answer:" line: the last label named anywhere
            return self._last_mention(text)
        return p, err

    def _last_mention(self, text):
        best, pos = None, -1
        for l in self.labels:
            for m in re.finditer(r"(?<![\w-])" + re.escape(l) + r"(?![\w-])", text, re.IGNORECASE):
                if m.start() > pos:
                    best, pos = l, m.start()
        if best is None:
            return None, f"no label ({', '.join(self.labels)}) in the output"
        return best, None

    def grammar(self, example=None):
        return Grammar("choice", list(self.labels))

    def predict(self, model, fmt, messages, examples=None, desc="", constrained=False, engine="xgrammar"):
        """Score every label after each prompt; return (predictions, stats)."""
        if constrained:
            return generate_answers(self, model, fmt, messages, examples, desc=desc,
                                    constrained=True, engine=engine)
        if hasattr(model, "label_loglikelihoods"):  # a remote backend (engine/openai_backend.py)
            texts = [fmt.prompt(m) for m in messages]
            conts = [fmt.answer_prefix() + l for l in self.labels]
            lls, info = model.label_loglikelihoods(texts, conts, self.eval_cfg.batch_size)
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

    def verify(self, candidate, example):
        return None

    def score(self, golds: list[str], preds: list[str]) -> dict[str, dict]:
        preds = ["" if p is None else p for p in preds]
        return metrics.classification_metrics(
            preds, golds, self.labels, n_boot=self.eval_cfg.bootstrap, seed=self.seed
        )
