"""Converted artifacts: converted once per (ONNX sha256, converter version, options), cached, timed.

A backend that runs something other than the .onnx file (an MNN model, ncnn param/bin, ...)
declares ``Capabilities(converts=True)`` and obtains its artifact through :func:`converted`.
The artifact lives under ``<results>/converted/<backend>/<key>/`` where ``key`` hashes the
source ONNX bytes' sha256, the converter's name and version and the conversion options; a
``conversion.json`` beside it records the conversion seconds, the converter version and the
artifact's sha256. A later open with the same key reuses it (``cached=True``, the seconds of the
conversion that built it). A conversion that fails raises :class:`ConversionFailed` naming the
operator or the reason; nothing is cached for it, so a fixed converter is tried again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.errors import ContractError
from core.files import write_text_atomic
from core.paths import results_dir

RECORD = "conversion.json"


class ConversionFailed(ContractError):
    """A converter could not convert a model: the message names the operator or the reason."""


@dataclass
class Conversion:
    """One converted artifact: where it is and how it was made."""

    artifact: str
    converter: str
    converter_version: str
    options: dict[str, Any]
    source_sha256: str
    artifact_sha256: str
    seconds: float
    cached: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RECORD):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(source_sha256: str, converter: str, version: str, options: dict[str, Any]) -> str:
    text = json.dumps([source_sha256, converter, version, options], sort_keys=True)
    return _sha256(text.encode())[:20]


def converted(backend: str, source: bytes, converter: str, version: str, options: dict[str, Any],
              build: Callable[[Path, Path], dict[str, Any] | None], root: Path | None = None) -> Conversion:
    """The artifact for ``source`` (serialized ONNX bytes), built by ``build(onnx_file, out_folder)``
    when not cached. ``build`` writes its files into ``out_folder``, may return details to record,
    and raises :class:`ConversionFailed` with the operator or reason when the converter fails."""
    source_sha = _sha256(source)
    key = cache_key(source_sha, converter, version, options)
    folder = (root or results_dir() / "converted") / backend / key
    record = folder / RECORD
    if record.is_file():
        data = json.loads(record.read_text(encoding="utf-8"))
        return Conversion(**{**data, "cached": True})
    work = folder.with_name(key + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    onnx_file = work / "source.onnx"
    onnx_file.write_bytes(source)
    start = time.perf_counter()
    try:
        detail = build(onnx_file, work) or {}
    except (ConversionFailed, KeyboardInterrupt, SystemExit, MemoryError):
        shutil.rmtree(work, ignore_errors=True)
        raise
    except Exception as exc:  # a converter's own bug (onnx2torch: KeyError on a graph it misreads) is still
        shutil.rmtree(work, ignore_errors=True)  # a per-model outcome, never a crash of bench or run
        raise ConversionFailed(f"{converter} {version} failed on this graph: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
    seconds = time.perf_counter() - start
    onnx_file.unlink()
    conversion = Conversion(artifact="", converter=converter, converter_version=version, options=dict(options),
                            source_sha256=source_sha, artifact_sha256=_tree_sha256(work), seconds=seconds,
                            detail=detail)
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    conversion.artifact = str(folder)
    write_text_atomic(record, json.dumps({k: v for k, v in conversion.to_dict().items() if k != "cached"},
                                         indent=1, sort_keys=True))
    return conversion


def first_reason(log: str, needles: tuple[str, ...] = ("not support", "Unsupported", "unsupported", "Error",
                                                      "error", "failed", "Failed")) -> str:
    """The line of a converter's log that names what failed (the last one carrying a needle)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    hits = [ln for ln in lines if any(n in ln for n in needles)]
    return (hits[-1] if hits else (lines[-1] if lines else "no output"))[:300]


def probe_conversion(backend: str, converter: str, version: str, build: Callable[[Path, Path], dict[str, Any] | None],
                     run: Callable[[Path, Any], Any], label: str, root: Path | None = None) -> tuple[bool, str]:
    """A converting backend's probe: convert the one-node Relu model (``base.tiny_model_bytes``) with
    ``build`` in a throw-away folder, run it with ``run(artifact_folder, x)`` (returns ``y``) and
    check Relu's values. ``(usable, reason)``; ``label`` names the runtime in the reason. The probe's
    artifact is thrown away unless ``root`` names a cache to keep it in (a converter that takes
    seconds to start)."""
    import tempfile

    import numpy as np

    from runtime.backends.base import tiny_model_bytes

    with tempfile.TemporaryDirectory(prefix="detbench-probe-") as tmp:
        try:
            conv = converted(backend, tiny_model_bytes(), converter, version, {}, build, root or Path(tmp))
            out = np.asarray(run(Path(conv.artifact), np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)))
        except Exception as exc:  # noqa: BLE001 - the probe reports whatever stops the runtime, as its reason
            return False, f"{label} cannot convert and run a one-node model: {exc}"
    if out.reshape(-1).tolist() != [0.0, 2.0, 0.0, 4.0]:
        return False, f"{label} ran the one-node probe model but returned {out.tolist()}"
    return True, ""
