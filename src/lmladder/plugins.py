"""User code named in a config as ``module:function`` or ``path/file.py:function`` (metric
functions, GRPO rewards, distillation teachers, tools): imported with one-line errors, and
digested so a changed file reruns what depends on it.

``lmladder run`` imports what its own config names. ``export``, ``report`` and ``serve``
read someone's run folder: they run inside :func:`untrusted` and any import of code the
folder's config.yaml names is refused (one-line error) unless the user passed
``--trust-run-code``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

from lmladder.errors import LadderError


_trusted = True  # process-wide (the server's worker threads included)


@contextlib.contextmanager
def untrusted(trust: bool = False):
    """Within this block, importing code named by a config is refused unless ``trust``
    (``--trust-run-code``): for commands that read a run folder written by someone else."""
    global _trusted
    before, _trusted = _trusted, bool(trust)
    try:
        yield
    finally:
        _trusted = before


def check_trusted(spec: str, field: str) -> None:
    """LadderError when code named by a run folder may not be imported here."""
    if not _trusted:
        raise LadderError(
            f"{field}: '{spec}' is code named in the run folder's config; this command does not import it "
            "(it could be anyone's code) unless you pass --trust-run-code"
        )


def load_callable(spec: str, field: str, expected: str = "'module:function'") -> Callable:
    """Import ``module:function`` / ``file.py:function``; the function, or LadderError (one
    line starting with ``field``). A module that is not importable is also looked for in
    the working directory (a module next to the user's data)."""
    check_trusted(spec, field)
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise LadderError(f"{field}: '{spec}' is not {expected}")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser().resolve()
            if not path.is_file():
                raise LadderError(f"{field}: {path}: file not found")
            s = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError:
                if os.getcwd() in sys.path:
                    raise
                sys.path.insert(0, os.getcwd())
                module = importlib.import_module(mod_name)
    except LadderError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise LadderError(f"{field}: cannot import '{mod_name}' ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LadderError(f"{field}: '{mod_name}' has no function '{fn_name}'")
    return fn


def source_digest(spec: str) -> str | None:
    """Content digest of the file defining a ``module:function`` (found without importing
    it), or None when it cannot be found."""
    mod_name = spec.rpartition(":")[0]
    try:
        if mod_name.endswith(".py"):
            origin = str(Path(mod_name).expanduser().resolve())
        else:
            s = importlib.util.find_spec(mod_name)
            origin = s.origin if s else None
    except (ImportError, ValueError):
        origin = None
    if not origin or not Path(origin).is_file():
        return None
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]


def folder_digest(folder: str | Path) -> str | None:
    """Names, sizes and mtimes of a folder's files (a model retrained in place), or None
    when the folder does not exist."""
    d = Path(folder)
    if not d.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(d)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
