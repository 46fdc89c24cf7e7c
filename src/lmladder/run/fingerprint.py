"""The one fingerprint: what a rung's result, or its trained weights, depend on.

A rung's ``result.json`` counts only while it carries the fingerprint the run's config and
data give (run.json lists them); a change reruns the rung. Trained weights are stamped with
the *training* fingerprint, which leaves out what only evaluation reads (``eval:``, the
judge, which learning-curve points are also measured), so they are reused when only those
change. The payload is the run-wide part (model, task, data settings and the data's content
digests, seed) plus the rung's own config, plus what others contribute by hook:

* the rung class: ``fingerprint_extra(cfg)`` (a corpus digest, a grammar engine);
* the rungs it builds on: ``from:`` (its start model), ``after`` (outputs it reads, e.g.
  best-of-n's reward model) and ``uses`` (rungs it runs itself, e.g. distill's teacher);
* the task kind: ``Task.fingerprint_part(cfg)`` (preference: the win-rate judge);
* the model backend: ``openai_backend.fingerprint_part(spec)`` (another server or tokenizer
  gives other scores).
"""

from __future__ import annotations

import hashlib
import json

from lmladder.data import digest
from lmladder.registry import rung_class

# data keys a result does not depend on: the files are fingerprinted by content (digests),
# and a line-length cap either lets the data in unchanged or stops the run
DATA_NOT_FINGERPRINTED = {"train", "test", "max_line_bytes"}


def data_digests(cfg) -> dict:
    """A file's sha256; a saved dataset's files; an hf: dataset's fingerprint."""
    return {"train": digest(cfg.data.train, "train"), "test": digest(cfg.data.test, "test")}


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _parent(cfg, rung: str) -> str | None:
    return getattr(cfg.rung_config(rung), "from_", None)


def rung(cfg, name: str, digests: dict, training: bool = False) -> str:
    """What rung ``name``'s result depends on; ``training=True``: what its trained weights
    depend on."""
    from lmladder.inference import openai_backend
    from lmladder.tasks import KINDS

    cls = rung_class(name)
    payload = {
        "model": cfg.model,
        "task": cfg.task.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json", exclude=DATA_NOT_FINGERPRINTED),
        "digests": digests,
        "seed": cfg.seed,
        "rung": name,
        # trained weights do not depend on which learning-curve points are also measured
        "rung_config": cfg.rung_config(name).model_dump(mode="json", exclude={"learning_curve"} if training else None),
    }
    if not training:
        payload["eval"] = cfg.eval.model_dump(mode="json")
        payload.update(KINDS[cfg.task.kind].fingerprint_part(cfg))
    parent = _parent(cfg, name)
    if parent:  # a stacked rung reruns when the model it starts from changes
        payload["from"] = rung(cfg, parent, digests, training)
    deps = [d for d in cls.after(cfg, name) if d in cfg.rungs and d != name]
    if deps:  # e.g. best-of-n reruns when the reward model it ranks with changes
        payload["after"] = {d: rung(cfg, d, digests, training) for d in deps}
    uses = [u for u in cls.uses(cfg, name).values() if u != name]
    if uses:  # e.g. distill relabels when its teacher rung's config changes
        payload["uses"] = {u: {"config": cfg.rung_config(u).model_dump(mode="json"),
                               "extra": rung_class(u).fingerprint_extra(cfg)} for u in uses}
    extra = cls.fingerprint_extra(cfg)
    if extra:  # e.g. the rag corpus's content digest
        payload["extra"] = extra
    backend = openai_backend.fingerprint_part(cfg.model)
    if backend:
        payload["openai"] = backend
    return _hash(payload)


def baseline(cfg, digests: dict) -> str:
    """What the majority baseline depends on: the task and the data (no model)."""
    return _hash({"task": cfg.task.model_dump(mode="json"), "digests": digests, "seed": cfg.seed,
                  "data": cfg.data.model_dump(mode="json", exclude=DATA_NOT_FINGERPRINTED), "baseline": "majority"})


def salted(fingerprint: str, salt: str) -> str:
    """A fingerprint of its own for a variant of a rung (a learning-curve subset)."""
    return hashlib.sha256(f"{fingerprint}:{salt}".encode()).hexdigest()[:16]
