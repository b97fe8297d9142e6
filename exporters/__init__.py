"""Exporters: a registered model (models.toml) to a validated, self-describing ONNX file.

One subpackage per source framework builds its families (``darknet``, ``pytorch``,
``tensorflow``; ``foreign`` wraps ONNX files of other layouts); this package only dispatches,
through the interface each framework declares (``exporters.interface``: its modules and
capabilities, no signature probing). Every exporter returns an :class:`ExportResult` and writes
the file only after the export was validated against its source model (see
``exporters.validation``). Shared by every framework: ``registry`` (models.toml), ``weights``
(locating and fetching weights), ``validation``, ``native_model``, ``matching`` (detection
matching, IoU and NMS).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.names import file_in
from exporters.frameworks import FRAMEWORKS
from exporters.interface import ExportModule, ExportResult, Framework, NativeModule, Progress
from exporters.registry import ModelSpec

__all__ = ["BATCH_SUFFIX", "FRAMEWORKS", "ExportResult", "Framework", "Progress", "batch_support", "default_output",
           "export_model", "native_module"]

BATCH_SUFFIX = "@batch"  # NAME@batch.onnx, contract name NAME@batch: the symbolic-batch export


def default_output(spec: ModelSpec, out_dir: Path, input_size: tuple[int, int] | None = None,
                   batch: bool = False) -> Path:
    h, w = input_size or spec.input_size
    suffix = ("" if (h, w) == spec.input_size else f"-{h}x{w}") + (BATCH_SUFFIX if batch else "")
    return file_in(Path(out_dir), spec.name, f"{suffix}.onnx", where=f"model {spec.name!r}")


def batch_support(spec: ModelSpec) -> tuple[bool, str]:
    """Whether ``export --batch`` can build ``spec`` (a symbolic batch axis with per-image NMS), and why not."""
    entry = FRAMEWORKS.get(spec.framework)
    if entry is None:
        return False, f"no exporter for framework {spec.framework!r}"
    if not entry.supports_batch:
        return False, f"the {spec.framework} exporter ({entry.export}) cannot: {entry.no_batch}"
    return True, ""


def export_model(spec: ModelSpec, out: Path, *, weights: Path | None = None,
                 input_size: tuple[int, int] | None = None, progress: Progress | None = None,
                 accept_mismatch: bool = False, batch: bool = False) -> ExportResult:
    """Export ``spec`` to ``out`` (random-init weights when ``weights`` is None) and validate it.

    ``accept_mismatch`` (exporters that support it) writes a file whose validation failed,
    marked ``detbench.validation = failed-accepted`` with the mismatches in its metadata.
    ``batch``: the symbolic-batch file (contract ``detbench.batch = symbolic``); a framework whose
    exporter cannot build one is refused with the reason (:func:`batch_support`) before any work."""
    framework = FRAMEWORKS.get(spec.framework)
    if framework is None:
        raise ConfigError(f"model {spec.name!r}: no exporter for framework {spec.framework!r}")
    module_name = framework.export
    if batch:
        ok, why = batch_support(spec)
        if not ok:
            raise ConfigError(f"export {spec.name} --batch: {why}; export it without --batch (batch 1)")
    if accept_mismatch and not framework.supports_accept_mismatch:
        raise ConfigError(f"--accept-mismatch: the {spec.framework} exporter ({module_name}) has no accepted "
                          f"failure mode; export {spec.name!r} without --accept-mismatch")
    # only the capabilities the framework declares, so its export need not take the others
    capabilities: dict[str, Any] = {}
    if batch:
        capabilities["batch"] = True
    if accept_mismatch:
        capabilities["accept_mismatch"] = True
    module: ExportModule = importlib.import_module(module_name)
    return module.export(spec, Path(out), weights=weights, input_size=input_size,
                         progress=progress or (lambda _m: None), **capabilities)


def native_module(framework: str, source: str = "") -> NativeModule:
    """The module whose ``open_native`` runs models of ``framework`` in that framework.

    Raises :class:`ConfigError` naming the known frameworks, or the module when it is absent.
    """
    entry = FRAMEWORKS.get(framework)
    where = f"{source}: " if source else ""
    if entry is None:
        raise ConfigError(f"{where}no native runtime for source framework {framework!r} "
                          f"(known: {', '.join(FRAMEWORKS)})")
    try:
        return importlib.import_module(entry.native)
    except ModuleNotFoundError as exc:
        if exc.name and entry.native.startswith(exc.name):
            raise ConfigError(f"{where}the native backend needs {entry.native} (the {framework} native runner), "
                              "and it is not in this tree") from exc
        raise
