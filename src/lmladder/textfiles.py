"""Reading users' text files defensively (data files and YAML configs).

* Only regular files: a device (``/dev/zero``), a named pipe or a socket is refused before
  it is opened (reading one never ends, or blocks).
* UTF-8 only, said plainly: a UTF-8 byte-order mark is skipped; UTF-16 / UTF-32 (a BOM or
  the NUL-byte pattern) and bytes that are not UTF-8 (with a Latin-1 / cp1252 guess) are a
  one-line error naming the file, the line and how to convert it (``iconv``).
* Bounded lines: a line is read with a bounded ``readline``; one longer than the cap is an
  error naming file:line and the setting that raises the cap (never read whole).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

from lmladder.errors import LadderError

DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024

_NOT_REGULAR = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular(path: str | Path, what: str) -> os.stat_result:
    """``os.stat`` of an existing path that must be a regular file (or a folder: callers say
    what a folder means to them); a device, FIFO or socket is a LadderError."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise LadderError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return st
    kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "not a regular file")
    link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    raise LadderError(f"{path}: the {what} is {kind}{link}, not a regular file; give a file")


def open_binary(path: str | Path):
    """``open(path, "rb")``, an OSError (permission denied, ...) being a one-line LadderError."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise LadderError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------------------- encodings

_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32-BE"),
    (b"\xff\xfe\x00\x00", "UTF-32-LE"),
    (b"\xfe\xff", "UTF-16-BE"),
    (b"\xff\xfe", "UTF-16-LE"),
)
UTF8_BOM = b"\xef\xbb\xbf"


def _converted_name(path: Path) -> str:
    return str(path.with_name(f"{path.stem}.utf8{path.suffix}"))


def sniff(head: bytes, path: str | Path) -> int:
    """Look at a file's first bytes: return how many to skip (3 for a UTF-8 BOM, else 0);
    UTF-16 / UTF-32 text (by its BOM or by the NUL bytes between ASCII characters) is an
    error naming the encoding and the iconv command that converts it."""
    if head.startswith(UTF8_BOM):
        return len(UTF8_BOM)
    enc = how = None
    for bom, name in _BOMS:
        if head.startswith(bom):
            enc, how = name, "byte-order mark"
            break
    else:
        b = head[:4]
        if len(b) == 4:
            nul = [x == 0 for x in b]
            if nul == [False, True, True, True]:
                enc = "UTF-32-LE"
            elif nul == [True, True, True, False]:
                enc = "UTF-32-BE"
            elif nul == [False, True, False, True]:
                enc = "UTF-16-LE"
            elif nul == [True, False, True, False]:
                enc = "UTF-16-BE"
            how = "NUL bytes between the characters"
    if enc is None:
        return 0
    p = Path(path)
    family = enc[:6]  # UTF-16 / UTF-32: iconv reads the BOM (or assumes big-endian without one)
    src = family if how == "byte-order mark" else enc
    raise LadderError(
        f"{p}: the file is {enc} text ({how}), not UTF-8; convert it with: "
        f"iconv -f {src} -t UTF-8 {p} > {_converted_name(p)}"
    )


# Characters Latin-1 / cp1252 text is made of, beyond ASCII: letters and the usual punctuation.
_LATIN_PUNCT = set("\u00a0¡¢£¤¥¦§¨©ª«¬®¯°±²³´µ¶·¸¹º»¼½¾¿×÷€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ")


def _looks_latin1(raw: bytes) -> bool:
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d: not cp1252 text
        return False
    high = [c for c in text if ord(c) >= 0x80]
    return bool(high) and all(c.isalpha() or c in _LATIN_PUNCT for c in high)


def not_utf8(raw: bytes, err: UnicodeDecodeError, path: str | Path, lineno: int) -> LadderError:
    """The one-line error for bytes that are not UTF-8: ``raw`` holds the line (a line, or a
    whole text whose line number ``lineno`` the caller worked out), ``err`` the decode error."""
    bad = raw[err.start]
    line_start = raw.rfind(b"\n", 0, err.start) + 1
    col = len(raw[line_start:err.start].decode("utf-8", "replace")) + 1
    line_end = raw.find(b"\n", err.start)
    line = raw[line_start: line_end if line_end >= 0 else len(raw)]
    p = Path(path)
    where_ = f"byte 0x{bad:02x} at line {lineno}, column {col}"
    if _looks_latin1(line):
        hint = f"looks like Latin-1/cp1252 — convert with: iconv -f CP1252 -t UTF-8 {p} > {_converted_name(p)}"
    else:
        hint = "the file may be binary or in another encoding; convert it to UTF-8"
    return LadderError(f"{p}:{lineno}: not UTF-8 ({where_}); {hint}")


def decode_text(raw: bytes, path: str | Path) -> str:
    """A whole (small) file's bytes as text: BOM and encoding checked as :func:`sniff`."""
    raw = raw[sniff(raw[:4], path):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise not_utf8(raw, e, path, lineno) from None


# ---------------------------------------------------------------------------- lines


def iter_lines(path: str | Path, max_line_bytes: int, setting: str = "data.max_line_bytes") -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line with its newline) of a UTF-8 text file, one bounded
    line at a time. The caller has checked that ``path`` is a regular file."""
    with open_binary(path) as f:
        f.seek(sniff(f.read(4), path))
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_line_bytes and not (len(raw) == max_line_bytes + 1 and raw.endswith(b"\n")):
                raise LadderError(
                    f"{path}:{lineno}: the line is longer than {setting}={max_line_bytes} "
                    f"({human_bytes(max_line_bytes)}); if it is meant to be, raise the cap, e.g. "
                    f"--set {setting}={max_line_bytes * 8}"
                )
            if b"\x00" in raw:
                raise LadderError(
                    f"{path}:{lineno}: the line contains NUL bytes: a binary file (or UTF-16/32 text), not UTF-8 text"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(raw, e, path, lineno) from None
            yield lineno, text
