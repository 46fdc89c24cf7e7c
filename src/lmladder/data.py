"""Readers (JSONL, CSV, Parquet, saved / hub Hugging Face datasets), field mapping (per-kind
default names, data.input_template), validation and seeded splits.

Every problem is a :class:`LadderError` naming ``file:line: field 'name'`` so a user
can open the file at the right place. Nothing is dropped silently: limits and
splits are recorded in :class:`Dataset.info` and shown in the report. Hostile files are
refused before they cost anything: devices / FIFOs, lines over data.max_line_bytes, text
that is not UTF-8 (named: UTF-16, Latin-1 ...), deep JSON, lone surrogates, ragged or
badly quoted CSV, Parquet columns that are not text / numbers (see :mod:`lmladder.textfiles`).

No leakage: a test input that is also a train input (casefolded, whitespace collapsed;
multiple-choice: with its choices) is an error unless ``data.allow_overlap``, and the
seeded split keeps duplicate inputs on one side.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lmladder.errors import LadderError, where
from lmladder.textfiles import DEFAULT_MAX_LINE_BYTES, check_regular, human_bytes, iter_lines

if TYPE_CHECKING:  # config.py imports the rungs, which read data: no import of config at run time
    from lmladder.config import DataConfig

log = logging.getLogger(__name__)


def parse_template(template: str) -> list[tuple[str, tuple[str, ...] | None]]:
    """``data.input_template`` as [(literal text, field path or None)]; ValueError for what is
    not a plain {field} / {dotted.path} placeholder."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    out: list[tuple[str, tuple[str, ...] | None]] = []
    for literal, name, spec, conv in parsed:
        if name is None:
            out.append((literal, None))
            continue
        shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if conv or spec:
            raise ValueError(f"placeholder {shown}: conversions and format specs are not supported; use {{{name}}}")
        if not name.strip():
            raise ValueError("empty placeholder {}: name a field, e.g. {question}")
        if "[" in name or "]" in name:
            raise ValueError(f"placeholder {shown}: use dots for nested fields and list items, e.g. {{answers.0}}")
        if name.isdigit():
            raise ValueError(f"placeholder {shown}: name a field, e.g. {{question}}, not a position")
        parts = tuple(name.split("."))
        if any(not p for p in parts):
            raise ValueError(f"placeholder {shown}: empty part in the dotted path")
        out.append((literal, parts))
    if not any(p for _, p in out):
        raise ValueError("the template has no {field} placeholder")
    return out


@dataclass
class Example:
    id: str
    input: str
    label: str  # the gold as text (lists / objects as JSON)
    source: str = ""  # "file:line", for error messages and predictions
    fields: dict[str, Any] = field(default_factory=dict)  # the whole row
    target: Any = None  # the gold as read (a list of answers, entities, a choice index...)
    choices: list[str] | None = None  # multiple-choice: this example's choices
    choice_labels: list[str] | None = None  # multiple-choice: the data's own labels of the choices
    instruction: str | None = None  # per-example instruction (data.instruction_field)
    group: str | None = None  # e.g. the source task (data.group_field)

    def __post_init__(self):
        if self.target is None:
            self.target = self.label


@dataclass
class Dataset:
    train: list[Example]
    test: list[Example]
    info: dict[str, Any]


# ---------------------------------------------------------------------------- sources
#
# A data spec (data.train / data.test) names a file (JSONL, CSV / TSV, Parquet), a folder
# written by datasets' save_to_disk (FOLDER@SPLIT for a DatasetDict's split) or a Hugging
# Face dataset (hf:NAME[:CONFIG][@SPLIT]). Each is read as (line, row) pairs that go through
# the same validation: the line is the 1-based file line (CSV: the line where the row ends)
# or, for Parquet and datasets, the 1-based row index.

MAX_JSON_DEPTH = 100  # nesting of one JSONL row (json would hit Python's recursion limit at ~1000)
_SURROGATE = re.compile("[\ud800-\udfff]")
_DEFAULT_SPLIT = {"train": "train", "test": "test"}


@dataclass
class _Source:
    """Where rows come from: ``name`` for messages and Example.source; ``types`` the column
    types of typed sources (Parquet / Arrow), ``class_labels`` a dataset's ClassLabel names."""
    kind: str  # file / saved / hf
    name: str
    path: Path | None = None  # file or saved folder
    split: str | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    types: dict[str, str] = field(default_factory=dict)
    class_labels: dict[str, list[str]] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        if self.kind == "file":
            return self.path.stem
        if self.kind == "saved":
            return self.path.name + (f"@{self.split}" if self.split else "")
        return self.name  # hf:NAME[:CONFIG]@SPLIT


def _is_saved_dataset(folder: Path) -> str | None:
    """'dict' for a DatasetDict folder, 'dataset' for a Dataset folder (save_to_disk), else None."""
    if (folder / "dataset_dict.json").is_file():
        return "dict"
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "dataset"
    return None


