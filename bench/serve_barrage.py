"""Server barrage: hostile requests against `lmladder serve` (no 500s, no leak, same answers).

What it does
------------
* Starts ``lmladder serve MODEL`` as a subprocess on 127.0.0.1 (a free port, an API key,
  ``--log-level info``), by default on the embedded SmolLM2-135M (``smollm2-135m``, offline).
* Phase 0: a set of valid greedy chat requests, one at a time: the reference answers.
* Phase 1: ``--requests`` (default 2000) malformed requests, one after another on one
  keep-alive connection, drawn from a seeded generator of ~25 kinds of hostile input:
  NaN / Infinity / 1e999, integers of 20-400 digits and of more than 4300 digits, nesting of
  65-5000 levels, lone surrogates (JSON escapes and raw UTF-8 bytes), wrong types, wrong
  Content-Type, oversize bodies, bad token ids, unknown / path-like model names, broken
  JSON, non-object JSON, unsupported features, out-of-range fields, wrong methods, no key.
* Phase 2: ``--clients`` (default 32) concurrent clients, each sending ``--per-client``
  requests alternating valid (the phase-0 prompts) and malformed ones: every valid answer
  must equal its phase-0 answer (isolation inside batches), every malformed one a 4xx.
* Reports: requests, status-code counts, 500s (must be 0), non-JSON or non-OpenAI-shaped
  error bodies (must be 0), tracebacks / "unhandled error" lines in the server log (must
  be 0), server RSS before / after (psutil, else /proc/PID/status), and whether a valid
  request afterwards gives the same greedy answer as before.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_barrage.py                 # smollm2-135m
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_barrage.py --model PATH --requests 500

Traffic goes to 127.0.0.1 only; request count and time are bounded.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
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
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
KEY = "barrage-key"


def _lit(d: dict, key: str, literal: str) -> bytes:
    """JSON of ``d`` with the value of ``key`` replaced by ``literal`` verbatim (NaN, 10**400 ...)."""
    return json.dumps({**d, key: "@@"}).replace('"@@"', literal).encode()


def hostile_cases(rng: random.Random, n: int, *, model: str, max_tokens_limit: int, body_limit: int):
    """``n`` malformed requests: (method, path, headers without auth, body bytes, send the key?).
    Every one must get a 4xx JSON error in OpenAI's shape."""

    def chat(**kw):
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}

    def js(d):
        return json.dumps(d).encode()

    wrong_types = {
        "messages": ["x", 5, [1], {"a": 1}, True, [], [None]],
        "stream": ["yes", 1, [1], {"a": 1}],
        "stop": [5, [1], {"a": 1}, False],
        "n": ["x", 0, 17, [1], True, 2.5],
        "logprobs": ["x", 5, [1]],
        "stream_options": [5, "x", [1], {"include_usage": "yes"}],
        "temperature": ["x", [1], True, {"a": 1}, 2.5, -0.1],
        "top_p": [0, 1.5, -1, "x"],
        "model": [7, [1], {"a": 1}, True, None],
        "max_tokens": [max_tokens_limit + 1, 0, -5, 1.5, 10**6, "8"],
    }
    num_keys = ["temperature", "top_p", "max_tokens", "n", "seed", "presence_penalty", "frequency_penalty"]
    m = model.encode()
    kinds = [
        ("non-finite", lambda: (CHAT, _lit(chat(), rng.choice(num_keys),
                                           rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])))),
        ("non-finite nested", lambda: (CHAT, js(chat()).replace(b'"hi"', rng.choice([b"NaN", b"[1, Infinity]"])))),
        ("huge int", lambda: (CHAT, _lit(chat(logprobs=True), rng.choice(["max_tokens", "n", "seed", "top_logprobs",
                                                                          "max_completion_tokens"]),
                                         str(rng.choice([-1, 1]) * 10 ** rng.randint(20, 400))))),
        ("int > 4300 digits", lambda: (CHAT, _lit(chat(), "max_tokens", "9" * rng.randint(4301, 6000)))),
        ("deep list", lambda: (CHAT, js(chat(metadata="@@")).replace(
            b'"@@"', b"[" * (k := rng.randint(65, 5000)) + b"]" * k))),
        ("deep object", lambda: (CHAT, b'{"a":' * (k := rng.randint(65, 3000)) + b"1" + b"}" * k)),
        ("lone surrogate", lambda: (CHAT, js(chat()).replace(b'"hi"', rng.choice(
            [b'"\\ud800"', b'"x\\udfff"', b'"\\uDBFF y"', b'"\\ude00\\ud83d"'])))),
        ("surrogate prompt", lambda: (COMP, rng.choice([b'{"model": "%s", "prompt": "\\ud800"}' % m,
                                                        b'{"model": "%s", "prompt": "\xed\xa0\x80"}' % m,
                                                        b'{"model": "%s", "prompt": ["a", "\\udc00"]}' % m]))),
        ("wrong type", lambda: (CHAT, js(chat(**{(k := rng.choice(sorted(wrong_types))):
                                                  rng.choice(wrong_types[k])})))),
        ("bad message", lambda: (CHAT, js({"model": model, "messages": [rng.choice(
            [{"role": "wizard", "content": "x"}, {"role": "user", "content": 5}, {"role": ["user"], "content": "x"},
             {"role": "user", "content": [{"type": "image_url"}]}, {"role": "user", "content": [{"type": "text"}]},
             "hello", None, []])]}))),
        ("content-type", lambda: ("CT", js(chat()))),
        ("oversize body", lambda: (CHAT, js(chat(pad="x" * (body_limit + rng.randint(1, 5000)))))),
        ("bad token ids", lambda: (COMP, js({"model": model, "max_tokens": 2, "prompt": rng.choice(
            [[-1], [10**7 + rng.randint(0, 10**6)], [[1, 2], []], [], [1.5], [[True]], [10**30], [1, "a"]])}))),
        ("model name", lambda: (CHAT, js(chat(model=rng.choice(
            ["nope", "../etc/passwd", "/etc", "a" * 300, "x/../y", "", "owner/nope", "C:\\x", "base\x00"]))))),
        ("broken JSON", lambda: (CHAT, rng.choice([b"{not json", b'{"model": "a",}', b"", b"\x00\x01\x02", b"{{{",
                                                   b'{"a": 1} x', b'{"model": "a\x01b"}', b"\xff\xfe{}",
                                                   b'{"a": "\\x"}', b"{'a': 1}"]))),
        ("non-object JSON", lambda: (CHAT, rng.choice([b"[1, 2]", b'"string"', b"42", b"null", b"true"]))),
        ("unsupported", lambda: (CHAT, js(chat(**rng.choice(
            [{"tools": [{"type": "function"}]}, {"logit_bias": {"1": 5}}, {"response_format": {"type": "json_schema"}},
             {"best_of": 3}, {"response_format": "json"}, {"suffix": "x"}, {"presence_penalty": 0.5}]))))),
        ("too many prompts", lambda: (COMP, js({"model": model, "prompt": ["a"] * rng.randint(65, 300),
                                                "max_tokens": 1}))),
        ("bad stop", lambda: (CHAT, js(chat(stop=rng.choice([[""], ["x" * 300], ["a"] * 17, [1, 2]]))))),
        ("echo+stream", lambda: (COMP, js({"model": model, "prompt": "hi", "echo": True, "stream": True}))),
        ("wrong method", lambda: ("METHOD", b"")),
        ("no key", lambda: ("NOAUTH", js(chat()))),
        ("unknown route", lambda: (rng.choice(["/v1/embeddings", "/v1/chat", "/admin", "/v1/models/../x"]),
                                   js(chat()))),
    ]
    out = []
    for _ in range(n):
        kind, make = kinds[rng.randrange(len(kinds))]
        path, body = make()
        headers, method, auth = {"Content-Type": "application/json"}, "POST", True
        if path == "CT":
            path, headers = rng.choice([CHAT, COMP]), {"Content-Type": rng.choice(
                ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-16", "image/png",
                 "multipart/form-data; boundary=x", ""])}
        elif path == "METHOD":
            path, method = rng.choice([CHAT, COMP, "/v1/models"]), rng.choice(["GET", "PUT", "DELETE", "PATCH"])
            if path == "/v1/models" and method == "GET":
                method = "POST"
        elif path == "NOAUTH":
            path, auth = rng.choice([CHAT, COMP, "/v1/models", "/metrics"]), False
        out.append((kind, method, path, headers, body, auth))
    return out


