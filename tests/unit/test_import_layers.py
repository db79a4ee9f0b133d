"""No import cycle between the units of `distserve/`: each subpackage (distserve.core,
distserve.sim, ...) is one unit, each top-level module (distserve/config.py,
distserve/llm.py, ...) is its own, and so are distserve/__init__.py and
distserve/cli/__main__.py. Every import counts, wherever it sits: at the top, inside a
function (a lazy import still ties the two units together) or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "distserve"
OWN_UNITS = {"distserve", "distserve.cli.__main__"}
"""Modules that are a unit on their own although they sit at or inside a package."""

Edge = tuple[str, str]
Site = str  # "distserve/sim/run.py:12: from distserve.bench import metrics"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether `name` is a module or package under distserve/ (else a name inside one)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit_of(module: str) -> str:
    if module in OWN_UNITS:
        return module
    parts = module.split(".")
    return ".".join(parts[:2])  # distserve.sim.run -> distserve.sim; distserve.llm as is


def imported_modules(path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The distserve modules an import statement loads, relative imports resolved. An
    import of a package's submodule names the submodule, not just the package: the
    parent package's own __init__ runs too, but that edge is implied by the package
    layout and would tie every unit to distserve/__init__.py."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "distserve"]
    base = node.module or ""
    if node.level:
        package = module_name(path).split(".")
        if path.name != "__init__.py":
            package.pop()
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    if base.split(".")[0] != "distserve":
        return []
    names = [f"{base}.{a.name}" for a in node.names]
    return [n if is_module(n) else base for n in names]


def unit_edges() -> dict[Edge, list[Site]]:
    """(importing unit, imported unit) -> the import lines that make that edge."""
    edges: dict[Edge, list[Site]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        src_unit = unit_of(module_name(path))
        for node in ast.walk(ast.parse(source, str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            line = ast.get_source_segment(source, node) or ""
            where = f"{path.relative_to(ROOT)}:{node.lineno}: {' '.join(line.split())}"
            for dst_unit in {unit_of(m) for m in imported_modules(path, node)} - {src_unit}:
                edges[src_unit, dst_unit].append(where)
    return edges


def cycles(edges: dict[Edge, list[Site]]) -> list[list[str]]:
    """One shortest cycle through each unit that lies on any cycle (deduplicated)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    found: dict[frozenset[str], list[str]] = {}
    for start in sorted(graph):
        path = _shortest_path_back(graph, start)
        if path and frozenset(path) not in found:
            found[frozenset(path)] = path
    return list(found.values())


def _shortest_path_back(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """[start, ..., u] with an edge u -> start, shortest such, by breadth-first search."""
    parent: dict[str, str] = {}
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for u in frontier:
            for v in sorted(graph[u]):
                if v == start:
                    path = [u]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if v not in seen:
                    seen.add(v)
                    parent[v] = u
                    nxt.append(v)
        frontier = nxt
    return None


def describe(cycle: list[str], edges: dict[Edge, list[Site]]) -> str:
    lines = [" -> ".join([*cycle, cycle[0]])]
    for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
        lines.append(f"  {a} -> {b}:")
        lines.extend(f"    {site}" for site in edges[a, b])
    return "\n".join(lines)


def test_the_walker_sees_every_kind_of_import() -> None:
    """A check of the checker: lazy, TYPE_CHECKING and relative imports are all seen."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import distserve.core.request\n"
        "from distserve import timing, LLM\n"
        "from . import routing\n"
        "from .scheduler import base\n"
        "if TYPE_CHECKING:\n"
        "    from distserve.sim.run import SimOptions\n"
        "def f():\n"
        "    from ..config import EngineConfig\n"
    )
    path = PACKAGE / "core" / "plan.py"
    found = [
        m
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for m in imported_modules(path, node)
    ]
    assert found == [
        "distserve.core.request",
        "distserve.timing",
        "distserve",
        "distserve.core.routing",
        "distserve.core.scheduler.base",
        "distserve.sim.run",
        "distserve.config",
    ]
    assert [unit_of(m) for m in found] == [
        "distserve.core",
        "distserve.timing",
        "distserve",
        "distserve.core",
        "distserve.core",
        "distserve.sim",
        "distserve.config",
    ]
    assert unit_of("distserve.cli.__main__") == "distserve.cli.__main__"
    assert cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [
        ["a", "b", "c"]
    ]


def test_no_import_cycle_between_units() -> None:
    edges = unit_edges()
    assert edges, "the walker found no imports at all: is the path right?"
    found = cycles(edges)
    assert not found, "import cycles between units of distserve/:\n" + "\n".join(
        describe(c, edges) for c in found
    )
