"""The house rules of the layout (docs/ARCHITECTURE.md), checked on the source: imports run one
way (cluster -> gateway -> engine -> {grammars, kernels}; gateway -> grammars), nothing imports the programs
that are clients of the server, and no module of the four packages outgrows 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "gateway", "grammars", "kernels", "cluster")
# package -> the first-party top-level packages it may import (besides itself)
ALLOWED = {
    "kernels": set(),
    "grammars": set(),
    "engine": {"grammars", "kernels"},
    "gateway": {"engine", "grammars"},
    "cluster": {"gateway", "engine", "grammars"},   # Ray Serve around the gateway; not imported back
}
FIRST_PARTY = set(PACKAGES) | {"clients", "benchmarks", "loadtests", "tests"}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """Top-level first-party packages a module imports anywhere (function-level included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & FIRST_PARTY


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package: str) -> None:
    wrong = {str(p.relative_to(ROOT)): sorted(imported_packages(p) - ALLOWED[package] - {package})
             for p in modules(package)}
    assert {k: v for k, v in wrong.items() if v} == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_400_lines(package: str) -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules(package)}
    assert {k: n for k, n in sizes.items() if n > 400} == {}
