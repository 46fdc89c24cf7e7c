"""Verification: the export is reloaded independently of the code that wrote it and its logits
are compared with the source's (base model + the run's adapter, unmerged: what the rung
evaluated) on three fixed prompts; everything lands in export.json.

* the prompts (verify_prompts): the rung's user message around the first three test inputs
  of rungs/<rung>/predictions.jsonl (VERIFY_INPUTS make up any shortfall), rendered with
  the chat template and followed by the first label;
* the reload: adapter as a second PEFT adapter on the source (verify_adapter); merged with
  AutoModelForCausalLM.from_pretrained, and it must carry no PEFT layers (verify_merged);
  gguf first read back with gguf.GGUFReader (check_gguf_file: header, every metadata value
  written, tensor names, shapes and types), then rebuilt by transformers' GGUF loader
  (verify_gguf);
* the comparison (compare_logits): max abs logit difference at every position (the
  criterion), mean abs difference, the largest source logit, top-1 agreement;
* the tokenizer: reloaded from the export, its chat template and the prompts' token ids
  must equal the source's. Transformers cannot rebuild a GGUF tokenizer without BPE merges
  (GGUF cannot store an empty array); then export.json says so and the logits are
  compared on the source tokenizer's ids;
* the bound (judge): TOLERANCE, or --tolerance; above it the export fails with a one-line
  error and the output folder is not written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmladder.errors import LadderError
from lmladder.export.gguf_writer import expected_tensor_names

if TYPE_CHECKING:
    from lmladder.models import ModelRef
    from lmladder.run.folder import RunFolder

# Max abs logit difference (export vs source) above which an export fails; measured
# values and the reasoning are in docs/export.md. SmolLM2-135M + LoRA (source logits up
# to ~38): merged / gguf f32 1.3e-4 (merge rounding: W+BA vs Wx+B(Ax)); f16 0.06-0.11
# depending on the prompts. f32: an absolute 1e-3 (~8x headroom). f16 rounds every
# weight to 11 bits, so its error scales with the logits: 2% of the source's max |logit|
# (0.76 on SmolLM2, 7-12x headroom). A wrong layout (e.g. an unpermuted q/k) moves the
# logits of a trained model by the order of the logits themselves and fails either bound
# by far. --tolerance gives an absolute value instead.
TOLERANCE = {
    ("adapter", "f32"): ("abs", 1e-5),  # a byte copy of the adapter: measured exactly 0
    ("merged", "f32"): ("abs", 1e-3),
    ("gguf", "f32"): ("abs", 1e-3),
    ("merged", "f16"): ("rel", 2e-2),
    ("gguf", "f16"): ("rel", 2e-2),
}

VERIFY_INPUTS = (
    "A gripping, beautifully acted film.",
    "Dull, overlong and instantly forgettable.",
    "It was fine, I suppose.",
)


# --------------------------------------------------------------------------- prompts, logits


@dataclass
class Prompts:
    """The verify prompts rendered with the run's chat format, their token ids with the
    source tokenizer, and (unless --no-verify) the source's logits on them."""

    tok: Any
    system_prompt: str | None
    texts: list[str]
    ids: list[list[int]]
    logits: list | None = None


def verify_prompts(run: RunFolder, rung: str, spec: dict, tok) -> Prompts:
    from lmladder.prompts import ChatFormat

    fmt = ChatFormat(tok, run.cfg.task.system_prompt)
    answer = run.labels[0] if run.labels else "The answer is"  # a label, or any continuation
    texts = [fmt.prompt(m) + fmt.answer_prefix() + answer for m in _verify_messages(run, rung, spec)]
    return Prompts(tok, run.cfg.task.system_prompt, texts, [fmt.encode(t) for t in texts])


def _verify_messages(run: RunFolder, rung: str, spec: dict) -> list[str]:
    inputs = []
    preds = run.dir / "rungs" / rung / "predictions.jsonl"
    if preds.is_file():
        for line in preds.read_text().splitlines()[:3]:
            try:
                inputs.append(str(json.loads(line)["input"]))
            except (ValueError, KeyError):
                pass
    inputs = (inputs + list(VERIFY_INPUTS))[:3]
    return [spec["user_message_template"].replace("{input}", x) for x in inputs]


