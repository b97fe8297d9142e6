"""The machine's matmul peak (runtime/peak.py) is the best of its timings, not a typical one."""

from __future__ import annotations

import statistics

import pytest

from runtime.peak import measure_peak


def test_peak_is_the_best_of_every_recorded_timing():
    # small and single-threaded: the rule under test does not depend on the size
    peak = measure_peak(threads=1, size=256, repeats=5, gpu=False)
    assert set(peak.samples) >= {"onnxruntime-cpu"} and all(len(v) >= 5 for v in peak.samples.values())
    for backend, rates in peak.samples.items():
        assert peak.by_backend[backend] == max(rates)
        assert peak.medians[backend] == statistics.median(rates)
    usable = [r for k, rates in peak.samples.items() if k != "numpy-unlimited-threads" for r in rates]
    assert peak.cpu_gflops == max(usable)
    # so no single timing of the reference itself stands above 100 % of the peak
    assert all(r / peak.cpu_gflops <= 1.0 for r in usable)
    assert peak.cpu_gflops >= max(peak.medians.get("numpy", 0.0), peak.medians["onnxruntime-cpu"])


# --------------------------------------------------------------------------- per-precision peaks

def test_int8_peak_runs_mlas_integer_kernels_and_names_them():
    from runtime.peak import measure_int8_peak

    p = measure_int8_peak(threads=1, size=512, repeats=2)
    assert p.precision == "int8" and p.gops and p.gops > 0
    assert set(p.by_kernel) == {"MatMulInteger", "QLinearConv"} and p.gops == max(p.by_kernel.values())
    assert p.library.startswith("onnxruntime") and "MLAS" in p.kernel
    flags = __import__("runtime.peak", fromlist=["cpu_flags"]).cpu_flags()
    if "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        assert "AVX2 u8s8" in p.kernel and p.units == []


def test_bf16_peak_is_absent_without_a_bf16_unit():
    from runtime.peak import measure_bf16_peak

    p = measure_bf16_peak(threads=1, size=256, repeats=1, flags=frozenset({"avx2", "fma"}))
    assert p.gops is None and "no bf16 unit on this CPU" in p.note


def test_bf16_peak_measured_where_the_cpu_has_a_bf16_unit():
    from runtime.peak import BF16_FLAGS, cpu_flags, measure_bf16_peak

    if not set(BF16_FLAGS) & cpu_flags():
        pytest.skip("this CPU has no bf16 unit (no avx512_bf16 / amx_bf16 in /proc/cpuinfo)")
    pytest.importorskip("openvino", reason="openvino not installed")
    p = measure_bf16_peak(threads=1, size=512, repeats=2)
    assert p.gops and p.gops > 0 and p.library.startswith("openvino") and "bf16" in p.kernel
    # both kernel families a detector runs, the best of them being the peak: with the MatMul
    # alone, bf16 convolution-heavy rows ran above 100 % of the "peak"
    assert set(p.by_kernel) == {"MatMul", "Convolution"} and p.gops == max(p.by_kernel.values())
    assert "bfloat16" in p.kernel or "bf16" in p.kernel.split("compiled precision")[1]


def test_a_row_is_set_against_the_peak_of_its_own_precision(monkeypatch):
    import runtime.peak as peak
    from runtime.peak import PeakResult, peak_for

    small = peak.measure_int8_peak
    monkeypatch.setattr(peak, "measure_int8_peak", lambda threads: small(threads, size=256, repeats=1))

    fp32 = PeakResult(cpu_gflops=100.0, gpu_gflops=None, size=8, repeats=1, threads=1)
    gops, precision, _ = peak_for(fp32, "cpu", "f32", {"detbench.precision": "fp32"}, 1)
    assert (gops, precision) == (100.0, "fp32")
    gops, precision, note = peak_for(fp32, "cpu", "f32", {"detbench.precision": "int8"}, 1)
    assert precision == "int8" and gops != 100.0 and "MLAS" in note


def test_a_kernel_is_timed_for_its_minimum_duration(monkeypatch):
    """Fast kernels are repeated until ``min_seconds`` have passed (a host's slow phase lasts
    seconds: seven 5 ms calls would all fall in it), never fewer than ``repeats``."""
    from runtime import peak

    now = [0.0]

    def call():  # each call takes 0.25 s of a fake clock
        now[0] += 0.25

    monkeypatch.setattr(peak.time, "perf_counter", lambda: now[0])
    rates = peak._rates(call, 1e9, repeats=3, min_seconds=2.0)
    assert len(rates) == 8 and all(abs(r - 4.0) < 1e-9 for r in rates)  # 8 x 0.25 s = the 2 s asked; 1 GFLOP / 0.25 s
    assert len(peak._rates(call, 1e9, repeats=12, min_seconds=2.0)) == 12  # never fewer than repeats
    rates = peak._rates(call, 1e9, repeats=4, min_seconds=0.0)
    assert len(rates) == 4
