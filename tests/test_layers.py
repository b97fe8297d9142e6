"""The layering rule, checked by the project itself: every package imports only packages below it.

The order is the one README's layout table states. Every import counts, at module level or
inside a function (a lazy import is still a dependency), and so does ``importlib.import_module``
with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a package may import only those before it
LAYERS = ["core", "counting", "exporters", "runtime", "eval", "quantization", "report", "pipeline"]
NOT_PACKAGES = {"tests", "benchmarks", "docs", "results", "build"}


def _packages() -> set[str]:
    return {p.name for p in ROOT.iterdir()
            if p.is_dir() and (p / "__init__.py").is_file() and p.name not in NOT_PACKAGES}


def _imported_names(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def imports_between_packages(packages: set[str]) -> list[tuple[str, str, str]]:
    """(importing file:line, importing package, imported package) for every cross-package import."""
    edges = []
    for pkg in sorted(packages):
        for file in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
            for line, name in _imported_names(tree):
                top = name.split(".")[0]
                if top in packages and top != pkg:
                    edges.append((f"{file.relative_to(ROOT)}:{line}", pkg, top))
    return edges


def test_every_package_has_a_layer():
    missing = sorted(_packages() - set(LAYERS))
    assert not missing, f"top-level package(s) {missing} have no place in LAYERS (tests/test_layers.py, README layout)"


def test_every_import_points_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{where}: {pkg} imports {top}" for where, pkg, top in imports_between_packages(_packages())
              if rank.get(top, -1) >= rank.get(pkg, len(LAYERS))]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("source, expected", [
    ("import core.paths\n", [(1, "core.paths")]),
    ("def f():\n    from runtime.backends import get_backend\n", [(2, "runtime.backends")]),
    ("import importlib\nimportlib.import_module('eval.coco')\n", [(1, "importlib"), (2, "eval.coco")]),
    ("from . import sibling\n", []),
])
def test_the_import_reader_sees_lazy_and_dynamic_imports(source, expected):
    assert list(_imported_names(ast.parse(source))) == expected
