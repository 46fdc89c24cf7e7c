"""Hostile data and config files (hardening issue, data layer): each case was a traceback, a
runaway (GBs of memory) or a wrong exit 0; now every one is exactly one stderr line
``lmladder: error: FILE[:LINE]: ...`` and exit 2, before anything is written.

The runaway cases (a device as the train file, a YAML alias bomb, a 50 MB line, a FIFO) run
the CLI in a subprocess under an RSS watchdog that kills it above 1.5 GB: they must exit 2
quickly instead.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl

PREFIX = "lmladder: error: "
RSS_LIMIT = 1.5e9


def _csv(rows, fields=("text", "label")) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _jl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


LATIN = [dict(r) for r in TEST_ROWS]
LATIN[2]["text"] = "café crème brûlée"

BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


# --------------------------------------------------------------------------- the cases
#
# Each builder gets the case folder, a valid train and test file, and returns
# (CLI args after "run", the file the message must name, more text it must contain).


def _as_test(name, content, *needles, train_too=False):
    """A test file with this content (str: UTF-8 text; bytes: as is)."""
    def build(d, train, test):
        f = d / name
        f.write_bytes(content.encode() if isinstance(content, str) else content)
        args = ["--train", str(f if train_too else train), "--test", str(test if train_too else f)]
        return args, f, needles
    return build


def _config(name, content, *needles, flags=True):
    def build(d, train, test):
        f = d / name
        f.write_bytes(content.encode() if isinstance(content, str) else content)
        return [str(f)] + (["--train", str(train), "--test", str(test)] if flags else []), f, needles
    return build


def _parquet(name, table=None, raw=None, *needles):
    def build(d, train, test):
        f = d / name
        if table is not None:
            pq.write_table(table(), f)
        else:
            f.write_bytes(raw())
        return ["--train", str(train), "--test", str(f)], f, needles
    return build


def _good_parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(TEST_ROWS), buf)
    raw = buf.getvalue()
    return raw[: len(raw) // 2] + b"\x00" * 50 + raw[-8:]  # footer kept, body cut


def _csv_lines(rows, edit):
    lines = _csv(rows).splitlines()
    edit(lines)
    return "\n".join(lines) + "\n"


def _set(lines, i, value):
    lines[i] = value


def _socket_case(d, train, test):
    f = d / "s.jsonl"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(f))
    _SOCKETS.append(s)  # closed after the case
    return ["--train", str(train), "--test", str(f)], f, ("socket", "not a regular file")


_SOCKETS: list = []

CASES = {
    # 1. non-regular files (the device and FIFO cases run in a subprocess below)
    "socket as test file": _socket_case,
    # 4. encodings
    "utf-16 jsonl (BOM)": _as_test("u16.jsonl", _jl(TEST_ROWS).encode("utf-16"), "UTF-16-LE", "iconv -f UTF-16 -t UTF-8"),
    "utf-16-be jsonl (no BOM)": _as_test("u16be.jsonl", _jl(TEST_ROWS).encode("utf-16-be"), "UTF-16-BE", "NUL bytes"),
    "utf-32 jsonl": _as_test("u32.jsonl", _jl(TEST_ROWS).encode("utf-32"), "UTF-32-LE", "iconv -f UTF-32"),
    "latin-1 jsonl": _as_test("lat1.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in LATIN).encode("latin-1"),
                              ":3: not UTF-8 (byte 0xe9 at line 3, column 14); looks like Latin-1/cp1252",
                              "iconv -f CP1252 -t UTF-8"),
    "invalid utf-8 jsonl": _as_test("bad8.jsonl", _jl(TEST_ROWS[:3]).encode() + b'{"text": "\x81\x8d\x90", "label": "pos"}\n',
                                    ":4: not UTF-8 (byte 0x81 at line 4, column 11)", "binary or in another encoding"),
    "NUL bytes in a line": _as_test("nul.jsonl", _jl(TEST_ROWS[:1]).encode() + b'{"text": "a\x00b", "label": "pos"}\n',
                                    ":2:", "NUL bytes"),
    "utf-16 yaml": _config("u16.yaml", "task:\n  kind: classification\n".encode("utf-16"), "UTF-16-LE", "iconv"),
    "latin-1 yaml": _config("lat1.yaml", "task:\n  instruction: Classify the café review\n".encode("latin-1"),
                            ":2: not UTF-8 (byte 0xe9 at line 2, column 32); looks like Latin-1/cp1252"),
    "utf-16 csv": _as_test("u16.csv", _csv(TEST_ROWS).encode("utf-16"), "UTF-16-LE"),
    "latin-1 csv": _as_test("lat1.csv", _csv(LATIN).encode("latin-1"), ":4: not UTF-8 (byte 0xe9", "Latin-1/cp1252"),
    # 2. YAML aliases (the bomb runs in a subprocess below)
    "yaml recursive alias": _config("rec.yaml", "task: &t\n  kind: classification\n  x: *t\n", "refers to its own anchor"),
    "yaml nested too deeply": _config("deep.yaml", "task: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    # 3. long lines, with the cap set low (the 50 MB line runs in a subprocess below)
    "long jsonl line": _as_test("long.jsonl", _jl(TEST_ROWS[:2]) + json.dumps({"text": "x" * 5000, "label": "pos"}) + "\n",
                                ":3: the line is longer than data.max_line_bytes=2048", "--set data.max_line_bytes="),
    "long csv field (unclosed quote)": _as_test("longq.csv", 'text,label\n"' + "x\n" * 2000 + '",pos\n',
                                                ":2: a field of the row starting at line 2 is longer than data.max_line_bytes=2048"),
    # 5. deep JSON
    "deeply nested json": _as_test("deep.jsonl", _jl(TEST_ROWS[:2]) + '{"text": ' + "[" * 100000 + "]" * 100000
                                   + ', "label": "pos"}\n', ":3: invalid JSON (nested too deeply"),
    "json nested over the limit": _as_test("deep2.jsonl", _jl(TEST_ROWS[:1]) + '{"text": "a", "label": "pos", "meta": '
                                           + "[" * 300 + "]" * 300 + "}\n", ":2: field 'meta' is nested over 100 levels deep"),
    # 6. Parquet
    "parquet bytes label": _parquet("bytes.parquet", lambda: pa.table(
        {"text": [r["text"] for r in TEST_ROWS], "label": [r["label"].encode() for r in TEST_ROWS]}), None,
        ":1: field 'label' holds binary data (column type binary, Python bytes)"),
    "parquet timestamp label": _parquet("ts.parquet", lambda: pa.table(
        {"text": [r["text"] for r in TEST_ROWS], "label": [datetime.datetime(2020, 1, 1 + i % 2) for i in range(len(TEST_ROWS))]}),
        None, ":1: field 'label' holds a timestamp (column type timestamp[us], Python datetime)"),
    "corrupt parquet": _parquet("corrupt.parquet", None, _good_parquet_bytes, ": not a readable Parquet file"),
    "text file named .parquet": _parquet("text.parquet", None, lambda: _jl(TEST_ROWS).encode(), ": not a readable Parquet file"),
    # 7. a section that is not a mapping, with flags that write into it
    "data: [1, 2] with --train": _config("datalist.yaml", "task:\n  kind: classification\ndata: [1, 2]\n",
                                        ":3: data: must be a mapping of keys (train, test, input_field", "got a list"),
    "task: 5 with --task": _config("task5.yaml", "model: x\ntask: 5\n", ":2: task: must be a mapping", "got int 5"),
    # 8. lone surrogates
    "lone surrogate in a value": _as_test("surr.jsonl", _jl(TEST_ROWS[:1]) + '{"text": "bad \\ud800 here", "label": "pos"}\n',
                                          ":2: field 'text' contains a lone surrogate ('\\ud800' escape)"),
    "lone surrogate in a key": _as_test("surrk.jsonl", _jl(TEST_ROWS[:1]) + '{"text": "a", "label": "pos", "x\\udc00": 1}\n',
                                        ":2: a field name contains a lone surrogate"),
    # 9. malformed CSV
    "csv extra column": _as_test("extra.csv", _csv_lines(TEST_ROWS, lambda l: _set(l, 3, l[3] + ",extra")),
                                 ":4: the row has 3 fields, the header (line 1) has 2: text, label"),
    "csv unterminated quote (train: was a third label)": _as_test(
        "quote.csv", _csv_lines(TRAIN_ROWS, lambda l: _set(l, len(l) - 2, 'great movie number 11,"pos')),
        ":24: unterminated quoted field", "lines 24-25", train_too=True),
    "csv quote closed later": _as_test("quote2.csv", _csv_lines(TEST_ROWS, lambda l: (_set(l, 2, 'x,"neg'), _set(l, 5, 'y,"pos"z'))),
                                       ":6: bad CSV quoting", "the row starts at line 3"),
    "csv missing column": _as_test("short.csv", _csv_lines(TEST_ROWS, lambda l: _set(l, 3, "lovely film 1")),
                                   ":4: field 'label' missing: the row has 1 field, the header (line 1) has 2"),
    # messages stay one line whatever the data holds
    "newline in a field name": _as_test("nl.jsonl", _jl(TEST_ROWS[:1]) + json.dumps({"te\nxt": "a", "label": "pos"}) + "\n",
                                        ":2: field 'text' missing", "fields present: label, te\\nxt"),
    "newline in an unknown test label": _as_test("nll.jsonl", _jl(TEST_ROWS[:1]) + json.dumps({"text": "a", "label": "neg\nx"}) + "\n",
                                                 ":2: field 'label': label 'neg\\nx' is not in the train labels"),
    "lone surrogate in yaml": _config("surr.yaml", 'task:\n  instruction: "bad \\ud800"\n',
                                      ":2: a lone surrogate escape ('\\ud800') is not valid Unicode text"),
    "NUL character in yaml": _config("nul.yaml", "task:\n  instruction: a\x00b\n", ":2: invalid YAML (unacceptable character #x0000)"),
    "csv duplicate header": _as_test("dup.csv", "text,label,text\na,pos,b\n", ":1: the header names column 'text' twice"),
}
SMALL_CAP = {"long jsonl line", "long csv field (unclosed quote)"}
WITHOUT_FLAGS = {"data: [1, 2] with --train": ["--task", "classification"], "task: 5 with --task": ["--task", "qa"]}


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "case"
    d.mkdir()
    return d, write_jsonl(d / "train.jsonl", TRAIN_ROWS), write_jsonl(d / "test.jsonl", TEST_ROWS)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_line_exit_2(run_cli, files, case):
    d, train, test = files
    args, named, needles = CASES[case](d, train, test)
    out = d / "out"
    extra = ["--set", "data.max_line_bytes=2048"] if case in SMALL_CAP else []
    extra += WITHOUT_FLAGS.get(case, [])
    try:
        code, stdout, stderr = run_cli("run", *args, "--out", str(out), "--rungs", "zero-shot", *extra)
    finally:
        while _SOCKETS:
            _SOCKETS.pop().close()
    assert "Traceback" not in stderr + stdout
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    msg = lines[0]
    assert msg.startswith(f"{PREFIX}{named}:") or msg.startswith(f"{PREFIX}{named} "), msg
    for n in needles:
        assert n in msg, (n, msg)
    assert not out.exists()


# --------------------------------------------------------------------------- runaway cases


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_watched(args: list[str], cwd: Path, timeout: float = 90) -> tuple[int | None, str, float, int, str]:
    """(exit code or None when killed, stderr, seconds, peak RSS, why killed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    err_path = cwd / "stderr.txt"
    t0 = time.monotonic()
    with open(err_path, "wb") as err, open(os.devnull, "wb") as null:
        p = subprocess.Popen([sys.executable, "-m", "lmladder", *args], stdout=null, stderr=err, cwd=cwd, env=env)
        peak, why = 0, ""
        while p.poll() is None:
            peak = max(peak, _rss(p.pid))
            if peak > RSS_LIMIT:
                why = f"RSS {peak / 1e9:.1f} GB"
            elif time.monotonic() - t0 > timeout:
                why = f"still running after {timeout:.0f} s"
            if why:
                p.kill()
                p.wait()
                break
            time.sleep(0.02)
    return (None if why else p.returncode), err_path.read_text(errors="replace"), time.monotonic() - t0, peak, why


def _fifo(d: Path) -> Path:
    f = d / "fifo.jsonl"
    os.mkfifo(f)
    return f


def _zero_link(d: Path, name: str) -> Path:
    f = d / name
    f.symlink_to("/dev/zero")
    return f


def _fifty_mb_line(d: Path) -> Path:
    f = d / "long.jsonl"
    with open(f, "w") as fh:
        fh.write(json.dumps({"text": "x" * 50_000_000, "label": "pos"}) + "\n")
    return f


RUNAWAY = {
    "train file is a symlink to /dev/zero": (lambda d, tr, te: (["--train", str(_zero_link(d, "zero.jsonl")), "--test", str(te)],
                                                                 "zero.jsonl", ("character device", "/dev/zero"))),
    "test file is a FIFO": (lambda d, tr, te: (["--train", str(tr), "--test", str(_fifo(d))], "fifo.jsonl", ("named pipe",))),
    "config is a symlink to /dev/zero": (lambda d, tr, te: ([str(_zero_link(d, "cfg.yaml"))], "cfg.yaml", ("character device",))),
    "yaml alias bomb": (lambda d, tr, te: ([str(_write(d / "bomb.yaml", BOMB)), "--train", str(tr)], "bomb.yaml",
                                           (":6: YAML aliases (*name) expand to over 100,000 values",))),
    "test file with one 50 MB line": (lambda d, tr, te: (["--train", str(tr), "--test", str(_fifty_mb_line(d))], "long.jsonl",
                                                         (":1: the line is longer than data.max_line_bytes=8388608",))),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS watchdog reads /proc")
@pytest.mark.parametrize("case", list(RUNAWAY))
def test_runaway_inputs_exit_2_quickly_in_bounded_memory(files, case):
    d, train, test = files
    args, name, needles = RUNAWAY[case](d, train, test)
    out = d / "out"
    code, err, secs, peak, why = _run_watched(["run", *args, "--out", str(out), "--rungs", "zero-shot"], d)
    assert not why, f"killed: {why}"
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PREFIX}{d / name}"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert secs < 60 and peak < 1e9, (secs, peak)
    assert not out.exists()


# --------------------------------------------------------------------------- now read correctly


def test_utf8_bom_is_read(tmp_path):
    """A UTF-8 byte-order mark (Excel, Notepad) is skipped, in JSONL, CSV and YAML alike."""
    from lmladder import config as C
    from lmladder.config import DataConfig
    from lmladder.data import read_examples

    plain = [(r["text"], r["label"]) for r in TEST_ROWS]
    j = tmp_path / "bom.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + _jl(TEST_ROWS).encode())
    c = tmp_path / "bom.csv"
    c.write_bytes(b"\xef\xbb\xbf" + _csv(TEST_ROWS).encode())
    for f in (j, c):
        assert [(e.input, e.label) for e in read_examples(f, DataConfig(), "test")] == plain
    y = tmp_path / "bom.yaml"
    y.write_bytes(b"\xef\xbb\xbf" + "task:\n  instruction: Sentiment?\n".encode())
    assert C.build(C.read_yaml(y)).task.instruction == "Sentiment?"


def test_empty_section_with_flags_is_an_empty_mapping(tmp_path, files):
    from lmladder import config as C

    _, train, _ = files
    y = tmp_path / "c.yaml"
    y.write_text("data:\ntask:\n")
    raw = C.read_yaml(y)
    raw["data"]["train"] = str(train)
    assert C.build(raw).data.train == str(train)


def test_csv_quoted_multiline_field_and_tsv_still_read(tmp_path):
    from lmladder.config import DataConfig
    from lmladder.data import read_examples

    f = tmp_path / "ok.csv"
    f.write_text('text,label\n"two\nlines, and ""quotes""",pos\nplain,neg\n')
    got = [(e.input, e.label, e.source.rsplit(":", 1)[1]) for e in read_examples(f, DataConfig(), "train")]
    assert got == [('two\nlines, and "quotes"', "pos", "3"), ("plain", "neg", "4")]
    t = tmp_path / "ok.tsv"
    t.write_text("text\tlabel\na, b\tpos\n")
    assert [(e.input, e.label) for e in read_examples(t, DataConfig(), "train")] == [("a, b", "pos")]


def test_parquet_is_read_batch_by_batch(tmp_path, monkeypatch):
    """No whole-table to_pylist: rows come from record batches (bounded memory)."""
    from lmladder.config import DataConfig
    from lmladder.data import read_examples

    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(3000)]
    f = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=500)

    def no_whole_table(*a, **k):
        raise AssertionError("read the whole table")

    sizes = []
    iter_batches = pq.ParquetFile.iter_batches

    def batches(self, *a, **k):
        for b in iter_batches(self, *a, **k):
            sizes.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq, "read_table", no_whole_table)
    monkeypatch.setattr(pq.ParquetFile, "read", no_whole_table)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", batches)
    exs = read_examples(f, DataConfig(), "train")
    assert len(exs) == 3000 and exs[2999].source == f"{f}:3000" and exs[2999].input == "t2999"
    assert len(sizes) >= 3 and max(sizes) <= 1024 and sum(sizes) == 3000


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_files_are_one_line(run_cli, files):
    d, train, test = files
    for f in (test, d / "c.yaml"):
        f.write_text("task: {}\n") if f.suffix == ".yaml" else None
        f.chmod(0)
    code, _, err = run_cli("run", str(d / "c.yaml"), "--out", str(d / "out"))
    assert code == 2 and err == f"{PREFIX}{d / 'c.yaml'}: cannot read it (Permission denied)\n"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(test), "--out", str(d / "out"))
    assert code == 2 and err == f"{PREFIX}{test}: cannot read it (Permission denied)\n"
