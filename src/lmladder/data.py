"""Readers (JSONL, CSV, Parquet), field mapping, validation and seeded splits.

Every problem is a :class:`LadderError` naming ``file:line: field 'name'`` so a user
can open the file at the right place. Nothing is dropped silently: limits and
splits are recorded in :class:`Dataset.info` and shown in the report.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lmladder.config import DataConfig
from lmladder.errors import LadderError, where


@dataclass
class Example:
    id: str
    input: str
    label: str  # the gold as text (lists / objects as JSON)
    source: str = ""  # "file:line", for error messages and predictions
    fields: dict[str, Any] = field(default_factory=dict)  # the whole row
    target: Any = None  # the gold as read (a list of answers, entities, a choice index...)
    choices: list[str] | None = None  # multiple-choice: this example's choices
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


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict). Line numbers are 1-based file lines (CSV: the
    line where the row ends; Parquet: 1-based row index)."""
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LadderError(
                        f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise LadderError(
                        f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                    )
                yield lineno, row
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield reader.line_num, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
    else:
        raise LadderError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .csv or .parquet)")


# Kinds whose gold may be structured (a list of answers / entities, a choice index).
_STRUCTURED_LABELS = {"qa", "extraction", "multiple-choice", "generation", "tagging"}


def _text_input(v, loc: str) -> str:
    if isinstance(v, list) and all(isinstance(t, str) for t in v):
        return " ".join(v)  # pre-tokenised input (e.g. WNUT tokens)
    if isinstance(v, (dict, list)):
        raise LadderError(f"{loc} must be text or a list of tokens, got {type(v).__name__}")
    return str(v)


def _choices(row: dict, fld: str, loc: str) -> list[str]:
    if fld not in row:
        raise LadderError(f"{loc} missing (data.choices_field)")
    v = row[fld]
    if isinstance(v, dict):  # {"A": "...", "B": "..."}
        v = list(v.values())
    if not isinstance(v, list) or len(v) < 2 or any(not str(c).strip() for c in v):
        raise LadderError(f"{loc} must be a list of at least two non-empty choices")
    return [str(c) for c in v]


def _choice_index(v, row: dict, choices: list[str], fld: str, loc: str) -> int:
    """The gold choice as an index: an int, a letter key (A, B, ...), a key of a choices
    mapping, or the choice text itself."""
    keys = list(row[fld].keys()) if isinstance(row.get(fld), dict) else []
    if isinstance(v, bool):
        raise LadderError(f"{loc}: answer must be an index, a key or a choice, got {v!r}")
    if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit() and not keys):
        i = int(v)
        if not 0 <= i < len(choices):
            raise LadderError(f"{loc}: answer index {i} is out of range for {len(choices)} choices")
        return i
    s = str(v).strip()
    if s in keys:
        return keys.index(s)
    if len(s) == 1 and s.upper() in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]:
        return "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(s.upper())
    if s in choices:
        return choices.index(s)
    raise LadderError(f"{loc}: answer {s!r} is not a choice index, letter, key or choice text")


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


def preference_example(row: dict, cfg: DataConfig, path: Path, lineno: int) -> Example:
    """One preference row: prompt (data.input_field), chosen and rejected responses
    (data.chosen_field / data.rejected_field). The gold is True (chosen is better);
    ``label`` is the chosen text (what SFT rungs learn), ``fields['rejected']`` the other."""
    texts = {}
    for fld, role in ((cfg.input_field, "user"), (cfg.chosen_field, "assistant"), (cfg.rejected_field, "assistant")):
        loc = where(path, lineno, fld)
        if fld not in row or row[fld] is None:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise LadderError(f"{loc} missing (fields present: {present})")
        texts[fld] = _turn_text(row[fld], loc, role)
    if texts[cfg.chosen_field] == texts[cfg.rejected_field]:
        raise LadderError(f"{where(path, lineno, cfg.rejected_field)} is identical to {cfg.chosen_field}")
    return Example(
        id=f"{path.stem}:{lineno}", input=texts[cfg.input_field], label=texts[cfg.chosen_field],
        source=f"{path}:{lineno}", target=True,
        fields={**row, "chosen": texts[cfg.chosen_field], "rejected": texts[cfg.rejected_field]},
    )


