"""The package boundaries the import-linter contract cannot see: no module reaches into another package's private
modules or names. (Which package may import which is the contract in pyproject.toml, run by `make test`.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"
PACKAGE = SERVER / "budgetwarden"


def owner(module: str) -> str:
    """The package a dotted module belongs to: `budgetwarden.store._keys` -> `budgetwarden.store`; top-level modules
    (`budgetwarden.cli`) own only themselves."""
    parts = module.split(".")
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SERVER).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def crossings(tree: ast.Module, here: str) -> list[str]:
    """Imports in module `here` (its parsed `tree`) of a private module or name of another budgetwarden package."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        if not node.module.startswith("budgetwarden.") or owner(node.module) == owner(here):
            continue
        private_module = any(part.startswith("_") for part in node.module.split(".")[1:])
        private_names = [alias.name for alias in node.names if alias.name.startswith("_")]
        if private_module or private_names:
            found.append(f"{here}:{node.lineno} from {node.module} import {[a.name for a in node.names]}")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
# Parsed at collection, before any test starts a thread: CPython 3.11's AST construction keeps its recursion depth in
# state shared by the interpreter's threads, and a thread parsing at the same time (3.11's tracebacks parse source to
# place their ^^^ carets, e.g. a sidecar thread logging an exception) makes ast.parse raise "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905; seen once in make test).
TREES = {path: ast.parse(path.read_text(), str(path)) for path in MODULES}
SELF_TEST_SOURCE = (
    "from budgetwarden.store._keys import TenantKeys\n"
    "from budgetwarden.domain import _x\n"
    "from budgetwarden.transport._admin import AdminServicer\n"
    "from budgetwarden.store import TenantKeys\n"
)
SELF_TEST_TREE = ast.parse(SELF_TEST_SOURCE)


def test_the_layout_has_its_packages() -> None:
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {"domain", "telemetry", "store", "transport", "app", "inject"} <= packages
    assert len(MODULES) > 30


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_private_name_of_another_package(path: Path) -> None:
    assert crossings(TREES[path], module_name(path)) == []


def test_the_check_sees_a_private_crossing_and_allows_one_inside_a_package() -> None:
    assert len(crossings(SELF_TEST_TREE, "budgetwarden.transport._service")) == 2
