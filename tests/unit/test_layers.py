"""The package import graph points one way: no cycle, and no package imports one above it.

Layers, lowest first. A module may import its own package, the leaves, and
any package of a lower layer; `lab` (test and demo harness) and the CLI sit on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "dataplane"

LAYERS = [
    {"config", "marks", "packet"},  # leaves: plain values every layer shares
    {"model"},
    {"lb"},
    {"nat", "netlink"},
    {"queue", "sync"},
    {"dns"},  # its stand-alone entry point (python -m dataplane.dns) reads manifests through sync
    {"daemon"},
    {"cli", "lab"},
    {"__main__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> set[str]:
    """The dataplane units a module imports (at any depth in the file: lazy imports count too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(ROOT).parent.parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = (*base, *(node.module.split(".") if node.module else ()))
                if not target:  # `from .. import x`: each name is a unit
                    found.update(alias.name for alias in node.names)
                    continue
            elif node.module and node.module.split(".")[0] == "dataplane":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            if target:
                found.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dataplane" and len(parts) > 1:
                    found.add(parts[1])
    return found


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_unit(path) for path in MODULES} - {"__init__"}
    assert units <= RANK.keys(), f"add to LAYERS: {sorted(units - RANK.keys())}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    unit = _unit(path)
    if unit == "__init__":
        return
    upward = {other for other in _imports(path) - {unit} if RANK.get(other, -1) >= RANK[unit]}
    assert not upward, f"{path.relative_to(ROOT)} ({unit}, layer {RANK[unit]}) imports {sorted(upward)}"


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    assert _imports(ROOT / "nat" / "render.py") >= {"config", "model"}
    assert "nat" in _imports(ROOT / "daemon" / "proxier.py")
