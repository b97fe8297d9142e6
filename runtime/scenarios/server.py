"""MLPerf's Server scenario: queries (one image each) arrive as a Poisson process; the figure is the
highest QPS whose tail latency, measured from each query's scheduled arrival, stays under a bound.

Steps for one model on one backend:

1. SingleStream p50 on one stream (``trial_seconds`` of back-to-back runs): the default bound
   is ``p99_factor`` x that p50 (:mod:`runtime.scenarios.settings` says why 10);
2. the configuration (streams x threads) with the highest back-to-back throughput over
   ``trial_seconds`` each; ``server_max_load`` (0.9) of that capacity is where the search starts
   and the most it asks for;
3. :func:`search_qps`: bisection over QPS, each trial a Poisson schedule of
   ``server_trial_queries`` queries (seed ``seed + trial``), passing when the empirical
   percentile is within the bound;
4. a confirmation run at the QPS found, with as many queries as the early-stopping estimate
   needs (662 for p99) and at least ``server_min_seconds``: the percentile is supported when
   :func:`early_stopping` says so; if not, the QPS is lowered and
   confirmed again at 0.75 x that QPS (up to 3 confirmations).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from core.errors import ConfigError
from runtime.backends import BackendSettings
from runtime.scenarios.common import (Config, Model, ScenarioResult, candidate_configs, parity_of, parity_verdict,
                                      percentile, usable_cores)
from runtime.scenarios.loadgen import issue_all, issue_scheduled, poisson_schedule
from runtime.scenarios.settings import SERVER, ScenarioSettings
from runtime.stats import conservative_rank, queries_needed


def early_stopping(latencies_ms, bound_ms: float, q: float = 0.99, confidence: float = 0.99) -> dict[str, Any]:
    """LoadGen's early-stopping verdict on the q-percentile: the smallest order statistic that is a
    ``confidence`` upper bound of the true q-quantile (:func:`runtime.stats.conservative_rank`) must
    exist and be at most ``bound_ms``. Equivalently: so few queries exceed the bound that, at that
    confidence, fewer than a fraction 1 - q of all queries would."""
    arr = np.sort(np.asarray(latencies_ms, dtype=np.float64))
    n = int(arr.size)
    over = int(np.sum(arr > bound_ms))
    rank = conservative_rank(n, q, confidence)
    if rank is not None and rank > n - 1:  # as runtime.stats: at least one query above the estimate
        rank = None
    estimate = float(arr[rank - 1]) if rank is not None else None
    supported = estimate is not None and estimate <= bound_ms
    if estimate is None:
        reason = f"{n} queries cannot support p{100 * q:g}: {queries_needed(q, confidence, 1)} needed"
    elif not supported:
        reason = f"early-stopping estimate {estimate:.1f} ms > bound {bound_ms:.1f} ms ({over} of {n} over)"
    else:
        reason = ""
    return {"supported": supported, "estimate_ms": estimate, "rank": rank, "queries": n, "over_bound": over,
            "empirical_ms": percentile(arr, q), "reason": reason, "q": q, "confidence": confidence}


@dataclass(frozen=True)
class Trial:
    qps: float
    tail_ms: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"qps": self.qps, "tail_ms": self.tail_ms, "passed": self.passed}


def search_qps(trial: Callable[[float], Trial], start: float, *, tolerance: float = 0.03,
               max_trials: int = 8, ceiling: float | None = None) -> tuple[float | None, list[Trial]]:
    """Highest passing QPS by bisection: ``trial(qps)`` says whether a QPS passes. The upper end starts
    at ``start`` and doubles while it passes, up to ``ceiling`` (the Server passes the measured
    back-to-back capacity: above it the queue grows without bound, which a short trial may not yet
    show); the search stops when the bracket is within ``tolerance`` of its upper end or after
    ``max_trials`` trials. None when no trial passed."""
    if start <= 0:
        raise ConfigError(f"QPS search start {start}: must be positive")
    trials: list[Trial] = []
    lo, hi = 0.0, min(start, ceiling) if ceiling else start
    while len(trials) < max_trials:  # find a failing upper end
        t = trial(hi)
        trials.append(t)
        if not t.passed:
            break
        if ceiling is not None and hi >= ceiling:
            return hi, trials
        lo, hi = hi, min(hi * 2, ceiling) if ceiling else hi * 2
    else:
        return lo, trials
    while len(trials) < max_trials and (hi - lo) > tolerance * hi:
        mid = (lo + hi) / 2 if lo > 0 else hi / 2
        t = trial(mid)
        trials.append(t)
        if t.passed:
            lo = mid
        else:
            hi = mid
        if lo == 0 and hi < start * tolerance:
            break
    return (lo if lo > 0 else None), trials


def run_at(calls, qps: float, count: int, seed: int):
    """One Poisson schedule of ``count`` queries at ``qps`` (seeded) through ``calls``; latencies in ms."""
    return issue_scheduled(calls, poisson_schedule(qps, count, seed))


def server(model: Model, backend: str, scenario: ScenarioSettings, backend_settings: BackendSettings, *,
           parity_images: int = 3, cores: int | None = None) -> ScenarioResult:
    """The Server figure of ``model`` on ``backend`` (module docstring)."""
    cores = cores or usable_cores()
    gc.collect()
    single = model.open(backend, backend_settings, Config(1, None, 1))
    try:
        issued = issue_all(single.calls, min_samples=5, min_seconds=scenario.trial_seconds,
                           max_seconds=max(scenario.trial_seconds, 30.0))
        p50 = percentile(issued.latencies_ms, 0.5)
    finally:
        single.close()
    bound = scenario.p99_ms if scenario.p99_ms is not None else scenario.p99_factor * p50
    bound_source = ("--p99-ms" if scenario.p99_ms is not None
                    else f"{scenario.p99_factor:g} x SingleStream p50 ({p50:.2f} ms, {issued.samples} runs)")

    capacities = []
    for config in candidate_configs(scenario, False, cores):
        opened = model.open(backend, backend_settings, config)
        try:
            done = issue_all(opened.calls, min_samples=1, min_seconds=scenario.trial_seconds,
                             max_seconds=scenario.trial_seconds)
        finally:
            opened.close()
        capacities.append((done.samples / done.duration_s, config))
    capacity, config = max(capacities, key=lambda c: c[0])

    q = scenario.percentile
    opened = model.open(backend, backend_settings, config)
    try:
        parity = parity_of(model, backend, opened.runners[0], backend_settings, parity_images) if parity_images else None
        counter = [0]

        def trial(qps: float) -> Trial:
            counter[0] += 1
            lat = run_at(opened.calls, qps, scenario.server_trial_queries, scenario.seed + counter[0]).latencies_ms
            tail = percentile(lat, q)
            return Trial(qps, tail, tail <= bound)

        ceiling = scenario.server_max_load * capacity  # settings: a queue at full capacity never settles
        found, trials = search_qps(trial, ceiling, tolerance=scenario.search_tolerance,
                                   max_trials=scenario.max_trials, ceiling=ceiling)
        confirmations = []
        verdict = None
        qps = found
        while qps is not None and len(confirmations) < 3:
            count = max(queries_needed(q, scenario.confidence, 1), math.ceil(qps * scenario.server_min_seconds))
            issued = run_at(opened.calls, qps, count, scenario.seed)
            verdict = early_stopping(issued.latencies_ms, bound, q, scenario.confidence)
            confirmations.append({"qps": qps, "queries": count, "seed": scenario.seed,
                                  "duration_s": issued.duration_s, **verdict})
            if verdict["supported"]:
                break
            qps *= 0.75  # a confirmation is long: step down far enough that the next one likely holds
        info = opened.runners[0].info
    finally:
        opened.close()
    supported = bool(verdict and verdict["supported"])
    figures = {
        "qps": qps if supported else None, "bound_ms": bound, "bound_source": bound_source, "percentile": q,
        "singlestream_p50_ms": p50, "capacity_ips": capacity, "cores": cores,
        "search_ceiling_qps": scenario.server_max_load * capacity,
        "config": config.to_dict(), "config_text": str(config),
        "capacity_trials": [{**c.to_dict(), "images_per_s": ips} for ips, c in capacities],
        "search": [t.to_dict() for t in trials], "trial_queries": scenario.server_trial_queries,
        "confirmations": confirmations, "seed": scenario.seed,
        "tail_ms": verdict["estimate_ms"] if verdict else None,
        "validity": {"verdict": "VALID" if supported else "INVALID",
                     "reason": "" if supported else (verdict["reason"] if verdict else "no QPS passed the search"),
                     "rules": {"min_seconds": scenario.server_min_seconds,
                               "queries_needed": queries_needed(q, scenario.confidence, 1),
                               "loadgen": "LoadGen Server: 270,336 queries and 600 s, or early stopping; "
                                          "early stopping only here"}},
        "batch_axis": {"batchable": model.batchable, "note": model.batch_note},
        "parity": parity, "parity_verdict": parity_verdict(backend, parity),
        "image": str(model.image),
    }
    return ScenarioResult(SERVER, model.contract.name, str(model.path), model.sha256, model.contract.to_props(),
                          backend, info.to_dict(), {}, figures)
