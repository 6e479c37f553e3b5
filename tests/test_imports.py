"""House rules read from the source, without importing it: imports point one way (no
circles, and the layers of docs/architecture.md), and no module is over about 500 lines
without a reason at its top.

Imports are found with :mod:`ast` in every ``.py`` file of the packages, at any depth:
module level, inside functions, and under ``if TYPE_CHECKING:`` all count. A lazy import
hides a circle from Python at run time but not from the reader, who still cannot
understand one module without the other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("edge", "gateway", "firmware_sim", "edgeferry")

# Which of our packages each package may import (besides itself).
LAYERS: dict[str, set[str]] = {
    "edge": set(),
    "gateway": {"edge"},
    "firmware_sim": {"edge"},
    "edgeferry": {"edge", "gateway", "firmware_sim"},
}

# Import circles that exist today and are being removed (issue 9: the house-edge
# restructure). Each entry is one strongly connected component of the import graph, as
# a set of module names. The test fails on any circle not listed here, and also on an
# entry that no longer is a circle exactly: when a circle goes, its entry goes with it.
KNOWN_CIRCLES: list[frozenset[str]] = []

MAX_LINES = 500
SIZE_SCOPE = (*PACKAGES, "bench")  # tests/ are lists of cases; they are not held to it

# Modules over MAX_LINES that are being split right now (issue 9) or whose owner has not
# yet said why they are long. The test fails when one of these is no longer over the
# limit or has gained a "Size:" line, so the entry is removed then.
KNOWN_LONG: set[str] = set()


# ---------------------------------------------------------------------------- reading


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of our packages, and every .c file (an
    extension module built from it, edge/_cparse.c: it imports nothing of ours)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted([*(REPO / pkg).rglob("*.py"), *(REPO / pkg).rglob("*.c")]):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imported_names(module: str, source: str, is_pkg: bool = False) -> Iterator[str]:
    """Every module name that ``module`` imports, absolute, at any depth of its source.
    For ``from a.b import c``: ``a.b.c`` when that is a module of ours, else ``a.b``."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in MODULES else target


def _ours(name: str) -> str | None:
    """The module of ours that importing ``name`` runs last (longest known prefix)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        if path.suffix == ".c":
            graph[module] = set()
            continue
        names = _imported_names(module, path.read_text(), path.name == "__init__.py")
        targets = {t for n in names if (t := _ours(n)) is not None}
        targets.discard(module)
        graph[module] = targets
    return graph


GRAPH = _graph()


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def _path_in(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    """One circle inside a component, as ``a -> b -> a``, for the failure message."""
    start = min(component)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [start]
                    while node != start:
                        path.append(node)
                        node = prev[node]
                    return " -> ".join([start, *reversed(path[1:]), start])
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    return start


# ---------------------------------------------------------------------------- checks


def test_the_walk_sees_the_imports_it_should():
    """The checks below stand on this: a walk that found nothing would pass them all."""
    assert len(MODULES) > 40 and {"edge", "edge.mqtt", "gateway", "edgeferry.cli"} <= set(MODULES)
    assert sum(len(t) for t in GRAPH.values()) > 50
    source = """
import os
import edge.mqtt
from edge import events
from gateway import frames as f, NotAModule
from . import store
from .store import Store
def lazy():
    from firmware_sim.fleet import Fleet
if TYPE_CHECKING:
    from edgeferry.procs import Broker
"""
    names = {_ours(n) for n in _imported_names("gateway.uplink", source)} - {None}
    assert names == {"edge.mqtt", "edge.events", "gateway.frames", "gateway", "gateway.store",
                     "firmware_sim.fleet", "edgeferry.procs"}
    assert _circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [frozenset({"a", "b"})]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_new_import_circles():
    circles = _circles(GRAPH)
    new = [c for c in circles if c not in KNOWN_CIRCLES]
    assert not new, "import circles:\n" + "\n".join(_path_in(c, GRAPH) for c in new)


def test_known_circles_are_still_there():
    """An allow-list entry whose circle is gone must go too (it would hide its return)."""
    circles = _circles(GRAPH)
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in circles]
    assert not gone, f"no longer circles: remove from KNOWN_CIRCLES: {gone}"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_layers(pkg):
    """edge imports nothing of ours; gateway and firmware_sim only edge; nothing
    imports edgeferry (the CLI, demo and process harness sit on top)."""
    allowed = LAYERS[pkg] | {pkg}
    wrong = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if m.split(".")[0] == pkg
                   for t in targets if t.split(".")[0] not in allowed)
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------- size


def _long_modules() -> dict[str, bool]:
    """Repo path -> whether its docstring gives a reason (a line starting "Size:"), for
    every module over MAX_LINES."""
    out: dict[str, bool] = {}
    for top in SIZE_SCOPE:
        for path in sorted((REPO / top).rglob("*.py")):
            text = path.read_text()
            if text.count("\n") <= MAX_LINES:
                continue
            doc = ast.get_docstring(ast.parse(text)) or ""
            reason = any(line.strip().startswith("Size:") for line in doc.splitlines())
            out[path.relative_to(REPO).as_posix()] = reason
    return out


def test_no_module_over_500_lines_without_a_reason():
    unexplained = sorted(p for p, reason in _long_modules().items()
                         if not reason and p not in KNOWN_LONG)
    assert not unexplained, (
        f"over {MAX_LINES} lines with no 'Size:' line in the module docstring: {unexplained} "
        "(split the module, or say at its top why it is one)")


def test_known_long_modules_still_need_their_entry():
    long = _long_modules()
    stale = sorted(p for p in KNOWN_LONG if p not in long or long[p])
    assert not stale, f"no longer over {MAX_LINES} lines without a reason: remove from KNOWN_LONG: {stale}"
