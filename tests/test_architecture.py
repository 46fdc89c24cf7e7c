"""The shape of the house (docs/architecture.md), checked from the source:

* no import cycle among lmladder's modules: the graph is computed with ``ast`` from every
  import statement, function-level ones included (a lazy import hides a cycle, it does
  not remove it), and importing ``a.b.c`` counts as importing the packages ``a.b`` and
  ``a`` whose ``__init__`` runs first; imports under ``if TYPE_CHECKING:`` never run;
* nothing under rungs/ imports the registry: a rung asks its context for other rungs;
* the rung registry, RunConfig's rung sections and the docs' rung tables agree;
* tasks.KINDS is the one list of task kinds (the config validates against it).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC.parent


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (SRC / "lmladder").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _type_checking_nodes(tree) -> set[int]:
    skip = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            for b in n.body:
                skip.update(id(x) for x in ast.walk(b))
    return skip


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported lmladder module: line of the (first) import}."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                t = known(t)
                while t:  # the module and every package __init__ on its way
                    if t != m and not m.startswith(t + ".") and t != "lmladder":
                        graph[m].setdefault(t, node.lineno)
                    t = known(t.rpartition(".")[0]) if "." in t else None
    return graph


def find_cycle(graph) -> list[str] | None:
    """One import cycle as a path (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_lazy_cycle():
    g = {"a": {"b": 3}, "b": {"c": 9}, "c": {"a": 40}, "d": {"a": 1}}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    where = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) if cycle else ""
    assert cycle is None, f"import cycle: {where} -> {cycle[-1] if cycle else ''}"


def test_lazy_imports_are_in_the_graph():
    """The graph sees function-level imports (the cycle test would be blind otherwise)."""
    graph = import_graph()
    src = (SRC / "lmladder/cli.py").read_text()
    lazy = re.search(r"^\s+from lmladder\.run import ladder$", src, re.M)
    assert lazy, "cli.py imports the ladder lazily (so --help answers at once)"
    assert "lmladder.run.ladder" in graph["lmladder.cli"]


def test_no_rung_imports_the_registry():
    graph = import_graph()
    offenders = [m for m in graph if m.startswith("lmladder.rungs") and "lmladder.registry" in graph[m]]
    assert offenders == []


def _rung_sections():
    from pydantic import BaseModel

    from lmladder.config import RunConfig

    run_wide = {"task", "data", "eval", "decision", "cost", "ladder", "tracking", "judge"}
    out = {}
    for name, f in RunConfig.model_fields.items():
        key = f.alias or name
        if key in run_wide or not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)):
            continue
        out[key] = f.annotation
    return out


def test_registry_config_and_docs_agree():
    from lmladder import registry

    sections = _rung_sections()
    assert set(sections) == set(registry.RUNGS)
    for name, cls in registry.RUNGS.items():
        # the rung's Config lives in the rung's own file
        assert sections[name].__module__ == cls.__module__, (name, sections[name].__module__)
        assert cls.name == name
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## The rungs", 1)[1].split("\n\n", 2)[1]
    in_readme = {n for row in table.splitlines()[2:] for n in re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])}
    assert in_readme == set(registry.RUNGS)
    docs = (ROOT / "docs/rungs.md").read_text()
    in_docs = set(re.findall(r"^## ([a-z0-9-]+)$", docs, re.M))
    assert set(registry.RUNGS) <= in_docs, sorted(set(registry.RUNGS) - in_docs)


def test_task_kinds_have_one_list():
    from lmladder import config
    from lmladder.errors import LadderError
    from lmladder.tasks import KINDS

    for kind in KINDS:
        assert config.build({"task": {"kind": kind}}).task.kind == kind
    with pytest.raises(LadderError, match=r"'clasification' is not a task kind .*did you mean 'classification'"):
        config.build({"task": {"kind": "clasification"}})
    help_text = config.RunConfig.model_fields["task"].annotation.model_fields["kind"].description
    assert all(k in help_text for k in KINDS)
    # no second list of kinds in the source
    for p in (SRC / "lmladder").rglob("*.py"):
        if p.parts[-2] == "tasks":
            continue
        assert not re.search(r'"classification", "math", "qa"', p.read_text()), p
