"""The one way detbench's own checks open an onnxruntime CPU session: export validation, shape
measurement, calibration and the INT8 smoke test. (What is *measured* opens its sessions
through :mod:`runtime.backends`, with the user's settings.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# onnxruntime logs warnings (unused initializers, fused nodes) to stderr; library code prints nothing
_ERRORS_ONLY = 3


def cpu_session(model: Any, *, basic_optimization_into: Path | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU provider for ``model`` (a file path, serialized
    bytes, or a ``ModelProto``), with every graph optimisation (onnxruntime's default), or with the
    basic ones only and the optimised graph written to ``basic_optimization_into``. onnxruntime's
    own exception types propagate: callers say what failed to load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = _ERRORS_ONLY
    if basic_optimization_into is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(basic_optimization_into)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
