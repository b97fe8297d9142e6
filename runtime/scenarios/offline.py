"""MLPerf's Offline scenario: all samples available at once; the figure is images per second.

Each candidate configuration (:func:`~runtime.scenarios.common.candidate_configs`: streams x
threads per stream x batch where the graph has a batch axis) runs for ``trial_seconds`` with
every stream busy back to back; the configuration with the most images/s is then measured
again under the Offline validity rules (:mod:`runtime.scenarios.settings`). Reported:
images/s, images/s per usable core, the configuration, every trial, and the verdict.
"""

from __future__ import annotations

import gc
from typing import Any

from core.errors import ConfigError
from runtime.backends import BackendSettings
from runtime.scenarios.common import (Config, Model, ScenarioResult, candidate_configs, parity_of, parity_verdict,
                                      percentile, usable_cores)
from runtime.scenarios.loadgen import issue_all
from runtime.scenarios.settings import OFFLINE, ScenarioSettings


def judge_offline(samples: int, duration_s: float, settings: ScenarioSettings, capped: bool) -> dict[str, Any]:
    """VALID when at least ``offline_min_samples`` samples ran over at least ``offline_min_seconds``."""
    reasons = []
    if samples < settings.offline_min_samples:
        reasons.append(f"{samples} samples < {settings.offline_min_samples} required")
    if duration_s < settings.offline_min_seconds:
        reasons.append(f"{duration_s:.1f} s < {settings.offline_min_seconds:g} s required")
    if capped:
        reasons.append(f"capped at {settings.offline_max_seconds:g} s")
    return {"verdict": "INVALID" if reasons else "VALID", "reason": "; ".join(reasons),
            "rules": {"min_samples": settings.offline_min_samples, "min_seconds": settings.offline_min_seconds,
                      "max_seconds": settings.offline_max_seconds,
                      "loadgen": "LoadGen Offline: 24,576 samples and 600 s; scaled down here"}}


def _throughput(opened, *, min_samples: int, min_seconds: float, max_seconds: float):
    issued = issue_all(opened.calls, min_samples=min_samples, min_seconds=min_seconds, max_seconds=max_seconds,
                       per_call=opened.config.batch)
    return issued, issued.samples / issued.duration_s


def offline(model: Model, backend: str, scenario: ScenarioSettings, backend_settings: BackendSettings, *,
            parity_images: int = 3, cores: int | None = None) -> ScenarioResult:
    """The Offline figure of ``model`` on ``backend`` (module docstring)."""
    cores = cores or usable_cores()
    configs = candidate_configs(scenario, model.batchable, cores)
    trials: list[dict[str, Any]] = []
    best: tuple[float, Config] | None = None
    for config in configs:
        gc.collect()
        opened = model.open(backend, backend_settings, config)
        try:
            _, ips = _throughput(opened, min_samples=1, min_seconds=scenario.trial_seconds,
                                 max_seconds=scenario.trial_seconds)
        finally:
            opened.close()
        trials.append({**config.to_dict(), "images_per_s": ips})
        if best is None or ips > best[0]:
            best = (ips, config)
    if best is None:
        raise ConfigError(f"{model.path}: no configuration to try")
    config = best[1]
    opened = model.open(backend, backend_settings, config)
    try:
        parity = parity_of(model, backend, opened.runners[0], backend_settings, parity_images) if parity_images else None
        issued, ips = _throughput(opened, min_samples=scenario.offline_min_samples,
                                  min_seconds=scenario.offline_min_seconds, max_seconds=scenario.offline_max_seconds)
        info = opened.runners[0].info
    finally:
        opened.close()
    capped = issued.duration_s >= scenario.offline_max_seconds and (
        issued.samples < scenario.offline_min_samples or issued.duration_s < scenario.offline_min_seconds)
    figures = {
        "images_per_s": ips, "images_per_s_per_core": ips / cores, "cores": cores,
        "config": config.to_dict(), "config_text": str(config), "samples": issued.samples,
        "duration_s": issued.duration_s, "per_stream_samples": list(issued.per_stream),
        "call_latency_ms": {"p50": percentile(issued.latencies_ms, 0.5), "p90": percentile(issued.latencies_ms, 0.9)},
        "validity": judge_offline(issued.samples, issued.duration_s, scenario, capped),
        "trials": trials, "trial_seconds": scenario.trial_seconds,
        "batch_axis": {"batchable": model.batchable, "note": model.batch_note},
        "parity": parity, "parity_verdict": parity_verdict(backend, parity),
        "image": str(model.image),
    }
    return ScenarioResult(OFFLINE, model.contract.name, str(model.path), model.sha256, model.contract.to_props(),
                          backend, info.to_dict(), {}, figures)
