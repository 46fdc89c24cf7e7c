"""Readers (JSONL, CSV, Parquet), field mapping, validation and seeded splits.

Every problem is a :class:`LadderError` naming ``file:line: field 'name'`` so a user
can open the file at the right place. Nothing is dropped silently: limits and
splits are recorded in :class:`Dataset.info` and shown in the report.

No leakage: a test input that is also a train input (casefolded, whitespace collapsed;
multiple-choice: with its choices) is an error unless ``data.allow_overlap``, and the
seeded split keeps duplicate inputs on one side.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lmladder.config import DataConfig
from lmladder.errors import LadderError, where

log = logging.getLogger(__name__)


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
    """One file's examples (multiple-choice: numeric answers get their base from this file)."""
    out, golds = _read(path, cfg, role, kind)
    _settle_numbers(golds, cfg)
    return out


def _read(path: str | Path, cfg: DataConfig, role: str, kind: str) -> tuple[list[Example], list[_Gold]]:
    path = Path(path)
    if not path.exists():
        raise LadderError(f"{path}: {role} file not found (data.{role})")
    if path.is_dir():
        raise LadderError(f"{path}: {role} path is a folder, expected a file (data.{role})")
    structured = kind in _STRUCTURED_LABELS
    out: list[Example] = []
    golds: list[_Gold] = []
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
        choices = choice_labels = gold = None
        if isinstance(target, (dict, list)) and not structured:
            raise LadderError(
                f"{where(path, lineno, cfg.label_field)} must be text, got {type(target).__name__}"
            )
        if kind == "multiple-choice":
            if not cfg.choices_field:
                raise LadderError("multiple-choice needs data.choices_field (--choices-field NAME)")
            choices, choice_labels = _choices(
                row, cfg.choices_field, where(path, lineno, cfg.choices_field),
                cfg.choice_labels_field, where(path, lineno, cfg.choice_labels_field),
            )
            loc = where(path, lineno, cfg.label_field)
            gold = _choice_index(target, choices, choice_labels, loc), loc
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
                choice_labels=choice_labels,
                **extra,
            )
        )
        if gold is not None:
            (g_kind, g_value), loc = gold
            golds.append(_Gold(out[-1], loc, g_kind, g_value))
    if not out:
        raise LadderError(f"{path}: no examples (data.{role} is empty)")
    _check_mixed(golds, path)
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
                raise LadderError(
                    f"{where(path, line, cfg.label_field)}: label '{e.label}' is not in "
                    f"{origin} ({', '.join(label_set)})"
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
