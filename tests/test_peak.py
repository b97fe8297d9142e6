"""The machine's matmul peak (runtime/peak.py) is the best of its timings, not a typical one."""

from __future__ import annotations

import statistics

from runtime.peak import measure_peak


def test_peak_is_the_best_of_every_recorded_timing():
    # small and single-threaded: the rule under test does not depend on the size
    peak = measure_peak(threads=1, size=256, repeats=5, gpu=False)
    assert set(peak.samples) >= {"onnxruntime-cpu"} and all(len(v) == 5 for v in peak.samples.values())
    for backend, rates in peak.samples.items():
        assert peak.by_backend[backend] == max(rates)
        assert peak.medians[backend] == statistics.median(rates)
    usable = [r for k, rates in peak.samples.items() if k != "numpy-unlimited-threads" for r in rates]
    assert peak.cpu_gflops == max(usable)
    # so no single timing of the reference itself stands above 100 % of the peak
    assert all(r / peak.cpu_gflops <= 1.0 for r in usable)
    assert peak.cpu_gflops >= max(peak.medians.get("numpy", 0.0), peak.medians["onnxruntime-cpu"])
