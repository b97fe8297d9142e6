"""benchmarks/runtime_table.py's rendering: a backend that disagrees never shows as a plain latency,
a failed conversion shows its reason, an INVALID p50 says so."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table():
    spec = importlib.util.spec_from_file_location("runtime_table", ROOT / "benchmarks" / "runtime_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(verdict: str, ratio: float = 1.5, p50_verdict: str = "VALID") -> dict:
    return {"conversion": {"ok": True, "seconds": 12.0, "cached": False},
            "parity": {"verdict": verdict, "network_max_rel": 17.6 if verdict == "disagree" else 7e-5,
                       "max_box_px": 0.01, "reasons": ["network outputs differ"] if verdict == "disagree" else []},
            "ratio_to_cpu": ratio, "n": 20, "p50_verdict": p50_verdict}


def _row(backends: dict) -> dict:
    return {"model": "ssd300", "cpu": {"p50_ms": 100.0, "n": 30, "p50_verdict": "VALID"}, "backends": backends}


def test_disagreeing_backend_is_not_a_latency():
    table = _table()
    text = table.render([_row({"ncnn": _cell("disagree", 1.19), "mnn": _cell("agree", 1.42)})],
                        ["mnn", "ncnn"], {}, [])
    row = next(line for line in text.splitlines() if line.startswith("| ssd300"))
    mnn, ncnn = row.split(" | ")[2:4]
    assert mnn.startswith("1.42x (n=20)") and "agree" in mnn
    assert "DISAGREES" in ncnn and "~~1.19x~~ not a latency" in ncnn
    assert "1.19x (" not in ncnn  # never the plain form a latency takes
    assert "ssd300 on ncnn: parity disagree: network outputs differ" in text


def test_failed_conversion_and_invalid_p50_are_said():
    table = _table()
    failed = {"conversion": {"ok": False, "reason": "NoSplit: the network part needs NonMaxSuppression"}}
    text = table.render([_row({"mnn": failed, "ncnn": _cell("agree", 2.0, "INVALID")})], ["mnn", "ncnn"],
                        {"litert": "not registered in this checkout"}, [])
    row = next(line for line in text.splitlines() if line.startswith("| ssd300"))
    assert "conversion failed" in row and "2.00x (n=20 INVALID)" in row
    assert "ssd300 on mnn: NoSplit: the network part needs NonMaxSuppression" in text
    assert "litert: not registered in this checkout" in text