def parse_spec(spec: str | Path, role: str) -> _Source:
    """What a data spec names (no data read). Raises LadderError for a path that is not there,
    a device / FIFO / socket, or a folder that is not a saved dataset."""
    s = str(spec)
    if s.startswith("hf:"):
        head, at, split = s[3:].partition("@")
        name, colon, config = head.partition(":")
        if not name.strip() or (at and not split.strip()) or (colon and not config.strip()):
            raise LadderError(f"{s}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:stanfordnlp/sst2@validation (data.{role})")
        name, config, split = name.strip(), config.strip() or None, split.strip() or _DEFAULT_SPLIT.get(role, 'train')
        shown = f"hf:{name}" + (f":{config}" if config else "") + f"@{split}"  # sources name the split read
        return _Source("hf", shown, split=split, hf_name=name, hf_config=config)
    path = Path(s)
    split = None
    if not path.exists() and "@" in path.name:  # FOLDER@SPLIT
        folder, _, split = s.rpartition("@")
        if Path(folder).is_dir():
            path = Path(folder)
        else:
            split = None
    if not path.exists():
        raise LadderError(f"{path}: {role} file not found (data.{role})")
    check_regular(path, f"{role} file")
    if path.is_dir():
        kind = _is_saved_dataset(path)
        if kind is None:
            raise LadderError(
                f"{path}: {role} path is a folder, expected a file (or a folder written by datasets' "
                f"save_to_disk) (data.{role})"
            )
        if kind == "dataset" and split:
            raise LadderError(f"{s}: {path} holds one dataset, not a DatasetDict with splits; drop '@{split}'")
        if kind == "dict":
            split = split or _DEFAULT_SPLIT.get(role, 'train')
            return _Source("saved", f"{path}@{split}", path=path, split=split)
        return _Source("saved", str(path), path=path)
    return _Source("file", s, path=path)


def _file_suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()


def _rows(src: _Source | str | Path, cfg: DataConfig | None = None, role: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict) from any source (see above). A plain path (the corpus
    readers of rag / continued-pretraining) is read as a file with the default limits."""
    if not isinstance(src, _Source):
        check_regular(src, "file")
        src = _Source("file", str(src), path=Path(src))
    max_line = cfg.max_line_bytes if cfg is not None else DEFAULT_MAX_LINE_BYTES
    if src.kind != "file":
        yield from _dataset_rows(src, role, max_line)
        return
    path = src.path
    suffix = _file_suffix(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _jsonl_rows(path, max_line)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, "\t" if suffix == ".tsv" else ",", max_line)
    elif suffix == ".parquet":
        yield from _parquet_rows(src, max_line)
    else:
        raise LadderError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .csv or .parquet, "
                          "a folder written by datasets' save_to_disk, or hf:NAME)")


def _check_json_row(row: dict, line: str, path: Path, lineno: int) -> None:
    """Nesting depth and lone surrogates (a JSON '\\ud800' escape decodes to a str that is not
    valid Unicode: it cannot be tokenised or written as UTF-8)."""
    deep = line.count("[") + line.count("{") > MAX_JSON_DEPTH
    escaped = "\\u" in line
    if not (deep or escaped):
        return
    for key, value in row.items():
        m = _SURROGATE.search(key) if escaped else None
        if m:
            raise LadderError(f"{path}:{lineno}: a field name contains a lone surrogate (a '\\u{ord(m.group()):04x}' "
                              "escape); it is not valid Unicode text")
        stack = [(value, 1)]
        while stack:
            v, depth = stack.pop()
            if isinstance(v, str):
                m = _SURROGATE.search(v) if escaped else None
                if m:
                    raise LadderError(
                        f"{where(path, lineno, key)} contains a lone surrogate ('\\u{ord(m.group()):04x}' escape): not valid "
                        "Unicode, so the text cannot be tokenised or written as UTF-8; fix the escape (a pair "
                        "like '\\ud83d\\ude00' is fine)"
                    )
            elif isinstance(v, (dict, list)):
                if depth > MAX_JSON_DEPTH:
                    raise LadderError(f"{where(path, lineno, key)} is nested over {MAX_JSON_DEPTH} levels deep")
                items = v.items() if isinstance(v, dict) else enumerate(v)
                for k, x in items:
                    if escaped and isinstance(k, str) and _SURROGATE.search(k):
                        raise LadderError(f"{where(path, lineno, key)}: a key contains a lone surrogate escape; "
                                          "it is not valid Unicode text")
                    stack.append((x, depth + 1))


def _jsonl_rows(path: Path, max_line_bytes: int) -> Iterator[tuple[int, dict]]:
    for lineno, line in iter_lines(path, max_line_bytes):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LadderError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise LadderError(f"{path}:{lineno}: invalid JSON (nested too deeply; at most {MAX_JSON_DEPTH} levels)") from None
        if not isinstance(row, dict):
            raise LadderError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        _check_json_row(row, line, path, lineno)
        yield lineno, row


def _csv_rows(path: Path, delimiter: str, max_line_bytes: int) -> Iterator[tuple[int, dict]]:
    """Strict CSV: bad quoting, an unterminated quote and a row with more or fewer fields than
    the header are errors naming the line (nothing is dropped or padded)."""
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(max_line_bytes, 1024))
    try:
        reader = csv.reader((line for _, line in iter_lines(path, max_line_bytes)), delimiter=delimiter, strict=True)
        header: list[str] | None = None
        header_line = 0
        start = 1  # the line where the current record starts
        while True:
            start = reader.line_num + 1
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise _csv_error(e, path, start, reader.line_num, delimiter, max_line_bytes) from None
            if not rec:  # blank line
                continue
            if header is None:
                header, header_line = rec, reader.line_num
                dupes = sorted({h for h in header if header.count(h) > 1})
                if dupes:
                    raise LadderError(f"{path}:{header_line}: the header names column '{dupes[0]}' twice")
                continue
            if len(rec) != len(header):
                cols = f"the header (line {header_line}) has {len(header)}: {', '.join(header)}"
                if len(rec) < len(header):
                    raise LadderError(
                        f"{where(path, reader.line_num, header[len(rec)])} missing: the row has {len(rec)} "
                        f"field{'s' if len(rec) != 1 else ''}, {cols}"
                    )
                hint = "" if delimiter == "\t" else f"; quote a field that contains '{delimiter}'"
                raise LadderError(f"{path}:{reader.line_num}: the row has {len(rec)} fields, {cols}{hint}")
            yield reader.line_num, dict(zip(header, rec))
    finally:
        csv.field_size_limit(old_limit)


def _csv_error(e: csv.Error, path: Path, start: int, line: int, delimiter: str, cap: int) -> LadderError:
    msg = str(e)
    if "unexpected end of data" in msg or "EOF" in msg:
        return LadderError(
            f"{path}:{start}: unterminated quoted field: a quote opened in the row starting at line {start} is "
            f"never closed (lines {start}-{line} would be one field); close it or double a literal quote (\"\")"
        )
    if "field larger than field limit" in msg:
        return LadderError(
            f"{path}:{start}: a field of the row starting at line {start} is longer than data.max_line_bytes={cap} "
            f"(an unclosed quote?); if it is meant to be, raise the cap, e.g. --set data.max_line_bytes={cap * 8}"
        )
    spans = f" (the row starts at line {start}: an unclosed quote there?)" if start != line else ""
    return LadderError(
        f"{path}:{line}: bad CSV quoting ({msg}){spans}; quote a field that contains quotes and double "
        "them inside (\"\")"
    )


def _parquet_rows(src: _Source, max_line_bytes: int) -> Iterator[tuple[int, dict]]:
    """Record batch by record batch (bounded memory), never the whole table at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = src.path
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as e:
        raise LadderError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    names = schema.names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LadderError(f"{path}: column '{dupes[0]}' appears twice in the Parquet schema")
    src.types.update({f.name: str(f.type) for f in schema})
    i = 0
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else None
        except (pa.ArrowException, OSError, ValueError) as e:
            raise LadderError(f"{path}: corrupt Parquet file after row {i} ({_first_line(e)})") from None
        if rows is None:
            return
        for row in rows:
            i += 1
            _check_cell_sizes(row, src.name, i, max_line_bytes)
            yield i, row


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _check_cell_sizes(row: dict, name: str, i: int, cap: int) -> None:
    for k, v in row.items():
        if isinstance(v, (str, bytes)) and len(v) > cap:
            raise LadderError(
                f"{where(name, i, k)} is longer than data.max_line_bytes={cap} ({human_bytes(cap)}); if it is meant to "
                f"be, raise the cap, e.g. --set data.max_line_bytes={cap * 8}"
            )


