"""Hostile input against the CLI: every case a tester tried, run as a user would (a fresh
``lmladder`` process each), classified as

  clean     exit 2 and exactly one line ``lmladder: error: ...`` on stderr, no traceback
  ok        a case that should succeed (a UTF-8 BOM, a too-long input cut by default) did
  traceback a Python traceback or exit 1
  runaway   the process went over --rss-mb (killed) or past --timeout seconds
  exit 0    a bad input the run accepted silently
  other     any other outcome

    python bench/hostile_cli.py                       # this checkout
    python bench/hostile_cli.py --src /tmp/old/src    # another checkout's source (before/after)

It prints one row per case and the totals. Nothing it writes outlives it (a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_case(argv: list[str], env: dict, cwd: Path, rss_limit: float, timeout: float) -> dict:
    t0 = time.time()
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors="replace")
    peak, killed = 0.0, None
    while p.poll() is None:
        peak = max(peak, rss_mb(p.pid))
        if peak > rss_limit:
            killed = "rss"
        elif time.time() - t0 > timeout:
            killed = "time"
        if killed:
            p.kill()
            break
        time.sleep(0.05)
    out, err = p.communicate()
    return {"code": p.returncode, "stderr": err, "peak_mb": round(peak), "seconds": round(time.time() - t0, 1),
            "killed": killed}


def classify(r: dict, expect_ok: bool) -> str:
    if r["killed"]:
        return "runaway"
    err = r["stderr"]
    if "Traceback (most recent call last)" in err or r["code"] == 1:
        return "traceback"
    if expect_ok:
        return "ok" if r["code"] == 0 else "other"
    if r["code"] == 0:
        return "exit 0"
    errs = [l for l in err.splitlines() if l.startswith("lmladder: error:")]
    if r["code"] == 2 and len(errs) == 1:
        return "clean"
    return "other"


def jl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_cases(d: Path) -> list[tuple[str, list[str], bool]]:
    """(name, lmladder arguments, expected to succeed)."""
    rows = [{"text": f"{w} movie number {i}", "label": lab} for i in range(12) for w, lab in
            (("great", "positive"), ("awful", "negative"))]
    test = [{"text": f"{w} film {i}", "label": lab} for i in range(4) for w, lab in
            (("lovely", "positive"), ("boring", "negative"))]
    train = jl(d / "train.jsonl", rows)
    good_test = jl(d / "test.jsonl", test)
    out = str(d / "out")
    base = ["run", "--rungs", "zero-shot", "--set", "eval.bootstrap=100", "--out", out]

    def with_train(p, *extra):
        return base + ["--train", str(p), "--test", str(good_test), *extra]

    def with_test(p, *extra):
        return base + ["--train", str(train), "--test", str(p), *extra]

    text = "".join(json.dumps(r) + "\n" for r in rows)
    cases: list[tuple[str, list[str], bool]] = []
    os.symlink("/dev/zero", d / "zero.jsonl")
    cases.append(("train is a symlink to /dev/zero", with_train(d / "zero.jsonl"), False))
    os.mkfifo(d / "fifo.jsonl")
    cases.append(("train is a FIFO", with_train(d / "fifo.jsonl"), False))
    bomb = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n"
    for i, (x, y) in enumerate(zip("bcdefghi", "abcdefgh")):
        bomb += f"{x}: &{x} [*{y},*{y},*{y},*{y},*{y},*{y},*{y},*{y},*{y}]\n"
    (d / "bomb.yaml").write_text(bomb + "task: {kind: classification}\n")
    cases.append(("YAML alias bomb config", ["run", str(d / "bomb.yaml"), "--train", str(train), "--out", out], False))
    with open(d / "long_line.jsonl", "w") as f:
        f.write(json.dumps(test[0]) + "\n")
        f.write('{"text": "' + "x" * (50 << 20) + '", "label": "positive"}\n')
    cases.append(("test file with one 50 MB line", with_test(d / "long_line.jsonl"), False))
    (d / "utf16.jsonl").write_text(text, encoding="utf-16")
    cases.append(("UTF-16 JSONL", with_train(d / "utf16.jsonl"), False))
    (d / "latin1.jsonl").write_bytes(text.replace("great", "gr\u00e9at").encode("latin-1"))
    cases.append(("Latin-1 JSONL", with_train(d / "latin1.jsonl"), False))
    (d / "badutf8.jsonl").write_bytes(text.encode() + b'{"text": "\xff\xfe bad", "label": "positive"}\n')
    cases.append(("invalid UTF-8 JSONL", with_train(d / "badutf8.jsonl"), False))
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    cases.append(("UTF-8 BOM JSONL (read it)", with_train(d / "bom.jsonl"), True))
    cfg_text = f"data:\n  train: {train}\n  test: {good_test}\ntask:\n  instruction: Classifi\u00e9 the review.\n"
    (d / "utf16.yaml").write_text(cfg_text, encoding="utf-16")
    cases.append(("UTF-16 YAML config", ["run", str(d / "utf16.yaml"), "--out", out], False))
    (d / "latin1.yaml").write_bytes(cfg_text.encode("latin-1"))
    cases.append(("Latin-1 YAML config", ["run", str(d / "latin1.yaml"), "--out", out], False))
    (d / "nested.jsonl").write_text(text + '{"text": ' + "[" * 100000 + "]" * 100000 + ', "label": "positive"}\n')
    cases.append(("deeply nested JSON line", with_train(d / "nested.jsonl"), False))
    (d / "surrogate.jsonl").write_text(json.dumps(test[0]) + "\n" + '{"text": "bad \\ud800 text", "label": "negative"}\n')
    cases.append(("lone surrogate in test data", with_test(d / "surrogate.jsonl"), False))
    (d / "list.yaml").write_text("data: [1, 2]\n")
    cases.append(("data: [1, 2] in YAML with flags",
                  ["run", str(d / "list.yaml"), "--train", str(train), "--out", out], False))
    (d / "notmap.yaml").write_text("- just\n- a list\n")
    cases.append(("YAML that is a list", ["run", str(d / "notmap.yaml"), "--train", str(train), "--out", out], False))
    (d / "syntax.yaml").write_text("task: {kind: classification\n")
    cases.append(("YAML syntax error", ["run", str(d / "syntax.yaml"), "--train", str(train), "--out", out], False))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import datetime

        pq.write_table(pa.table({"text": [r["text"] for r in rows], "label": [r["label"].encode() for r in rows]}),
                       d / "bytes.parquet")
        cases.append(("Parquet with bytes labels", with_train(d / "bytes.parquet"), False))
        pq.write_table(pa.table({"text": [r["text"] for r in rows],
                                 "label": [datetime.datetime(2020, 1, 1 + i % 2) for i in range(len(rows))]}),
                       d / "ts.parquet")
        cases.append(("Parquet with timestamp labels", with_train(d / "ts.parquet"), False))
    except ImportError:
        pass
    (d / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(4096) + b"PAR1")
    cases.append(("corrupt Parquet", with_train(d / "corrupt.parquet"), False))
    csv_rows = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    (d / "extra.csv").write_text(csv_rows + "oops,positive,extra column\n")
    cases.append(("CSV row with an extra column", with_train(d / "extra.csv"), False))
    (d / "missing.csv").write_text(csv_rows + "only text\n")
    cases.append(("CSV row with a missing column", with_train(d / "missing.csv"), False))
    (d / "quote.csv").write_text(csv_rows + '"unterminated,positive\n' + csv_rows.split("\n", 1)[1])
    cases.append(("CSV with an unterminated quote", with_train(d / "quote.csv"), False))
    (d / "empty.jsonl").write_text("")
    cases.append(("empty train file", with_train(d / "empty.jsonl"), False))
    cases.append(("missing train file", with_train(d / "nope.jsonl"), False))
    cases.append(("train is a folder", with_train(d), False))
    (d / "garbage.jsonl").write_bytes(os.urandom(20000))
    cases.append(("random bytes as JSONL", with_train(d / "garbage.jsonl"), False))
    (d / "array.jsonl").write_text("[1, 2, 3]\n")
    cases.append(("JSON array rows", with_train(d / "array.jsonl"), False))
    jl(d / "nolabel.jsonl", rows[:3] + [{"text": "no label"}])
    cases.append(("row without a label", with_train(d / "nolabel.jsonl"), False))
    jl(d / "listlabel.jsonl", rows[:3] + [{"text": "x", "label": ["a", "b"]}])
    cases.append(("list as a classification label", with_train(d / "listlabel.jsonl"), False))
    jl(d / "longin.jsonl", test[:1] + [{"text": "word " * 12500, "label": "positive"}])
    cases.append(("12.5k-token test input, truncation: error",
                  with_test(d / "longin.jsonl", "--set", "data.truncation=error"), False))
    cases.append(("12.5k-token test input, default (cut, counted)", with_test(d / "longin.jsonl"), True))
    f = d / "afile"
    f.write_text("x")
    cases.append(("--out is a file", base[:-1] + [str(f), "--train", str(train)], False))
    cases.append(("--out under a file", base[:-1] + [str(f / "run"), "--train", str(train)], False))
    ro = Path("/sys") if os.geteuid() == 0 else d / "ro"
    if ro != Path("/sys"):
        ro.mkdir()
        ro.chmod(0o555)
    cases.append(("--out in a read-only folder", base[:-1] + [str(ro / "run"), "--train", str(train)], False))
    pick = d / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    (pick / "pytorch_model.bin").write_bytes(b"not really a pickle")
    cases.append(("pickle-only model folder", with_train(train, "--model", str(pick), "--out", str(d / "pk")), False))
    cases.append(("unknown --set key", with_train(train, "--set", "zero-shot.nope=1"), False))
    cases.append(("--target without a value", with_train(train, "--target", "accuracy"), False))
    cases.append(("--limit-test 0", with_train(train, "--limit-test", "0"), False))
    cases.append(("unknown rung", base[:2] + ["zero-shoot"] + base[3:] + ["--train", str(train)], False))
    cases.append(("unknown task kind", with_train(train, "--task", "regression"), False))
    cases.append(("hf: dataset offline", with_train("hf:nobody/no-such-dataset"), False))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", help="source folder of the lmladder to test (default: this checkout's src)")
    ap.add_argument("--rss-mb", type=float, default=3000, help="kill a case above this RSS (MB)")
    ap.add_argument("--timeout", type=float, default=240, help="kill a case after this many seconds")
    ap.add_argument("--only", help="run the cases whose name contains this text")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    src = Path(a.src).resolve() if a.src else ROOT / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    d = Path(tempfile.mkdtemp(prefix="lmladder-hostile-"))
    try:
        cases = build_cases(d)
        rows, totals = [], {}
        print(f"{'case':<50} {'outcome':<10} {'exit':>4} {'peak MB':>8} {'s':>6}  first stderr line")
        for name, args, ok in cases:
            if a.only and a.only not in name:
                continue
            shutil.rmtree(d / "out", ignore_errors=True)
            r = run_case([sys.executable, "-m", "lmladder.cli", *args], env, d, a.rss_mb, a.timeout)
            kind = classify(r, ok)
            totals[kind] = totals.get(kind, 0) + 1
            first = next((l for l in r["stderr"].splitlines() if l.startswith(("lmladder: error", "Traceback"))), "")
            if kind == "traceback":
                first = (r["stderr"].strip().splitlines() or [""])[-1]
            print(f"{name:<50} {kind:<10} {str(r['code']):>4} {r['peak_mb']:>8} {r['seconds']:>6}  {first[:110]}",
                  flush=True)
            rows.append({"case": name, "outcome": kind, **{k: r[k] for k in ("code", "peak_mb", "seconds")},
                         "line": first})
        print("\ntotals:", ", ".join(f"{k} {v}" for k, v in sorted(totals.items())), f"(of {len(rows)} cases)")
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
