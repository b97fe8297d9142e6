"""Exporters: a registered model (models.toml) to a validated, self-describing ONNX file.

One module per source framework builds its families; this package only dispatches.
Every exporter returns an :class:`ExportResult` and writes the file only after the
export was validated against its source model (see ``exporters.validation``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exporters.registry import ModelSpec
from core.contract import ModelContract
from core.errors import ConfigError

# framework -> module whose ``export(spec, out, *, weights, input_size, progress)`` builds it
_FRAMEWORK_MODULES = {
    "darknet": "exporters.darknet",
    "pytorch": "exporters.torch_detectors",
    "tensorflow": "exporters.tf_ssd",
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """What an export produced: the file, its contract, and the validation figures."""

    path: Path
    contract: ModelContract
    seconds: float
    validation: dict[str, Any] = field(default_factory=dict)


def default_output(spec: ModelSpec, out_dir: Path, input_size: tuple[int, int] | None = None) -> Path:
    h, w = input_size or spec.input_size
    suffix = "" if (h, w) == spec.input_size else f"-{h}x{w}"
    return Path(out_dir) / f"{spec.name}{suffix}.onnx"


def export_model(spec: ModelSpec, out: Path, *, weights: Path | None = None,
                 input_size: tuple[int, int] | None = None, progress: Progress | None = None) -> ExportResult:
    """Export ``spec`` to ``out`` (random-init weights when ``weights`` is None) and validate it."""
    try:
        module_name = _FRAMEWORK_MODULES[spec.framework]
    except KeyError:
        raise ConfigError(f"model {spec.name!r}: no exporter for framework {spec.framework!r}") from None
    module = importlib.import_module(module_name)
    return module.export(spec, Path(out), weights=weights, input_size=input_size, progress=progress or (lambda _m: None))
