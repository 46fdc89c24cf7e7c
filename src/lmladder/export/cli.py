"""`lmladder export`: its flags (add_arguments) and its steps (main).

1. check the arguments (check_arguments): the run folder and its label set, the rung
   (finished, not stacked), the format for this rung, --dtype, --tolerance, --out; nothing
   is loaded before these pass;
2. the rung's prompt (prompt.prompt_spec);
3. the source (load_source): the base model (float32, CPU; for GGUF the architecture and
   tokenizer are checked first, see gguf_writer) plus the run's adapter, unmerged, and its
   logits on the verify prompts;
4. into a temporary sibling of --out (io.atomic_dir): the format's files (adapter.py,
   merged.py, gguf_writer.py), each reloaded and compared (verify.py), then
   lmladder_prompt.json, README.md, the tolerance check and export.json; only then is the
   folder renamed into place;
5. print the files written and the verification result.

Heavy libraries are imported inside the steps: lmladder's parser imports this module.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmladder.errors import LadderError
from lmladder.export import verify
from lmladder.export.adapter import adapter_dir, load_adapter, write_adapter
from lmladder.export.gguf_writer import check_gguf_supported, gguf_name, tokenizer_metadata, write_gguf
from lmladder.export.merged import merged_model, write_merged
from lmladder.export.prompt import prompt_spec, readme, write_prompt_and_readme
from lmladder.io import atomic_dir

if TYPE_CHECKING:
    from lmladder.run.folder import RunFolder

FORMATS = ("adapter", "merged", "gguf")
DTYPES = ("f32", "f16")


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="run folder written by `lmladder run`")
    p.add_argument("--rung", required=True, help="finished rung to export (zero-shot, few-shot, lora)")
    p.add_argument("--format", required=True, choices=FORMATS, help="adapter | merged | gguf")
    p.add_argument("--out", required=True, help="output folder (replaced atomically if it holds an earlier export)")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="weights of merged / gguf exports (default f32); norms stay f32 in GGUF")
    p.add_argument("--no-verify", action="store_true", help="skip the reload + logit comparison")
    p.add_argument("--trust-run-code", action="store_true",
                   help="import Python code the run folder's config names (off by default: a run folder may "
                   "come from anyone; export needs none of it)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs logit difference allowed (default: 1e-3 for f32; for f16, "
                   "2%% of the source's max abs logit)")


def main(a) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    run, adapter, out = check_arguments(a)
    spec = prompt_spec(run, a.rung)
    src = load_source(run, a, adapter, spec)
    record = verify.new_record(a, run, src.ref, adapter)
    with atomic_dir(out) as tmp:
        result = write_and_verify(tmp, a, run, src, record, out)
        gguf_file = record["gguf"]["file"] if "gguf" in record else None
        write_prompt_and_readme(tmp, spec, readme(a.format, a.rung, run, src.ref.path, gguf_file))
        record["verify"] = None if a.no_verify else verify.judge(result, a.format, a.dtype, a.tolerance,
                                                                 record["dtype"], out)
        verify.write_record(tmp, record, t0)
    print_summary(a, run, out, record)
    return 0


# --------------------------------------------------------------------------- 1. arguments


def check_arguments(a) -> tuple[RunFolder, Path | None, Path]:
    """Every check that needs no model: (the run, the rung's adapter folder or None, --out)."""
    run = load_run(a.run_dir)
    check_rung(run, a.rung)
    adapter = adapter_dir(run, a.rung)
    if a.format == "adapter" and adapter is None:
        raise LadderError(
            f"rung '{a.rung}' has no adapter (prompt rung: nothing trained); "
            "use --format merged or gguf to export the base model with its prompt"
        )
    if a.format == "adapter" and a.dtype != "f32":
        raise LadderError("--dtype applies to merged and gguf exports; the adapter is copied as trained")
    if a.tolerance is not None and a.tolerance < 0:
        raise LadderError(f"--tolerance {a.tolerance}: must be >= 0")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "export.json").is_file())):
        raise LadderError(f"{out}: exists and is not an lmladder export; choose another --out")
    if out.resolve() == run.dir.resolve() or out.resolve().is_relative_to(run.dir.resolve() / "rungs"):
        raise LadderError(f"{out}: is inside the run's rungs/ folder; choose another --out")
    return run, adapter, out


def load_run(run_dir: str | Path) -> RunFolder:
    """The run folder, which must record its label set (export writes the rung's prompt)."""
    from lmladder.run.folder import read_run

    run = read_run(run_dir)
    if not run.labels and run.cfg.task.kind == "classification":
        raise LadderError(f"{run.dir / 'data.json'}: missing or has no 'labels'; rerun `lmladder run` into {run.dir}")
    return run