# ---------------------------------------------------------------------------- Hugging Face datasets

_LOADED: dict[tuple[str, str], Any] = {}  # (spec, role) -> datasets.Dataset, for digest()


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """datasets / huggingface_hub in offline mode (cache only, no retries) while loading."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hc

    saved = datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = saved


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def load_dataset_source(src: _Source, role: str):
    """The ``datasets.Dataset`` a saved folder or an hf: spec names (memory-mapped Arrow; rows
    are read later, batch by batch). Offline (HF_HUB_OFFLINE, or the hub unreachable) an
    hf: dataset must be in the local cache: otherwise a one-line error at once."""
    key = (src.name, role)
    if src.kind == "hf" and key in _LOADED:  # validation and digest() load it once (a saved folder: cheap)
        return _LOADED[key]
    datasets = _quiet_datasets()
    split = src.split
    if src.kind == "saved":
        try:
            ds = datasets.load_from_disk(str(src.path))
        except Exception as e:  # a damaged folder: whatever datasets raises, one line
            raise LadderError(f"{src.path}: cannot read the saved dataset ({type(e).__name__}: {_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise LadderError(f"{src.name}: no split '{split}' (data.{role}; its splits: {', '.join(ds)}); "
                                  f"pick one with {src.path}@SPLIT")
            ds = ds[split]
    else:
        from lmladder.models import _hub_reachable

        offline = not _hub_reachable()
        why = ("HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
               else "the Hugging Face hub is unreachable")
        try:
            with _hub_offline(offline):
                ds = datasets.load_dataset(src.hf_name, src.hf_config, split=split)
        except (ConnectionError, FileNotFoundError) as e:
            if offline:
                raise LadderError(
                    f"{src.name}: dataset '{src.hf_name}' is not in the local Hugging Face cache and {why}; load it "
                    "once online, or give a folder written by save_to_disk"
                ) from None
            raise LadderError(f"{src.name}: cannot load the dataset ({_first_line(e)})") from None
        except ValueError as e:  # unknown split or config
            raise LadderError(f"{src.name}: {_first_line(e)} (data.{role}: hf:NAME[:CONFIG][@SPLIT])") from None
        except Exception as e:
            raise LadderError(f"{src.name}: cannot load the dataset ({type(e).__name__}: {_first_line(e)})") from None
        _LOADED[key] = ds
    return ds


def _dataset_rows(src: _Source, role: str, max_line_bytes: int) -> Iterator[tuple[int, dict]]:
    ds = load_dataset_source(src, role)
    try:
        features = dict(ds.features)
    except Exception:  # pragma: no cover - features are always there for a Dataset
        features = {}
    src.types.update({k: repr(f) for k, f in features.items()})
    src.class_labels.update({k: list(f.names) for k, f in features.items() if type(f).__name__ == "ClassLabel"})
    i = 0
    try:
        for batch in ds.iter(batch_size=1000):
            cols = list(batch)
            for values in zip(*(batch[c] for c in cols)):
                i += 1
                row = dict(zip(cols, values))
                _check_cell_sizes(row, src.name, i, max_line_bytes)
                yield i, row
    except LadderError:
        raise
    except Exception as e:  # a damaged arrow file
        raise LadderError(f"{src.name}: cannot read row {i + 1} ({type(e).__name__}: {_first_line(e)})") from None


# ---------------------------------------------------------------------------- digests


def _sha256_files(paths: list[Path], root: Path, h=None):
    h = h or hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h


def digest(spec: str | None, role: str = "train") -> str | None:
    """What a run's results depend on in the data ``spec`` names (data.train / data.test; ``role``
    picks a DatasetDict's default split): a file's sha256 (the same value as before hf: / folders
    existed); a saved dataset folder's sha256 over the split's Arrow and JSON files (names and
    content); for hf:NAME, sha256 of the name, config, split and the loaded dataset's fingerprint
    (which follows its revision and data files), version and row count. None for no spec or
    a path that is not there (validation reports it)."""
    if not spec:
        return None
    try:
        src = parse_spec(spec, role)
    except LadderError:
        return None
    if src.kind == "file":
        h = hashlib.sha256()
        with open(src.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if src.kind == "saved":
        folder, split = src.path, src.split
        if split is not None:  # a DatasetDict: the split's own folder
            folder = folder / split
            if not folder.is_dir():
                return None  # validation names the missing split
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".arrow", ".json"))
        h = hashlib.sha256(f"saved\0{split}\0".encode())
        return _sha256_files(files, folder, h).hexdigest()
    ds = load_dataset_source(src, role)
    payload = {
        "hf": src.hf_name, "config": src.hf_config, "split": src.split,
        "fingerprint": getattr(ds, "_fingerprint", None), "version": str(ds.info.version) if ds.info.version else None,
        "rows": ds.num_rows,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# Kinds whose gold may be structured (a list of answers / entities, a choice index).
_STRUCTURED_LABELS = {"qa", "extraction", "multiple-choice", "generation", "tagging"}


def _text_input(v, loc: str) -> str:
    if isinstance(v, list) and all(isinstance(t, str) for t in v):
        return " ".join(v)  # pre-tokenised input (e.g. WNUT tokens)
    if isinstance(v, (dict, list)):
        raise LadderError(f"{loc} must be text or a list of tokens, got {type(v).__name__}")
    return str(v)


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _choices(row: dict, fld: str, loc: str, labels_fld: str | None, labels_loc: str):
    """This row's choices as (texts, labels). Labels come from data.choice_labels_field, from
    HF's nested shape ``{"text": [...], "label": [...]}``, or from the keys of a
    ``{label: text}`` mapping; a plain list has none (None)."""
    if fld not in row:
        raise LadderError(f"{loc} missing (data.choices_field)")
    v = row[fld]
    labels = None
    if isinstance(v, dict) and isinstance(v.get("text"), list) and "label" in v:
        labels, v = v["label"], v["text"]
        if not isinstance(labels, list) or len(labels) != len(v):
            raise LadderError(f"{loc}: 'label' must be a list as long as 'text' ({len(v)} choices)")
    elif isinstance(v, dict):  # {"A": "...", "B": "..."}
        labels, v = list(v.keys()), list(v.values())
    if not isinstance(v, list) or len(v) < 2 or any(c is None or not str(c).strip() for c in v):
        raise LadderError(f"{loc} must be a list of at least two non-empty choices")
    if labels_fld:
        if labels_fld not in row:
            raise LadderError(f"{labels_loc} missing (data.choice_labels_field)")
        labels = row[labels_fld]
        if not isinstance(labels, list) or len(labels) != len(v):
            raise LadderError(f"{labels_loc} must be a list of {len(v)} choice labels (one per choice)")
    if labels is not None:
        labels = [str(x).strip() for x in labels]
        where_ = labels_loc if labels_fld else loc
        if any(not x for x in labels):
            raise LadderError(f"{where_}: choice labels must be non-empty")
        if len(set(labels)) != len(labels):
            raise LadderError(f"{where_}: choice labels must be distinct, got {labels}")
    return [str(c) for c in v], labels


def _is_number(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, str) and v.strip().isascii() and v.strip().isdigit()
    )


def _choice_index(v, choices: list[str], labels: list[str] | None, loc: str):
    """The gold choice, as (kind, value): kind "label" / "letter" / "text" with value the
    0-based index, or kind "number" with value the number as given (its base is settled over
    the whole data, see :func:`_settle_numbers`)."""
    if isinstance(v, bool) or isinstance(v, (dict, list)) or v is None:
        raise LadderError(f"{loc}: answer must be a choice label, letter, number or choice text, got {v!r}")
    s = str(v).strip()
    if labels is not None:
        if s in labels:
            return "label", labels.index(s)
        ci = [i for i, x in enumerate(labels) if x.casefold() == s.casefold()]
        if len(ci) == 1:
            return "label", ci[0]
        raise LadderError(f"{loc}: answer {s!r} is not one of this example's choice labels ({', '.join(labels)})")
    if _is_number(v):
        n = int(s)
        if not 0 <= n <= len(choices):
            raise LadderError(f"{loc}: answer index {n} is out of range for {len(choices)} choices")
        return "number", n
    if len(s) == 1 and s.upper() in _LETTERS[: len(choices)]:
        return "letter", _LETTERS.index(s.upper())
    if s in choices:
        return "text", choices.index(s)
    raise LadderError(f"{loc}: answer {s!r} is not a choice letter ({_LETTERS[0]}-{_LETTERS[len(choices) - 1]}), "
                      "number or choice text")


@dataclass
class _Gold:
    """A multiple-choice gold as read, before numbers are given their base."""
    example: Example
    loc: str
    kind: str  # label / letter / number / text
    value: int


def _check_mixed(golds: list[_Gold], path) -> None:
    """Letter answers and numeric answers in one file: name the first row of the minority."""
    letters = [g for g in golds if g.kind == "letter"]
    numbers = [g for g in golds if g.kind == "number"]
    if letters and numbers:
        few, many = (letters, "numbers") if len(letters) < len(numbers) else (numbers, "letters")
        g = few[0]
        raise LadderError(
            f"{g.loc}: answer {g.example.target!r} is a {'letter' if g.kind == 'letter' else 'number'} "
            f"but most answers in {path} are {many} ({len(letters)} letters, {len(numbers)} numbers); use one kind"
        )


def _settle_numbers(golds: list[_Gold], cfg: DataConfig) -> None:
    """Give numeric answers their base and set every gold's target (the 0-based index) and label.

    data.answer_base when set; otherwise inferred from all the numeric answers: a 0 means
    0-based, an answer equal to its row's number of choices means 1-based; both is an error
    (inconsistent), neither is an error (ambiguous) asking for data.answer_base."""
    numbers = [g for g in golds if g.kind == "number"]
    base = cfg.answer_base
    if numbers and base is None:
        zero = next((g for g in numbers if g.value == 0), None)
        full = next((g for g in numbers if g.value == len(g.example.choices)), None)
        if zero and full:
            raise LadderError(
                f"{full.loc}: answer {full.value} of {full.value} choices means 1-based numbers but "
                f"{zero.loc} has answer 0 (0-based); the numeric answers are inconsistent"
            )
        if zero or full:
            base = 0 if zero else 1
        else:
            g = numbers[0]
            raise LadderError(
                f"{g.loc}: numeric answer {g.value} may count choices from 0 or 1 (no answer is 0 or "
                f"the number of choices); set data.answer_base: 0 or 1"
            )
    for g in golds:
        i = g.value
        if g.kind == "number":
            i = g.value - base
            n = len(g.example.choices)
            if not 0 <= i < n:
                raise LadderError(
                    f"{g.loc}: answer index {g.value} is out of range for {n} choices "
                    f"(data.answer_base {base}: {base}-{n - 1 + base})"
                )
        g.example.target = i
        g.example.label = str(i)


def _turn_text(v, loc: str, role: str) -> str:
    """A preference field as text: a string, or (OpenAI / TRL conversational shape) a list of
    {role, content} messages, of which the last ``role`` message's content is taken."""
    if isinstance(v, list) and v and all(isinstance(m, dict) for m in v):
        msgs = [m for m in v if m.get("role") == role] or v
        v = msgs[-1].get("content")
    if not isinstance(v, str):
        raise LadderError(f"{loc} must be text or a list of {{role, content}} messages")
    if not v.strip():
        raise LadderError(f"{loc} is empty")
    return v.strip()


