"""No function outside cli.py takes more than MAX_PARAMETERS parameters: settings travel as
objects built once at the command line, not re-packed into long argument lists at every hop.

``self``/``cls`` do not count; ``*args`` and ``**kwargs`` count one each (a catch-all is no way
around the rule).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "benchmarks", "results", "build", ".git", "docs"}
MAX_PARAMETERS = 8


def _functions():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or rel.name == "cli.py" or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield rel, node


def _count(node) -> int:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return len(names) - (names[:1] in (["self"], ["cls"]))


def test_no_function_outside_cli_takes_more_than_eight_parameters():
    over = [f"{rel}:{node.lineno} {node.name} ({_count(node)})" for rel, node in _functions()
            if _count(node) > MAX_PARAMETERS]
    assert over == [], "functions with more than 8 parameters (pass a settings object): " + ", ".join(over)


def test_the_count_sees_keyword_only_and_positional_parameters():
    tree = ast.parse("def f(a, b, /, c, *, d, e=1, **kw): pass\nclass C:\n    def m(self, x): pass\n")
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert _count(funcs["f"]) == 6 and _count(funcs["m"]) == 1