def read_examples(path: str | Path, cfg: DataConfig, role: str, kind: str = "classification") -> list[Example]:
    path = Path(path)
    if not path.exists():
        raise LadderError(f"{path}: {role} file not found (data.{role})")
    if path.is_dir():
        raise LadderError(f"{path}: {role} path is a folder, expected a file (data.{role})")
    structured = kind in _STRUCTURED_LABELS
    out = []
    for lineno, row in _rows(path):
        if kind == "preference":
            out.append(preference_example(row, cfg, path, lineno))
            continue
        raw = {}
        for fld in (cfg.input_field, cfg.label_field):
            if fld not in row:
                present = ", ".join(sorted(map(str, row))) or "none"
                raise LadderError(f"{where(path, lineno, fld)} missing (fields present: {present})")
            v = row[fld]
            if v is None or (isinstance(v, str) and not v.strip()):
                raise LadderError(f"{where(path, lineno, fld)} is empty")
            if isinstance(v, list) and not v and not (structured and fld == cfg.label_field):
                raise LadderError(f"{where(path, lineno, fld)} is empty")
            raw[fld] = v
        text = _text_input(raw[cfg.input_field], where(path, lineno, cfg.input_field))
        target = raw[cfg.label_field]
        choices = None
        if isinstance(target, (dict, list)) and not structured:
            raise LadderError(
                f"{where(path, lineno, cfg.label_field)} must be text, got {type(target).__name__}"
            )
        if kind == "multiple-choice":
            if not cfg.choices_field:
                raise LadderError("multiple-choice needs data.choices_field (--choices-field NAME)")
            choices = _choices(row, cfg.choices_field, where(path, lineno, cfg.choices_field))
            target = _choice_index(
                target, row, choices, cfg.choices_field, where(path, lineno, cfg.label_field)
            )
        extra = {}
        for attr, fld in (("instruction", cfg.instruction_field), ("group", cfg.group_field)):
            if fld:
                v = row.get(fld)
                if v is None or not str(v).strip():
                    raise LadderError(f"{where(path, lineno, fld)} missing or empty (data.{attr}_field)")
                extra[attr] = str(v)
        label = target if isinstance(target, str) else json.dumps(target, ensure_ascii=False)
        out.append(
            Example(
                id=f"{path.stem}:{lineno}",
                input=text,
                label=label.strip(),
                source=f"{path}:{lineno}",
                fields=row,
                target=target.strip() if isinstance(target, str) else target,
                choices=choices,
                **extra,
            )
        )
    if not out:
        raise LadderError(f"{path}: no examples (data.{role} is empty)")
    return out


def _sample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load(
    cfg: DataConfig, seed: int, labels: list[str] | None = None, kind: str = "classification"
) -> Dataset:
    """Load train/test, split when there is no test file, apply limits, check labels
    (classification: every gold must be in the label set)."""
    if not cfg.train:
        raise LadderError("no train file: give --train PATH or data.train in the config")
    train = read_examples(cfg.train, cfg, "train", kind)
    info: dict[str, Any] = {"train_file": str(cfg.train), "kind": kind}
    if cfg.test:
        test = read_examples(cfg.test, cfg, "test", kind)
        info["test_file"] = str(cfg.test)
    else:
        idx = list(range(len(train)))
        random.Random(seed).shuffle(idx)
        n_test = max(1, round(len(train) * cfg.test_fraction))
        if n_test >= len(train):
            raise LadderError(f"{cfg.train}: too few examples ({len(train)}) to split off a test set")
        test_idx = set(idx[:n_test])
        test = [e for i, e in enumerate(train) if i in test_idx]
        train = [e for i, e in enumerate(train) if i not in test_idx]
        info["test_file"] = f"{cfg.train} (seeded split, test_fraction={cfg.test_fraction})"
    info["train_total"], info["test_total"] = len(train), len(test)
    if kind != "classification":
        train = _sample(train, cfg.limit_train, seed)
        test = _sample(test, cfg.limit_test, seed + 1)
        info["train_used"], info["test_used"] = len(train), len(test)
        info["labels"] = list(labels or [])
        return Dataset(train=train, test=test, info=info)
    # Labels are inferred from, and checked on, every row: a limit must not hide a bad row
    # or drop a label from the set.
    label_set = list(labels) if labels else sorted({e.label for e in train})
    known = set(label_set)
    origin = "task.labels" if labels else "the train labels"
    for e in train + test:
        if e.label not in known:
            path, line = e.source.rsplit(":", 1)
            raise LadderError(
                f"{where(path, line, cfg.label_field)}: label '{e.label}' is not in "
                f"{origin} ({', '.join(label_set)})"
            )
    if len(label_set) < 2:
        raise LadderError(
            f"{cfg.train}: field '{cfg.label_field}': only one label ('{label_set[0]}'); "
            "classification needs at least two"
        )
    train = _sample(train, cfg.limit_train, seed)
    test = _sample(test, cfg.limit_test, seed + 1)
    info["train_used"], info["test_used"] = len(train), len(test)
    info["labels"] = label_set
    return Dataset(train=train, test=test, info=info)
