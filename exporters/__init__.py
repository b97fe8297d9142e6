"""Exporters: a registered model (models.toml) to a validated, self-describing ONNX file.

One module per source framework builds its families; this package only dispatches.
Every exporter returns an :class:`ExportResult` and writes the file only after the
export was validated against its source model (see ``exporters.validation``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exporters.registry import ModelSpec
from core.contract import ModelContract
from core.errors import ConfigError
from core.names import file_in



@dataclass(frozen=True)
class Framework:
    """One source framework: ``export`` names the module whose ``export(spec, out, *, weights,
    input_size, progress)`` builds its models, ``native`` the module whose ``open_native(path,
    contract, *, threads, weights)`` rebuilds the same model in the framework itself (the native
    backend); ``runtime`` says what that native runtime is."""

    export: str
    native: str
    runtime: str
    # why `export --batch` cannot build this framework's models (None: it can: the export module's
    # ``export`` takes ``batch=True`` and writes a ``detbench.batch = symbolic`` file)
    no_batch: str | None = None


# The one framework table: the module that builds a model also names its native runner.
FRAMEWORKS = {
    "darknet": Framework("exporters.darknet.export", "exporters.darknet.native", "OpenCV DNN (Darknet importer)"),
    "pytorch": Framework(
        "exporters.pytorch.export", "exporters.pytorch.native", "PyTorch eager",
        no_batch="the traced forward runs torchvision's transform, RPN/RoI heads and post-processing on images[0] "
                 "(torchvision post-processes each image in a Python loop, which tracing unrolls at the traced batch "
                 "of 1), so the graph has no symbolic batch axis with per-image NMS"),
    "tensorflow": Framework(
        "exporters.tensorflow.export", "exporters.tensorflow.native", "TensorFlow tf.function",
        no_batch="the tf.function's signature is [1, 3, H, W] and its decoding keeps image 0 of "
                 "combined_non_max_suppression's padded per-image results (nms_boxes[0, :valid[0]]), so the graph "
                 "has no symbolic batch axis nor an image index per detection"),
}
_FRAMEWORK_MODULES = {name: f.export for name, f in FRAMEWORKS.items()}  # framework -> export module

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """What an export produced: the file, its contract, and the validation figures.

    ``warnings`` are things about the source model that did not stop the export but that
    the user must hear about (e.g. a Darknet layer whose output feeds nothing).
    """

    path: Path
    contract: ModelContract
    seconds: float
    validation: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


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
    if entry.no_batch:
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
    try:
        module_name = FRAMEWORKS[spec.framework].export
    except KeyError:
        raise ConfigError(f"model {spec.name!r}: no exporter for framework {spec.framework!r}") from None
    if batch:
        ok, why = batch_support(spec)
        if not ok:
            raise ConfigError(f"export {spec.name} --batch: {why}; export it without --batch (batch 1)")
    module = importlib.import_module(module_name)
    extra: dict[str, Any] = {"batch": True} if batch else {}
    if accept_mismatch:
        if "accept_mismatch" not in inspect.signature(module.export).parameters:
            raise ConfigError(f"--accept-mismatch: the {spec.framework} exporter ({module_name}) has no accepted "
                              f"failure mode; export {spec.name!r} without --accept-mismatch")
        extra["accept_mismatch"] = True
    return module.export(spec, Path(out), weights=weights, input_size=input_size,
                         progress=progress or (lambda _m: None), **extra)


def native_module(framework: str, source: str = ""):
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