def check_rung(run: RunFolder, rung: str) -> None:
    if rung in run.finished:
        parent = getattr(run.cfg.rung_config(rung), "from_", None)
        if parent:  # its adapter belongs on the parent's model, not on the base
            raise LadderError(f"rung '{rung}' starts from {parent}'s model (from:); exporting a stacked rung is not supported yet")
        return
    from lmladder import registry

    finished = ", ".join(run.finished) or "none"
    if rung not in registry.RUNGS:
        raise LadderError(
            f"unknown rung '{rung}' (known: {', '.join(registry.RUNGS)}; finished in {run.dir}: {finished})"
        )
    raise LadderError(f"rung '{rung}' is not finished in {run.dir} (no result.json; finished: {finished})")


# --------------------------------------------------------------------------- 3. the source


@dataclass
class Source:
    """The rung as the run evaluated it, and what the export is compared against."""

    base: Any  # the base model, float32 on CPU
    model: Any  # base + the run's adapter as an unmerged PEFT model; the base for a prompt rung
    tok: Any
    ref: Any  # models.ModelRef: where the base model was loaded from
    adapter: Path | None
    tmeta: dict | None  # GGUF tokenizer metadata, checked before any work (gguf only)
    prompts: verify.Prompts


def load_source(run: RunFolder, a, adapter: Path | None, spec: dict) -> Source:
    base, tok, ref, tmeta = load_base(run, a.format)
    prompts = verify.verify_prompts(run, a.rung, spec, tok)
    model = load_adapter(base, adapter)
    if not a.no_verify:
        prompts.logits = verify.logits_of(model, prompts.ids)
    return Source(base, model, tok, ref, adapter, tmeta, prompts)


def load_base(run: RunFolder, fmt: str):
    """(model, tokenizer, models.ModelRef, GGUF tokenizer metadata or None) for the run's model."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from lmladder.models import load_causal_lm, materialise, resolve

    ref0 = resolve(run.cfg.model)
    if ref0.kind not in ("embedded", "gguf", "folder", "hub"):  # e.g. a model behind an API
        raise LadderError(f"model '{run.cfg.model}' ({ref0.kind}) has no local weights to export")
    if fmt == "gguf":  # unsupported architecture: fail before loading any weights
        path, local_only = materialise(ref0)
        check_gguf_supported(transformers.AutoConfig.from_pretrained(path, local_files_only=local_only))
    model, tok, ref = load_causal_lm(run.cfg.model, device="cpu", dtype=torch.float32)
    tmeta = None
    if fmt == "gguf":  # fail on an unsupported model / tokenizer before any work
        check_gguf_supported(model.config)
        tmeta = tokenizer_metadata(tok, model.config, ref.gguf)
    return model, tok, ref, tmeta


# --------------------------------------------------------------------------- 4. write, verify


def write_and_verify(tmp: Path, a, run: RunFolder, src: Source, record: dict, out: Path) -> dict:
    """Write the format's files into ``tmp``; unless --no-verify, reload them and compare with
    the source (the verify result, before the tolerance). GGUF adds record["gguf"]."""
    check = not a.no_verify
    if a.format == "adapter":
        write_adapter(tmp, src.adapter, src.tok)
        return verify.verify_adapter(tmp, src.model, src.prompts, out) if check else {}
    plain = merged_model(src.model, src.base, src.adapter)
    if a.format == "merged":
        write_merged(tmp, plain, src.tok, a.dtype)
        return verify.verify_merged(tmp, src.prompts, out) if check else {}
    name = gguf_name(run.cfg.model, a.rung)
    file = f"{name}-{a.dtype}.gguf"
    written = write_gguf(tmp / file, plain, src.tok, a.dtype, name, src.ref.gguf, src.tmeta)
    record["gguf"] = {"file": file, "tokenizer_pre": written["tokenizer"]["pre"]}
    if written["tokenizer"]["warning"]:
        record["gguf"]["warning"] = written["tokenizer"]["warning"]
    if not check:
        return {}
    record["gguf"]["reader"] = verify.check_gguf_file(tmp / file, written, plain.config)
    return verify.verify_gguf(tmp, file, src.prompts)


# --------------------------------------------------------------------------- 5. summary


def print_summary(a, run: RunFolder, out: Path, record: dict) -> None:
    print(f"exported rung '{a.rung}' of {run.dir} as {a.format}"
          + (f" ({a.dtype})" if a.format != "adapter" else "") + f" to {out}")
    for name in record["files"]:
        p = out / name
        size = sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size
        print(f"  {p}  ({size / 1e6:.1f} MB)" if size > 1e5 else f"  {p}")
    if record["verify"]:
        v = record["verify"]
        print(f"verified: max abs logit diff {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}) on "
              f"{v['prompts']} prompts, {v['tokens']} tokens; argmax agreement {v['argmax_agreement']:.3f}")
        if v.get("tokenizer"):
            print(f"tokenizer: {v['tokenizer']}")
    else:
        print("not verified (--no-verify)")
