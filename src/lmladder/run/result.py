"""The schema of ``rungs/<rung>/result.json``: what a finished rung wrote, and what the
report and the verdict read back (docs/verdict.md lists every field).

``RungResult.write`` writes it atomically, last of a rung's files, so its presence marks
the rung finished; ``load`` reads one back and returns None for a file that is not a
complete result (a foreign or damaged file is never taken for a finished rung).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lmladder.io import atomic_write_json


@dataclass
class Cost:
    """Two-part cost: one-time seconds (prepare + training + what the rung builds on) and
    seconds per call, with what they are made of."""

    one_time_s: float = 0.0
    per_call_s: float = 0.0
    forgetting_s: float = 0.0
    prompt_tokens_per_call: float = 0.0
    generated_tokens_per_call: float = 0.0
    peak_rss_mb: float = 0.0
    eval_batch_size: int | None = None
    trainable_params: int = 0
    trainable_share: float = 0.0
    train_seconds: float = 0.0
    prepare_seconds: float = 0.0
    prompt_tokens_per_example: float = 0.0
    eval_seconds: float = 0.0
    eval_examples_per_second: float | None = None


@dataclass
class RungResult:
    name: str
    rank: float  # place on the ladder (cost order; a stacked rung after what it builds on)
    summary: str
    fingerprint: str
    metric: str  # the primary metric
    score: float
    ci: list[float]
    metrics: dict[str, dict]  # every metric: {value, ci, interval}
    n_test: int
    per_example: dict | None  # what a paired comparison needs (verdict.paired)
    cost: Cost | dict  # (the baseline keeps its own zero-cost shape)
    details: dict[str, Any]
    artifacts: dict[str, str]
    model: dict[str, Any] | None
    finished: str
    policy: bool = True  # False: not a model to ship for the task (a reward model)
    baseline: bool = False  # the majority baseline (never recommended)
    by_group: dict | None = None  # metrics per data.group_field group
    learning_curve: list[dict] | None = None

    # the key order of result.json (as written since the verdict issue): a stable diff
    ORDER = ("name", "rank", "summary", "baseline", "fingerprint", "policy", "metric", "score", "ci", "metrics",
             "n_test", "per_example", "cost", "details", "by_group", "learning_curve", "artifacts", "model",
             "finished")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        out = {}
        for k in self.ORDER:
            v = d[k]
            if k == "baseline" and not v:
                continue  # only the baseline row says so
            if k == "policy" and self.baseline:
                continue
            if k in ("by_group", "learning_curve") and not v:
                continue
            out[k] = v
        return out

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


_REQUIRED = {f.name for f in fields(RungResult) if f.default is MISSING and f.default_factory is MISSING}


def load(path: Path) -> dict[str, Any] | None:
    """result.json as a dict, or None when it is missing, not JSON, or not a complete result."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not _REQUIRED <= set(d) or not isinstance(d.get("cost"), dict):
        return None
    return d


def fingerprint_of(path: Path) -> str | None:
    d = load(path)
    return d.get("fingerprint") if d else None
