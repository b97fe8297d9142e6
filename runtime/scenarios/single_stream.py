"""MLPerf's SingleStream scenario: one image at a time, back to back; what `bench` has always
measured (:func:`runtime.bench.bench_models`), kept there and delegated to."""

from __future__ import annotations

from runtime.bench import bench_models

__all__ = ["bench_models"]