_SETTINGS_FLAGS = {"input_field": "--input-field", "label_field": "--label-field", "choices_field": "--choices-field"}
# Names public datasets use for each role, in order of preference (the error for a missing
# field suggests the first one a row has).
_COMMON_NAMES = {
    "input_field": ("text", "sentence", "question", "question_stem", "prompt", "input", "query", "content",
                    "document", "goal", "ctx", "tokens", "instruction"),
    "label_field": ("label", "answerKey", "answer", "answers", "output", "target", "completion", "chosen",
                    "solution", "tags", "ner_tags", "labels", "gold"),
    "choices_field": ("choices", "options", "endings", "candidates"),
    "chosen_field": ("chosen", "response_j", "preferred"),
    "rejected_field": ("rejected", "response_k", "dispreferred"),
}


def _shown(name) -> str:
    """A name or value as it goes into a one-line message (control characters escaped)."""
    s = str(name)
    return s if s.isprintable() else s.encode("unicode_escape").decode("ascii")


def _missing(row: dict, fld: str, setting: str, cfg: DataConfig, name: str, lineno: int) -> LadderError:
    """``file:line: field 'x' missing (fields present: ...)``, with the row's likely field for
    that role when it has one (OpenBookQA's question_stem for a default 'question')."""
    present = sorted(map(_shown, row))
    taken = {cfg.input_field, cfg.label_field, cfg.choices_field, cfg.chosen_field, cfg.rejected_field,
             cfg.choice_labels_field, cfg.instruction_field, cfg.group_field}
    free = [k for k in present if k not in taken]
    alt = next((n for n in _COMMON_NAMES.get(setting, ()) if n in free), None)
    if alt is None:
        close = difflib.get_close_matches(fld, free, n=1, cutoff=0.6)
        alt = close[0] if close else None
    msg = f"{where(name, lineno, fld)} missing (data.{setting}; fields present: {', '.join(present) or 'none'})"
    if alt is not None:
        flag = _SETTINGS_FLAGS.get(setting)
        msg += f"; did you mean '{alt}'? set data.{setting}: {alt}" + (f" ({flag} {alt})" if flag else "")
    return LadderError(msg)


