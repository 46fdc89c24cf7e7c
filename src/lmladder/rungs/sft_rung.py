"""What every weight-update rung shares: features, training with checkpoints / resume /
early stopping (training/sft.py), the forgetting check, saving the trained weights with the
rung fingerprint (and reusing them when a later run finds the same fingerprint), and
handing the shared base model back untouched in ``close()``.

A subclass says how to get the model it trains (``base_for_training``), how to make it
trainable (``wrap``), how to load saved weights (``load_saved``) and how to undo its
changes (``release``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmladder.io import atomic_dir, atomic_write_json
from lmladder.rungs.base import Rung
from lmladder.run import distributed
from lmladder import prompts

log = logging.getLogger(__name__)


class SftRung(Rung):
    trains = True
    kinds = Rung.kinds + ("preference",)  # scores chosen vs rejected (tasks/preference.py)
    artifact = "adapter"  # folder under rungs/<rung>/ with the trained weights
    no_packing_reason: str | None = None  # why this rung cannot pack sequences, if it cannot

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        """The step plan (training/sft.step_plan) from the counts alone: a checkpoint interval
        that cannot hold the best evaluated step is an error before anything is written."""
        from lmladder.training import sft

        rc = cfg.rung_config(cls.name)
        if not hasattr(rc, "eval_steps") or dataset is None:
            return  # alignment rungs (TRL trainers) have no dev evaluation
        world = distributed.dist_env()[1]
        _, dev = sft.carve_dev(len(dataset.train), rc.dev_fraction, rc.dev_max, cfg.seed)
        sft.step_plan(rc, len(dataset.train) - len(dev), len(dev), rc.batch_size * rc.grad_accum, cls.name,
                      checkpoints=rc.checkpoints and world == 1)

    # ------------------------------------------------------------------ hooks

    def base_for_training(self):
        """The model this rung starts from (default: the shared base)."""
        return self.ctx.base()[0]

    def wrap(self, model):
        """Make ``model`` trainable (PEFT wrapper, or the model itself)."""
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config())

    def peft_config(self):
        raise NotImplementedError

    def load_saved(self, model, folder: Path):
        from peft import PeftModel

        return PeftModel.from_pretrained(model, folder)

    def release(self, model) -> None:
        """Undo what ``wrap`` / ``load_saved`` did to the shared base (adapters injected
        into its modules are removed)."""
        base = model.unload()
        self._restore_base(base)

    def scoring_model(self):
        """The model handed to the task for predictions (and used for perplexity)."""
        return self.model

    def n_virtual(self) -> int:
        return 0

    # ------------------------------------------------------------------ rung interface

    def prepare(self) -> None:
        task = self.ctx.task
        self.build_features([task.answer(e) for e in self.ctx.data.train])
        self.messages = [task.user_message(ex) for ex in self.ctx.data.test]
        self.adapter_dir = self.out_dir / self.artifact
        self.model = None
        self._trainable = 0
        self._total = 0

    def build_features(self, answers: list[str]) -> None:
        """Training features (masked prompt + answer + end of turn) for the train split with
        these answer texts (the gold answers; distill passes the teacher's)."""
        from lmladder.training import sft

        task, fmt = self.ctx.task, self.ctx.fmt()
        model, tok = self.ctx.base()
        eos = prompts.eos_token_ids(tok, model)
        train = self.ctx.data.train
        self.answers = list(answers)
        self.features = [
            sft.build_feature(fmt, task.train_message(e), a, self.cfg.max_length, e.source, eos,
                              truncation=self.cfg.truncation)
            for e, a in zip(train, self.answers)
        ]
        self.truncated = sum(1 for f in self.features if f.truncated)
        if self.truncated:
            log.warning("%s: %d training sequence(s) longer than max_length=%d: prompt cut from the left",
                        self.name, self.truncated, self.cfg.max_length)

    def train_weights(self, model, tok, work: Path, checkpoint_dir: Path | None, fingerprint: str) -> dict[str, Any]:
        """Train the wrapped model in place; return the training stats (default: SFT on the
        features, training/sft.py; alignment rungs run a TRL trainer, training/trl_train.py)."""
        from lmladder.training import sft

        return sft.train(
            model, tok, self.features, self.answers, self.cfg, work, self.ctx.cfg.seed,
            checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
            no_packing_reason=self.no_packing_reason, n_virtual=self.n_virtual(), name=self.name,
            dev_metric=self.dev_metric(),
        )

    select_on_metric = True  # False: a rung whose dev selection must not see the gold (distill)

    def dev_metric(self):
        """``select_on`` metric (auto: label-scoring tasks): a function scoring the model being
        trained on the dev examples with the task's own prediction (label scoring), or None."""
        task = self.ctx.task
        mode = getattr(self.cfg, "select_on", "loss")
        if mode == "loss" or not self.select_on_metric or task.kind not in ("classification", "multiple-choice"):
            return None
        train, fmt, metric = self.ctx.data.train, self.ctx.fmt(), self.ctx.cfg.primary_metric

        def score(model, idx) -> float:
            exs = [train[i] for i in idx]
            preds, _ = task.predict(self.dev_scoring_model(model), fmt, [task.user_message(e) for e in exs], exs,
                                    desc=f"{self.name}: dev {metric}")
            return task.score([task.gold(e) for e in exs], [p["pred"] for p in preds])[metric]["value"]

        return score

    def dev_scoring_model(self, model):
        """The model being trained, as the task scorer calls it (prompt learning wraps it)."""
        return model

    def _count(self, model, loaded: bool = False) -> None:
        """Trainable parameters: those requiring grad; for saved PEFT weights loaded for
        inference (frozen), the size of the adapter's own state."""
        if loaded and hasattr(model, "peft_config"):
            from peft import get_peft_model_state_dict

            self._trainable = sum(v.numel() for v in get_peft_model_state_dict(model).values())
        else:
            self._trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._total = sum(p.numel() for p in model.parameters())

    def fit(self) -> dict[str, Any]:
        import json
        import time


        t_fit = time.perf_counter()
        _, tok = self.ctx.base()
        main = distributed.is_main()
        fp = self.ctx.fingerprint(self.name, training=True)
        stamp = self.adapter_dir / "lmladder_fingerprint.txt"
        reuse = main and stamp.is_file() and stamp.read_text().strip() == fp
        reuse = distributed.broadcast(reuse)  # rank 0 decides; only it evaluates, so only it loads
        if reuse and not main:
            return {"reused_adapter": True}
        start = self.base_for_training()
        t0 = time.perf_counter()
        forgetting = self._forgetting_setup(start, tok) if main else None
        forgetting_s = time.perf_counter() - t0  # the forgetting check is not training cost
        cost_file = self.adapter_dir / "lmladder_cost.json"
        if reuse:
            log.info("%s: reusing the trained weights in %s", self.name, self.adapter_dir)
            self.model = self.load_saved(start, self.adapter_dir)
            self._count(self.model, loaded=True)
            self.model.eval()
            stats: dict[str, Any] = {"reused_adapter": True, "truncated": getattr(self, "truncated", 0)}
            try:  # what training these weights cost when they were made, not their load time
                stats["original_train_seconds"] = float(json.loads(cost_file.read_text())["train_seconds"])
            except (OSError, ValueError, KeyError):
                pass
        else:
            self.model = self.wrap(start)
            self._count(self.model)
            # the run folder holds the checkpoints (rank 0); other ranks use a private temp folder
            work = self.out_dir / ".trainer" if main else Path(tempfile.mkdtemp(prefix="lmladder-trainer-"))
            stats = self.train_weights(self.model, tok, work, self.out_dir / "checkpoints" if main else None, fp)
            shutil.rmtree(work, ignore_errors=True)
            if main:
                with atomic_dir(self.adapter_dir) as tmp:
                    self.model.save_pretrained(tmp, safe_serialization=True)
                    (tmp / "lmladder_fingerprint.txt").write_text(fp + "\n")
                # what these weights cost (saving included, the forgetting check not): a later
                # run that reuses them reports this, not their load time
                train_s = time.perf_counter() - t_fit - forgetting_s
                atomic_write_json(cost_file, {"train_seconds": round(train_s, 3)})
                # the trained weights are saved: the checkpoints are no longer needed
                shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
        stats["trainable_params"] = self._trainable
        stats["trainable_share"] = self._trainable / max(self._base_params(), 1)
        if forgetting is not None:
            chunks, info = forgetting
            t0 = time.perf_counter()
            info["ppl_after"] = self._ppl(chunks, tok)
            forgetting_s += time.perf_counter() - t0
            stats["forgetting"] = info
            stats["forgetting_seconds"] = round(forgetting_s, 3)
        return stats

    def _base_params(self) -> int:
        return self.ctx.model_info.get("parameters") or self._total

    def _forgetting_setup(self, start, tok):
        """Perplexity of the forgetting text under the starting model (None when disabled)."""
        from lmladder.training import forgetting

        spec = self.cfg.forgetting_text
        if not spec:
            return None
        texts, name = forgetting.load_texts(spec)
        chunks = forgetting.token_chunks(tok, texts, self.cfg.forgetting_max_tokens)
        info = {"text": name, "tokens": sum(map(len, chunks)),
                "ppl_before": forgetting.perplexity(start, chunks, self._pad(tok))}
        return chunks, info

    @staticmethod
    def _pad(tok) -> int:
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    def _ppl(self, chunks, tok) -> float:
        from lmladder.training import forgetting

        return forgetting.perplexity(self.scoring_model(), chunks, self._pad(tok))

    def trainable_params(self) -> int:
        return self._trainable

    def predict(self):
        if not self._merge_for_scoring():
            return self.ctx.task.predict(
                self.scoring_model(), self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name
            )
        with self.merged() as model:
            return self.ctx.task.predict(model, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name)

    def _merge_for_scoring(self) -> bool:
        model = self.model
        if model is None and self.mergeable and (self.adapter_dir / "adapter_config.json").is_file():
            return True  # merged and unloaded by an earlier predict: merge_for_scoring reloads it
        return bool(self.mergeable and model is not None and hasattr(model, "merge_and_unload")
                    and getattr(model, "peft_config", None))

    @contextlib.contextmanager
    def merged(self):
        """Evaluate at deployment speed: a mergeable adapter (lora, ia3) is merged into the
        weights it wraps and its wrapper modules are taken out (an unmerged PEFT forward
        costs up to 2x per call, and even a merged one still pays the wrappers' Python
        overhead; a deployed adapter is merged). Afterwards the shared base's weights are
        restored exactly from copies of the merged layers (no rounding drift for the next
        rung) and the adapter is no longer attached (it is on disk; a later predict or
        ``from:`` loads it from there)."""
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self.model is None:  # merged away by an earlier predict
            self.model = self.load_saved(self.base_for_training(), self.adapter_dir)
            self.model.eval()
        model, saved = self.model, []
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                w = getattr(m.get_base_layer(), "weight", None)
                if w is not None:
                    saved.append((w, w.detach().clone()))
        base = model.merge_and_unload()
        self.model = None  # the wrappers are gone: nothing for close() to unload
        try:
            yield base
        finally:
            with torch.no_grad():
                for w, orig in saved:
                    w.copy_(orig)
            saved.clear()
            self._restore_base(base)

    def artifacts(self):
        return {self.artifact: self.artifact}

    def close(self) -> None:
        if self.model is not None:
            model, self.model = self.model, None
            self.release(model)
            del model
            gc.collect()

    def _restore_base(self, base) -> None:
        """Put the shared base back as the other rungs expect it: eval mode, frozen,
        no activation checkpointing."""
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
        self.ctx.set_base(base)


class LoraOrFullRung(SftRung):
    """A rung whose ``method`` picks what trains (dpo, grpo): ``lora`` -- a fresh LoRA
    adapter on the start model, removed again in ``close()``; ``full`` -- every weight of
    a private copy of the start model (saved whole, in rungs/<rung>/model)."""

    @property
    def artifact(self) -> str:
        return "adapter" if self.cfg.method == "lora" else "model"

    def base_for_training(self):
        import copy

        base = self.ctx.base()[0]
        return base if self.cfg.method == "lora" else copy.deepcopy(base)

    def peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=self.cfg.r, lora_alpha=self.cfg.alpha,
                          lora_dropout=self.cfg.dropout, target_modules=self.cfg.target_modules)

    def wrap(self, model):
        if self.cfg.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        from transformers import set_seed

        set_seed(self.ctx.cfg.seed)  # the adapter's initialisation
        return super().wrap(model)

    def load_saved(self, model, folder: Path):
        if self.cfg.method == "lora":
            return super().load_saved(model, folder)
        from transformers import AutoModelForCausalLM

        dtype, device = model.dtype, model.device
        del model
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).to(device)

    def release(self, model) -> None:
        if self.cfg.method == "lora":
            super().release(model)
        # full: a private copy; dropping it leaves the start model as it was


class PromptLearningRung(SftRung):
    """Prompt / prefix tuning: PEFT wraps the base without touching its modules; the
    trained virtual tokens are served through inference/prompt_learning.VirtualTokenModel."""

    no_packing_reason = (
        "the learned virtual tokens must precede every sequence, which a packed row "
        "cannot give each of its sequences"
    )

    def dev_scoring_model(self, model):
        from lmladder.inference.prompt_learning import VirtualTokenModel

        return VirtualTokenModel(model)  # fresh: the virtual tokens change while training

    def scoring_model(self):
        from lmladder.inference.prompt_learning import VirtualTokenModel

        if getattr(self, "_scorer", None) is None or self._scorer.peft_model is not self.model:
            self.model.eval()
            self._scorer = VirtualTokenModel(self.model)
        return self._scorer

    def release(self, model) -> None:
        self._scorer = None
        self._restore_base(model.get_base_model())
