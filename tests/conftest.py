"""Shared fixtures.

Real data is read in place from the shared data folder (``DETBENCH_DATA``, default
``../shared/data``). Exports are expensive, so ``exported`` builds each
(model, weights, size) once per test session and hands the same file to every test.
The results store and download cache point into the session's temporary folder so
tests never touch a user's results.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import DetbenchError
from core.paths import data_dir as _data_dir



def pytest_collection_modifyitems(session, config, items):
    from exporters.registry import load_registry

    names = set(load_registry().names)
    covered = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        # Only tests that really export count (registry/parse tests cover every name trivially).
        if callspec is None or "exported" not in getattr(item, "fixturenames", ()):
            continue
        for value in callspec.params.values():
            if isinstance(value, str) and value in names:
                covered.add(value)
            elif getattr(value, "name", None) in names:
                covered.add(value.name)
    # Read by test_registry_coverage.py (plain attributes: conftest may be imported twice).
    config.detbench_covered_models = covered
    # Coverage is only meaningful when the whole suite was collected (no -k, -m or file selection).
    config.detbench_whole_suite = not config.option.keyword and not config.option.markexpr and all(
        os.path.abspath(arg).rstrip("/") == os.path.abspath(os.path.join(str(config.rootpath), "tests"))
        or os.path.abspath(arg) == str(config.rootpath)
        for arg in (config.args or ["tests"])
    )


@pytest.fixture(scope="session", autouse=True)
def _isolated_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("detbench-home")
    from runtime.backends.litert import converter_env

    saved = {k: os.environ.get(k) for k in ("DETBENCH_RESULTS", "DETBENCH_CACHE", "DETBENCH_LITERT_VENV")}
    # litert's converter venv is a tool made once per machine (gigabytes), not an output to isolate
    os.environ["DETBENCH_LITERT_VENV"] = str(converter_env())
    os.environ["DETBENCH_RESULTS"] = str(root / "results")
    os.environ["DETBENCH_CACHE"] = str(root / "cache")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "darknet").is_dir() or not (path / "coco-val2017-subset").is_dir():
        pytest.fail(f"shared test data not found at {path}; set DETBENCH_DATA to the folder holding "
                    "darknet/ and coco-val2017-subset/")
    return path


@pytest.fixture(scope="session")
def coco_dir(data_dir) -> Path:
    return data_dir / "coco-val2017-subset"


@pytest.fixture(scope="session")
def darknet_dir(data_dir) -> Path:
    return data_dir / "darknet"


@pytest.fixture(scope="session")
def registry():
    from exporters.registry import load_registry

    return load_registry()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, registry):
    """``exported(name, weights=None, input_size=None)`` -> ExportResult, built once per session."""
    from exporters import default_output, export_model

    out_dir = tmp_path_factory.mktemp("exports")
    done = {}

    def get(name: str, weights: Path | None = None, input_size: tuple[int, int] | None = None):
        key = (name, str(weights), input_size)
        if key not in done:
            spec = registry.get(name)
            tag = "trained" if weights else "random"
            target = default_output(spec, out_dir / tag, input_size)
            try:
                done[key] = export_model(spec, target, weights=weights, input_size=input_size)
            except DetbenchError as exc:
                done[key] = exc  # a failed export is not retried by every test that needs it
        if isinstance(done[key], DetbenchError):
            raise done[key]
        return done[key]

    return get