_PLAIN = (str, int, float, bool, type(None))
_TYPE_WORDS = {"bytes": "binary data", "datetime": "a timestamp", "date": "a date", "time": "a time of day",
               "timedelta": "a duration", "Decimal": "a decimal"}


def _check_value(v, loc: str, col_type: str | None) -> None:
    """A used field holds what JSON holds (text, numbers, booleans, lists, mappings): Parquet /
    Arrow binary, timestamp, decimal ... columns are an error naming the type."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif not isinstance(x, _PLAIN):
            py = type(x).__name__
            what = _TYPE_WORDS.get(py, f"a {py}")
            typ = f"column type {col_type}, " if col_type else ""
            raise LadderError(
                f"{loc} holds {what} ({typ}Python {py}), not text, a number or a list of them; cast the "
                "column to string before loading"
            )


def _is_empty(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and v != v)


def _render(parts, row: dict, name: str, lineno: int) -> str:
    """data.input_template filled from a row (dotted paths into mappings and lists)."""
    out = []
    for literal, path in parts:
        out.append(literal)
        if path is None:
            continue
        dotted = ".".join(path)
        loc = f"{where(name, lineno, dotted)} (data.input_template)"
        cur: Any = row
        for depth, seg in enumerate(path):
            if isinstance(cur, dict) and seg in cur:
                cur = cur[seg]
            elif isinstance(cur, list) and seg.isdigit() and int(seg) < len(cur):
                cur = cur[int(seg)]
            elif depth == 0:
                raise LadderError(f"{loc} missing (fields present: {', '.join(sorted(map(_shown, row))) or 'none'})")
            else:
                parent = ".".join(path[:depth])
                has = (f"'{parent}' has: {', '.join(sorted(map(_shown, cur))) or 'nothing'}" if isinstance(cur, dict)
                       else f"'{parent}' is a list of {len(cur)}" if isinstance(cur, list)
                       else f"'{parent}' is {type(cur).__name__}, not a mapping")
                raise LadderError(f"{loc} missing ({has})")
        if cur is None or (isinstance(cur, float) and cur != cur):
            raise LadderError(f"{loc} is empty")
        _check_value(cur, loc, None)
        out.append(_text_input(cur, loc))
    return "".join(out)


def preference_example(row: dict, cfg: DataConfig, path: Path | str, lineno: int, stem: str | None = None,
                       template=None) -> Example:
    """One preference row: prompt (data.input_field, or data.input_template), chosen and rejected
    responses (data.chosen_field / data.rejected_field). The gold is True (chosen is better);
    ``label`` is the chosen text (what SFT rungs learn), ``fields['rejected']`` the other."""
    cfg = cfg.for_kind("preference")
    texts = {}
    fields = [(cfg.chosen_field, "assistant", "chosen_field"), (cfg.rejected_field, "assistant", "rejected_field")]
    if template is None and cfg.input_template:
        template = parse_template(cfg.input_template)
    if template is None:
        fields.insert(0, (cfg.input_field, "user", "input_field"))
    for fld, role, setting in fields:
        loc = where(path, lineno, fld)
        if fld not in row or row[fld] is None:
            raise _missing(row, fld, setting, cfg, str(path), lineno)
        texts[fld] = _turn_text(row[fld], loc, role)
    if template is not None:
        prompt = _render(template, row, str(path), lineno).strip()
        if not prompt:
            raise LadderError(f"{path}:{lineno}: the prompt made by data.input_template is empty")
    else:
        prompt = texts[cfg.input_field]
    if texts[cfg.chosen_field] == texts[cfg.rejected_field]:
        raise LadderError(f"{where(path, lineno, cfg.rejected_field)} is identical to {cfg.chosen_field}")
    return Example(
        id=f"{stem if stem is not None else Path(path).stem}:{lineno}", input=prompt, label=texts[cfg.chosen_field],
        source=f"{path}:{lineno}", target=True,
        fields={**row, "chosen": texts[cfg.chosen_field], "rejected": texts[cfg.rejected_field]},
    )


def _row_choices(row: dict, cfg: DataConfig, name: str, lineno: int):
    """A multiple-choice row's (choices, choice labels), or the error naming what is wrong."""
    if cfg.choices_field not in row:
        raise _missing(row, cfg.choices_field, "choices_field", cfg, name, lineno)
    return _choices(row, cfg.choices_field, where(name, lineno, cfg.choices_field),
                    cfg.choice_labels_field, where(name, lineno, cfg.choice_labels_field))