VALID_PROMPTS = ["hello there", "Classify: a great movie", "Why is the sky blue?", "x", "Tell me a joke.",
                 "What is 2+2?", "Name a colour.", "Say something short."]


def valid_body(model: str, i: int, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": VALID_PROMPTS[i % len(VALID_PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0}


def is_openai_error(r) -> bool:
    try:
        err = r.json()["error"]
        return set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    except Exception:
        return False


def rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model spec to serve (default: the embedded smollm2-135m)")
    ap.add_argument("--requests", type=int, default=2000, help="malformed requests, one after another")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients in phase 2 (0: no phase 2)")
    ap.add_argument("--per-client", type=int, default=8, help="requests per concurrent client (half valid)")
    ap.add_argument("--max-tokens", type=int, default=12, help="max_tokens of the valid requests")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import httpx

    body_limit, limit = 1 << 20, 1024  # the server's defaults
    tmp = Path(tempfile.mkdtemp(prefix="serve-barrage-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "server.log"
    logf = open(log_path, "w")
    cmd = [sys.executable, "-m", "lmladder.cli", "serve", a.model, "--host", "127.0.0.1", "--port", str(port),
           "--api-key", KEY, "--log-level", "info"]
    print("server:", " ".join(cmd[1:]), flush=True)
    srv = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
    auth = {"Authorization": f"Bearer {KEY}"}
    res: dict = {}
    try:
        t0 = time.perf_counter()
        while True:
            if srv.poll() is not None:
                sys.exit(f"server exited early (rc {srv.returncode}); log: {log_path}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 300:
                sys.exit("server did not come up in 300 s")
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()["data"][0]["id"]
        print(f"server up in {time.perf_counter() - t0:.1f}s, model {model}; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)

        def ask(c, i):
            r = c.post(CHAT, json=valid_body(model, i, a.max_tokens), headers=auth)
            if r.status_code != 200:
                return ("HTTP", r.status_code)
            ch = r.json()["choices"][0]
            return ch["message"]["content"], ch["finish_reason"]

        with httpx.Client(base_url=url, timeout=300) as c:
            ref = [ask(c, i) for i in range(len(VALID_PROMPTS))]
        res["rss_before"] = rss_mb(srv.pid)
        res["load_start"] = os.getloadavg()[0]

        rng = random.Random(a.seed)
        statuses: collections.Counter = collections.Counter()
        by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        bad_shape = 0
        t1 = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as c:
            for kind, method, path, headers, body, with_key in hostile_cases(
                    rng, a.requests, model=model, max_tokens_limit=limit, body_limit=body_limit):
                r = c.request(method, path, content=body, headers={**headers, **(auth if with_key else {})})
                statuses[r.status_code] += 1
                by_kind[kind][r.status_code] += 1
                bad_shape += not is_openai_error(r)
        res["phase1_s"] = time.perf_counter() - t1
        res["load_phase1"] = os.getloadavg()[0]

        # phase 2: concurrent clients, valid and malformed interleaved
        conc_status: collections.Counter = collections.Counter()
        mismatches, conc_bad_shape, lock = [], [0], threading.Lock()
        barrier = threading.Barrier(max(1, a.clients))

        def client(k):
            crng = random.Random(a.seed * 1000 + k)
            cases = hostile_cases(crng, a.per_client, model=model, max_tokens_limit=limit, body_limit=body_limit)
            with httpx.Client(base_url=url, timeout=600) as c:
                barrier.wait(timeout=60)
                for j in range(a.per_client):
                    if j % 2 == (k % 2):
                        i = (k + j) % len(VALID_PROMPTS)
                        got = ask(c, i)
                        with lock:
                            conc_status[200 if got[0] != "HTTP" else got[1]] += 1
                            if got != ref[i]:
                                mismatches.append((i, got, ref[i]))
                    else:
                        _, method, path, headers, body, with_key = cases[j]
                        r = c.request(method, path, content=body, headers={**headers, **(auth if with_key else {})})
                        with lock:
                            conc_status[r.status_code] += 1
                            conc_bad_shape[0] += not is_openai_error(r)

        t2 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(900)
        res["phase2_s"] = time.perf_counter() - t2
        res["load_phase2"] = os.getloadavg()[0]
        res["rss_after"] = rss_mb(srv.pid)
        with httpx.Client(base_url=url, timeout=300) as c:
            after = [ask(c, i) for i in range(len(VALID_PROMPTS))]
            health = c.get("/health").json()["status"]
            metrics = c.get("/metrics", headers=auth).text
    finally:
        srv.terminate()
        try:
            srv.wait(20)
        except subprocess.TimeoutExpired:
            srv.kill()
        logf.close()
    log_text = log_path.read_text(errors="replace")
    tracebacks = log_text.count("Traceback (most recent call last)")
    unhandled = log_text.count("unhandled error")
    m500 = sum(float(l.split()[-1]) for l in metrics.splitlines()
               if l.startswith("lmladder_requests_total") and 'status="5' in l)

    import torch

    print(f"\n{a.model}, CPU x{os.cpu_count()}, torch {torch.__version__}; seed {a.seed}; server log {log_path}")
    print(f"1-min load average: start {res['load_start']:.2f}, after phase 1 {res['load_phase1']:.2f}, "
          f"after phase 2 {res['load_phase2']:.2f}\n")
    n2 = sum(conc_status.values())
    fmt = lambda cnt: ", ".join(f"{k}: {v}" for k, v in sorted(cnt.items()))  # noqa: E731
    rows = [
        ("phase 1: malformed, sequential", f"{a.requests}", fmt(statuses),
         sum(v for k, v in statuses.items() if k >= 500), f"{bad_shape}", f"{res['phase1_s']:.1f}"),
        (f"phase 2: {a.clients} clients, valid + malformed", f"{n2}", fmt(conc_status),
         sum(v for k, v in conc_status.items() if k >= 500), f"{conc_bad_shape[0]}", f"{res['phase2_s']:.1f}"),
    ]
    print("| phase | requests | status codes | 5xx | non-OpenAI error bodies | wall s |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print("\n| check | result |")
    print("|---|---|")
    print(f"| valid answers in phase 2 equal to their solo answers | "
          f"{conc_status.get(200, 0) - len(mismatches)} / {conc_status.get(200, 0)} |")
    print(f"| greedy answers after the barrage equal to before | {sum(x == y for x, y in zip(after, ref))} / "
          f"{len(ref)} |")
    print(f"| 5xx in /metrics (lmladder_requests_total) | {m500:g} |")
    print(f"| tracebacks / 'unhandled error' lines in the server log | {tracebacks} / {unhandled} |")
    print(f"| server RSS before / after the barrage | {res['rss_before']:.0f} MB / {res['rss_after']:.0f} MB |")
    print(f"| /health after | {health} |")
    print("\nper kind (phase 1):")
    for kind in sorted(by_kind):
        print(f"  {kind:20s} {fmt(by_kind[kind])}")
    ok = (not any(k >= 500 for k in statuses) and not any(k >= 500 for k in conc_status) and not bad_shape
          and not conc_bad_shape[0] and not mismatches and after == ref and tracebacks == 0 and unhandled == 0
          and not any(200 <= k < 300 for k in statuses))
    print("\nRESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
