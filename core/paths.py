"""Where detbench finds data and puts what it makes.

Every location can be moved with an environment variable, so tests and users
never depend on the current directory:

- ``DETBENCH_DATA``: the shared data folder (default ``<project root>/../shared/data``),
  holding ``darknet/`` (cfgs, weights), ``coco-val2017-subset/``, ``cocoapi-oracle/``.
- ``DETBENCH_CACHE``: downloaded weights and model definitions (default ``~/.cache/detbench``).
- ``DETBENCH_RESULTS``: the results store and default export folder (default ``<project root>/results``).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def data_dir() -> Path:
    return _env_path("DETBENCH_DATA", (PROJECT_ROOT.parent / "shared" / "data").resolve())


def cache_dir() -> Path:
    return _env_path("DETBENCH_CACHE", Path.home() / ".cache" / "detbench")


def results_dir() -> Path:
    return _env_path("DETBENCH_RESULTS", PROJECT_ROOT / "results")


def models_toml() -> Path:
    return _env_path("DETBENCH_MODELS", PROJECT_ROOT / "models.toml")