def input_fields(cfg: DataConfig, kind: str) -> list[str]:
    """The fields a row must carry for the model to answer it (no gold): the input field or
    the template's fields, multiple-choice's choices (and choice labels), the per-example
    instruction. What ``lmladder serve``'s /v1/predict takes."""
    cfg = cfg.for_kind(kind)
    if cfg.input_template:
        names = sorted({p[0] for _, p in parse_template(cfg.input_template) if p})
    else:
        names = [cfg.input_field]
    if kind == "multiple-choice":
        names += [f for f in (cfg.choices_field, cfg.choice_labels_field) if f]
    if cfg.instruction_field:
        names.append(cfg.instruction_field)
    return names


def input_example(row: dict, cfg: DataConfig, kind: str, name: str, lineno: int) -> Example:
    """An Example from a row without a gold (a request to a served rung), read and checked
    like a data row: LadderError naming ``name:lineno: field`` for what is missing or of the
    wrong type. Its ``label`` is empty."""
    cfg = cfg.for_kind(kind)
    if not isinstance(row, dict):
        raise LadderError(f"{name}:{lineno}: expected an object of fields, got {type(row).__name__}")
    template = parse_template(cfg.input_template) if cfg.input_template else None
    for fld in input_fields(cfg, kind):
        if fld in row:
            _check_value(row[fld], where(name, lineno, fld), None)
    if template is not None:
        text = _render(template, row, name, lineno)
    else:
        if cfg.input_field not in row:
            raise _missing(row, cfg.input_field, "input_field", cfg, name, lineno)
        v = row[cfg.input_field]
        if kind == "preference":
            text = _turn_text(v, where(name, lineno, cfg.input_field), "user")
        else:
            if _is_empty(v) or (isinstance(v, list) and not v):
                raise LadderError(f"{where(name, lineno, cfg.input_field)} is empty")
            text = _text_input(v, where(name, lineno, cfg.input_field))
    if not text.strip():
        raise LadderError(f"{name}:{lineno}: the input is empty")
    choices, choice_labels = _row_choices(row, cfg, name, lineno) if kind == "multiple-choice" else (None, None)
    extra = {}
    if cfg.instruction_field:
        v = row.get(cfg.instruction_field)
        if _is_empty(v) or not str(v).strip():
            raise LadderError(f"{where(name, lineno, cfg.instruction_field)} missing or empty (data.instruction_field)")
        extra["instruction"] = str(v)
    return Example(id=f"{name}:{lineno}", input=text, label="", source=f"{name}:{lineno}", fields=row,
                   target=None, choices=choices, choice_labels=choice_labels, **extra)


