"""The run manifest: what ``run`` already did, keyed by the inputs of each step.

``<results dir>/run-manifest.json`` holds one entry per (model, input size, step,
provider)::

    {"model": "yolov3-tiny", "input_size": [416, 416], "step": "bench", "provider": "cpu",
     "key": "<sha256 of the step's inputs>", "status": "done" | "skipped" | "failed",
     "reason": "...", "onnx_sha256": "...", "path": "...", "finished": "<UTC ISO time>"}

A step whose entry has status ``done`` and the same ``key`` is not repeated. The file is
rewritten atomically after every step, so an interrupted run loses at most the step in
flight and the next run continues from there. The measurements themselves live in the
results store; the manifest only remembers which inputs produced them and why a step
was skipped (the report shows those reasons).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.files import atomic_file
from core.paths import results_dir

MANIFEST_NAME = "run-manifest.json"
VERSION = 1


def manifest_path(root: Path | None = None) -> Path:
    return (root or results_dir()) / MANIFEST_NAME


def load(root: Path | None = None) -> dict[str, Any]:
    """The manifest (an empty one when the file does not exist)."""
    path = manifest_path(root)
    if not path.exists():
        return {"version": VERSION, "entries": {}}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"run manifest {path} is unreadable ({exc}); delete it to start the run afresh "
                          "(the results store is kept)") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        raise ConfigError(f"run manifest {path} has no 'entries' table; delete it to start the run afresh")
    return doc


def entry_id(model: str, input_size: tuple[int, int], step: str, provider: str | None = None) -> str:
    return f"{model}|{input_size[0]}x{input_size[1]}|{step}|{provider or ''}"


def input_key(inputs: dict[str, Any]) -> str:
    """sha256 of a step's inputs (canonical JSON)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class Manifest:
    """The manifest of one results folder, saved after every change."""

    def __init__(self, root: Path | None = None):
        self.path = manifest_path(root)
        self.doc = load(root)

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return self.doc["entries"]

    def get(self, model: str, input_size: tuple[int, int], step: str, provider: str | None = None) -> dict | None:
        return self.entries.get(entry_id(model, input_size, step, provider))

    def put(self, model: str, input_size: tuple[int, int], step: str, provider: str | None, *, key: str,
            status: str, reason: str = "", **extra: Any) -> dict[str, Any]:
        entry = {"model": model, "input_size": list(input_size), "step": step, "provider": provider, "key": key,
                 "status": status, "reason": reason,
                 "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}
        self.entries[entry_id(model, input_size, step, provider)] = entry
        self.save()
        return entry

    def save(self) -> None:
        with atomic_file(self.path, "w", encoding="utf-8") as fh:
            json.dump(self.doc, fh, indent=1, sort_keys=True)
