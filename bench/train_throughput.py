"""Training throughput and memory: lmladder's LoRA path vs TRL SFTTrainer + PEFT (issue 4).

What is compared
----------------
The same data (the first ``--train`` rows of examples/data/sst2.train.jsonl), model
(SmolLM2-135M-Instruct, fp32 on CPU), LoRA (r=16, alpha=32, dropout 0.05, all-linear),
batch size, learning rate / warmup / linear schedule and ``max_steps``:

* ``lmladder``: ``training.sft.train`` as the ``lora`` rung runs it (length-grouped
  batches, each micro-batch packed into one row, logits computed only at supervised
  positions), no dev split / checkpoints, so only training is timed.
* ``trl``: ``trl.SFTTrainer`` with a conversational prompt-completion dataset
  (``prompt=[user msg]``, ``completion=[assistant label]``), TRL's defaults otherwise
  (completion-only loss, no packing, gradient checkpointing on, its entropy / token
  accuracy metrics), ``peft_config`` = the same LoRA.
* ``trl-nogc``: the same with ``gradient_checkpointing=False`` (TRL's default costs
  speed to save memory; this row separates the two effects).
* ``lmladder-fulllogits``: lmladder with packing off and full logits (the path before
  issue 4), to show where the memory went.
* ``lmladder-gc``: lmladder with ``gradient_checkpointing: true`` (as TRL's default).
* ``qlora``: lmladder's path on a 4-bit NF4 base (bitsandbytes), vs ``lmladder``'s peak RSS.
* ``lmladder-issue4``: the path before issue 16 (the whole batch in one micro-batch, PEFT's
  own LoRA dropout); ``lmladder-capN``: the micro-batch cap (training/memory.py
  ``CPU_MICRO_TOKENS``) set to N tokens.
* ``--profile``: where the lora path's peak goes, stage by stage, in one fresh process
  (imports, weights, forgetting check, data, adapter + optimizer, one optimizer step);
  again with ``MALLOC_MMAP_THRESHOLD_=131072`` for the allocator's share (issue 16).

Every run is its own subprocess (peak RSS is the child's ``ru_maxrss``, never shared);
runs alternate A/B/A/B (``--rounds``) because the machine is shared. Tokens/s counts
real (non-pad) tokens: mean example length x batch x steps, the same formula for both.
The final eval loss is computed by the same function on the same held-out sentences
(examples/data/sst2.test.jsonl, first ``--eval`` rows): mean cross-entropy of the answer
tokens + end-of-turn under the chat template.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py            # 2 rounds, 20 steps
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py --steps 10 --rounds 1

Needs TRL: ``.venv/bin/pip install -c constraints.txt trl``.
"""

from __future__ import annotations

from lmladder import prompts

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the machine is shared: spin-waiting threads cost more than they give

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
INSTRUCTION = "Decide whether the sentiment of the movie review sentence is positive or negative."
LABELS = ["negative", "positive"]
LR, WARMUP, R, ALPHA, DROPOUT = 2e-4, 0.1, 16, 32, 0.05


def _rows(path: Path, n: int) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()[:n]]


def _features(tok, model, rows):
    from lmladder.training import sft
    from lmladder.prompts import ChatFormat, user_message

    fmt = ChatFormat(tok)
    eos = prompts.eos_token_ids(tok, model)
    msgs = [user_message(INSTRUCTION, r["text"], labels=LABELS) for r in rows]
    feats = [sft.build_feature(fmt, m, r["label"], 1024, f"sst2:{i}", eos) for i, (m, r) in enumerate(zip(msgs, rows))]
    return msgs, feats


@contextlib.contextmanager
def _noop_ctx(model):
    yield 0


def _lora():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear")


def eval_loss(model, tok, feats) -> float:
    import torch

    from lmladder.training import sft

    model.eval()
    col = sft.Collator(tok.pad_token_id, keep_logits=True)
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(feats), 8):
            b = col([{"input_ids": f.input_ids, "labels": f.labels} for f in feats[s : s + 8]])
            labels = b.pop("labels")
            k = int((labels[:, 1:] != -100).sum())
            total += sft.token_loss(model(**b), labels).item() * k
            n += k
    return total / n