def read_examples(path: str | Path, cfg: DataConfig, role: str, kind: str = "classification") -> list[Example]:
    """One source's examples (multiple-choice: numeric answers get their base from this one)."""
    out, golds = _read(path, cfg, role, kind)
    _settle_numbers(golds, cfg)
    return out


def _read(spec: str | Path, cfg: DataConfig, role: str, kind: str) -> tuple[list[Example], list[_Gold]]:
    cfg = cfg.for_kind(kind)
    src = parse_spec(spec, role)
    name = src.name if src.kind != "file" else str(src.path)
    template = parse_template(cfg.input_template) if cfg.input_template else None
    if template is not None and kind == "tagging":
        raise LadderError("data.input_template: tagging reads a list of tokens from data.input_field; "
                          "a template cannot make one")
    structured = kind in _STRUCTURED_LABELS
    used = [f for f in (cfg.input_field if template is None else None, cfg.label_field, cfg.choices_field,
                        cfg.choice_labels_field, cfg.instruction_field, cfg.group_field) if f]
    if kind == "preference":
        used = [f for f in (cfg.input_field if template is None else None, cfg.chosen_field, cfg.rejected_field,
                            cfg.instruction_field, cfg.group_field) if f]
    if template is not None:
        used += sorted({p[0] for _, p in template if p})
    out: list[Example] = []
    golds: list[_Gold] = []
    for lineno, row in _rows(src, cfg, role):
        for fld in used:
            if fld in row:
                _check_value(row[fld], where(name, lineno, fld), src.types.get(fld))
        if kind == "preference":
            out.append(preference_example(row, cfg, name, lineno, src.stem, template))
            continue
        raw = {}
        for fld, setting in ((cfg.input_field, "input_field"), (cfg.label_field, "label_field")):
            if setting == "input_field" and template is not None:
                continue
            if fld not in row:
                raise _missing(row, fld, setting, cfg, name, lineno)
            v = row[fld]
            if _is_empty(v):
                raise LadderError(f"{where(name, lineno, fld)} is empty")
            if isinstance(v, list) and not v and not (structured and fld == cfg.label_field):
                raise LadderError(f"{where(name, lineno, fld)} is empty")
            raw[fld] = v
        if template is not None:
            text = _render(template, row, name, lineno)
            if not text.strip():
                raise LadderError(f"{name}:{lineno}: the input made by data.input_template is empty")
        else:
            text = _text_input(raw[cfg.input_field], where(name, lineno, cfg.input_field))
        target = raw[cfg.label_field]
        names = src.class_labels.get(cfg.label_field)
        if names is not None and isinstance(target, int) and not isinstance(target, bool):
            if not 0 <= target < len(names):  # -1: an unlabelled split (e.g. GLUE's test splits)
                raise LadderError(f"{where(name, lineno, cfg.label_field)} is {target}: no label (ClassLabel "
                                  f"{', '.join(names)}); this split is unlabelled")
            target = names[target]  # the dataset's label names, not their indices
        choices = choice_labels = gold = None
        if isinstance(target, (dict, list)) and not structured:
            raise LadderError(
                f"{where(name, lineno, cfg.label_field)} must be text, got {type(target).__name__}"
            )
        if kind == "multiple-choice":
            choices, choice_labels = _row_choices(row, cfg, name, lineno)
            loc = where(name, lineno, cfg.label_field)
            gold = _choice_index(target, choices, choice_labels, loc), loc
        extra = {}
        for attr, fld in (("instruction", cfg.instruction_field), ("group", cfg.group_field)):
            if fld:
                v = row.get(fld)
                if _is_empty(v) or not str(v).strip():
                    raise LadderError(f"{where(name, lineno, fld)} missing or empty (data.{attr}_field)")
                extra[attr] = str(v)
        label = target if isinstance(target, str) else json.dumps(target, ensure_ascii=False)
        out.append(
            Example(
                id=f"{src.stem}:{lineno}",
                input=text,
                label=label.strip(),
                source=f"{name}:{lineno}",
                fields=row,
                target=target.strip() if isinstance(target, str) else target,
                choices=choices,
                choice_labels=choice_labels,
                **extra,
            )
        )
        if gold is not None:
            (g_kind, g_value), loc = gold
            golds.append(_Gold(out[-1], loc, g_kind, g_value))
    if not out:
        raise LadderError(f"{name}: no examples (data.{role} is empty)")
    _check_mixed(golds, name)
    return out, golds


