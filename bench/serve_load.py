"""Serving load test: `lmladder serve` (batched, multi-adapter) vs one-at-a-time transformers (issue 6).

What is measured
----------------
* The server: ``lmladder serve RUN_DIR --adapter lora-b=<copy of the run's adapter>``
  started as a subprocess on 127.0.0.1 (a free port), SmolLM2-135M-Instruct on CPU.
  Load: ``--clients`` concurrent clients (threads, one HTTP connection each) send
  ``--requests`` chat completions in total (short SST-2 sentences as prompts, greedy,
  ``max_tokens`` 32). Two scenarios: (A) every request to the base model, (B) requests
  spread round-robin over base / lora / lora-b (three adapter groups per batch).
  Reported: requests/s, p50/p95 latency, aggregate generated tokens/s (completion
  tokens from ``usage`` / wall time).
* The baseline, in this script's process: the same base model loaded with
  ``lmladder.models.load_causal_lm`` and ``model.generate`` (greedy, 32 new tokens),
  one request at a time, on the first ``--baseline-requests`` prompts; the server's
  scenario-A answers for those prompts must be identical (checked, reported).
* Wall-clock numbers are sensitive to other load on the machine (the 1-min load average
  is printed at each phase); the CPU-time columns (tokens per CPU-second of the server
  process, resp. of this process during the baseline) are the contention-robust view.
* Memory: RSS of the server process with base + 2 adapters loaded (after one request
  to each, before the load test, and after it), vs RSS of a fresh process holding 2
  merged full models (``PeftModel.merge_and_unload`` of each adapter over its own base
  copy, one generate each).

    HF_HUB_OFFLINE=1 .venv/bin/lmladder run examples/sst2.yaml --rungs lora --limit-train 16 \\
        --limit-test 4 --set lora.max_steps=2 --out /tmp/serve-run      # the adapter (~1 min)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_load.py --run-dir /tmp/serve-run
    # issue 16: engines side by side (continuous batching; llama.cpp; the engine before)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_load.py --run-dir runs/sst2 \\
        --engines builtin,llamacpp,builtin@1986ff5

Traffic goes to 127.0.0.1 only; request count and time are bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[list[dict]]:
    rows = [json.loads(l) for l in (ROOT / "examples/data/sst2.test.jsonl").read_text().splitlines() if l.strip()]
    out = []
    for r in rows[:n]:
        text = r["text"].strip()
        if len(text) > 160:
            text = text[:160]
        out.append([{"role": "user", "content": f"In one sentence, what is this review saying? {text}"}])
    while len(out) < n:
        out += out[: n - len(out)]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(url: str, reqs: list[tuple[str, list[dict]]], clients: int, max_tokens: int, deadline_s: float):
    import httpx

    lock = threading.Lock()
    todo = list(enumerate(reqs))
    res: dict[int, dict] = {}
    t_end = time.perf_counter() + deadline_s

    def client():
        with httpx.Client(base_url=url, timeout=deadline_s) as c:
            while time.perf_counter() < t_end:
                with lock:
                    if not todo:
                        return
                    i, (model, msgs) = todo.pop(0)
                t0 = time.perf_counter()
                r = c.post("/v1/chat/completions", json={"model": model, "messages": msgs, "max_tokens": max_tokens,
                                                          "temperature": 0})
                dt = time.perf_counter() - t0
                body = r.json()
                if r.status_code != 200:
                    res[i] = {"error": body, "latency": dt}
                    continue
                res[i] = {"latency": dt, "text": body["choices"][0]["message"]["content"],
                          "tokens": body["usage"]["completion_tokens"]}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline_s + 30)
    wall = time.perf_counter() - t0
    ok = [r for r in res.values() if "error" not in r]
    lat = [r["latency"] for r in ok]
    toks = sum(r["tokens"] for r in ok)
    return {
        "requests": len(reqs), "ok": len(ok), "errors": len(res) - len(ok), "wall_s": wall,
        "req_per_s": len(ok) / wall, "p50_s": pct(lat, 0.5) if lat else None, "p95_s": pct(lat, 0.95) if lat else None,
        "tokens": toks, "tok_per_s": toks / wall, "results": res,
    }


def baseline(spec: str, msgs_list: list[list[dict]], max_tokens: int):
    import torch

    from lmladder.prompts import eos_token_ids
    from lmladder.models import load_causal_lm

    model, tok, _ = load_causal_lm(spec)
    eos = sorted(eos_token_ids(tok, model))
    texts, lats, toks = [], [], 0

    def one(msgs):
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False,
                  return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        gen = out[0, ids.shape[1]:].tolist()
        if any(t in eos for t in gen):
            gen = gen[: next(i for i, t in enumerate(gen) if t in eos) + 1]
        return gen

    one(msgs_list[0])  # warmup
    c0 = time.process_time()
    t0 = time.perf_counter()
    for msgs in msgs_list:
        s = time.perf_counter()
        gen = one(msgs)
        lats.append(time.perf_counter() - s)
        toks += len(gen)
        texts.append(tok.decode([t for t in gen if t not in eos], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False))
    wall = time.perf_counter() - t0
    return {"requests": len(msgs_list), "wall_s": wall, "cpu_s": time.process_time() - c0, "req_per_s": len(msgs_list) / wall, "p50_s": pct(lats, 0.5),
            "p95_s": pct(lats, 0.95), "tokens": toks, "tok_per_s": toks / wall, "texts": texts}


def merged_rss(spec: str, adapters: list[str]) -> None:
    """Child mode: load one merged full model per adapter, generate once each, print RSS (MB) as JSON."""
    import torch
    from peft import PeftModel

    from lmladder.models import load_causal_lm

    models, out = [], {"start": rss_mb(os.getpid())}
    for i, a in enumerate(adapters):
        m, tok, _ = load_causal_lm(spec)
        m = PeftModel.from_pretrained(m, a).merge_and_unload().eval()
        ids = tok("Hello", return_tensors="pt").input_ids
        with torch.inference_mode():
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        models.append(m)
        out[f"after_{i + 1}"] = rss_mb(os.getpid())
    print(json.dumps(out))


def _start(cmd: list[str], env: dict, logpath: Path, url: str):
    import httpx

    t0 = time.perf_counter()
    srv = subprocess.Popen(cmd, stdout=open(logpath, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    while True:
        if srv.poll() is not None:
            sys.exit(f"server exited early (rc {srv.returncode}); log: {logpath}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return srv, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > 900:
            srv.kill()
            sys.exit(f"server did not come up in 900 s; log: {logpath}")
        time.sleep(0.5)


def engines_main(a) -> int:
    """Issue 16: the engines side by side on one run folder, each its own server process,
    one after another: ``builtin`` (continuous batching), ``llamacpp`` (--engine llamacpp,
    f16 GGUF + GGUF LoRA), and ``builtin@REV`` (the built-in engine of an earlier commit,
    checked out into a temporary git worktree: "today's" engine before the change).
    Per engine: lone requests (one at a time, ``--lone`` of them: latency p50 and batch-1
    decode tok/s), then ``--clients`` concurrent clients sending ``--requests`` requests
    (p50 / p95 latency, aggregate tok/s), all to the base model, greedy."""
    import httpx

    run = Path(a.run_dir)
    ps = prompts(a.requests)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="serve-engines-"))
    for eng in a.engines.split(","):
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        src = ROOT / "src"
        kind = eng
        if "@" in eng:
            kind, rev = eng.split("@", 1)
            wt = tmp / f"wt-{rev}"
            if not wt.exists():  # an engine may be listed twice (interleaved rounds)
                subprocess.run(["git", "worktree", "add", "--detach", str(wt), rev], cwd=ROOT, check=True,
                               capture_output=True)
            src = wt / "src"
        env["PYTHONPATH"] = str(src)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-c", "import sys; from lmladder.cli import main; sys.exit(main())", "serve",
               str(run.resolve()), "--host", "127.0.0.1", "--port", str(port), "--batch-size", str(a.batch_size),
               "--batch-wait-ms", str(a.batch_wait_ms), "--log-level", "warning"]
        if kind == "llamacpp":
            cmd += ["--engine", "llamacpp", "--threads", str(a.threads)]
        print(f"{eng}: starting", flush=True)
        srv, up = _start(cmd, env, tmp / f"{eng.replace('/', '_')}.log", url)
        try:
            httpx.post(url + "/v1/chat/completions", json={"model": "base", "messages": ps[0], "max_tokens": 4,
                                                           "temperature": 0}, timeout=300).raise_for_status()
            lone = load(url, [("base", p) for p in ps[: a.lone]], 1, a.max_tokens, a.time_limit)
            l0 = os.getloadavg()[0]
            many = load(url, [("base", p) for p in ps], a.clients, a.max_tokens, a.time_limit)
            rss = rss_mb(srv.pid)
        finally:
            srv.terminate()
            try:
                srv.wait(20)
            except subprocess.TimeoutExpired:
                srv.kill()
        lone_tok_s = lone["tokens"] / sum(r["latency"] for r in lone["results"].values())
        rows.append(dict(engine=eng, up_s=up, lone_p50=lone["p50_s"], lone_tok_s=lone_tok_s, ok=many["ok"],
                         n=many["requests"], p50=many["p50_s"], p95=many["p95_s"], agg=many["tok_per_s"],
                         rss=rss, load=l0, texts=[many["results"].get(i, {}).get("text") for i in range(a.lone)]))
        print(f"{eng}: lone p50 {lone['p50_s']:.2f}s ({lone_tok_s:.1f} tok/s); {a.clients} clients p50 "
              f"{many['p50_s']:.2f}s p95 {many['p95_s']:.2f}s, {many['tok_per_s']:.1f} tok/s; load {l0:.1f}", flush=True)
    for eng in sorted(set(a.engines.split(","))):
        if "@" in eng:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / f"wt-{eng.split('@', 1)[1]}")],
                           cwd=ROOT, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{a.requests} requests, {a.clients} clients, max_tokens {a.max_tokens}, greedy, base model of "
          f"{run}; server --batch-size {a.batch_size} --batch-wait-ms {a.batch_wait_ms}; {a.threads} threads\n")
    print("| engine | lone p50 s | batch-1 decode tok/s | clients p50 s | p95 s | p50 / lone p50 | aggregate tok/s "
          "| ok | RSS MB | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['lone_p50']:.2f} | {r['lone_tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | "
              f"{r['p50'] / r['lone_p50']:.2f}x | {r['agg']:.1f} | {r['ok']}/{r['n']} | {r['rss']:.0f} | "
              f"{r['load']:.1f} |")
    if len(rows) > 1:
        same = [sum(x == y for x, y in zip(rows[0]["texts"], r["texts"])) for r in rows[1:]]
        print("\nsame greedy text as " + rows[0]["engine"] + " on the first lone prompts: "
              + ", ".join(f"{r['engine']} {k}/{a.lone}" for r, k in zip(rows[1:], same)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", help="compare engines instead (issue 16), e.g. builtin,llamacpp,builtin@1986ff5")
    ap.add_argument("--lone", type=int, default=8, help="--engines: lone requests, one at a time")
    ap.add_argument("--threads", type=int, default=1, help="--engines: OMP / llama.cpp threads per server (1: robust on a shared machine)")
    ap.add_argument("--run-dir", default="/tmp/serve-run", help="run folder with rungs/lora/adapter")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32, help="server --batch-size")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0, help="server --batch-wait-ms")
    ap.add_argument("--baseline-requests", type=int, default=12)
    ap.add_argument("--time-limit", type=float, default=240.0, help="per load scenario (seconds)")
    ap.add_argument("--merged-rss", nargs="+", metavar="SPEC ADAPTER", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.engines:
        return engines_main(a)
    if a.merged_rss:
        merged_rss(a.merged_rss[0], a.merged_rss[1:])
        return 0

    import httpx
    import yaml

    run = Path(a.run_dir)
    adapter = run / "rungs/lora/adapter"
    if not (adapter / "adapter_config.json").is_file():
        sys.exit(f"{adapter}: no adapter; create it first (see this script's docstring)")
    spec = yaml.safe_load((run / "config.yaml").read_text())["model"]
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    adapter_b = tmp / "lora-b"
    shutil.copytree(adapter, adapter_b)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w")
    cmd = [sys.executable, "-m", "lmladder.cli", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--adapter", f"lora-b={adapter_b}", "--batch-size", str(a.batch_size), "--batch-wait-ms",
           str(a.batch_wait_ms), "--max-adapters", "2", "--log-level", "warning"]
    print("server:", " ".join(cmd[1:]), flush=True)
    t_start = time.perf_counter()
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        while True:
            if srv.poll() is not None:
                sys.exit(f"server exited early (rc {srv.returncode}); log: {tmp / 'server.log'}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t_start > 180:
                sys.exit("server did not come up in 180 s")
            time.sleep(0.5)
        print(f"server up in {time.perf_counter() - t_start:.1f}s", flush=True)
        ps = prompts(a.requests)
        rss = {"idle (weights not yet paged in)": rss_mb(srv.pid)}
        for m in ("base", "lora", "lora-b"):  # warm up + load both adapters
            httpx.post(url + "/v1/chat/completions", json={"model": m, "messages": ps[0], "max_tokens": 4,
                                                           "temperature": 0}, timeout=120).raise_for_status()
            rss["base, after 1 request" if m == "base" else f"+ adapter {m}"] = rss_mb(srv.pid)
        rss["2 adapters loaded"] = rss["+ adapter lora-b"]
        scen, loadavg = {}, {"start": os.getloadavg()[0]}
        cpu0 = cpu_s(srv.pid)
        scen["A: base only"] = load(url, [("base", p) for p in ps], a.clients, a.max_tokens, a.time_limit)
        cpu1 = cpu_s(srv.pid)
        scen["A: base only"]["cpu_s"] = cpu1 - cpu0
        loadavg["A"] = os.getloadavg()[0]
        print(f"A done: {scen['A: base only']['wall_s']:.1f}s", flush=True)
        models = ["base", "lora", "lora-b"]
        scen["B: base/lora/lora-b"] = load(url, [(models[i % 3], p) for i, p in enumerate(ps)], a.clients,
                                           a.max_tokens, a.time_limit)
        scen["B: base/lora/lora-b"]["cpu_s"] = cpu_s(srv.pid) - cpu1
        loadavg["B"] = os.getloadavg()[0]
        print(f"B done: {scen['B: base/lora/lora-b']['wall_s']:.1f}s", flush=True)
        rss["after load"] = rss_mb(srv.pid)
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        srv.terminate()
        try:
            srv.wait(20)
        except subprocess.TimeoutExpired:
            srv.kill()
        log.close()

    base_res = baseline(spec, ps[: a.baseline_requests], a.max_tokens)
    loadavg["baseline"] = os.getloadavg()[0]
    srv_texts = [scen["A: base only"]["results"].get(i, {}).get("text") for i in range(a.baseline_requests)]
    same = sum(x == y for x, y in zip(srv_texts, base_res["texts"]))
    child = subprocess.run([sys.executable, __file__, "--merged-rss", spec, str(adapter), str(adapter_b)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    merged = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else {}
    shutil.rmtree(tmp, ignore_errors=True)

    bs = [l for l in metrics.splitlines() if l.startswith("lmladder_batch_size_")]
    bsum = float(next(l for l in bs if l.startswith("lmladder_batch_size_sum")).split()[1])
    bcnt = float(next(l for l in bs if l.startswith("lmladder_batch_size_count")).split()[1])

    import torch

    print(f"\nSmolLM2-135M-Instruct ({spec}), CPU x{os.cpu_count()} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__} threads {torch.get_num_threads()}; {a.requests} requests, {a.clients} clients, "
          f"max_tokens {a.max_tokens}, greedy; server --batch-size {a.batch_size} --batch-wait-ms {a.batch_wait_ms}")
    print(f"mean decode batch (rows) over the run: {bsum / max(bcnt, 1):.1f} ({int(bcnt)} batches); "
          f"1-min load average at start / after A / after B / after baseline: "
          + " / ".join(f"{v:.1f}" for v in loadavg.values()) + "\n")
    print("| setup | requests ok | wall s | req/s | p50 s | p95 s | gen tokens | gen tok/s | vs one-at-a-time "
          "| tok per CPU-s | vs one-at-a-time (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    bcpu = base_res["tokens"] / base_res["cpu_s"]
    print(f"| transformers generate, one at a time (base) | {base_res['requests']} | {base_res['wall_s']:.1f} | "
          f"{base_res['req_per_s']:.2f} | {base_res['p50_s']:.2f} | {base_res['p95_s']:.2f} | {base_res['tokens']} | "
          f"{base_res['tok_per_s']:.1f} | 1.00x | {bcpu:.2f} | 1.00x |")
    for name, s in scen.items():
        scpu = s["tokens"] / s["cpu_s"]
        print(f"| lmladder serve, {name} | {s['ok']}/{s['requests']} | {s['wall_s']:.1f} | {s['req_per_s']:.2f} | "
              f"{s['p50_s']:.2f} | {s['p95_s']:.2f} | {s['tokens']} | {s['tok_per_s']:.1f} | "
              f"**{s['tok_per_s'] / base_res['tok_per_s']:.2f}x** | {scpu:.2f} | **{scpu / bcpu:.2f}x** |")
    print(f"\nserver answers identical to one-at-a-time generate (first {a.baseline_requests} prompts, base): "
          f"{same}/{a.baseline_requests}")
    print("\n| memory (RSS) | MB |\n|---|---:|")
    for k, v in rss.items():
        print(f"| server, {k} | {v:.0f} |")
    for k, v in merged.items():
        print(f"| merged full models process, {k.replace('_', ' ')} | {v:.0f} |")
    if merged:
        r = merged["after_2"] / rss["2 adapters loaded"]
        print(f"\n2 merged full models / (1 base + 2 adapters served): **{r:.2f}x** RSS "
              f"({merged['after_2']:.0f} MB vs {rss['2 adapters loaded']:.0f} MB)")
        extra_ad = rss["2 adapters loaded"] - rss["base, after 1 request"]
        extra_m = merged["after_2"] - merged["after_1"]
        print(f"marginal cost of a second variant: +{extra_ad / 2:.0f} MB per served adapter vs "
              f"+{extra_m:.0f} MB per merged model")
    else:
        print("merged-model RSS child failed:", child.stderr[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