def child(mode: str, a) -> dict:
    import torch

    from lmladder.rungs.lora import LoraConfig as LadderLora
    from lmladder.training import sft
    from lmladder.models import load_causal_lm

    seed = int(mode.split("-seed")[1]) if "-seed" in mode else 0  # e.g. lmladder-seed1: another data order
    mode = mode.split("-seed")[0]
    label = mode
    if "-cap" in mode:  # e.g. lmladder-cap128: memory.CPU_MICRO_TOKENS = 128 (the micro-batch cap)
        from lmladder.training import memory

        mode, cap = mode.split("-cap")
        memory.CPU_MICRO_TOKENS = int(cap)
    if mode == "lmladder-issue4":  # the path before issue 16: the whole batch in one micro-batch, PEFT's dropout
        from lmladder.training import lean, memory

        real_plan = memory.plan
        memory.plan = lambda *a_, **kw: real_plan(*a_, **{**kw, "cap_tokens": 10**9})
        lean.fused_lora_dropout = _noop_ctx
    torch.manual_seed(seed)
    if mode == "qlora":  # never load the fp32 model in this process: its RSS would count
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from lmladder import models

        path, _ = models.materialise(models.resolve("smollm2-135m"))
        tok = AutoTokenizer.from_pretrained(path)
        models.fix_pad_token(tok)
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.float32),
            dtype=torch.float32)
    else:
        model, tok, ref = load_causal_lm("smollm2-135m")
    train_rows = _rows(ROOT / "examples/data/sst2.train.jsonl", a.train)
    eval_rows = _rows(ROOT / "examples/data/sst2.test.jsonl", a.eval)
    msgs, feats = _features(tok, model, train_rows)
    _, eval_feats = _features(tok, model, eval_rows)
    avg_len = sum(len(f.input_ids) for f in feats) / len(feats)
    out = {"mode": label + (f"-seed{seed}" if seed else "")}
    if mode.startswith("trl"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list([
            {"prompt": [{"role": "user", "content": m}], "completion": [{"role": "assistant", "content": r["label"]}]}
            for m, r in zip(msgs, train_rows)
        ])
        kw = {} if mode == "trl" else {"gradient_checkpointing": False}
        args = SFTConfig(output_dir=str(a.work / mode), max_steps=a.steps, per_device_train_batch_size=a.batch,
                         learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="linear", report_to="none",
                         save_strategy="no", use_cpu=True, bf16=False, seed=seed, data_seed=seed, **kw)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_lora())
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        trained = trainer.model
    else:
        cfg = LadderLora(lr=LR, warmup_ratio=WARMUP, max_steps=a.steps, batch_size=a.batch, r=R, alpha=ALPHA,
                         dropout=DROPOUT, dev_fraction=0, checkpoints=False, packing=mode != "lmladder-fulllogits",
                         gradient_checkpointing=mode == "lmladder-gc")
        if mode == "lmladder-issue4":
            cfg.memory_budget_mb = 10**6
        if mode == "lmladder-fulllogits":  # the pre-issue-4 path: vocabulary logits at every position
            init = sft.Collator.__init__

            def full_logits(self, *args, **kw):
                init(self, *args, **kw)
                self.keep_logits = False

            sft.Collator.__init__ = full_logits
        if mode == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            out["base_weights_mb"] = model.get_memory_footprint() / 2**20
        from peft import get_peft_model

        pm = get_peft_model(model, _lora())
        stats = sft.train(pm, tok, feats, [r["label"] for r in train_rows], cfg, a.work / mode, seed, name=mode)
        seconds = stats["train_seconds"]
        trained = pm
        out["memory_plan"] = {k: stats["memory_plan"][k] for k in ("micro", "accum", "checkpoint_layers", "budget_mb")}
    out.update({
        "seconds": seconds,
        "tokens_per_s": avg_len * a.batch * a.steps / seconds,
        "examples_per_s": a.batch * a.steps / seconds,
        "eval_loss": eval_loss(trained, tok, eval_feats),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load": os.getloadavg()[0],
    })
    return out


