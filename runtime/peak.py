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
MIN_SECONDS = 1.5   # per kernel, see _rates
MAX_REPEATS = 500


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


# A chain of VGG/Darknet-sized convolutions: 256 -> 256 channels, 3x3, on 32 x 32, eight deep
# (9.7 GFLOPs a run). A chain, not one layer: a network keeps its activations in the library's
# blocked layout from layer to layer, while a lone layer pays the layout conversions at both ends
# every run (on an AMX Xeon one layer on 64 x 64 reached 537 GFLOP/s in bf16, the chain 2075; in
# fp32 261 vs 318); 32 x 32 keeps a layer's activations (1 MB in fp32) in the core's L2 cache, as
# a detector's deeper layers are.
CONV_CHANNELS, CONV_SIDE, CONV_LAYERS = 256, 32, 8
CONV_OPS = 2.0 * CONV_CHANNELS * CONV_CHANNELS * 9 * CONV_SIDE * CONV_SIDE * CONV_LAYERS


def _conv_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    # weights scaled so that activations keep their magnitude along the chain (no inf/denormals)
    weights = [numpy_helper.from_array(rng.standard_normal((CONV_CHANNELS, CONV_CHANNELS, 3, 3), dtype=np.float32)
                                       / np.float32(48.0), f"w{i}") for i in range(CONV_LAYERS)]
    names = ["x"] + [f"h{i}" for i in range(CONV_LAYERS - 1)] + ["y"]
    nodes = [helper.make_node("Conv", [names[i], f"w{i}"], [names[i + 1]], name=f"conv3x3_{i}", pads=[1, 1, 1, 1])
             for i in range(CONV_LAYERS)]
    shape = [1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE]
    graph = helper.make_graph(nodes, "conv_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _rates(fn, flops: float, repeats: int, min_seconds: float = MIN_SECONDS) -> list[float]:
    """``repeats`` timed calls, and more until ``min_seconds`` have passed: on a shared host the
    speed comes and goes in phases of seconds (up to 1.7x on the Xeon VM this was tuned on), and
    the best of 7 calls of 5 ms all falls inside one phase."""
    fn()  # warm-up: thread pool start, page faults on the output buffer
    out = []
    begin = time.perf_counter()
    while len(out) < repeats or (time.perf_counter() - begin < min_seconds and len(out) < MAX_REPEATS):
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
    from runtime.backends.onnxruntime import OrtSettings, create_session

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size ** 3
    samples: dict[str, list[float]] = {}

    session, _ = create_session(_matmul_model(size), "cpu", OrtSettings(threads=threads))
    feeds = {"a": a, "b": b}
    samples["onnxruntime-cpu"] = _rates(lambda: session.run(None, feeds), flops, repeats)
    conv, _ = create_session(_conv_model(), "cpu", OrtSettings(threads=threads))
    x = rng.standard_normal((1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE), dtype=np.float32)
    samples["onnxruntime-cpu-conv"] = _rates(lambda: conv.run(None, {"x": x}), CONV_OPS, repeats)
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


# --------------------------------------------------------------------------- per precision
# A bf16 or INT8 row is set against the peak of ITS precision: the fp32 SGEMM rate would flatter an
# INT8 row (whose kernels do 2-4x the operations per cycle) and say nothing for bf16.

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty when unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass(frozen=True)
class PrecisionPeak:
    """The best rate of one precision's library kernels (GOP/s, 1 MAC = 2 ops), or None with ``note``."""

    precision: str  # "int8" | "bf16"
    gops: float | None
    kernel: str  # which kernel of which library, or "" when not measured
    library: str
    threads: int | None
    by_kernel: dict[str, float] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)
    units: list[str] = field(default_factory=list)  # the CPU's flags for this precision
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int8_matmul_model(n: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"], name="u8s8gemm")], "u8s8gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _qlinear_conv_model() -> bytes:
    """The same chain as :func:`_conv_model` in QLinearConv (u8 activations, s8 weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wz")]
    inits += [numpy_helper.from_array(rng.integers(-127, 128, size=(CONV_CHANNELS, CONV_CHANNELS, 3, 3), dtype=np.int8),
                                      f"w{i}") for i in range(CONV_LAYERS)]
    names = ["x"] + [f"h{i}" for i in range(CONV_LAYERS - 1)] + ["y"]
    # each layer's output scale/zero point are the next layer's input ones (xs, xz)
    nodes = [helper.make_node("QLinearConv", [names[i], "xs", "xz", f"w{i}", "ws", "wz", "xs", "xz"], [names[i + 1]],
                              name=f"qconv3x3_{i}", pads=[1, 1, 1, 1]) for i in range(CONV_LAYERS)]
    shape = [1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE]
    graph = helper.make_graph(nodes, "qconv_chain", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


@functools.lru_cache(maxsize=8)
def measure_int8_peak(threads: int | None = None, size: int = DEFAULT_SIZE, repeats: int = DEFAULT_REPEATS,
                      flags: frozenset | None = None) -> PrecisionPeak:
    """The int8 rate of this CPU through onnxruntime's MLAS integer kernels: ``MatMulInteger``
    (u8 x s8 -> s32 GEMM) and a 3x3 ``QLinearConv``, the kernels an INT8 (QDQ) detector runs on.
    MLAS picks its int8 kernel from the CPU: AMX, AVX-512 VNNI / AVX-VNNI (vpdpbusd) when present,
    else AVX2 (vpmaddubsw + vpmaddwd), which is what runs on a CPU without VNNI."""
    import onnxruntime as ort

    from runtime.backends.onnxruntime import OrtSettings, create_session

    have = cpu_flags() if flags is None else set(flags)
    units = sorted(f for f in INT8_FLAGS if f in have)
    path = ("AMX-INT8" if "amx_int8" in have else "AVX-512 VNNI" if "avx512_vnni" in have else "AVX-VNNI"
            if "avx_vnni" in have else "AVX2 u8s8 (vpmaddubsw; no VNNI on this CPU)" if "avx2" in have
            else "SSE/scalar")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    b = rng.integers(-128, 128, size=(size, size), dtype=np.int8)
    samples: dict[str, list[float]] = {}
    gemm, _ = create_session(_int8_matmul_model(size), "cpu", OrtSettings(threads=threads))
    samples["MatMulInteger"] = _rates(lambda: gemm.run(None, {"a": a, "b": b}), 2.0 * size ** 3, repeats)
    conv, _ = create_session(_qlinear_conv_model(), "cpu", OrtSettings(threads=threads))
    x = rng.integers(0, 256, size=(1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE), dtype=np.uint8)
    samples["QLinearConv"] = _rates(lambda: conv.run(None, {"x": x}), CONV_OPS, repeats)
    best = {k: max(v) for k, v in samples.items()}
    kernel = max(best, key=best.get)
    return PrecisionPeak(precision="int8", gops=best[kernel], kernel=f"{kernel} (MLAS {path})",
                         library=f"onnxruntime {ort.__version__}", threads=threads, by_kernel=best,
                         medians={k: statistics.median(v) for k, v in samples.items()}, units=units,
                         note="best of repeats; 1 MAC = 2 ops")


@functools.lru_cache(maxsize=8)
def measure_bf16_peak(threads: int | None = None, size: int = DEFAULT_SIZE, repeats: int = DEFAULT_REPEATS,
                      flags: frozenset | None = None) -> PrecisionPeak:
    """The bf16 rate through OpenVINO's CPU plugin (oneDNN: AMX-BF16 / AVX512-BF16 kernels): the best
    of a square MatMul and the chain of 3x3 convolutions of :func:`measure_peak`, both compiled with
    ``INFERENCE_PRECISION_HINT=bf16``, only where the CPU has a bf16 unit: without one, bf16 is
    emulated in fp32 and no bf16 peak exists (``gops`` None, ``note`` says so) — a number there would
    be an fp32 rate under a bf16 name. The convolution is there for the reason it is in the fp32
    peak: oneDNN's bf16 convolutions outrun its bf16 MatMul (with the MatMul alone, yolov3-416 and
    ssd300 in bf16 ran at 107 % and 127 % of that "peak" on an AVX512-BF16 EPYC)."""
    have = cpu_flags() if flags is None else set(flags)
    units = sorted(f for f in BF16_FLAGS if f in have)
    if not units:
        return PrecisionPeak(precision="bf16", gops=None, kernel="", library="", threads=threads, units=[],
                             note="no bf16 unit on this CPU (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo)")
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    rng = np.random.default_rng(0)
    kernels = {"MatMul": (_matmul_model(size), {"a": rng.standard_normal((size, size), dtype=np.float32),
                                                "b": rng.standard_normal((size, size), dtype=np.float32)},
                          2.0 * size ** 3),
               "Convolution": (_conv_model(), {"x": rng.standard_normal((1, CONV_CHANNELS, CONV_SIDE, CONV_SIDE),
                                                                        dtype=np.float32)}, CONV_OPS)}
    samples, compiled_as = {}, {}
    for kernel, (model, feeds, ops) in kernels.items():
        compiled = core.compile_model(core.read_model(model, b""), "CPU", config)
        compiled_as[kernel] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        request = compiled.create_infer_request()
        samples[kernel] = _rates(lambda r=request, f=feeds: r.infer(f), ops, repeats)
    best = {k: max(v) for k, v in samples.items()}
    kernel = max(best, key=best.get)
    return PrecisionPeak(precision="bf16", gops=best[kernel], kernel=f"{kernel} (oneDNN, {'/'.join(units)}; "
                         f"compiled precision {compiled_as[kernel]})", library=f"openvino {ov.__version__}",
                         threads=threads, by_kernel=best, medians={k: statistics.median(v) for k, v in samples.items()},
                         units=units, note="best of repeats; 1 MAC = 2 ops")


def peak_for(peak: PeakResult, device: str, precision: str | None, contract: dict[str, Any] | None,
             threads: int | None) -> tuple[float | None, str, str]:
    """(peak GOP/s, its precision, note) a bench row's fraction of peak refers to: an INT8 file
    (contract ``detbench.precision``) against the int8 peak, a backend computing in bf16 against the
    bf16 peak (none where the CPU has no bf16 unit), else fp32 against :func:`measure_peak`'s."""
    file_precision = (contract or {}).get("detbench.precision") or (contract or {}).get("precision")
    if device == "cpu" and file_precision == "int8":  # CPU kernels: an accelerator has peaks of its own
        p = measure_int8_peak(threads)
        return p.gops, "int8", f"{p.kernel}, {p.library}"
    if device == "cpu" and (precision or "").lower() in ("bf16", "bfloat16"):
        p = measure_bf16_peak(threads)
        return p.gops, "bf16", (f"{p.kernel}, {p.library}" if p.gops else p.note)
    return peak.for_device(device), "fp32", "best of SGEMM / 3x3 conv (onnxruntime MLAS) and numpy BLAS"
