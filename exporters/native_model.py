"""What a framework's native runner gives back: the source model, ready to run on the contract's input.

Each framework subpackage (see ``exporters.interface``) has a ``native`` module beside its
``export`` whose ``open_native(path, contract, *, threads, weights)`` rebuilds the
very model the ONNX file was exported from and validated against (same builders, same seeds,
same weights) and returns a :class:`NativeModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.contract import sha256_file
from core.errors import WeightsError


@dataclass
class NativeModel:
    """``run(images)`` -> the contract's outputs by name (numpy, labels int64), computed by the
    source framework. ``library``/``version`` name it, ``runtime`` says how it runs (threads,
    mode), ``what`` what one call does. ``min_score``: the score below which the framework's own
    post-processing drops detections the contract graph keeps (0 when it keeps them all), so
    comparisons leave that tail out."""

    framework: str
    library: str
    version: str
    runtime: str
    what: str
    run: Callable[[np.ndarray], dict[str, np.ndarray]]
    threads: int | None = None
    min_score: float = 0.0


def matching_weights(path: Path, contract, spec, weights: Path | None) -> Path:
    """The weights file whose sha256 the contract records (``weights`` or the located official file)."""
    from exporters.weights import locate_weights

    candidate = Path(weights) if weights is not None else locate_weights(spec)
    if candidate is None or not candidate.is_file():
        raise WeightsError(f"{path} was exported with weights {contract.weights}; the native backend needs that "
                           f"file (pass --native-weights PATH or `python cli.py fetch {contract.name}`)")
    if "sha256:" + sha256_file(candidate) != contract.weights:
        raise WeightsError(f"{candidate} is not the weights {path} was exported with (it records {contract.weights}); "
                           "pass the matching file with --native-weights PATH")
    return candidate
