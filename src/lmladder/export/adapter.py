"""The run's PEFT LoRA adapter (rungs/<rung>/adapter) and its export.

The adapter is found in the run folder, loaded onto the base model as an *unmerged* PEFT
model (the source: what the lora rung evaluated, which merged / gguf exports merge and
every verification compares against), and for ``--format adapter`` copied byte for byte as
trained (adapter_model.safetensors + adapter_config.json; no --dtype) with the run's
tokenizer and its chat template. The README saying how to load it on which base model is
written by prompt.readme; verify.verify_adapter reloads the copy as a second adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmladder.run.folder import RunFolder

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def adapter_dir(run: RunFolder, rung: str) -> Path | None:
    p = run.dir / "rungs" / rung / "adapter"
    return p if (p / "adapter_config.json").is_file() else None


def load_adapter(model, adapter: Path | None):
    """The base model plus the run's adapter as an unmerged PEFT model (the base itself for a
    prompt rung)."""
    if adapter is None:
        return model
    from peft import PeftModel

    source = PeftModel.from_pretrained(model, str(adapter))
    source.eval()
    return source


def write_adapter(tmp: Path, adapter: Path, tok) -> None:
    for f in ADAPTER_FILES:
        shutil.copy2(adapter / f, tmp / f)
    tok.save_pretrained(tmp)
