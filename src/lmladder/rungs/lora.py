"""lora: supervised fine-tuning with PEFT LoRA on the zero-shot prompt format.

Loss only on the answer tokens and the end-of-turn token (prompt masked), built
through the chat template (see engine/sft.py). The adapter is saved as safetensors;
if a finished adapter with the same fingerprint is already on disk (a run stopped
after training), it is loaded instead of retrained.

Under ``torchrun`` / ``accelerate launch`` every rank trains (DDP, same global batch
as one process, see engine/sft.py); rank 0 alone decides on reuse, saves the adapter
and evaluates.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from lmladder.io import atomic_dir
from lmladder.rungs.base import Rung

log = logging.getLogger(__name__)


class Lora(Rung):
    name = "lora"
    cost_rank = 2
    trains = True
    summary = "LoRA adapter, SFT on the train split"

    def prepare(self) -> None:
        from lmladder.engine import sft

        task, fmt = self.ctx.task, self.ctx.fmt()
        model, tok = self.ctx.base()
        eos = sft.eos_token_ids(tok, model)
        train = self.ctx.data.train
        self.answers = [task.answer(e) for e in train]
        self.features = [
            sft.build_feature(fmt, task.user_message(e.input), a, self.cfg.max_length, e.source, eos)
            for e, a in zip(train, self.answers)
        ]
        self.messages = [task.user_message(ex.input) for ex in self.ctx.data.test]
        self.adapter_dir = self.out_dir / "adapter"
        self.peft_model = None

    def _peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules,
        )

    def fit(self):
        from peft import PeftModel, get_peft_model

        from lmladder.engine import sft

        model, tok = self.ctx.base()
        main = sft.is_main()
        stamp = self.adapter_dir / "lmladder_fingerprint.txt"
        reuse = main and stamp.is_file() and stamp.read_text().strip() == self.ctx.fingerprint(self.name)
        if sft.broadcast(reuse):  # rank 0 decides; only it evaluates, so only it loads
            if main:
                log.info("lora: reusing the trained adapter in %s", self.adapter_dir)
                self.peft_model = PeftModel.from_pretrained(model, self.adapter_dir)
                self.peft_model.eval()
            return {"reused_adapter": True}
        self.peft_model = get_peft_model(model, self._peft_config())
        # Trainer's scratch folder (nothing is saved there: save_strategy="no"); the
        # other ranks use a private temp folder, never the run folder.
        work = self.out_dir / ".trainer" if main else Path(tempfile.mkdtemp(prefix="lmladder-trainer-"))
        stats = sft.train(
            self.peft_model, tok, self.features, self.answers, self.cfg, work, self.ctx.cfg.seed
        )
        shutil.rmtree(work, ignore_errors=True)
        if main:
            with atomic_dir(self.adapter_dir) as tmp:
                self.peft_model.save_pretrained(tmp, safe_serialization=True)
                (tmp / "lmladder_fingerprint.txt").write_text(self.ctx.fingerprint(self.name) + "\n")
        return stats

    def trainable_params(self) -> int:
        if self.peft_model is None:
            return 0
        return sum(p.numel() for p in self.peft_model.parameters() if p.requires_grad)

    def predict(self):
        return self.ctx.task.predict(self.peft_model, self.ctx.fmt(), self.messages, desc=self.name)

    def artifacts(self):
        return {"adapter": "adapter"}

    def close(self) -> None:
        # Remove the LoRA layers so later rungs see the untouched base model.
        if self.peft_model is not None:
            base = self.peft_model.unload()
            base.eval()
            for p in base.parameters():
                p.requires_grad_(False)
            self.ctx.set_base(base)
            self.peft_model = None