def logits_of(model, id_lists) -> list:
    import torch

    out = []
    with torch.no_grad():
        for ids in id_lists:
            out.append(model(input_ids=torch.tensor([ids])).logits[0].float())
    return out


def compare_logits(src: list, dst: list) -> dict:
    import torch

    if any(a.shape != b.shape for a, b in zip(src, dst)):
        raise LadderError(f"verification: logits shapes differ ({src[0].shape} vs {dst[0].shape})")
    diffs = [(a - b).abs() for a, b in zip(src, dst)]
    return {
        "max_abs_diff": max(float(d.max()) for d in diffs),
        "mean_abs_diff": float(torch.cat([d.flatten() for d in diffs]).mean()),
        "max_abs_logit": max(float(a.abs().max()) for a in src),
        "argmax_agreement": float(
            torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(src, dst)]).mean()
        ),
        "prompts": len(src),
        "tokens": sum(int(a.shape[0]) for a in src),
    }


def check_tokenizer(tok2, p: Prompts) -> str | None:
    """None if ``tok2`` renders and encodes the verify prompts exactly like the source tokenizer."""
    from lmladder.prompts import ChatFormat

    if getattr(tok2, "chat_template", None) != getattr(p.tok, "chat_template", None):
        return "chat template differs"
    fmt2 = ChatFormat(tok2, p.system_prompt)
    ids2 = [fmt2.encode(t) for t in p.texts]
    if ids2 != p.ids:
        return "token ids of the verify prompts differ"
    return None


def verify_tokenizer(folder: Path, p: Prompts, out: Path) -> str:
    from transformers import AutoTokenizer

    bad = check_tokenizer(AutoTokenizer.from_pretrained(folder), p)
    if bad:
        raise LadderError(f"verification failed: exported tokenizer: {bad}; nothing written to {out}")
    return "reloaded from the export: same chat template and token ids"


# --------------------------------------------------------------------------- per format


def verify_adapter(tmp: Path, source, p: Prompts, out: Path) -> dict:
    """The exported adapter loaded into the source as a second PEFT adapter."""
    source.load_adapter(str(tmp), adapter_name="exported")
    source.set_adapter("exported")
    result = compare_logits(p.logits, logits_of(source, p.ids))
    result["tokenizer"] = verify_tokenizer(tmp, p, out)
    return result


