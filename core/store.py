"""The results store: one JSON object per line in ``<results dir>/results.jsonl``.

Every measurement (export, profile, bench, eval) appends one record::

    {"kind": "bench", "model": "yolov3-416", "model_sha256": "...", "provider": "cpu",
     "settings": {...}, "contract": {...detbench.* metadata...}, "host": {...},
     "versions": {...}, "created": "2026-11-24T02:40:00+00:00", "data": {...}}

Appends are whole lines under an exclusive lock, so concurrent writers and an
interrupted run never leave a half record; a line that does not parse is skipped on
read and counted (``load`` reports it through ``corrupt_lines``) rather than losing the rest;
an append after a line cut short starts on a fresh line, so the cut line never swallows it.
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

from core.errors import WriteError
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


def new_record(kind: str, data: dict[str, Any], *, model: str | None = None, model_sha256: str | None = None,
               provider: str | None = None, settings: dict[str, Any] | None = None,
               contract: dict[str, str] | None = None, host: dict[str, Any] | None = None) -> dict[str, Any]:
    """One record as the store holds it. ``host`` is the machine that measured (default: this one;
    ``run --ray`` writes every record from the driver, naming the worker that produced it)."""
    if kind not in KINDS:
        raise ValueError(f"record kind {kind!r} is not one of {KINDS}")
    return {
        "kind": kind, "model": model, "model_sha256": model_sha256, "provider": provider,
        "settings": settings or {}, "contract": contract or {}, "host": host or host_info(), "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "data": data,
    }


def append(kind: str, data: dict[str, Any], *, model: str | None = None, model_sha256: str | None = None,
           provider: str | None = None, settings: dict[str, Any] | None = None,
           contract: dict[str, str] | None = None, root: Path | None = None) -> dict[str, Any]:
    """Append one record measured on this machine (:func:`new_record`) and return it."""
    return write(new_record(kind, data, model=model, model_sha256=model_sha256, provider=provider,
                            settings=settings, contract=contract), root)


def write(record: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """Append ``record`` (made by :func:`new_record`) to the store under ``root`` and return it."""
    path = store_path(root)
    line = (json.dumps(record, sort_keys=True, default=_json_default) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                # A last line cut short (power loss, disk full) must not swallow this record:
                # start on a fresh line, leaving the cut one for readers to skip and report.
                size = fh.seek(0, os.SEEK_END)
                if size:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = b"\n" + line
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError as exc:
        raise WriteError(path, exc, "the record was not stored (a partial line, if any, is skipped when read)") from exc
    return record


@dataclass
class Loaded:
    """Records read from a store; ``corrupt_lines`` are the 1-based numbers of lines that are not
    a record (not JSON; JSON that is not an object with a known ``kind`` and a ``data`` object),
    skipped so the rest is still read."""

    records: list[dict[str, Any]] = field(default_factory=list)
    corrupt_lines: list[int] = field(default_factory=list)
    file: Path | None = None

    def skipped_note(self) -> str | None:
        """"<file>: 2 line(s) that are not records were skipped (line 4, 9)", or None."""
        if not self.corrupt_lines:
            return None
        shown = ", ".join(map(str, self.corrupt_lines[:10])) + (" ..." if len(self.corrupt_lines) > 10 else "")
        return (f"{self.file}: {len(self.corrupt_lines)} line(s) that are not records (cut short, not JSON, or not "
                f"an object with a known kind and data) were skipped (line {shown})")


def load(kind: str | None = None, model: str | None = None, root: Path | None = None) -> Loaded:
    """All records (optionally of one kind / model), oldest first."""
    return read_file(store_path(root), kind=kind, model=model)


def read_file(path: Path, kind: str | None = None, model: str | None = None) -> Loaded:
    """:func:`load` for any JSON-lines file of records (a store copied elsewhere, under another name)."""
    out = Loaded(file=Path(path))
    if not out.file.exists():
        return out
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            # Readers index records by kind and read their data: anything else is not a record.
            if not (isinstance(rec, dict) and rec.get("kind") in KINDS and isinstance(rec.get("data"), dict)):
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
