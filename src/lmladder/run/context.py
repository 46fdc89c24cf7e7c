"""What the rungs of one run share: the config, the data, the task and the base model.

The base model is loaded once, lazily (a resume with nothing to run never loads it), and
shared by every rung; a rung that changes it (a LoRA wrapped around it) hands it back in
``close()`` through :meth:`Context.set_base`. A rung with ``from: <rung>`` sees that rung's
output model as its base for as long as it runs (:meth:`Context.push_base` /
:meth:`Context.pop_base`).

A rung that needs another rung's predictions (distill's teacher) or the same run on other
data (a learning-curve subset) gets a *view*: :meth:`Context.with_data` (another train or
test split over the same model cache) and :meth:`Context.predict_with` / :meth:`rung_on`
(a rung of this run prepared on a view). Rungs never import the registry themselves.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

from lmladder.errors import LadderError
from lmladder.run import fingerprint as fp_mod

log = logging.getLogger(__name__)


class ModelCache:
    """The loaded base model, its tokenizer and prompt format, and the stack of start
    models of ``from:`` rungs: shared by a context and all its views."""

    def __init__(self):
        self.model = self.tok = self.fmt = None
        self.info: dict[str, Any] = {}
        self.stack: list = []


class Context:
    def __init__(self, cfg, dataset, task, run_dir: Path):
        self.cfg, self.data, self.task, self.run_dir = cfg, dataset, task, Path(run_dir)
        self.models = ModelCache()
        self.digests = fp_mod.data_digests(cfg)
        self.salt: str | None = None  # a view's own fingerprints (learning-curve subsets)

    # ------------------------------------------------------------------ the base model
    @property
    def model_info(self) -> dict[str, Any]:
        return self.models.info

    def base(self):
        """(model, tokenizer): the current base (the shared base, or a ``from:`` start model)."""
        m = self.models
        if m.model is None:
            from lmladder.models import load_causal_lm

            t0 = time.perf_counter()
            log.info("loading model %s", self.cfg.model)
            m.model, m.tok, ref = load_causal_lm(self.cfg.model)
            m.info = _model_info(self.cfg.model, m.model, ref, time.perf_counter() - t0)
            m.info["chat_template"] = bool(getattr(m.tok, "chat_template", None))
        return m.model, m.tok

    def set_base(self, model) -> None:
        """Hand the (restored) base back after a rung changed it."""
        self.models.model = model

    def push_base(self, parent: str) -> None:
        """Until :meth:`pop_base`, the base model is ``parent``'s model (same tokenizer): its
        output model (rungs/<parent>/model), or, for an adapter rung (lora, ia3), the model it
        trained on with its adapter merged; the shared base is kept aside."""
        model, _ = self.base()
        m = self._start_model(parent, model)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        self.models.stack.append(self.models.model)
        self.models.model = m

    def pop_base(self) -> None:
        self.models.model = self.models.stack.pop()

    def _start_model(self, parent: str, base):
        from transformers import AutoModelForCausalLM

        from lmladder.registry import rung_class

        cls = rung_class(parent)
        if cls.output_model:
            folder = self.run_dir / "rungs" / parent / cls.output_model
            if not (folder / "config.json").is_file():
                raise LadderError(f"from: {parent}: no model in {folder} (did the {parent} rung fail?)")
            log.info("starting from %s's model (%s)", parent, folder)
            return AutoModelForCausalLM.from_pretrained(
                folder, dtype=base.dtype, use_safetensors=True, trust_remote_code=False
            ).to(base.device)
        from peft import PeftModel

        folder = self.run_dir / "rungs" / parent / cls.artifact
        if not (folder / "adapter_config.json").is_file():
            raise LadderError(f"from: {parent}: no adapter in {folder} (did the {parent} rung fail?)")
        grand = self.cfg.parent_of(parent)  # the adapter was trained on its own start model
        start = self._start_model(grand, base) if grand else copy.deepcopy(base)
        log.info("starting from the model with %s's adapter merged (%s)", parent, folder)
        return PeftModel.from_pretrained(start, folder).merge_and_unload()

    def fmt(self, plain: bool = False):
        """The prompt format: the chat template, or (``plain``) the same prompts as text."""
        from lmladder.prompts import ChatFormat

        m = self.models
        if m.fmt is None:
            _, tok = self.base()
            m.fmt = ChatFormat(tok, self.cfg.task.system_prompt)
        if plain:
            return ChatFormat(m.fmt.tokenizer, self.cfg.task.system_prompt, plain=True)
        return m.fmt

    @contextlib.contextmanager
    def closing(self, rung, parent: str | None = None):
        """Run a rung's steps, then always close it (it hands a changed base back) and pop
        the ``from:`` parent's model. When a step failed, that failure is the one the user
        sees: an error in close() is then logged, not raised over it."""
        failed = True
        try:
            yield rung
            failed = False
        finally:
            try:
                rung.close()
            except Exception:
                if not failed:
                    raise
                log.warning("%s: cleaning up after the failure also failed", getattr(rung, "name", "rung"),
                            exc_info=log.isEnabledFor(logging.DEBUG))
            finally:
                if parent:
                    self.pop_base()

    # ------------------------------------------------------------------ fingerprints
    def fingerprint(self, rung: str, training: bool = False) -> str:
        """What a rung's result (``training``: its trained weights) depends on (run/fingerprint.py)."""
        fp = fp_mod.rung(self.cfg, rung, self.digests, training)
        return fp_mod.salted(fp, self.salt) if self.salt else fp

    def fingerprint_baseline(self) -> str:
        return fp_mod.baseline(self.cfg, self.digests)

    # ------------------------------------------------------------------ views
    def with_data(self, train=None, test=None, salt: str | None = None) -> "Context":
        """This run with another train and / or test split over the same model cache;
        ``salt`` gives the view's rungs fingerprints of their own (a learning-curve subset
        trains other weights)."""
        from lmladder.data import Dataset

        view = copy.copy(self)
        view.data = Dataset(train=list(self.data.train if train is None else train),
                            test=list(self.data.test if test is None else test), info=self.data.info)
        if salt is not None:
            view.salt = f"{self.salt}:{salt}" if self.salt else salt
        return view

    @contextlib.contextmanager
    def rung_on(self, name: str, test, train=None, out_dir: Path | None = None):
        """Rung ``name`` of this run (its own config section), prepared on a view whose test
        split is ``test`` (and train split ``train``, default the run's); closed afterwards."""
        from lmladder.registry import rung_class

        view = self.with_data(train=train, test=test)
        rung = rung_class(name)(view, self.cfg.rung_config(name), Path(out_dir or self.run_dir / "rungs" / name))
        rung.name = name
        with self.closing(rung):
            rung.prepare()
            yield rung

    def predict_with(self, name: str, split: str = "train", out_dir: Path | None = None):
        """(predictions, info) of rung ``name`` of this run on the ``split`` examples (as its
        test split): e.g. distill's teacher labelling the train inputs."""
        examples = {"train": self.data.train, "test": self.data.test}[split]
        with self.rung_on(name, examples, out_dir=out_dir) as rung:
            return rung.predict()


def _model_info(spec: str, model, ref, seconds: float) -> dict[str, Any]:
    if ref.kind == "openai":  # served elsewhere: no local weights
        return {"spec": spec, "kind": ref.kind, "path": ref.path, "endpoint": model.url, "parameters": None,
                "tokenizer": os.environ.get("LMLADDER_OPENAI_TOKENIZER") or None, "load_seconds": round(seconds, 2)}
    if ref.kind == "vllm":  # held by vLLM (inference/vllm_backend.py)
        return {"spec": spec, "kind": ref.kind, "path": model.path, "parameters": None, "backend": "vllm",
                "load_seconds": round(seconds, 2)}
    return {
        "spec": spec, "kind": ref.kind, "path": ref.path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "load_seconds": round(seconds, 2),
    }
