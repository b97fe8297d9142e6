"""In-process load generation shared by the Offline and Server scenarios (no network).

A *stream* is one callable that runs the model on the bound input and may run on its own
thread at the same time as the others (its library releases the GIL while it computes):
an onnxruntime session each, or one OpenVINO infer request each on a compiled model with
that many streams (:meth:`runtime.backends.base.Backend.open_streams`).

:func:`issue_all` (Offline) lets every stream take the next sample as soon as it is free
until a sample count and a duration are both reached. :func:`issue_scheduled` (Server)
issues queries at scheduled arrival times: query ``i`` goes, in arrival order, to the first
stream that is free, which waits for its arrival time if it is early; its latency is
completion minus *scheduled* arrival, so the time it waited for a free stream (queueing)
is part of it. That is a FIFO queue served by ``len(streams)`` servers, without a
dispatcher thread whose own scheduling would add to the figures.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.errors import ConfigError


def poisson_schedule(qps: float, count: int, seed: int) -> np.ndarray:
    """Arrival times (seconds from the start) of ``count`` queries of a Poisson process at rate
    ``qps``: cumulative sums of exponential gaps of mean 1/qps, from ``numpy.random.default_rng(seed)``."""
    if qps <= 0:
        raise ConfigError(f"target QPS {qps}: must be positive")
    if count < 1:
        raise ConfigError(f"query count {count}: must be at least 1")
    gaps = np.random.default_rng(seed).exponential(1.0 / qps, size=count)
    return np.cumsum(gaps)


@dataclass(frozen=True)
class Issued:
    """What a load generator measured: per-sample latencies (ms, in issue order), completed
    samples, the wall time from the first issue to the last completion, and the samples each
    stream completed."""

    latencies_ms: np.ndarray
    samples: int
    duration_s: float
    per_stream: tuple[int, ...]


def _join(threads: list[threading.Thread], errors: list[BaseException]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def issue_all(streams: list[Callable[[], None]], *, min_samples: int, min_seconds: float, max_seconds: float,
              per_call: int = 1, clock: Callable[[], float] = time.perf_counter) -> Issued:
    """Offline: every stream runs back to back until ``min_samples`` samples (``per_call`` images per
    call: the batch) are done and ``min_seconds`` have passed, or ``max_seconds`` have passed."""
    lock = threading.Lock()
    done = [0] * len(streams)
    latencies: list[float] = []
    errors: list[BaseException] = []
    began = clock()

    def worker(k: int, call: Callable[[], None]) -> None:
        try:
            while True:
                start = clock()
                call()
                end = clock()
                with lock:
                    done[k] += per_call
                    latencies.append((end - start) * 1e3)
                    total, elapsed = sum(done), end - began
                if (total >= min_samples and elapsed >= min_seconds) or elapsed >= max_seconds or errors:
                    return
        except BaseException as exc:  # re-raised in the caller's thread by _join
            errors.append(exc)

    _join([threading.Thread(target=worker, args=(k, c), daemon=True) for k, c in enumerate(streams)], errors)
    return Issued(np.asarray(latencies), sum(done), clock() - began, tuple(done))


def issue_scheduled(streams: list[Callable[[], None]], arrivals_s: np.ndarray,
                    clock: Callable[[], float] = time.perf_counter,
                    sleep: Callable[[float], None] = time.sleep) -> Issued:
    """Server: query ``i`` arrives ``arrivals_s[i]`` seconds after the start and is served by the first
    free stream, in arrival order; its latency runs from its scheduled arrival to its completion."""
    arrivals = np.asarray(arrivals_s, dtype=np.float64)
    lock = threading.Lock()
    latencies = np.full(arrivals.size, np.nan)
    done = [0] * len(streams)
    errors: list[BaseException] = []
    cursor = [0]
    began = clock()

    def worker(k: int, call: Callable[[], None]) -> None:
        try:
            while not errors:
                with lock:
                    i = cursor[0]
                    if i >= arrivals.size:
                        return
                    cursor[0] += 1
                wait = began + arrivals[i] - clock()
                if wait > 0:
                    sleep(wait)
                call()
                latencies[i] = (clock() - began - arrivals[i]) * 1e3
                done[k] += 1
        except BaseException as exc:
            errors.append(exc)

    _join([threading.Thread(target=worker, args=(k, c), daemon=True) for k, c in enumerate(streams)], errors)
    return Issued(latencies, int(arrivals.size), clock() - began, tuple(done))


__all__ = ["Issued", "issue_all", "issue_scheduled", "poisson_schedule"]
