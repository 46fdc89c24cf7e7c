"""Classification: pick the label with the highest log-likelihood after the prompt
(as lm-eval scores choices); reasoning / constrained rungs generate and parse instead."""

from __future__ import annotations

import re

from lmladder import metrics, prompts
from lmladder.tasks.base import Grammar, Task, continuation_texts, continuations, final_part, generate_answers


class ClassificationTask(Task):
    kind = "classification"
    summary = 'a label from a fixed set (label log-likelihood)'
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
        """Score every label after each prompt, through the end of its answer (see
        ``tasks.base.continuations``); return (predictions, stats)."""
        if constrained:
            return generate_answers(self, model, fmt, messages, examples, desc=desc,
                                    constrained=True, engine=engine)
        if hasattr(model, "label_loglikelihoods"):  # a remote backend (inference/openai_backend.py)
            texts = [fmt.prompt(m) for m in messages]
            conts = continuation_texts(self, fmt, messages[0], self.labels) if messages else []
            lls, info = model.label_loglikelihoods(texts, conts, self.eval_cfg.batch_size)
            return self._argmax(lls), info

        from lmladder.inference.scoring import loglikelihoods
        from lmladder.prompts import eos_token_ids

        tok = fmt.tokenizer
        prompt_ids = [fmt.encode(fmt.prompt(m)) for m in messages]
        eos = eos_token_ids(tok, model)
        lls, stats = loglikelihoods(
            model,
            prompt_ids,
            [continuations(self, fmt, m, self.labels, eos) for m in messages],
            batch_size=self.eval_cfg.batch_size,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            desc=desc,
            max_batch_tokens=self.eval_cfg.max_batch_tokens,
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

    def example_values(self, golds, preds):
        return {"accuracy": [float(self.correct(p, g)) for p, g in zip(preds, golds)]}

    def paired_data(self, golds, preds, metric):
        if metric == "macro_f1":  # not a mean over examples: resample (pred, gold) pairs
            p, g = metrics._encode(["" if x is None else x for x in preds], golds, self.labels)
            return {"kind": "macro_f1", "pred": p.tolist(), "gold": g.tolist(), "k": len(self.labels)}
        return super().paired_data(golds, preds, metric)

    def score(self, golds: list[str], preds: list[str]) -> dict[str, dict]:
        preds = ["" if p is None else p for p in preds]
        return metrics.classification_metrics(
            preds, golds, self.labels, n_boot=self.eval_cfg.bootstrap, seed=self.seed
        )
