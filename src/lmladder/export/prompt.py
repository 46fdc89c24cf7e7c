"""What every export carries besides weights.

* lmladder_prompt.json (prompt_spec): the rung's instruction, labels, system prompt, the
  few-shot examples and the exact user message with an {input} placeholder. For the prompt
  rungs (zero-shot, few-shot) this file *is* the rung: merged / gguf export the base model
  and the prompt next to it. A LoRA adapter was trained on the zero-shot prompt, so the
  lora exports carry it too.
* README.md (readme): how to load the export (PEFT on which base model, transformers, or
  llama.cpp) and use that prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lmladder.errors import LadderError
from lmladder.export.adapter import adapter_dir

if TYPE_CHECKING:
    from lmladder.run.folder import RunFolder


def prompt_spec(run: RunFolder, rung: str) -> dict:
    """What makes a rung besides weights: the prompt (and for few-shot, the shots)."""
    from lmladder.tasks import make_task

    cfg = run.cfg
    task = make_task(cfg.task, run.labels, cfg.eval, cfg.seed)
    shots = []
    shots_file = run.dir / "rungs" / rung / "shots.json"
    if rung == "few-shot":
        if not shots_file.is_file():
            raise LadderError(f"{shots_file}: missing; rerun the few-shot rung")
        shots = json.loads(shots_file.read_text())
    pairs = [(s["input"], s["label"]) for s in shots]
    return {
        "rung": rung,
        "task": cfg.task.kind,
        "instruction": task.instruction,
        "labels": run.labels,
        "system_prompt": cfg.task.system_prompt,
        "shots": shots,
        "user_message_template": task.user_message("{input}", pairs),
        "usage": "Replace {input} in user_message_template, send it as the user turn through the "
        "model's chat template (system_prompt null = the template's default system turn), and "
        "read the assistant's answer: one of the labels.",
        "trained_adapter": adapter_dir(run, rung) is not None,
    }


def readme(fmt: str, rung: str, run: RunFolder, base_path: str, gguf_name: str | None) -> str:
    spec = run.cfg.model
    lines = [f"# lmladder export: rung `{rung}` as `{fmt}`", "",
             f"Run folder: `{run.dir.resolve()}`  ", f"Base model: `{spec}` (loaded from `{base_path}`)", ""]
    if fmt == "adapter":
        lines += [
            "A PEFT LoRA adapter (safetensors). Load it on the base model above:", "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_path}")',
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
            'tok = AutoTokenizer.from_pretrained("THIS_FOLDER")  # with the chat template', "```", "",
            "`model.merge_and_unload()` gives a plain model (or use `lmladder export --format merged`).",
        ]
    elif fmt == "merged":
        lines += ["A plain transformers model (safetensors), LoRA merged in if the rung has one:", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
                  'tok = AutoTokenizer.from_pretrained("THIS_FOLDER")', "```"]
    else:
        lines += [f"`{gguf_name}` for llama.cpp, e.g.:", "", "```bash",
                  f"llama-cli -m {gguf_name} -cnv   # chat with the embedded chat template",
                  f"llama-server -m {gguf_name} --port 8080", "```"]
    lines += ["", "`lmladder_prompt.json` holds the prompt the rung was evaluated (and trained) with: "
              "fill `user_message_template` and send it through the chat template.",
              "`export.json` records the verification (max abs logit difference vs the source).", ""]
    return "\n".join(lines)


def write_prompt_and_readme(tmp: Path, spec: dict, readme_text: str) -> None:
    (tmp / "lmladder_prompt.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    (tmp / "README.md").write_text(readme_text)
