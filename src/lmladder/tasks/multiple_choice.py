"""Multiple choice: each example carries its own choices (``data.choices_field``).

Direct answers are scored by log-likelihood as lm-eval scores choices: the prediction is
the choice whose text is most likely after the prompt (``accuracy``, lm-eval's ``acc``),
and the one with the highest log-likelihood per character (``accuracy_norm``, lm-eval's
``acc_norm``). Generating rungs (reasoning, constrained) parse a letter or a choice text,
and both metrics then count the same answer.

A prediction is ``{"choice": i, "choice_norm": j}`` (indices into the example's choices).
"""

from __future__ import annotations

import re
import string

from lmladder.tasks.base import (ANSWER_RE, Grammar, Task, continuation_texts, continuations, final_part,
                                 generate_answers)

LETTERS = string.ascii_uppercase
_LETTER_RE = re.compile(r"^\(?([A-Z])(?:[).:]|\s|$)")
_ANSWER_LETTER_RE = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?(?![\w'])", re.IGNORECASE)


def _clean(s: str) -> str:
    return " ".join(s.strip().strip(".!\"'`*").split()).lower()


class MultipleChoiceTask(Task):
    kind = "multiple-choice"
    summary = "one of each example's choices"
    metric_names = ("accuracy", "accuracy_norm")
    generative = False
    plain_end = ""  # plain prompts score " <choice>" exactly as lm-eval does

    def default_instruction(self) -> str:
        return "Choose the correct answer."

    def hints(self) -> list[str]:
        return ["Answer with the text of the correct choice."]

    def query(self, example) -> str:
        names = getattr(example, "choice_labels", None) or LETTERS
        lines = [f"{names[i] if i < len(names) else LETTERS[i]}. {c}" for i, c in enumerate(example.choices or [])]
        return example.input + "\n" + "\n".join(lines)

    def plain_message(self, x, examples=()) -> str:
        """lm-eval's multiple-choice prompt: ``Question: <input>\nAnswer:`` (choices are not
        listed; each is scored as the continuation ``" " + choice``), examples before it."""
        shots = [f"Question: {e.input}\nAnswer: {self.answer(e)}" for e in examples]
        return "\n\n".join(shots + [f"Question: {x.input}\nAnswer:"])

    def answer(self, example) -> str:
        return example.choices[example.target]

    def gold(self, example) -> int:
        return example.target

    # ------------------------------------------------------------------ outputs
    def parse(self, text, example=None):
        if example is None or not example.choices:
            return None, "no choices to match the output against"
        choices = example.choices
        t = text.strip()
        m = ANSWER_RE.match(t)
        if m:
            t = t[m.end():].strip()
        i = self._match(t, choices)
        if i is None:
            return None, f"no choice ({LETTERS[0]}-{LETTERS[len(choices) - 1]} or a choice text) in the output"
        return {"choice": i, "choice_norm": i}, None

    def _match(self, t: str, choices: list[str]) -> int | None:
        low = [_clean(c) for c in choices]
        if _clean(t) in low:
            return low.index(_clean(t))
        m = _LETTER_RE.match(t)
        if m and LETTERS.index(m.group(1)) < len(choices):
            return LETTERS.index(m.group(1))
        ms = [m for m in _ANSWER_LETTER_RE.finditer(t) if LETTERS.index(m.group(1).upper()) < len(choices)]
        if ms:
            return LETTERS.index(ms[-1].group(1).upper())
        best, pos = None, -1  # the choice text mentioned last (the longest at a tie)
        tl = t.lower()
        for j, c in enumerate(low):
            k = tl.rfind(c) if c else -1
            if k > pos or (k == pos and k >= 0 and len(c) > len(low[best])):
                best, pos = j, k
        return best

    def extract(self, text, example=None):
        p, err = self.parse(final_part(text), example)
        return (p, err) if p is not None else self.parse(text, example)

    def vote_key(self, pred):
        return pred["choice"] if isinstance(pred, dict) else pred

    def grammar(self, example=None):
        if example is None or not example.choices:
            return None
        return Grammar("choice", list(example.choices))

    # ------------------------------------------------------------------ prediction
    def predict(self, model, fmt, messages, examples=None, desc="", constrained=False, engine="xgrammar"):
        """Log-likelihood of each example's choices after its prompt (see module doc)."""
        if constrained:
            return generate_answers(self, model, fmt, messages, examples, desc=desc,
                                    constrained=True, engine=engine)
        examples = list(examples)
        if hasattr(model, "label_loglikelihoods"):  # a remote backend: one request set per example
            lls, tokens, info = [], [], {}
            for m, e in zip(messages, examples):
                row, info = model.label_loglikelihoods(
                    [fmt.prompt(m)], continuation_texts(self, fmt, m, e.choices), self.eval_cfg.batch_size)
                lls.append(row[0])
                tokens.append(info.get("prompt_tokens_per_example", 0))
            info = {**info, "prompt_tokens_per_example": sum(tokens) / max(len(tokens), 1)}
            return self._argmax(lls, examples), info

        from lmladder.inference.scoring import loglikelihoods
        from lmladder.prompts import eos_token_ids

        tok = fmt.tokenizer
        prompt_ids = [fmt.encode(fmt.prompt(m)) for m in messages]
        eos = eos_token_ids(tok, model)
        choice_ids = [continuations(self, fmt, m, e.choices, eos) for m, e in zip(messages, examples)]
        lls, stats = loglikelihoods(
            model, prompt_ids, choice_ids, batch_size=self.eval_cfg.batch_size,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, desc=desc,
            max_batch_tokens=self.eval_cfg.max_batch_tokens,
        )
        info = {
            "prompt_tokens_per_example": sum(map(len, prompt_ids)) / max(len(prompt_ids), 1),
            "shared_prefix_tokens": stats.prefix_tokens,
            "computed_tokens": stats.computed_tokens,
        }
        return self._argmax(lls, examples), info

    def _argmax(self, lls: list[list[float]], examples) -> list[dict]:
        preds = []
        for row, e in zip(lls, examples):
            norm = [ll / max(len(c), 1) for ll, c in zip(row, e.choices)]
            i = max(range(len(row)), key=lambda j: row[j])  # ties: the first choice
            j = max(range(len(norm)), key=lambda j: norm[j])
            preds.append({"pred": {"choice": i, "choice_norm": j}, "answer": e.choices[i], "scores": row})
        return preds

    # ------------------------------------------------------------------ scoring
    def correct(self, pred, gold) -> bool:
        return pred is not None and pred["choice"] == gold

    def example_values(self, golds, preds):
        return {
            "accuracy": [float(self.correct(p, g)) for p, g in zip(preds, golds)],
            "accuracy_norm": [float(p is not None and p["choice_norm"] == g) for p, g in zip(preds, golds)],
        }

    def score(self, golds, preds):
        return self.mean_metrics(self.example_values(golds, preds))
