"""No code outside runtime/backends/ tests a backend's name: policy goes through declared capabilities.

A name test is a comparison (``==``, ``!=``, ``in``) of a string literal that is a registered
backend name, a membership test in a literal tuple/list/set holding one, or ``endswith``/
``startswith`` on a backend-name fragment. ``cpu`` is left out: it is also the device name that
capabilities declare, and the reference backend is named through ``runtime.backends.REFERENCE``.
"""

from __future__ import annotations

import re
from pathlib import Path

from runtime.backends import ALIASES, REFERENCE, backend_names

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"runtime/backends", "tests", "benchmarks", ".git"}


def _name_tests(text: str, names: set[str]) -> list[str]:
    quoted = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    lit = rf"[\"'](?:{quoted})[\"']"
    patterns = [
        rf"(?:==|!=)\s*{lit}", rf"{lit}\s*(?:==|!=|in\b|not\s+in\b)",
        rf"\bin\s*[\(\[\{{][^\)\]\}}]*{lit}",
        r"\.(?:endswith|startswith)\(\s*[\"']-?(?:bf16|f32|fp16|int8|" + quoted + r")[\"']",
    ]
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if any(re.search(p, code) for p in patterns):
            hits.append(f"{number}: {line.strip()}")
    return hits


def test_the_detector_finds_name_tests():
    names = {"cuda", "openvino-bf16", "native"}
    assert _name_tests('gpu = provider in ("cuda", "tensorrt")', names)
    assert _name_tests('if n.endswith("-bf16"):', names)
    assert _name_tests('if r.provider == "native":', names)
    assert not _name_tests('if caps.device != "cpu":', names)
    assert not _name_tests('x = "cuda"  # == "cuda"', names)


def test_no_backend_name_test_outside_backends():
    names = (set(backend_names()) | set(ALIASES)) - {REFERENCE}
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in SKIP):
            continue
        hits = _name_tests(path.read_text(encoding="utf-8"), names)
        if hits:
            found[rel] = hits
    assert not found, f"backend names tested outside runtime/backends/ (declare a capability instead): {found}"
