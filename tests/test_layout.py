"""The layout's rules (DEVELOPERS.md): dependencies point one way, from the service down to the bundle contract, and
no module imports another that imports it back, by any path, lazily or for types only."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("bundle", "exporter", "worker")
# what each package may import of the others: the bundle contract is the bottom, and the worker never the exporter
ALLOWED = {"bundle": set(), "exporter": {"bundle"}, "worker": {"bundle"}}


def modules() -> dict[str, Path]:
    """Every module of the packages, by its dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere: at the top, inside a function, under TYPE_CHECKING."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        out |= {name for name in names if name in known}
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def cycle_through(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from ``start`` back to itself, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(edges[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    cycles = [" -> ".join(c) for name in sorted(edges) if (c := cycle_through(name, edges))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_packages_import_downwards_only():
    edges = graph()
    wrong = sorted(f"{a} imports {b}" for a, targets in edges.items() for b in targets
                   if (pa := a.split(".")[0]) != (pb := b.split(".")[0]) and pb not in ALLOWED[pa])
    assert not wrong, "\n".join(wrong)
