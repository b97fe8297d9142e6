"""Finding official weights and model definition files locally.

Search order for a registered file name: the download cache (``DETBENCH_CACHE``,
where ``fetch`` puts files), then the shared data folder (``DETBENCH_DATA``) and its
``darknet/`` subfolder. An explicit ``--weights PATH`` always wins over all of these.
"""

from __future__ import annotations

from pathlib import Path

from exporters.registry import ModelSpec
from runtime.paths import cache_dir, data_dir


def search_dirs() -> list[Path]:
    return [cache_dir(), data_dir() / "darknet", data_dir()]


def locate_file(file_name: str) -> Path | None:
    """The first existing ``file_name`` in :func:`search_dirs`, or None."""
    for folder in search_dirs():
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    return None


def locate_weights(spec: ModelSpec) -> Path | None:
    """Official weights for ``spec`` if present locally (never downloads)."""
    if not spec.weights.file:
        return None
    return locate_file(spec.weights.file)
