"""lmladder export RUN_DIR --rung NAME --format adapter|merged|gguf --out DIR

Export one finished rung of a run folder:

  adapter  the PEFT LoRA adapter (safetensors + adapter_config.json), the tokenizer with
           its chat template, and a README saying how to load it on which base model
  merged   a plain transformers model (safetensors) with the LoRA merged in
           (PEFT merge_and_unload), tokenizer and chat template
  gguf     one GGUF file written by lmladder's own writer (architectures: llama),
           --dtype f32 (default) or f16

Prompt rungs (zero-shot, few-shot) have no weights of their own: merged / gguf export
the base model and lmladder_prompt.json (instruction, labels, shots, the user-message
template) next to it. Every rung's export carries lmladder_prompt.json: a LoRA adapter
was trained on the zero-shot prompt.

Verification (on by default, --no-verify skips it): the export is reloaded (PEFT /
transformers / transformers' GGUF loader, plus gguf.GGUFReader for the header) and its
logits are compared with the source (base model + run adapter, unmerged) on a few fixed
prompts rendered with the chat template. The max abs logit difference is printed and
written to DIR/export.json; above the tolerance the export fails and DIR is not written.

examples:
  lmladder export runs/sst2 --rung lora --format merged --out exports/sst2-merged
  lmladder export runs/sst2 --rung lora --format gguf --dtype f16 --out exports/sst2-gguf
  lmladder export runs/sst2 --rung few-shot --format gguf --out exports/sst2-fewshot
"""

# Where each piece is (comments, not part of the docstring: that is `lmladder export --help`):
#   cli.py          add_arguments + main: the checks that need no model, then the steps in order
#   prompt.py       lmladder_prompt.json (the rung's prompt) and README.md, in every export
#   adapter.py      the run's PEFT adapter: found, loaded onto the base (the source), copied out
#   merged.py       the LoRA merged into the base, saved as a plain transformers model
#   gguf_writer.py  lmladder's own GGUF writer (llama): supported check, tensor names and the
#                   q/k permutation, llama.* and tokenizer.* metadata
#   verify.py       reload + logit comparison with the source, tolerances, export.json

from lmladder.export.cli import add_arguments, main

__all__ = ["add_arguments", "main"]
