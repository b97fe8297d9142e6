"""The results store: one JSON object per line in ``<results dir>/results.jsonl``.

Every measurement (export, profile, bench, eval) appends one record::

    {"kind": "bench", "model": "yolov3-416", "model_sha256": "...", "provider": "cpu",
     "settings": {...}, "contract": {...detbench.* metadata...}, "host": {...},
     "versions": {...}, "created": "2026-11-24T02:40:00+00:00", "data": {...}}

Appends are whole lines under an exclusive lock, so concurrent writers and an
interrupted run never leave a half record; a line that does not parse is skipped on
read and counted (``load`` reports it through ``corrupt_lines``) rather than losing the rest.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
import socket
from dataclasses import dataclass, field
from importlib import metadata as _md
from pathlib import Path
from typing import Any

from core.paths import results_dir

STORE_NAME = "results.jsonl"
KINDS = ("export", "quantize", "profile", "bench", "eval", "images", "tune")
_VERSIONED = ("onnx", "onnxruntime-gpu", "onnxruntime", "torch", "torchvision", "tensorflow-cpu", "tf2onnx",
              "opencv-python-headless", "pycocotools", "faster-coco-eval", "numpy", "openvino", "ray")


def store_path(root: Path | None = None) -> Path:
    return (root or results_dir()) / STORE_NAME


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "machine": platform.machine(), "system": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    found = {}
    for dist in _VERSIONED:
        try:
            found[dist] = _md.version(dist)
        except _md.PackageNotFoundError:
            continue
    return found


def append(kind: str, data: dict[str, Any], *, model: str | None = None, model_sha256: str | None = None,
           provider: str | None = None, settings: dict[str, Any] | None = None,
           contract: dict[str, str] | None = None, root: Path | None = None,
           host: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append one record and return it. ``host`` is the machine that measured (default: this one;
    ``run --ray`` writes every record from the driver, naming the worker that produced it)."""
    if kind not in KINDS:
        raise ValueError(f"record kind {kind!r} is not one of {KINDS}")
    record = {
        "kind": kind, "model": model, "model_sha256": model_sha256, "provider": provider,
        "settings": settings or {}, "contract": contract or {}, "host": host or host_info(), "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "data": data,
    }
    path = store_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return record


@dataclass
class Loaded:
    records: list[dict[str, Any]] = field(default_factory=list)
    corrupt_lines: list[int] = field(default_factory=list)


def load(kind: str | None = None, model: str | None = None, root: Path | None = None) -> Loaded:
    """All records (optionally of one kind / model), oldest first."""
    path = store_path(root)
    out = Loaded()
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                out.corrupt_lines.append(number)
                continue
            if (kind is None or rec.get("kind") == kind) and (model is None or rec.get("model") == model):
                out.records.append(rec)
    return out


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in the results store")
