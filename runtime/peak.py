"""The machine's measured single-precision matrix-multiply rate (its practical peak).

A latency only says how well a detector runs when it is set against what the
hardware can do. detbench measures that ceiling rather than quoting a datasheet:
the best rate of several timed large square float32 matrix products, through
onnxruntime's ``MatMul`` (MLAS) and through numpy's BLAS, and of a large 3x3 convolution
through onnxruntime's ``Conv`` (MLAS's blocked NCHWc kernels, which on AVX-512 outrun its own
SGEMM: the detectors' convolutions reached 103 % of the matmul rate here), all with the
same thread count as the benchmark. The highest is the peak a result's ``fraction_of_peak`` refers to. The best, not the median: a peak
is what the machine can reach, and any single timing (a model's run included) that beats
the reference would otherwise show more than 100 % of it; the medians are kept beside.
On a CUDA device the same ``MatMul`` runs through onnxruntime's CUDA provider with inputs
bound on the device.

Rates are GFLOP/s with FLOPs = 2 x MACs (one multiply-accumulate = 2 FLOPs).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

DEFAULT_SIZE = 2048
DEFAULT_REPEATS = 7


@dataclass(frozen=True)
class PeakResult:
    """Measured matmul rates in GFLOP/s (FLOPs = 2 x MACs), the best of ``repeats`` timings.

    ``by_backend`` maps ``onnxruntime-cpu`` / ``numpy`` (/ ``onnxruntime-cuda``) to the best
    rate of its ``samples``; ``medians`` to their medians (how steady the machine was);
    ``cpu_gflops`` is the best CPU rate and ``gpu_gflops`` the CUDA one (None without a usable
    CUDA device).
    """

    cpu_gflops: float
    gpu_gflops: float | None
    size: int
    repeats: int
    threads: int | None
    by_backend: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)
    statistic: str = "best of repeats (max GFLOP/s)"

    def for_device(self, device: str) -> float | None:
        """The peak matching the device a backend ran on (GPU peak off the CPU, else CPU)."""
        return self.cpu_gflops if device == "cpu" else self.gpu_gflops

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matmul_model(n: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"], name="sgemm")], "sgemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


# A VGG/Darknet-sized convolution: 256 -> 256 channels, 3x3, on 64 x 64 (2.4 GMACs a run).
CONV_CHANNELS, CONV_SIDE = 256, 64


def _conv_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(1).standard_normal((CONV_CHANNELS, CONV_CHANNELS, 3, 3), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv3x3", pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE])],
        initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _rates(fn, flops: float, repeats: int) -> list[float]:
    fn()  # warm-up: thread pool start, page faults on the output buffer
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(flops / (time.perf_counter() - start) / 1e9)
    return out


@contextlib.contextmanager
def _numpy_threads(threads: int | None):
    """Limit numpy's OpenBLAS pool to ``threads`` for the block; yields whether the limit holds.

    numpy's wheels bundle scipy-openblas, whose thread count can be set at run time through
    its exported ``scipy_openblas_set_num_threads64_``; other BLAS builds are left alone
    (yield False) and then numpy's rate is not used for a thread-limited peak.
    """
    if threads is None:
        yield True
        return
    lib = _openblas()
    if lib is None:
        yield False
        return
    before = lib.scipy_openblas_get_num_threads64_()
    lib.scipy_openblas_set_num_threads64_(threads)
    try:
        yield True
    finally:
        lib.scipy_openblas_set_num_threads64_(before)


@functools.lru_cache(maxsize=1)
def _openblas():
    import ctypes
    import glob
    import os

    folder = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for candidate in sorted(glob.glob(os.path.join(folder, "libscipy_openblas*"))):
        try:
            lib = ctypes.CDLL(candidate)
            lib.scipy_openblas_set_num_threads64_.argtypes = [ctypes.c_int]
            lib.scipy_openblas_get_num_threads64_.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


@functools.lru_cache(maxsize=8)
def measure_peak(threads: int | None = None, size: int = DEFAULT_SIZE, repeats: int = DEFAULT_REPEATS,
                 gpu: bool = True) -> PeakResult:
    """Measure the float32 matmul rate (cached per process and settings)."""
    from runtime.backends import get_backend
    from runtime.backends.onnxruntime import create_session

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size ** 3
    samples: dict[str, list[float]] = {}

    session, _ = create_session(_matmul_model(size), "cpu", threads=threads)
    feeds = {"a": a, "b": b}
    samples["onnxruntime-cpu"] = _rates(lambda: session.run(None, feeds), flops, repeats)
    conv, _ = create_session(_conv_model(), "cpu", threads=threads)
    x = rng.standard_normal((1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE), dtype=np.float32)
    conv_flops = 2.0 * CONV_CHANNELS * CONV_CHANNELS * 9 * CONV_SIDE * CONV_SIDE
    samples["onnxruntime-cpu-conv"] = _rates(lambda: conv.run(None, {"x": x}), conv_flops, repeats)
    with _numpy_threads(threads) as limited:
        numpy_key = "numpy" if limited else "numpy-unlimited-threads"
        samples[numpy_key] = _rates(lambda: a @ b, flops, repeats)

    gpu_rate = None
    if gpu and get_backend("cuda").probe()[0]:
        import onnxruntime as ort

        cuda, _ = create_session(_matmul_model(size), "cuda")
        binding = cuda.io_binding()
        for name, arr in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
        binding.bind_output("c", "cuda")

        def run_bound():
            cuda.run_with_iobinding(binding)
            binding.synchronize_outputs()

        samples["onnxruntime-cuda"] = _rates(run_bound, flops, repeats)
        gpu_rate = max(samples["onnxruntime-cuda"])

    best = {k: max(v) for k, v in samples.items()}
    # numpy without a thread limit is not a peak for a thread-limited benchmark
    cpu = max(best["onnxruntime-cpu"], best["onnxruntime-cpu-conv"], best.get("numpy", 0.0))
    return PeakResult(cpu_gflops=cpu, gpu_gflops=gpu_rate, size=size, repeats=repeats, threads=threads,
                      by_backend=best, samples=samples,
                      medians={k: statistics.median(v) for k, v in samples.items()})
