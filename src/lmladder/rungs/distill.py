"""distill: a teacher labels the train inputs; a LoRA student learns the teacher's outputs.

Sequence-level knowledge distillation (Kim & Rush, 2016): the teacher's *answers* on the
train inputs replace the gold answers, and the student is trained on them exactly as the
``lora`` rung trains on gold (SFT through the chat template, prompt masked, loss on the
answer and the end-of-turn token, training/sft.py). The student's prompt is the cheap
zero-shot prompt, so an expensive prompt (many-shot, chain-of-thought + self-consistency)
is paid once per train input at labelling time and never again at inference: the report
shows the teacher rung's test cost per call next to the student's.

``distill.teacher`` names who labels:

* a rung name of this run's ladder (``few-shot``, ``self-consistency``, ``cot``,
  ``best-of-n``, ``few-shot@k32`` with ``copies``...): that inference rung, with its own
  config section, runs its ``prepare`` / ``predict`` with the train split as its test split
  (``ctx.predict_with``: the run's context builds it, this file never imports the registry;
  ``Distill.uses`` names it, so the ladder checks it is an inference rung for the task kind
  and its config is part of this rung's fingerprint); its parsed predictions become
  answer texts in the task's answer format (classification: the label; math: the number;
  extraction: the JSON; multiple-choice: the choice text). The teacher rung need not be in
  ``rungs``; when it is, the report already has its test-set quality and cost. With
  ``few-shot`` the in-context examples are drawn from the train split, so a train input
  labelled may sit among its own shots (``selection: similar`` puts it there: the teacher
  then mostly copies the gold; a warning says so).
* ``model:<spec>``: another model (any ``--model`` spec, loaded with models.load_causal_lm)
  answering the zero-shot prompt with the task's own predictor.
* ``module:function`` (or ``path/to/file.py:function``): a callable ``f(examples) ->
  list[str]`` (the train Examples in, one answer text per example out; ``None`` or an
  unparseable text drops the row): a scripted or external teacher.

Every teacher answer is parsed with the task's parser (``task.parse``) and rendered back in
the answer format; rows without a parseable answer are dropped (counted). The labels are
cached in ``rungs/<rung>/teacher.jsonl`` (written atomically; the first line holds the
teacher fingerprint: teacher spec, its config, the model, task, seed, eval settings and the
train examples) so a rerun that only changes the student's training settings does not
relabel. Details: teacher name / kind, labelled and dropped counts, agreement with the gold
train labels, labelling seconds (included in the rung's train seconds: it is the cost of
distilling), the teacher's prompt tokens per call on train, plus the usual SFT stats.

``kd: logits`` adds token-level distillation where the teacher has token distributions over
the student's vocabulary: ``zero-shot`` / ``few-shot`` (context distillation: the run's model
reading the teacher's prompt, with the student's adapter switched off) or ``model:<spec>``
with the same vocabulary. Before training the teacher scores each training sequence (its
prompt + the same answer tokens) and keeps its top-k log-probs at every answer token; the
loss is ``(1 - alpha) CE + alpha T^2 KL(teacher || student)`` over those tokens, through the
same SFT engine (the teacher rows ride along in the batch: training/sft.py ``extra``).

What TRL offers and why we do not use it here: TRL's ``GKDTrainer`` /
``DistillationTrainer`` distil token distributions on the student's own samples, with the
teacher run on the same input ids: the teacher must be a plain model, not a prompt strategy
(few-shot, self-consistency), which is the headline use. Sequence-level distillation is SFT on
teacher outputs, which the shared SFT engine already does with exact masking, packing,
checkpoints and resume; logit KD reuses that engine with its own loss.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import time
from typing import Any, Literal

from pydantic import Field

from lmladder import prompts
from lmladder.errors import LadderError
from lmladder.io import atomic_write_jsonl
from lmladder.plugins import load_callable, source_digest
from lmladder.run import distributed
from lmladder.rungs.base import Rung
from lmladder.rungs.lora import LoraConfig, peft_config
from lmladder.training import forgetting, steps, weights


class DistillConfig(LoraConfig):
    """distill: a teacher labels the train inputs; a LoRA student learns its outputs (SFT)."""

    teacher: str = Field(
        "few-shot",
        description="Who labels the train inputs: a rung name of this run (e.g. self-consistency, "
        "few-shot), 'model:<spec>' (another model, zero-shot), or 'module:function' (a callable "
        "taking the Example list and returning answer texts).",
    )
    kd: Literal["sequence", "logits"] = Field(
        "sequence",
        description="sequence: SFT on the teacher's answers; logits: also match the teacher's token "
        "distributions on them (teacher: zero-shot, few-shot or model:<spec> with the same vocabulary).",
    )
    kd_alpha: float = Field(
        0.5, ge=0, le=1, description="kd: logits: weight of the KL term (1 - kd_alpha on the answer's cross-entropy)."
    )
    kd_temperature: float = Field(1.0, gt=0, description="kd: logits: softmax temperature of teacher and student.")
    kd_top_k: int = Field(
        20, ge=1, description="kd: logits: the teacher's top-k tokens kept per answer token (renormalised)."
    )


log = logging.getLogger(__name__)

CACHE = "teacher.jsonl"


# --------------------------------------------------------------------------- teacher specs


def teacher_kind(spec: str) -> str:
    """'model' (model:<spec>), 'callable' (module:function) or 'rung' (a rung name)."""
    if spec.startswith("model:"):
        return "model"
    return "callable" if ":" in spec else "rung"


def answer_text(task, example, pred) -> str | None:
    """A parsed prediction rendered as the answer the student should write (the task's
    answer format, as ``task.answer`` renders a gold); None when there is none."""
    if pred is None:
        return None
    if task.kind == "multiple-choice":
        i = pred.get("choice") if isinstance(pred, dict) else pred
        if not isinstance(i, int) or not example.choices or not 0 <= i < len(example.choices):
            return None
        return example.choices[i]
    if isinstance(pred, (dict, list)):
        return json.dumps(pred, ensure_ascii=False)
    text = str(pred).strip()
    return text or None


def check_teacher(spec: str, field: str) -> None:
    """A ``model:`` or ``module:function`` teacher that cannot work: one-line LadderError,
    before any model work. (A rung teacher is :meth:`Distill.uses`'s: the ladder checks that
    it is a known inference rung supporting the task kind, run/ladder._check_uses.)"""
    spec = (spec or "").strip()
    if not spec:
        raise LadderError(f"{field}: empty; name a rung (few-shot), model:<spec> or module:function")
    kind = teacher_kind(spec)
    if kind == "model":
        from lmladder import models

        model_spec = spec[len("model:"):].strip()
        if not model_spec:
            raise LadderError(f"{field}: 'model:' needs a model spec, e.g. model:smollm2-135m")
        try:
            models.check_available(models.resolve(model_spec))
        except LadderError as e:
            raise LadderError(f"{field}: {e}") from None
    elif kind == "callable":
        load_callable(spec, field)


LOGIT_RUNGS = ("zero-shot", "few-shot")  # one forward pass gives the answer's distribution


def check_logit_teacher(cfg, spec: str, field: str) -> None:
    """kd: logits needs the teacher's token distributions over the student's vocabulary:
    a prompt rung on the same model (context distillation) or another model (its
    vocabulary is compared when it is loaded)."""
    spec = spec.strip()
    kind = teacher_kind(spec)
    if kind == "model":
        return
    if kind == "rung" and spec.partition("@")[0] in LOGIT_RUNGS and not getattr(cfg.rung_config(spec), "constrained", False):
        return
    raise LadderError(
        f"{field}: logits needs a teacher with one token distribution per answer token "
        f"({', '.join(LOGIT_RUNGS)} unconstrained, or model:<spec> with the student's vocabulary); "
        f"'{spec}' has none: use kd: sequence"
    )


def kd_loss(outputs, labels, fields, num_items_in_batch=None, *, alpha: float, temperature: float):
    """(1 - alpha) x cross-entropy on the teacher's answer + alpha x T^2 x KL(teacher || student)
    over the teacher's top-k tokens at every answer position, summed over the supervised
    tokens and divided by their count in the step (as training/sft.token_loss)."""
    import torch.nn.functional as F

    from lmladder.training.sft import IGNORE

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    shift = labels[:, 1:]
    keep = shift != IGNORE
    targets = shift[keep]
    if logits.dim() == 3:
        logits = logits[:, -labels.shape[1]:][:, :-1][keep]
    logits = logits.float()
    ids = fields["kd_ids"].to(logits.device)
    t_logp = fields["kd_logps"].to(logits.device).float()
    if ids.shape[0] != logits.shape[0]:
        raise RuntimeError(f"kd: {ids.shape[0]} teacher rows for {logits.shape[0]} supervised tokens")
    ce = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
    s_logp = F.log_softmax(logits / temperature, -1).gather(-1, ids)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    loss = (1 - alpha) * ce + alpha * temperature ** 2 * kl
    denom = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    return loss / denom


def teacher_topk(model, fmt, message: str, answer: str, student_feature, eos: set[int], k: int,
                 temperature: float, source: str) -> dict:
    """The teacher's top-k log-probs (at ``temperature``, renormalised over the k) at each
    answer token of ``student_feature``, the teacher reading its own prompt ``message``."""
    import torch

    from lmladder.training import sft

    tf = sft.build_feature(fmt, message, answer, 10 ** 9, source, eos)
    sup_t = [t for t in tf.labels if t != sft.IGNORE]
    sup_s = [t for t in student_feature.labels if t != sft.IGNORE]
    if sup_t != sup_s:
        raise LadderError(
            f"{source}: kd: logits: the teacher and the student tokenise the answer {answer!r} differently "
            f"(another vocabulary or chat template); use kd: sequence"
        )
    n = len(sup_t)
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tf.input_ids], device=dev), logits_to_keep=n + 1)
    logits = out.logits[0, -(n + 1):-1].float()
    logp = torch.log_softmax(logits / temperature, -1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    vals = top.values - torch.logsumexp(top.values, -1, keepdim=True)
    return {"kd_ids": top.indices.cpu(), "kd_logps": vals.cpu()}



# --------------------------------------------------------------------------- the rung


class Distill(Rung):
    name = "distill"
    cost_rank = 29
    trains = True
    summary = "LoRA student, zero-shot prompt, trained on a teacher's answers to the train inputs"
    kinds = Rung.kinds  # the answer kinds (not preference: a teacher gives answers, not pairs)
    mergeable = True  # `from: distill` starts from the base with the student's adapter merged
    artifact = "adapter"  # rungs/distill/adapter: the student

    # ------------------------------------------------------------------ checks

    @classmethod
    def _names(cls, cfg) -> list[str]:
        """This rung and its named copies in the run (distill, distill@sc...): each has
        its own teacher."""
        names = [r for r in cfg.rungs if r.partition("@")[0] == cls.name]
        return names or [cls.name]

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        if not dataset.train:
            raise LadderError(f"{cls.name} needs train inputs for the teacher to label")
        steps.check_step_plan(cfg, dataset, cls.name)
        for name in cls._names(cfg):
            rc = cfg.rung_config(name)
            check_teacher(rc.teacher, f"{name}.teacher")
            if rc.kd == "logits":
                check_logit_teacher(cfg, rc.teacher, f"{name}.kd")

    @classmethod
    def uses(cls, cfg, name: str) -> dict[str, str]:
        """A rung teacher, which distill runs itself (``ctx.predict_with``): the ladder checks
        that it is an inference rung for the task kind, and adds its config section and extra
        fingerprint to this rung's fingerprint."""
        spec = (cfg.rung_config(name).teacher or "").strip()
        return {"teacher": spec} if spec and teacher_kind(spec) == "rung" else {}

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        """A callable teacher's source file: a changed teacher retrains the student. (A rung
        teacher's config comes in through :meth:`uses`; the hook gets no rung name, so a run
        with several distill copies fingerprints each with every copy's callable.)"""
        out = {}
        for name in cls._names(cfg):
            spec = (cfg.rung_config(name).teacher or "").strip()
            if teacher_kind(spec) == "callable":
                out[name] = {"teacher_source": source_digest(spec)}
        return out

    # ------------------------------------------------------------------ rung interface

    def prepare(self) -> None:
        # the student's prompts are the zero-shot prompts; its features are built in fit(),
        # once the teacher has labelled the train inputs
        self.messages = [self.ctx.task.user_message(ex) for ex in self.ctx.data.test]
        self.trainable = 0

    def fit(self) -> dict[str, Any]:
        train = self.ctx.data.train
        labels = self.teacher_labels() if distributed.is_main() else None
        labels = distributed.broadcast(labels)  # rank 0 labels (or reads the cache) for every rank
        answers, teacher = labels["answers"], labels["stats"]
        kept = [(e, a) for e, a in zip(train, answers) if a is not None]
        if not kept:
            raise LadderError(
                f"{self.name}: the teacher '{teacher['name']}' gave no parseable answer for any of the "
                f"{len(train)} train inputs (see {self.out_dir / CACHE})"
            )
        # the student trains on the kept rows only, with the teacher's answers
        kept_examples = [e for e, _ in kept]
        student = self.ctx.with_data(train=kept_examples)
        self.features, self.answers, self.truncated = steps.sft_features(
            student, self.cfg, self.name, answers=[a for _, a in kept])

        start, tok = self.ctx.base()  # the shared base, or the `from:` rung's model
        check = forgetting.before(start, tok, self.cfg)
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            from peft import get_peft_model

            from lmladder.training import sft

            self.model = get_peft_model(start, peft_config(self.cfg))  # the adapter goes into the base
            self.trainable = weights.count_trainable(self.model)
            extra = loss_fn = None
            if self.cfg.kd == "logits":  # the teacher's top-k distributions at every answer token
                t0 = time.perf_counter()
                extra = self._teacher_distributions(self.model, kept_examples)
                kd_seconds = time.perf_counter() - t0
                loss_fn = functools.partial(kd_loss, alpha=self.cfg.kd_alpha, temperature=self.cfg.kd_temperature)
            with steps.trainer_dirs(self.out_dir) as (work, checkpoints):
                # no dev_metric: the dev split is judged against the teacher's labels, not gold
                stats = sft.train(self.model, tok, self.features, self.answers, self.cfg, work, self.ctx.cfg.seed,
                                  checkpoint_dir=checkpoints, fingerprint=fp, name=self.name,
                                  extra=extra, loss_fn=loss_fn)
            if self.cfg.kd == "logits":
                stats["kd"] = {"mode": "logits", "alpha": self.cfg.kd_alpha, "temperature": self.cfg.kd_temperature,
                               "top_k": self.cfg.kd_top_k, "teacher_forward_seconds": round(kd_seconds, 2)}
            return stats

        def load(folder) -> dict[str, Any]:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(start, folder).eval()
            self.trainable = weights.count_trainable(self.model, loaded=True)
            return {"truncated": self.truncated}

        stats = weights.reuse_or_train(
            self.out_dir / self.artifact, fp, train=train, load=load, name=self.name,
            save=lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True),
            checkpoints=self.out_dir / "checkpoints",
        )
        stats["trainable_params"] = self.trainable
        stats["trainable_share"] = weights.share_of_base(self.ctx, self.trainable, self.model)
        forgetting.after(check, self.model, stats)
        return {"teacher": teacher, **stats}

    def predict(self):
        """The student asked with the zero-shot prompt, its adapter merged (as lora's)."""
        from peft import PeftModel

        if self.model is None:  # merged away by an earlier predict: the adapter is on disk
            self.model = PeftModel.from_pretrained(self.ctx.base()[0], self.out_dir / self.artifact).eval()
        model, self.model = self.model, None  # merged below: nothing left for close() to unload
        with weights.merged(model, self.ctx) as base:
            return self.ctx.task.predict(base, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name)

    def trainable_params(self) -> int:
        return self.trainable

    def artifacts(self) -> dict[str, str]:
        return {self.artifact: self.artifact, "teacher": CACHE}

    def close(self) -> None:
        if self.model is not None:  # the adapter's modules out of the shared base
            model, self.model = self.model, None
            weights.restore_base(self.ctx, model.unload())
            del model
            gc.collect()

    # ------------------------------------------------------------------ kd: logits

    def _teacher_distributions(self, student, examples) -> list[dict]:
        """Per training feature (``examples``: the kept train rows), the teacher's top-k
        log-probs at its answer tokens: the run's model (the student's adapter off) reading
        the teacher rung's prompt, or another model reading the zero-shot prompt."""
        from lmladder.models import load_causal_lm
        from lmladder.prompts import ChatFormat

        spec, task = self.cfg.teacher.strip(), self.ctx.task
        k, temp = self.cfg.kd_top_k, self.cfg.kd_temperature
        if teacher_kind(spec) == "model":
            model, tok, _ = load_causal_lm(spec[len("model:"):].strip())
            rows = lambda m: m.get_output_embeddings().weight.shape[0]  # noqa: E731 - padded vocab
            if tok.get_vocab() != self.ctx.fmt().tokenizer.get_vocab() or rows(model) != rows(student):
                raise LadderError(f"{self.name}.kd: logits: teacher {spec} has another vocabulary than the "
                                  f"student; use kd: sequence")
            fmt = ChatFormat(tok, self.ctx.cfg.task.system_prompt)
            messages = [task.user_message(e) for e in examples]
            guard = None
        else:
            # the teacher rung's prompts for the kept rows (its shots from the run's whole train split)
            with self.ctx.rung_on(spec, test=examples, out_dir=self.out_dir / "teacher") as rung:
                messages = list(rung.messages)
            model, fmt = student, self.ctx.fmt()
            guard = student.disable_adapter()  # the teacher is the model without the student's adapter
        eos = prompts.eos_token_ids(fmt.tokenizer, model)
        was_training = model.training
        model.eval()
        try:
            if guard is not None:
                guard.__enter__()
            return [teacher_topk(model, fmt, m, a, f, eos, k, temp, e.source)
                    for m, a, f, e in zip(messages, self.answers, self.features, examples)]
        finally:
            if guard is not None:
                guard.__exit__(None, None, None)
            if was_training:
                model.train()
            if guard is None:
                del model
                gc.collect()

    # ------------------------------------------------------------------ the teacher

    def teacher_fingerprint(self) -> str:
        """What the teacher's labels depend on: teacher spec, task, seed, eval settings and the
        train examples; a callable's source file; a rung teacher's own fingerprint (its config
        and extra, the model; ``ctx.fingerprint``), a model teacher's spec."""
        cfg, spec = self.ctx.cfg, self.cfg.teacher.strip()
        h = hashlib.sha256()
        for e in self.ctx.data.train:
            h.update(json.dumps([e.id, e.input, e.label, e.instruction, e.choices], default=str).encode())
        kind = teacher_kind(spec)
        payload = {
            "teacher": spec,
            "task": cfg.task.model_dump(mode="json"),
            "seed": cfg.seed,
            "eval": cfg.eval.model_dump(mode="json"),
            "train": h.hexdigest(),
            "extra": {"teacher_source": source_digest(spec)} if kind == "callable" else {},
        }
        if kind == "rung":
            payload["model"] = cfg.model
            payload["rung"] = self.ctx.fingerprint(spec)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _read_cache(self, fp: str) -> dict | None:
        path = self.out_dir / CACHE
        if not path.is_file():
            return None
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError):
            return None
        if not rows or rows[0].get("fingerprint") != fp:
            return None
        head, rows = rows[0], rows[1:]
        if [r.get("id") for r in rows] != [e.id for e in self.ctx.data.train]:
            return None
        return {"answers": [r.get("answer") for r in rows], "stats": {**head["stats"], "cached": True}}

    def teacher_labels(self) -> dict:
        """{"answers": one answer text (or None: dropped) per train example, "stats": ...};
        from the cache when the teacher fingerprint matches, else by running the teacher."""
        fp = self.teacher_fingerprint()
        cached = self._read_cache(fp)
        if cached is not None:
            log.info("%s: reusing the teacher's labels in %s", self.name, self.out_dir / CACHE)
            return cached
        task, train = self.ctx.task, self.ctx.data.train
        spec = self.cfg.teacher.strip()
        kind = teacher_kind(spec)
        log.info("%s: teacher %s labels %d train inputs", self.name, spec, len(train))
        t0 = time.perf_counter()
        if kind == "callable":
            preds, info = self._run_callable(spec)
        elif kind == "model":
            preds, info = self._run_model(spec[len("model:"):].strip())
        else:
            preds, info = self._run_rung(spec)
        seconds = time.perf_counter() - t0
        answers = [answer_text(task, e, p.get("pred")) for e, p in zip(train, preds)]
        agree = []
        for e, p, a in zip(train, preds, answers):
            if a is None:
                continue
            try:
                g = task.gold(e)
            except Exception:  # noqa: BLE001 - a train row without a usable gold
                g = None
            if g is not None:
                agree.append(bool(task.correct(p["pred"], g)))
        dropped = sum(a is None for a in answers)
        stats = {
            "name": spec,
            "kind": kind,
            "fingerprint": fp,
            "train_inputs": len(train),
            "labelled": len(train) - dropped,
            "dropped": dropped,
            "agreement_with_gold": (sum(agree) / len(agree)) if agree else None,
            "seconds": round(seconds, 2),
            "cached": False,
            **{k: info[k] for k in ("prompt_tokens_per_example", "generated_tokens_per_example",
                                    "samples_per_example") if k in info},
        }
        if dropped:
            log.warning("%s: the teacher gave no parseable answer for %d of %d train inputs (dropped)",
                        self.name, dropped, len(train))
        rows = [{"fingerprint": fp, "stats": stats}] + [
            {"id": e.id, "answer": a, "pred": p.get("pred"), "error": p.get("error"),
             **({"raw": p["raw"]} if p.get("raw") is not None else {})}
            for e, p, a in zip(train, preds, answers)
        ]
        atomic_write_jsonl(self.out_dir / CACHE, json.loads(json.dumps(rows, default=str)))
        return {"answers": answers, "stats": stats}

    def _run_callable(self, spec: str):
        task, train = self.ctx.task, self.ctx.data.train
        fn = load_callable(spec, f"{self.name}.teacher")
        try:
            out = fn(list(train))
        except Exception as e:  # noqa: BLE001 - the user's teacher failed
            raise LadderError(f"{self.name}.teacher: {spec} failed ({type(e).__name__}: {e})") from None
        out = list(out) if out is not None else []
        if len(out) != len(train):
            raise LadderError(
                f"{self.name}.teacher: {spec} returned {len(out)} answers for {len(train)} train inputs"
            )
        preds = []
        for e, text in zip(train, out):
            if text is None or not str(text).strip():
                preds.append({"pred": None, "raw": text, "error": "no answer"})
                continue
            p, err = task.parse(str(text), e)
            preds.append({"pred": p, "raw": str(text), "error": err})
        return preds, {}

    def _run_model(self, model_spec: str):
        """Another model answers the zero-shot prompt (the task's predictor), then is freed."""
        from lmladder.models import load_causal_lm
        from lmladder.prompts import ChatFormat

        task, train = self.ctx.task, self.ctx.data.train
        model, tok, _ = load_causal_lm(model_spec)
        try:
            fmt = ChatFormat(tok, self.ctx.cfg.task.system_prompt)
            messages = [task.user_message(e) for e in train]
            return task.predict(model, fmt, messages, train, desc=f"{self.name} teacher")
        finally:
            del model
            gc.collect()

    def _run_rung(self, spec: str):
        """The teacher rung's prepare / predict with the train split as its test split (files
        it writes go to rungs/<rung>/teacher/)."""
        if getattr(self.ctx.cfg.rung_config(spec), "selection", None) == "similar":
            log.warning("%s: teacher %s with selection: similar puts each train input among its own "
                        "shots (with its gold label): the teacher mostly copies the gold", self.name, spec)
        out = self.out_dir / "teacher"
        out.mkdir(parents=True, exist_ok=True)
        return self.ctx.predict_with(spec, split="train", out_dir=out)
