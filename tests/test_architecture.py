"""The layering the README's "Architecture" section promises, checked on every import in src/ (function-level and
TYPE_CHECKING ones included): no cycle between modules, and no import from a lower layer into a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "visiontune"

# Lowest first. A module belongs to the longest prefix listed; modules of one layer may import each other
# (within a subpackage) but sibling packages of one layer (export / explain, serve / cli) may not.
LAYERS = [
    ["visiontune.errors", "visiontune.version"],
    ["visiontune.files", "visiontune.samples"],
    ["visiontune.settings"],
    ["visiontune.config"],
    ["visiontune.tracking.connect"],  # reaching MLflow: below `models`, whose locate fetches `models:/` URIs
    ["visiontune.data"],
    ["visiontune.models"],
    ["visiontune.tracking"],  # finished folders, exports and searches as MLflow runs; the search in `training` calls it
    ["visiontune.training"],
    ["visiontune.export", "visiontune.explain"],
    ["visiontune.inference"],
    ["visiontune.evaluation"],
    ["visiontune.jobs"],
    ["visiontune.api"],
    ["visiontune"],  # the package root re-exports the API
    ["visiontune.serve"],
    ["visiontune.cli_settings"],
    ["visiontune.cli"],
]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[int, str]]:
    """(line, imported module) for every visiontune import in module `name`, wherever it stands."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "visiontune"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "visiontune":
                continue
            for alias in node.names:  # `from visiontune import samples` imports a module, not the package root
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return found


def owner(name: str) -> tuple[int, str]:
    """(layer index, the prefix that places it) of module `name`."""
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    assert best is not None, f"{name} is in no layer: add it to LAYERS and to the README's Architecture section"
    return best


def test_every_module_has_a_layer():
    for name in MODULES:
        owner(name)


def test_imports_point_down_the_layers():
    wrong = []
    for name in MODULES:
        rank, place = owner(name)
        for line, target in imports_of(name):
            target_rank, target_place = owner(target)
            if target_rank > rank or (target_rank == rank and target_place != place):
                wrong.append(f"{MODULES[name].relative_to(SRC)}:{line} {name} ({place}) imports {target} ({target_place})")
    assert not wrong, "imports that run up (or across) the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: sorted({t for _, t in imports_of(name) if t in MODULES and t != name}) for name in MODULES}
    # the package root is imported by Python before any submodule, not by the submodules' code: not an edge back
    state, stack, cycles = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it by job (limit {MAX_LINES})"
