"""``POST /v1/predict``: a run's rung served as the task it won, not as bare weights.

A few-shot winner needs its examples in the prompt, a calibrated one its label prior, a
constrained one its grammar, a LoRA its adapter *and* the ladder's prompt template it was
trained on. A client of ``/v1/chat/completions`` would have to rebuild all of that by hand;
this route takes the task's input fields (``{"inputs": [{"text": "..."}]}``, the same
fields as a data row, gold not needed) and answers with what the rung predicts: the label
with every label's score (classification), the parsed JSON (extraction), the number
(math), the choice (multiple-choice), the text (qa, generation).

It reads only the run folder (config.yaml, data.json, results.json, the rung's
result.json, shots.json and its weights) and replays the rung's own steps with what the
run recorded: the prompt format chosen on dev, the shots, the calibration, the chosen
instruction (prompt-search), the grammar engine. Nothing named as code in the folder is
imported (serve's --trust-run-code is not needed). The work runs on the server's model
worker (``Engine.call``), so it is serialised with the batched chat / completion decodes.

Served: zero-shot, calibrated, few-shot (random selection), constrained, prompt-search,
cot, self-consistency, and rungs whose weights are a LoRA / IA3 adapter over the base
(lora, ia3, distill, dpo / grpo with method lora) or a whole model (full,
continued-pretraining, dpo / grpo with method full). Not served (a one-line reason at
startup or on request): qlora (a 4-bit base), prompt / prefix tuning (virtual tokens),
encoder, rag (the retrieval index), tools (code), best-of-n (verifier), reward-model (not
a policy), stacked rungs (``from:``), few-shot with ``selection: similar``, and the
preference kind (its policy answers through /v1/chat/completions).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmladder.errors import LadderError

log = logging.getLogger("lmladder.serving.cli")

PROMPT_RUNGS = ("zero-shot", "calibrated", "few-shot", "constrained", "prompt-search", "cot", "self-consistency")
NOT_SERVED = {
    "qlora": "its adapter was trained on a 4-bit base this server does not load",
    "prompt-tuning": "its learned virtual tokens are not served yet",
    "prefix-tuning": "its learned key/value prefix is not served yet",
    "encoder": "it is a separate encoder model",
    "rag": "it needs the retrieval index of its corpus",
    "tools": "it runs tool code",
    "best-of-n": "it needs its verifier or judge",
    "reward-model": "it scores answers; it is not a policy",
}
MAX_INPUTS = 64


class _Data:
    def __init__(self, test):
        self.train, self.test = [], test


class ServeContext:
    """What a rung's prediction steps read from the ladder's Context: config, task, the
    model (the worker's, with the rung's adapter active) and the request's examples as the
    test split. No train data, no run folder writes."""

    def __init__(self, cfg, task, model, tok, examples):
        self.cfg, self.task, self._model, self._tok = cfg, task, model, tok
        self.data = _Data(examples)

    def base(self):
        return self._model, self._tok

    def fmt(self, plain: bool = False):
        from lmladder.prompts import ChatFormat

        return ChatFormat(self._tok, self.cfg.task.system_prompt, plain=plain)


def _shot(rec: dict):
    from lmladder.data import Example

    e = Example(id=str(rec.get("id", "")), input=rec["input"], label=rec["label"], source="shots.json",
                fields=dict(rec.get("fields") or {}), target=rec.get("target"), choices=rec.get("choices"),
                choice_labels=rec.get("choice_labels"), instruction=rec.get("instruction"))
    return e


class Predictor:
    """One rung of a run folder, ready to predict for rows of the task's input fields."""

    def __init__(self, run_dir: str | Path, rung: str | None = None):
        from lmladder.registry import rung_class
        from lmladder.run.folder import read_run
        from lmladder.tasks import make_task

        run = read_run(run_dir)
        self.run, self.cfg = run, run.cfg
        if rung is None:
            try:
                rung = json.loads((run.dir / "results.json").read_text())["recommendation"].get("rung")
            except (OSError, ValueError, KeyError):
                rung = None
            if rung is None:
                raise LadderError(f"{run.dir}: no rung is recommended in results.json; serve one with --rung NAME "
                                  f"(finished: {', '.join(run.finished) or 'none'})")
        self.rung = rung
        base = rung.partition("@")[0]
        from lmladder import registry

        if base not in registry.RUNGS or ("@" in rung and rung not in self.cfg.copies):
            raise LadderError(f"--rung {rung}: unknown rung (finished in {run.dir}: {', '.join(run.finished) or 'none'})")
        cls = rung_class(rung)
        self.rc = self.cfg.rung_config(rung)
        kind = self.cfg.task.kind
        why = None
        if kind in ("preference", "tagging"):
            why = (f"a {kind} run's rungs are not served as a task here" + (
                f"; its policy answers through /v1/chat/completions with model '{rung}'" if kind == "preference" else ""))
        elif base in NOT_SERVED:
            why = NOT_SERVED[base]
        elif getattr(self.rc, "from_", None):
            why = f"it starts from {self.rc.from_}'s model (from:), which this server does not build"
        elif base == "few-shot" and self.rc.selection == "similar":
            why = "selection: similar picks its examples per input from the train set"
        if why:
            raise LadderError(f"rung '{rung}' cannot be served by /v1/predict: {why}")
        if rung not in run.finished:
            raise LadderError(f"--rung {rung}: not a finished rung of {run.dir} (finished: "
                              f"{', '.join(run.finished) or 'none'})")
        rdir = run.dir / "rungs" / rung
        self.result = json.loads((rdir / "result.json").read_text())
        details = self.result.get("details") or {}
        self.task = make_task(self.cfg.task, run.labels, self.cfg.eval, self.cfg.seed)  # no setup: no user code
        self.format = (details.get("prompt_format") or {}).get("chosen") or "chat"
        self.calibration = details.get("calibration")
        self.instruction = details.get("chosen_instruction")  # prompt-search
        self.shots = []
        if base == "few-shot":
            self.shots = [_shot(r) for r in json.loads((rdir / "shots.json").read_text())]
        self.adapter = None  # the engine's adapter name (rungs/<rung>/adapter)
        self.model_dir = None  # a whole model of the rung's own (rungs/<rung>/model)
        if base not in PROMPT_RUNGS:
            art = getattr(cls, "output_model", None) or getattr(self.rc, "method", None) == "full" and "model"
            if (rdir / "adapter" / "adapter_config.json").is_file():
                self.adapter = rung
            elif art and (rdir / art / "config.json").is_file():
                self.model_dir = rdir / art
            else:
                raise LadderError(f"rung '{rung}' cannot be served by /v1/predict: no adapter or model in {rdir}")
        self.lengths = self._lengths()

    def _lengths(self) -> dict:
        try:
            return json.loads((self.run.dir / "data.json").read_text()).get("lengths") or {}
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        from lmladder.data import input_fields

        return {
            "rung": self.rung, "task": self.cfg.task.kind, "model": self.cfg.model,
            "input_fields": input_fields(self.cfg.data, self.cfg.task.kind),
            "labels": list(self.task.labels) or None, "prompt_format": self.format,
            "shots": len(self.shots), "calibrated": bool(self.calibration),
            "constrained": self._constrained(),
            "weights": "adapter" if self.adapter else "model" if self.model_dir else "base",
            "score": {"metric": self.result.get("metric"), "value": self.result.get("score"),
                      "ci": self.result.get("ci")},
            "max_inputs": MAX_INPUTS,
        }

    def _constrained(self) -> bool:
        return self.rung.partition("@")[0] == "constrained" or bool(getattr(self.rc, "constrained", False))

    # ------------------------------------------------------------------ requests
    def examples(self, rows: list, tok) -> list:
        """The request's rows as Examples, read like data rows (LadderError naming the row
        and field), each input cut to the run's ``max_input_tokens`` as the run cut its
        data (or refused when the run said ``data.truncation: error``)."""
        from lmladder.data import input_example

        out = [input_example(r, self.cfg.data, self.cfg.task.kind, "inputs", i) for i, r in enumerate(rows)]
        limit = self.lengths.get("max_input_tokens")
        if limit and tok is not None:
            for e in out:
                ids = tok(self.task.query(e), add_special_tokens=False).input_ids
                if len(ids) > limit:
                    if self.cfg.data.truncation == "error":
                        raise LadderError(f"{e.source}: the input has {len(ids)} tokens, more than the run's "
                                          f"data.max_input_tokens={limit}")
                    own = tok(e.input, add_special_tokens=False).input_ids
                    keep = len(own) - (len(ids) - limit)
                    if keep < 1:
                        raise LadderError(f"{e.source}: the choices alone are over the run's "
                                          f"data.max_input_tokens={limit} tokens")
                    e.input = tok.decode(own[:keep], skip_special_tokens=False)
                    e.fields = {**e.fields, "_truncated_to": limit}
        return out

    def predict(self, model, tok, examples: list) -> list[dict]:
        """The rung's predictions for ``examples`` (run on the model worker)."""
        from lmladder.tasks.base import generate_answers

        base = self.rung.partition("@")[0]
        task, cfg = self.task, self.cfg
        ctx = ServeContext(cfg, task, model, tok, examples)
        if base in ("cot", "self-consistency"):
            from lmladder.rungs.cot import reasoning_predict

            holder = SimpleNamespace(ctx=ctx, name=self.rung)
            if base == "cot":
                preds, _ = reasoning_predict(holder, self.rc)
            else:
                from lmladder.rungs.self_consistency import majority_vote

                preds, _ = reasoning_predict(holder, self.rc, n=self.rc.n, do_sample=True)
                preds = [majority_vote(task, rec.get("samples", [rec])) for rec in preds]
        elif base == "constrained":
            reasoning = cfg.cot.prompt if self.rc.reasoning else None
            msgs = [task.user_message(e, reasoning=reasoning) for e in examples]
            budget = self.rc.max_new_tokens or (cfg.cot.max_new_tokens if self.rc.reasoning else None)
            preds, _ = generate_answers(task, model, ctx.fmt(), msgs, examples, desc=self.rung, constrained=True,
                                        engine=self.rc.engine, reasoning=self.rc.reasoning, max_new_tokens=budget)
        else:
            plain = self.format == "plain"
            if base == "prompt-search":
                msgs = [task.user_message(e, instruction=self.instruction) for e in examples]
            elif plain:
                msgs = [task.plain_message(e, self.shots) for e in examples]
            else:
                msgs = [task.user_message(e, self.shots) for e in examples]
            preds, _ = task.predict(model, ctx.fmt(plain=plain), msgs, examples, desc=self.rung,
                                    constrained=self._constrained(), engine=cfg.constrained.engine)
            if self.calibration:
                from lmladder.rungs.base import apply_calibration

                preds = apply_calibration(self.calibration, task.labels, preds)
        return [self._answer(p, e) for p, e in zip(preds, examples)]

    def _answer(self, p: dict, e) -> dict:
        """One prediction as the API returns it."""
        import math

        out: dict[str, Any] = {"pred": p.get("pred")}
        if "scores" in p:
            s = p["scores"]
            out["scores"] = s
            z = max(s.values())
            tot = sum(math.exp(v - z) for v in s.values())
            out["probs"] = {k: math.exp(v - z) / tot for k, v in s.items()}  # over the label set
        if e.choices is not None and isinstance(p.get("pred"), int):
            out["choice"] = e.choices[p["pred"]]
            if e.choice_labels:
                out["choice_label"] = e.choice_labels[p["pred"]]
        for k in ("raw", "error", "agreement", "votes"):
            if p.get(k) is not None:
                out[k] = p[k]
        if "_truncated_to" in (e.fields or {}):
            out["truncated_to_tokens"] = e.fields["_truncated_to"]
        return out

    def load_model(self, like):
        """The rung's own whole model (full, continued-pretraining), in ``like``'s dtype and
        device; None for rungs on the base."""
        if self.model_dir is None:
            return None
        from lmladder.models import check_safetensors
        from transformers import AutoModelForCausalLM

        check_safetensors(self.model_dir, f"rung '{self.rung}'")
        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=like.dtype, use_safetensors=True,
                                                 trust_remote_code=False).to(like.device)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        log.info("/v1/predict: loaded %s's model in %.1fs", self.rung, time.perf_counter() - t0)
        return m