def profile(a) -> dict:
    """Where the LoRA rung's peak goes (issue 16), in this fresh process, stage by stage:
    RSS after the imports, after loading the weights, after the forgetting check, after
    the data, after the adapter and the optimizer state; then the peak of one optimizer step
    (the default memory plan: micro-batches with accumulation, fused LoRA dropout) above that.
    Run it again with ``MALLOC_MMAP_THRESHOLD_=131072`` to see the allocator's share."""
    import psutil
    import torch

    rss = lambda: psutil.Process().memory_info().rss / 2**20  # noqa: E731
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    out = {"imports": rss()}
    from peft import get_peft_model

    from lmladder.models import load_causal_lm
    from lmladder.rungs.lora import LoraConfig as LadderLora
    from lmladder.training import forgetting, lean, memory, sft

    out["imports"] = rss()
    model, tok, _ = load_causal_lm("smollm2-135m")
    out["weights_loaded"] = rss()
    cfg = LadderLora(max_steps=1, batch_size=a.batch, dev_fraction=0, checkpoints=False)
    before = peak()
    check = forgetting.before(model, tok, cfg)
    out["forgetting_check_peak_over_weights"] = max(0.0, peak() - max(before, out["weights_loaded"]))
    del check
    train_rows = _rows(ROOT / "examples/data/sst2.train.jsonl", a.train)
    msgs, feats = _features(tok, model, train_rows)
    out["data"] = rss()
    pm = get_peft_model(model, _lora())
    pm.train()
    n_train = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    for p in pm.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()  # the two moments exist now
    opt.zero_grad(set_to_none=False)
    out["adapter_and_optimizer"] = rss()
    out["optimizer_state_mb_analytic"] = n_train * 12 / 2**20
    lengths = [len(f.input_ids) for f in feats]
    plan = memory.plan(pm, lengths, a.batch, 1, None)
    order = sorted(range(len(feats)), key=lambda i: -lengths[i])[: a.batch]  # the longest global batch
    col = sft.Collator(tok.pad_token_id, packing=True, keep_logits=True)
    base_peak = peak()
    with lean.fused_lora_dropout(pm), lean.checkpoint_layers(pm, plan.layers_for if plan.checkpoint_layers else 0):
        for s_ in range(0, a.batch, plan.micro):
            b = col([{"input_ids": feats[i].input_ids, "labels": feats[i].labels} for i in order[s_: s_ + plan.micro]])
            labels = b.pop("labels")
            sft.token_loss(pm(**b), labels).backward()
    opt.step()
    out["step_peak"] = peak()
    out["step_peak_over_start"] = peak() - max(base_peak, out["adapter_and_optimizer"])
    out["micro_tokens"] = max(lengths) * plan.micro
    out["plan"] = plan.as_dict()
    out["activation_estimate_mb"] = memory.activation_mb_per_token(pm) * out["micro_tokens"] * (
        1 - plan.layers_for(out["micro_tokens"]) / max(plan.n_layers, 1))
    out["full_logits_mb_analytic"] = out["micro_tokens"] * pm.config.vocab_size * 4 * 3 / 2**20
    out["malloc"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", "default")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train", type=int, default=200, help="train rows used")
    p.add_argument("--eval", type=int, default=64, help="held-out rows for the final eval loss")
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds (alternating)")
    p.add_argument("--modes", default="lmladder,trl", help="modes alternated each round")
    p.add_argument("--once", default="lmladder-gc,trl-nogc,qlora,lmladder-fulllogits", help="modes run once at the end")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help="where the LoRA rung's peak goes, stage by stage")
    p.add_argument("--work", type=Path, default=Path("/tmp/lmladder-bench-train"))
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a)), flush=True)
        return
    if a.profile:
        print(json.dumps(profile(a), indent=1), flush=True)
        return
    plan = [m for _ in range(a.rounds) for m in a.modes.split(",")] + [m for m in a.once.split(",") if m]
    results = []
    for mode in plan:
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(a.steps), "--batch", str(a.batch),
               "--train", str(a.train), "--eval", str(a.eval), "--work", str(a.work)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode}: failed\n{r.stderr[-3000:]}", file=sys.stderr)
            continue
        res = json.loads(line[7:])
        results.append(res)
        print(f"{mode:22s} {res['tokens_per_s']:8.1f} tok/s  {res['examples_per_s']:6.2f} ex/s  "
              f"peak RSS {res['peak_rss_mb']:7.0f} MB  eval loss {res['eval_loss']:.4f}  load {res['load']:.1f}"
              f"  {res.get('memory_plan', '')}",
              flush=True)
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["mode"], []).append(r)

    def rng(mode, key):
        v = [r[key] for r in by.get(mode, [])]
        return (min(v), max(v)) if v else (float("nan"), float("nan"))

    print(f"\n{a.steps} steps x batch {a.batch}, {a.train} train rows, eval on {a.eval} held-out rows\n")
    print("| run | tokens/s | peak RSS MB | final eval loss |\n|---|---|---|---|")
    for mode in by:
        t, m, e = rng(mode, "tokens_per_s"), rng(mode, "peak_rss_mb"), rng(mode, "eval_loss")
        print(f"| {mode} (n={len(by[mode])}) | {t[0]:.0f}–{t[1]:.0f} | {m[0]:.0f}–{m[1]:.0f} | {e[0]:.4f}–{e[1]:.4f} |")
    if "lmladder" in by and "trl" in by:
        t_l, t_t = rng("lmladder", "tokens_per_s"), rng("trl", "tokens_per_s")
        m_l, m_t = rng("lmladder", "peak_rss_mb"), rng("trl", "peak_rss_mb")
        print(f"\nthroughput lmladder / trl: {t_l[0] / t_t[1]:.2f}x – {t_l[1] / t_t[0]:.2f}x (worst – best pairing)")
        print(f"peak RSS lmladder / trl:  {m_l[0] / m_t[1]:.2f}x – {m_l[1] / m_t[0]:.2f}x")
        if "trl-nogc" in by:
            t_n = rng("trl-nogc", "tokens_per_s")
            print(f"throughput lmladder / trl-nogc: {t_l[0] / t_n[1]:.2f}x – {t_l[1] / t_n[0]:.2f}x")
    if "qlora" in by and "lmladder" in by:
        q = by["qlora"][0]
        print(f"qlora / lora peak RSS: {q['peak_rss_mb'] / rng('lmladder', 'peak_rss_mb')[1]:.2f}x – "
              f"{q['peak_rss_mb'] / rng('lmladder', 'peak_rss_mb')[0]:.2f}x; 4-bit base weights "
              f"{q.get('base_weights_mb', 0):.0f} MB")


if __name__ == "__main__":
    main()