def verify_merged(tmp: Path, p: Prompts, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    m2 = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
    m2.eval()
    if (tmp / "adapter_config.json").exists() or hasattr(m2, "peft_config"):
        raise LadderError(f"verification failed: merged export still carries PEFT layers; nothing written to {out}")
    result = compare_logits(p.logits, logits_of(m2, p.ids))
    result["tokenizer"] = verify_tokenizer(tmp, p, out)
    del m2
    return result


def check_gguf_file(path: Path, written: dict, config) -> dict:
    """Read the file back with gguf.GGUFReader and check header, metadata and tensors."""
    import gguf

    r = gguf.GGUFReader(str(path))
    problems = []

    def val(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    if val("GGUF.version") != 3:
        problems.append(f"GGUF.version {val('GGUF.version')} != 3")
    if val("general.architecture") != "llama":
        problems.append(f"general.architecture {val('general.architecture')!r}")
    for key, want in written["metadata"].items():
        got = val(key)
        ok = got is not None and (abs(got - want) <= 1e-6 * max(1.0, abs(want)) if isinstance(want, float) else got == want)
        if not ok:
            problems.append(f"{key}: {got!r} != {want!r}")
    tm = written["tokenizer"]
    if val("tokenizer.ggml.model") != "gpt2":
        problems.append("tokenizer.ggml.model != gpt2")
    n_tok = len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else 0
    if n_tok != config.vocab_size:
        problems.append(f"{n_tok} tokens != vocab_size {config.vocab_size}")
    for k, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if k in tm["ids"] and val(f"tokenizer.ggml.{key}") != tm["ids"][k]:
            problems.append(f"tokenizer.ggml.{key} {val(f'tokenizer.ggml.{key}')} != {tm['ids'][k]}")
    if tm["chat_template"] and val("tokenizer.chat_template") != tm["chat_template"]:
        problems.append("tokenizer.chat_template differs")
    expected = expected_tensor_names(config)
    got_names = [t.name for t in r.tensors]
    if sorted(got_names) != sorted(expected):
        missing = sorted(set(expected) - set(got_names))[:3]
        extra = sorted(set(got_names) - set(expected))[:3]
        problems.append(f"tensor names differ (missing {missing}, unexpected {extra})")
    for t in r.tensors:
        want = written["tensors"].get(t.name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (columns) first
        if want is None:
            continue
        if shape != want[0] or t.tensor_type.name != want[1]:
            problems.append(f"{t.name}: {shape} {t.tensor_type.name} != {want[0]} {want[1]}")
    if problems:
        raise LadderError(f"GGUF check failed for {path.name}: " + "; ".join(problems[:4]))
    return {
        "gguf_version": 3,
        "tensor_count": len(r.tensors),
        "tokens": n_tok,
        "merges": len(tm["merges"]),
        "metadata_checked": len(written["metadata"]) + 5,
    }


def verify_gguf(tmp: Path, name: str, p: Prompts) -> dict:
    """The GGUF rebuilt by transformers' GGUF loader (model and, if it can, tokenizer)."""
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet = contextlib.redirect_stderr(io.StringIO())  # the GGUF loader's own tqdm bar
    try:
        with quiet:
            gm = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any loader failure is a verification failure
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LadderError(f"verification failed: transformers cannot load {name} ({first})") from None
    gm.eval()
    result = compare_logits(p.logits, logits_of(gm, p.ids))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tok2 = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        result["tokenizer"] = (f"not rebuilt by transformers from the GGUF ({type(e).__name__}: {first}); "
                               "logits compared on the source tokenizer's ids")
        return result
    bad = check_tokenizer(tok2, p)
    if bad:
        raise LadderError(f"verification failed: tokenizer rebuilt from {name}: {bad}")
    result["tokenizer"] = "rebuilt by transformers from the GGUF: same chat template and token ids"
    return result


# --------------------------------------------------------------------------- tolerance, export.json


def judge(result: dict, fmt: str, dtype: str, tolerance: float | None, dtype_label: str, out: Path) -> dict:
    """Apply the tolerance (TOLERANCE, or --tolerance as an absolute bound) to a verify result:
    adds tolerance (and tolerance_rule for a relative one) and passed; raises if it failed."""
    tol_kind, tol = ("abs", tolerance) if tolerance is not None else TOLERANCE[(fmt, dtype)]
    if tol_kind == "rel":
        tol = tol * result["max_abs_logit"]
        result["tolerance_rule"] = f"{TOLERANCE[(fmt, dtype)][1]:g} x max abs source logit"
    result["tolerance"] = tol
    result["passed"] = result["max_abs_diff"] <= tol
    if not result["passed"]:
        raise LadderError(
            f"verification failed: max abs logit diff {result['max_abs_diff']:.3g} > tolerance {tol:.3g} "
            f"({fmt} {dtype_label}); nothing written to {out}"
        )
    return result


def new_record(a, run: RunFolder, ref: ModelRef, adapter: Path | None) -> dict[str, Any]:
    """export.json before the export: what is exported from where."""
    from lmladder import __version__

    return {
        "lmladder": __version__,
        "run_dir": str(run.dir.resolve()),
        "rung": a.rung,
        "format": a.format,
        "dtype": a.dtype if a.format != "adapter" else "as trained",
        "base_model": {"spec": run.cfg.model, "path": ref.path, "kind": ref.kind},
        "adapter": str(adapter.resolve()) if adapter is not None else None,
        "merged_adapter": a.format != "adapter" and adapter is not None,
    }


def write_record(tmp: Path, record: dict, t0: float) -> None:
    """export.json, written last into the export folder: the files, the time taken."""
    record["files"] = sorted(p.name for p in tmp.iterdir()) + ["export.json"]
    record["seconds"] = round(time.perf_counter() - t0, 2)
    (tmp / "export.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