def _sample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _norm(text: str) -> str:
    """Casefolded, every whitespace run one space, stripped."""
    return " ".join(str(text).casefold().split())


def input_key(e: Example) -> str:
    """What makes two examples the same input for the leakage check and the grouped split:
    the normalised input, with the choices (multiple-choice: the same stem with other choices
    is another question) and the per-example instruction when there is one."""
    key = "\x1f".join([_norm(e.input), *(_norm(c) for c in e.choices or [])])
    return f"{_norm(e.instruction)}\x1e{key}" if e.instruction else key


def _split(train: list[Example], cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded train/test split by input: duplicates (same :func:`input_key`) all land on one
    side. Groups are shuffled with the seed and go to test until test_fraction is reached
    (without duplicates this is a plain seeded shuffle of the rows)."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(train):
        groups.setdefault(input_key(e), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(train) * cfg.test_fraction))
    if n_test >= len(train):
        raise LadderError(f"{cfg.train}: too few examples ({len(train)}) to split off a test set")
    test_idx: set[int] = set()
    for g in order:
        if len(test_idx) >= n_test:
            break
        test_idx.update(g)
    if len(test_idx) >= len(train):
        raise LadderError(
            f"{cfg.train}: too few distinct inputs ({len(groups)} in {len(train)} rows) to split off a "
            "test set; give data.test"
        )
    test = [e for i, e in enumerate(train) if i in test_idx]
    return [e for i, e in enumerate(train) if i not in test_idx], test


def overlap(train: list[Example], test: list[Example]) -> list[list[str]]:
    """[test source, train source] for every test example whose input is also in train."""
    first: dict[str, str] = {}
    for e in train:
        first.setdefault(input_key(e), e.source)
    return [[e.source, first[k]] for e in test if (k := input_key(e)) in first]


def _check_overlap(train: list[Example], test: list[Example], cfg: DataConfig, info: dict) -> None:
    pairs = overlap(train, test)
    info["overlap"] = {"n": len(pairs), "pairs": pairs[:20]}
    if not pairs:
        return
    n = len(pairs)
    msg = (f"data: {n} test input{'s' if n != 1 else ''} also appear{'' if n != 1 else 's'} in train "
           f"(first: {pairs[0][0]} = {pairs[0][1]})")
    if not cfg.allow_overlap:
        raise LadderError(f"{msg}; remove them or set data.allow_overlap: true")
    log.warning("%s; kept (data.allow_overlap: true)", msg)


def load(
    cfg: DataConfig, seed: int, labels: list[str] | None = None, kind: str = "classification"
) -> Dataset:
    """Load train/test, split when there is no test file, apply limits, check labels
    (classification: every gold must be in the label set) and that no test input is also a
    train input (``info["overlap"]``; an error unless data.allow_overlap)."""
    if not cfg.train:
        raise LadderError("no train file: give --train PATH or data.train in the config")
    cfg = cfg.for_kind(kind)
    train, golds = _read(cfg.train, cfg, "train", kind)
    info: dict[str, Any] = {"train_file": str(cfg.train), "kind": kind}
    if cfg.test:
        test, test_golds = _read(cfg.test, cfg, "test", kind)
        golds += test_golds
        info["test_file"] = str(cfg.test)
    _settle_numbers(golds, cfg)  # multiple-choice: one base for the numeric answers of both files
    if not cfg.test:
        train, test = _split(train, cfg, seed)
        info["test_file"] = f"{cfg.train} (seeded split, test_fraction={cfg.test_fraction})"
    info["train_total"], info["test_total"] = len(train), len(test)
    if kind == "classification":
        # Labels are inferred from, and checked on, every row: a limit must not hide a bad row
        # or drop a label from the set.
        label_set = list(labels) if labels else sorted({e.label for e in train})
        known = set(label_set)
        origin = "task.labels" if labels else "the train labels"
        for e in train + test:
            if e.label not in known:
                path, line = e.source.rsplit(":", 1)
                shown = f"'{e.label}'" if e.label.isprintable() else repr(e.label)  # one line
                raise LadderError(
                    f"{where(path, line, cfg.label_field)}: label {shown} is not in "
                    f"{origin} ({', '.join(map(_shown, label_set))})"
                )
        if len(label_set) < 2:
            raise LadderError(
                f"{cfg.train}: field '{cfg.label_field}': only one label ('{label_set[0]}'); "
                "classification needs at least two"
            )
    else:
        label_set = list(labels or [])
    train = _sample(train, cfg.limit_train, seed)
    test = _sample(test, cfg.limit_test, seed + 1)
    info["train_used"], info["test_used"] = len(train), len(test)
    info["labels"] = label_set
    _check_overlap(train, test, cfg, info)
    return Dataset(train=train, test=test, info=info)
