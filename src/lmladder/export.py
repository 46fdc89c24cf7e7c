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

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmladder.errors import LadderError

if TYPE_CHECKING:
    from lmladder.run.ladder import RunFolder

log = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "gguf")
DTYPES = ("f32", "f16")

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

# Architectures lmladder's GGUF writer supports: transformers model_type -> (class, GGUF arch).
GGUF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama")}

VERIFY_INPUTS = (
    "A gripping, beautifully acted film.",
    "Dull, overlong and instantly forgettable.",
    "It was fine, I suppose.",
)


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


# --------------------------------------------------------------------------- run folder


def load_run(run_dir: str | Path) -> RunFolder:
    """The run folder, which must record its label set (export writes the rung's prompt)."""
    from lmladder.run.ladder import read_run

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


def adapter_dir(run: RunFolder, rung: str) -> Path | None:
    p = run.dir / "rungs" / rung / "adapter"
    return p if (p / "adapter_config.json").is_file() else None


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


# --------------------------------------------------------------------------- GGUF writer


def check_gguf_supported(config) -> str:
    """Return the GGUF architecture name for a transformers config or raise LadderError."""
    mt = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    supported = ", ".join(f"{k} ({v[0]})" for k, v in GGUF_ARCHITECTURES.items())
    if mt not in GGUF_ARCHITECTURES:
        cls = f" ({archs[0]})" if archs else ""
        raise LadderError(
            f"GGUF export does not support model type '{mt}'{cls}; supported: {supported}. "
            "Use --format merged (any architecture) and llama.cpp's convert_hf_to_gguf.py"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type not in (None, "default"):
        raise LadderError(
            f"GGUF export: rope scaling '{rope_type}' is not supported by lmladder's writer "
            "(only plain RoPE); use --format merged"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise LadderError(f"GGUF export: {flag}=true is not supported by lmladder's writer; use --format merged")
    return GGUF_ARCHITECTURES[mt][1]


def _rope_theta(config) -> float:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _head_dim(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd or config.hidden_size // config.num_attention_heads)


def permute_qk(w, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's row permutation of q/k projections (convert_hf_to_gguf.py LlamaModel.permute):
    HF stores rotary halves [x0..x{d/2}, y0..], GGML wants interleaved pairs. transformers'
    GGUF loader (LlamaTensorProcessor._reverse_permute_weights) undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_tensors(state_dict: dict, config, dtype: str):
    """Yield (gguf_name, numpy array) for a Llama state dict, in llama.cpp's naming."""
    import numpy as np

    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    half = dtype == "f16"
    for hf_name, t in state_dict.items():
        if "rotary_emb" in hf_name:
            continue
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            if tied:
                continue
            name = "output.weight"
        else:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
            if not m or m.group(2) not in _LAYER_MAP:
                raise LadderError(f"GGUF export: unexpected tensor '{hf_name}' for a llama model")
            name = f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
        a = t.detach().to("cpu").float().numpy()
        if name.endswith("attn_q.weight"):
            a = permute_qk(a, n_head, n_head)
        elif name.endswith("attn_k.weight"):
            a = permute_qk(a, n_head, n_kv)
        # llama.cpp keeps 1-D tensors (norms) in f32 whatever the output type
        a = np.ascontiguousarray(a.astype(np.float16 if half and a.ndim > 1 else np.float32))
        yield name, a


def expected_tensor_names(config) -> list[str]:
    names = ["token_embd.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"blk.{i}.{v}" for v in _LAYER_MAP.values()]
    names.append("output_norm.weight")
    if not getattr(config, "tie_word_embeddings", False):
        names.append("output.weight")
    return names


def _tokenizer_json(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LadderError("GGUF export needs a fast (tokenizers) tokenizer; this model has a slow one")
    return json.loads(backend.to_str())


def _pre_tokenizer_name(tj: dict, source_gguf: str | None) -> tuple[str, str | None]:
    """tokenizer.ggml.pre for llama.cpp (it picks its split regex by this name)."""
    if source_gguf:  # the model came from a GGUF (embedded / .gguf): keep llama.cpp's own name
        try:
            from transformers.integrations.gguf import read_gguf_metadata

            pre = read_gguf_metadata(source_gguf)[0].get("tokenizer.ggml.pre")
            if pre:
                return str(pre), None
        except Exception:  # pragma: no cover - fall through to detection
            pass
    pre = tj.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else [pre.get("type")]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt2", None
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm", None
    if kinds == ["Split", "ByteLevel"]:
        regex = (pre["pretokenizers"][0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in regex:
            return "llama-bpe", None
    return "default", f"pre-tokenizer {kinds} not recognised; wrote tokenizer.ggml.pre='default' (llama.cpp may split text differently)"


def tokenizer_metadata(tok, config, source_gguf: str | None = None) -> dict:
    """The tokenizer.* metadata llama.cpp expects for a byte-level BPE (``gpt2``) vocabulary."""
    tj = _tokenizer_json(tok)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise LadderError(
            f"GGUF export supports byte-level BPE tokenizers (tokenizer.ggml.model=gpt2); this one is "
            f"{model.get('type')} with decoder {(tj.get('decoder') or {}).get('type')}; use --format merged"
        )
    n = int(config.vocab_size)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n:
        raise LadderError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {n}")
    rev = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif t in added:
            tokens.append(t)
            types.append(3 if added[t].special else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(t)
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre, warning = _pre_tokenizer_name(tj, source_gguf)
    probe = tok("a", add_special_tokens=True).input_ids
    plain = tok("a", add_special_tokens=False).input_ids
    ids = {
        "bos": tok.bos_token_id if tok.bos_token_id is not None else getattr(config, "bos_token_id", None),
        "eos": tok.eos_token_id if tok.eos_token_id is not None else getattr(config, "eos_token_id", None),
        "unk": tok.unk_token_id,
        "pad": tok.pad_token_id,
    }
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "ids": {k: v for k, v in ids.items() if isinstance(v, int)},
        "add_bos": bool(len(probe) > len(plain) and ids["bos"] is not None and probe[0] == ids["bos"]),
        "add_eos": bool(len(probe) > len(plain) and ids["eos"] is not None and probe[-1] == ids["eos"]),
        "chat_template": getattr(tok, "chat_template", None),
        "warning": warning,
    }


def llama_metadata(config, dtype: str) -> dict:
    """llama.* (and general.file_type) keys, as convert_hf_to_gguf.py writes them."""
    hd = _head_dim(config)
    md = {
        "llama.vocab_size": int(config.vocab_size),
        "llama.context_length": int(config.max_position_embeddings),
        "llama.embedding_length": int(config.hidden_size),
        "llama.block_count": int(config.num_hidden_layers),
        "llama.feed_forward_length": int(config.intermediate_size),
        "llama.attention.head_count": int(config.num_attention_heads),
        "llama.attention.head_count_kv": int(config.num_key_value_heads),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.rope.freq_base": _rope_theta(config),
        "llama.rope.dimension_count": hd,
        "general.file_type": 0 if dtype == "f32" else 1,  # ALL_F32 / MOSTLY_F16
    }
    if hd != config.hidden_size // config.num_attention_heads:
        md["llama.attention.key_length"] = hd
        md["llama.attention.value_length"] = hd
    return md


def write_gguf(path: Path, model, tok, dtype: str, name: str, source_gguf: str | None = None,
               tmeta: dict | None = None) -> dict:
    """Write ``model`` (a plain Llama) and ``tok`` to one GGUF file. Returns what was written."""
    import gguf

    config = model.config
    arch = check_gguf_supported(config)
    tmeta = tmeta or tokenizer_metadata(tok, config, source_gguf)
    meta = llama_metadata(config, dtype)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name(name)
    w.add_description("exported by lmladder")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in meta.items():
        if isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tmeta["pre"])
    w.add_token_list(tmeta["tokens"])
    w.add_token_types(tmeta["types"])
    if tmeta["merges"]:  # GGUF cannot store an empty array
        w.add_token_merges(tmeta["merges"])
    ids = tmeta["ids"]
    if "bos" in ids:
        w.add_bos_token_id(ids["bos"])
    if "eos" in ids:
        w.add_eos_token_id(ids["eos"])
    if "unk" in ids:
        w.add_unk_token_id(ids["unk"])
    if "pad" in ids:
        w.add_pad_token_id(ids["pad"])
    w.add_add_bos_token(tmeta["add_bos"])
    w.add_add_eos_token(tmeta["add_eos"])
    if tmeta["chat_template"]:
        w.add_chat_template(tmeta["chat_template"])
    shapes = {}
    for tname, arr in llama_tensors(model.state_dict(), config, dtype):
        w.add_tensor(tname, arr)
        shapes[tname] = (tuple(arr.shape), "F16" if arr.dtype.itemsize == 2 else "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"metadata": meta, "tokenizer": tmeta, "tensors": shapes}


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


# --------------------------------------------------------------------------- verification


def _logits(model, id_lists) -> list:
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


def _check_tokenizer(tok2, tok, texts: list[str], src_ids: list[list[int]], fmt_cls, system_prompt) -> str | None:
    """None if ``tok2`` renders and encodes the verify prompts exactly like ``tok``."""
    if getattr(tok2, "chat_template", None) != getattr(tok, "chat_template", None):
        return "chat template differs"
    fmt2 = fmt_cls(tok2, system_prompt)
    ids2 = [fmt2.encode(t) for t in texts]
    if ids2 != src_ids:
        return "token ids of the verify prompts differ"
    return None


# --------------------------------------------------------------------------- main


def _slug(s: str) -> str:
    s = Path(s.rstrip("/")).name or s
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "model"


def _readme(fmt: str, rung: str, run: RunFolder, base_path: str, gguf_name: str | None) -> str:
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


def main(a) -> int:
    import os
    import warnings

    from lmladder import __version__

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
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
    spec = prompt_spec(run, a.rung)
    tol_kind, tol = ("abs", a.tolerance) if a.tolerance is not None else TOLERANCE[(a.format, a.dtype)]

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from lmladder.io import atomic_dir
    from lmladder.models import load_causal_lm, materialise, resolve
    from lmladder.prompts import ChatFormat

    ref0 = resolve(run.cfg.model)
    if ref0.kind not in ("embedded", "gguf", "folder", "hub"):  # e.g. a model behind an API
        raise LadderError(f"model '{run.cfg.model}' ({ref0.kind}) has no local weights to export")
    if a.format == "gguf":  # unsupported architecture: fail before loading any weights
        path, local_only = materialise(ref0)
        check_gguf_supported(transformers.AutoConfig.from_pretrained(path, local_files_only=local_only))
    model, tok, ref = load_causal_lm(run.cfg.model, device="cpu", dtype=torch.float32)
    tmeta = None
    if a.format == "gguf":  # fail on an unsupported model / tokenizer before any work
        check_gguf_supported(model.config)
        tmeta = tokenizer_metadata(tok, model.config, ref.gguf)
    fmt = ChatFormat(tok, run.cfg.task.system_prompt)
    answer = run.labels[0] if run.labels else "The answer is"  # a label, or any continuation
    texts = [fmt.prompt(m) + fmt.answer_prefix() + answer for m in _verify_messages(run, a.rung, spec)]
    src_ids = [fmt.encode(t) for t in texts]

    source = model
    if adapter is not None:
        from peft import PeftModel

        source = PeftModel.from_pretrained(model, str(adapter))
        source.eval()
    verify = not a.no_verify
    src_logits = _logits(source, src_ids) if verify else None

    record: dict[str, Any] = {
        "lmladder": __version__,
        "run_dir": str(run.dir.resolve()),
        "rung": a.rung,
        "format": a.format,
        "dtype": a.dtype if a.format != "adapter" else "as trained",
        "base_model": {"spec": run.cfg.model, "path": ref.path, "kind": ref.kind},
        "adapter": str(adapter.resolve()) if adapter is not None else None,
        "merged_adapter": a.format != "adapter" and adapter is not None,
    }
    gguf_name = None
    result: dict[str, Any] = {}

    def verify_tokenizer(folder) -> str:
        from transformers import AutoTokenizer

        bad = _check_tokenizer(AutoTokenizer.from_pretrained(folder), tok, texts, src_ids, ChatFormat,
                               run.cfg.task.system_prompt)
        if bad:
            raise LadderError(f"verification failed: exported tokenizer: {bad}; nothing written to {out}")
        return "reloaded from the export: same chat template and token ids"

    with atomic_dir(out) as tmp:
        if a.format == "adapter":
            for f in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(adapter / f, tmp / f)
            tok.save_pretrained(tmp)
            if verify:
                source.load_adapter(str(tmp), adapter_name="exported")
                source.set_adapter("exported")
                result = compare_logits(src_logits, _logits(source, src_ids))
                result["tokenizer"] = verify_tokenizer(tmp)
        else:
            plain = source.merge_and_unload() if adapter is not None else model
            plain.eval()
            if a.format == "merged":
                if a.dtype == "f16":
                    plain = plain.to(torch.float16)
                plain.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                if verify:
                    from transformers import AutoModelForCausalLM

                    m2 = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
                    m2.eval()
                    if (tmp / "adapter_config.json").exists() or hasattr(m2, "peft_config"):
                        raise LadderError(f"verification failed: merged export still carries PEFT layers; nothing written to {out}")
                    result = compare_logits(src_logits, _logits(m2, src_ids))
                    result["tokenizer"] = verify_tokenizer(tmp)
                    del m2
            else:
                gguf_name = f"{_slug(run.cfg.model)}-{a.rung}-{a.dtype}.gguf"
                written = write_gguf(tmp / gguf_name, plain, tok, a.dtype, f"{_slug(run.cfg.model)}-{a.rung}",
                                     ref.gguf, tmeta)
                record["gguf"] = {"file": gguf_name, "tokenizer_pre": written["tokenizer"]["pre"]}
                if written["tokenizer"]["warning"]:
                    record["gguf"]["warning"] = written["tokenizer"]["warning"]
                if verify:
                    record["gguf"]["reader"] = check_gguf_file(tmp / gguf_name, written, plain.config)
                    result = _verify_gguf(tmp, gguf_name, src_logits, src_ids, tok, texts, fmt, run)
        (tmp / "lmladder_prompt.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
        (tmp / "README.md").write_text(_readme(a.format, a.rung, run, ref.path, gguf_name))
        if verify:
            if tol_kind == "rel":
                tol = tol * result["max_abs_logit"]
                result["tolerance_rule"] = f"{TOLERANCE[(a.format, a.dtype)][1]:g} x max abs source logit"
            result["tolerance"] = tol
            result["passed"] = result["max_abs_diff"] <= tol
            record["verify"] = result
            if not result["passed"]:
                raise LadderError(
                    f"verification failed: max abs logit diff {result['max_abs_diff']:.3g} > tolerance {tol:.3g} "
                    f"({a.format} {record['dtype']}); nothing written to {out}"
                )
        else:
            record["verify"] = None
        record["files"] = sorted(p.name for p in tmp.iterdir()) + ["export.json"]
        record["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "export.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    print(f"exported rung '{a.rung}' of {run.dir} as {a.format}"
          + (f" ({a.dtype})" if a.format != "adapter" else "") + f" to {out}")
    for name in record["files"]:
        p = out / name
        size = sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size
        print(f"  {p}  ({size / 1e6:.1f} MB)" if size > 1e5 else f"  {p}")
    if record["verify"]:
        v = record["verify"]
        print(f"verified: max abs logit diff {v['max_abs_diff']:.3g} (tolerance {tol:.3g}) on {v['prompts']} prompts, "
              f"{v['tokens']} tokens; argmax agreement {v['argmax_agreement']:.3f}")
        if v.get("tokenizer"):
            print(f"tokenizer: {v['tokenizer']}")
    else:
        print("not verified (--no-verify)")
    return 0


def _verify_gguf(tmp: Path, name: str, src_logits, src_ids, tok, texts, fmt, run) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmladder.prompts import ChatFormat

    import contextlib
    import io

    quiet = contextlib.redirect_stderr(io.StringIO())  # the GGUF loader's own tqdm bar
    try:
        with quiet:
            gm = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any loader failure is a verification failure
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LadderError(f"verification failed: transformers cannot load {name} ({first})") from None
    gm.eval()
    result = compare_logits(src_logits, _logits(gm, src_ids))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tok2 = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        result["tokenizer"] = (f"not rebuilt by transformers from the GGUF ({type(e).__name__}: {first}); "
                               "logits compared on the source tokenizer's ids")
        return result
    bad = _check_tokenizer(tok2, tok, texts, src_ids, ChatFormat, run.cfg.task.system_prompt)
    if bad:
        raise LadderError(f"verification failed: tokenizer rebuilt from {name}: {bad}")
    result["tokenizer"] = "rebuilt by transformers from the GGUF: same chat template and token ids"
    return result
