"""MLPerf Inference scenarios for `bench`: SingleStream (the default, :mod:`runtime.bench`),
Offline (:mod:`.offline`: images/s) and Server (:mod:`.server`: QPS at a tail-latency bound).

:func:`bench_scenario` measures every model on every backend in one scenario and appends one
``bench`` record per model x backend whose data and settings carry ``scenario`` (SingleStream
records carry ``single-stream``). Everything runs in this process: no network.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError
from runtime.backends import BackendSettings, get_backend
from runtime.scenarios.settings import OFFLINE, SCENARIOS, SERVER, SINGLE_STREAM, ScenarioSettings


def bench_scenario(paths: list[Path], backends: list[str], scenario: ScenarioSettings, bench_settings=None,
                   backend_settings: BackendSettings | None = None, *, record: bool = True) -> list:
    """Every model on every backend in ``scenario.scenario``; SingleStream returns
    :class:`runtime.bench.BenchResult`s, Offline and Server
    :class:`runtime.scenarios.common.ScenarioResult`s. Every backend is checked before anything is measured."""
    from runtime.bench import BenchSettings

    bench_settings = bench_settings or BenchSettings()
    backend_settings = backend_settings or BackendSettings()
    if scenario.scenario == SINGLE_STREAM:
        from runtime.scenarios.single_stream import bench_models

        return bench_models(paths, backends, bench_settings, backend_settings, record=record)
    from core import store
    from runtime.scenarios.common import Model
    from runtime.scenarios.offline import offline
    from runtime.scenarios.server import server

    if not paths:
        raise ConfigError("name at least one ONNX file to benchmark")
    names = list(dict.fromkeys(get_backend(b).name for b in backends))
    if not names:
        raise ConfigError("name at least one --provider")
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"no ONNX file at {p}")
    for name in names:
        if get_backend(name).capabilities.native:
            raise ConfigError(f"--scenario {scenario.scenario}: the native backend runs SingleStream only")
        get_backend(name).require(backend_settings)
    measure = offline if scenario.scenario == OFFLINE else server
    parity_images = bench_settings.parity_images if bench_settings.parity else 0
    results = []
    for path in paths:
        model = Model.load(path, bench_settings.image)
        for name in names:
            result = measure(model, name, scenario, backend_settings, parity_images=parity_images)
            result.settings = {"provider": name, "scenario": scenario.scenario, **backend_settings.to_dict(),
                               **{k: v for k, v in scenario.to_dict().items() if k != "scenario"},
                               "image": str(model.image), "parity": bench_settings.parity}
            results.append(result)
            if record:
                store.append("bench", result.to_record(), model=result.model, model_sha256=result.model_sha256,
                             provider=result.provider, settings=result.settings, contract=result.contract)
    return results


def scenario_of(record: dict) -> str:
    """The scenario a ``bench`` record measured (records from before scenarios existed: SingleStream)."""
    return (record.get("data") or {}).get("scenario") or (record.get("settings") or {}).get("scenario") \
        or SINGLE_STREAM


__all__ = ["OFFLINE", "SCENARIOS", "SERVER", "SINGLE_STREAM", "ScenarioSettings", "bench_scenario",
           "scenario_of"]
