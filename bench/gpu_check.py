"""The measurements of bench/gpu_check.sh, one per call: ``python bench/gpu_check.py STEP``
prints one markdown table row (``| check | result | numbers | seconds |``) on its last line.

Steps (each run by gpu_check.sh under its own timeout, in its own process, so a crash or
an out-of-memory in one leaves the others' rows):

* ``env``     the GPU, its memory, torch / CUDA versions, bf16 support;
* ``ladder``  the demo ladder (examples/sst2.yaml: zero-shot, few-shot, lora) in bf16 on the
              GPU, test set cut to ``--limit-test``; score and wall time of each rung;
* ``mfu``     full fine-tuning steps (AdamW, bf16) of a 0.5B-class Llama: $GPU_CHECK_MODEL if
              that names local weights, else the embedded SmolLM2's config at larger width
              (hidden 1024, 28 layers, MLP 4096: ~0.48B parameters), randomly initialised;
              tokens/s, model FLOPs utilisation (6N + 12 L d s FLOPs per token against the
              GPU's dense bf16 peak), peak memory;
* ``lora``    lmladder's LoRA path (training/sft.train, packing) vs TRL's SFTTrainer + PEFT on
              SmolLM2, same data / LoRA / steps, bf16: tokens/s and peak memory;
* ``qlora``   lmladder's LoRA path on a 4-bit NF4 base (bitsandbytes): tokens/s, peak memory,
              the 4-bit weights' size;
* ``vllm``    if vLLM imports: lmladder's ``vllm:`` backend (offline batching) vs transformers
              ``generate`` on the same prompts, generated tokens/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/lmladder-gpu-check"))

# dense bf16 peak FLOP/s by GPU name (NVIDIA's datasheets, without sparsity)
PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756e12), ("H100", 989.4e12), ("A100", 312e12), ("L40S", 362e12),
             ("A10G", 70e12), ("L4", 121e12))


def row(check: str, result: str, numbers: str, seconds: float) -> None:
    print(f"| {check} | {result} | {numbers} | {seconds:.0f} |", flush=True)


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in name), None)


def step_env() -> None:
    import torch

    t0 = time.perf_counter()
    p = torch.cuda.get_device_properties(0)
    row("environment", p.name, f"{p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}, {torch.cuda.device_count()} GPU(s)",
        time.perf_counter() - t0)


def step_ladder(limit_test: int) -> None:
    t0 = time.perf_counter()
    out = WORK / "sst2"
    cmd = [sys.executable, "-m", "lmladder.cli", "run", str(ROOT / "examples/sst2.yaml"), "--out", str(out),
           "--limit-test", str(limit_test), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        row("demo ladder, bf16", f"failed (exit {r.returncode})", r.stderr.strip().splitlines()[-1][:120]
            if r.stderr.strip() else "", secs)
        return
    res = json.loads((out / "results.json").read_text())
    parts = []
    for rr in res.get("rungs") or []:
        score, one = rr.get("score"), (rr.get("cost") or {}).get("one_time_s")
        parts.append(f"{rr.get('name')} " + (f"{score:.3f}" if isinstance(score, (int, float)) else "-")
                     + (f" ({one:.0f} s)" if isinstance(one, (int, float)) else ""))
    rec = (res.get("recommendation") or {}).get("rung")
    row("demo ladder, bf16", f"recommended: {rec}", "; ".join(parts) + f"; {limit_test} test rows", secs)


def _mfu_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = os.environ.get("GPU_CHECK_MODEL")
    if name:
        try:
            m = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, local_files_only=True)
            return m, name
        except OSError:
            pass
    from lmladder import models

    path, _ = models.materialise(models.resolve("smollm2-135m"))
    cfg = AutoConfig.from_pretrained(path)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 1024, 4096, 28
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 16, 4, 64
    cfg.max_position_embeddings = 4096
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa"), \
        "SmolLM2 config at width 1024 x 28 layers (random init)"


def step_mfu(steps: int = 10, batch: int = 8, seq: int = 2048) -> None:
    import torch

    t_start = time.perf_counter()
    model, what = _mfu_model()
    model.cuda().train()
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def one():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = batch * seq * steps / dt
    flops_tok = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    peak = peak_flops(torch.cuda.get_device_name(0))
    mfu = f"MFU {100 * tps * flops_tok / peak:.1f}%" if peak else "MFU n/a (unknown GPU peak)"
    row("full FT, bf16 AdamW", f"{n / 1e9:.2f}B params: {what}",
        f"{tps:,.0f} tok/s, {mfu}, batch {batch} x {seq}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
        time.perf_counter() - t_start)


def _train_child(mode: str, steps: int, batch: int) -> dict:
    """One LoRA training run on the GPU (own process): tokens/s, peak memory."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import train_throughput as tt

    from lmladder import models
    from lmladder.rungs.lora import LoraConfig as LadderLora
    from lmladder.training import sft

    path, _ = models.materialise(models.resolve("smollm2-135m"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    models.fix_pad_token(tok)
    out: dict = {"mode": mode}
    if mode == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        out["weights_mb"] = model.get_memory_footprint() / 2**20
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    rows = tt._rows(ROOT / "examples/data/sst2.train.jsonl", 400)
    msgs, feats = tt._features(tok, model, rows)
    avg_len = sum(len(f.input_ids) for f in feats) / len(feats)
    torch.cuda.reset_peak_memory_stats()
    if mode == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": m}],
                                 "completion": [{"role": "assistant", "content": r["label"]}]}
                                for m, r in zip(msgs, rows)])
        args = SFTConfig(output_dir=str(WORK / "trl"), max_steps=steps, per_device_train_batch_size=batch,
                         learning_rate=tt.LR, warmup_steps=tt.WARMUP, lr_scheduler_type="linear", report_to="none",
                         save_strategy="no", bf16=True, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=tt._lora())
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    else:
        from peft import get_peft_model

        cfg = LadderLora(lr=tt.LR, warmup_ratio=tt.WARMUP, max_steps=steps, batch_size=batch, r=tt.R,
                         alpha=tt.ALPHA, dropout=tt.DROPOUT, dev_fraction=0, checkpoints=False)
        stats = sft.train(get_peft_model(model, tt._lora()), tok, feats, [r["label"] for r in rows], cfg,
                          WORK / mode, 0, name=mode)
        seconds = stats["train_seconds"]
    out.update(tokens_per_s=avg_len * batch * steps / seconds, seconds=seconds,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    return out


def _run_child(mode: str, steps: int, batch: int, timeout: float) -> dict | str:
    cmd = [sys.executable, __file__, "train-child", mode, str(steps), str(batch)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"{mode}: timed out"
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return f"{mode}: failed ({(r.stderr.strip().splitlines() or ['?'])[-1][:100]})"
    return json.loads(line[7:])


def step_lora(steps: int = 40, batch: int = 16) -> None:
    t0 = time.perf_counter()
    res = {m: _run_child(m, steps, batch, 80) for m in ("lmladder", "trl")}
    parts = []
    for m, r in res.items():
        parts.append(r if isinstance(r, str) else f"{m} {r['tokens_per_s']:,.0f} tok/s, peak {r['peak_gib']:.2f} GiB")
    ok = [r for r in res.values() if isinstance(r, dict)]
    ratio = (f"lmladder / TRL {res['lmladder']['tokens_per_s'] / res['trl']['tokens_per_s']:.2f}x"
             if len(ok) == 2 else "no ratio")
    row("LoRA: lmladder vs TRL, bf16", ratio, "; ".join(parts) + f"; SmolLM2, {steps} steps x batch {batch}",
        time.perf_counter() - t0)


def step_qlora(steps: int = 30, batch: int = 16) -> None:
    t0 = time.perf_counter()
    r = _run_child("qlora", steps, batch, 60)
    if isinstance(r, str):
        row("QLoRA (bitsandbytes NF4)", "failed", r, time.perf_counter() - t0)
        return
    row("QLoRA (bitsandbytes NF4)", "ok", f"{r['tokens_per_s']:,.0f} tok/s, peak {r['peak_gib']:.2f} GiB, 4-bit "
        f"model {r['weights_mb']:.0f} MB; {steps} steps x batch {batch}", time.perf_counter() - t0)


def step_vllm(prompts: int = 256, new: int = 64) -> None:
    t0 = time.perf_counter()
    from lmladder.inference import vllm_backend

    if vllm_backend.vllm_version() is None:
        row("vLLM", "skipped", "vllm is not installed (pip install vllm)", time.perf_counter() - t0)
        return
    import torch

    from lmladder.inference.generate import generate
    from lmladder.models import load_causal_lm

    vm, tok, _ = load_causal_lm("vllm:smollm2-135m")
    vm.llm_kwargs.update(gpu_memory_utilization=0.3, enforce_eager=False)
    rows = [json.loads(l) for l in (ROOT / "examples/data/sst2.test.jsonl").read_text().splitlines()[:prompts]]
    ids = [tok.apply_chat_template([{"role": "user", "content": f"Summarise: {r['text']}"}], tokenize=True,
                                   add_generation_prompt=True) for r in rows]
    ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]
    generate(vm, tok, ids[:4], max_new_tokens=8, progress=False)  # start vLLM (not timed)
    _, sv = generate(vm, tok, ids, max_new_tokens=new, progress=False)
    hf, _, _ = load_causal_lm("smollm2-135m", device="cuda", dtype=torch.bfloat16)
    _, sh = generate(hf, tok, ids, max_new_tokens=new, batch_size=64, progress=False)
    v, h = sv.generated_tokens / sv.seconds, sh.generated_tokens / sh.seconds
    row("vLLM offline (--model vllm:)", f"{v / h:.1f}x transformers generate",
        f"vLLM {vllm_backend.vllm_version()} {v:,.0f} tok/s vs transformers {h:,.0f} tok/s (batch 64); "
        f"{prompts} prompts x {new} new tokens, greedy", time.perf_counter() - t0)


def main() -> int:
    step = sys.argv[1] if len(sys.argv) > 1 else ""
    if step == "train-child":
        print("RESULT " + json.dumps(_train_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA", flush=True)
        return 3
    WORK.mkdir(parents=True, exist_ok=True)
    steps = {"env": step_env, "ladder": lambda: step_ladder(int(os.environ.get("GPU_CHECK_LIMIT_TEST", "200"))),
             "mfu": step_mfu, "lora": step_lora, "qlora": step_qlora, "vllm": step_vllm}
    if step not in steps:
        print(f"unknown step {step!r}; one of {', '.join(steps)}", file=sys.stderr)
        return 2
    steps[step]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
