"""Latency of an exported detector per execution provider, and where its time goes.

:func:`bench_model` measures one ONNX file on one provider; :func:`bench_models` runs
several files x providers, checks every provider before measuring anything, and appends
one ``bench`` record per model x provider x settings to the results store.

What is measured (all figures in a :class:`BenchResult`):

- the input is a real COCO image brought to the contract's size and resize mode with
  :func:`core.images.prepare_for` (NMS cost depends on the content, so never zeros),
  prepared before any clock starts;
- ``session_seconds``: wall time of ``InferenceSession`` creation;
- ``warmup`` untimed runs, then ``runs`` timed runs (or as many as fit in ``seconds``);
  each run is timed alone with ``time.perf_counter`` around ``session.run`` (outputs
  fetched to numpy included; they are a few kB);
- latency mean/std/p50/p90/p99/min/max in milliseconds, throughput in images/s
  (= batch x 1000 / mean latency);
- ``peak_rss_mb``: the process's peak resident memory growth over session creation and
  the runs (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus the
  RSS before); memory onnxruntime's allocator took earlier in the same process and reuses
  is not counted again;
- on CUDA devices, inputs bound on the device through IO binding so timing excludes host
  copies (``include_copies=True`` times ``session.run`` with host arrays instead);
- ``fraction_of_peak``: achieved GFLOP/s (2 x the analyzer's MACs x batch / p50 latency)
  over the machine's measured matmul rate (:mod:`runtime.peak`) on the same thread count;
- ``native``: the same model in its source framework (:mod:`runtime.native`), timed the
  same way, and ``ratio`` = onnxruntime p50 / native p50 (below 1: onnxruntime is faster);
- ``nodes``: per-kernel time, share and achieved GMAC/s (:mod:`runtime.nodes`), from a
  separate profiled session so profiling overhead never reaches the latency figures.

Batch: the contract's graphs have a fixed batch of 1 (``boxes [K, 4]`` carries no image
index), so ``batch > 1`` is a :class:`ConfigError` for them; a graph whose first input
dimension is symbolic is fed ``batch`` copies of the image.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.contract import INPUT_NAME, read_contract, sha256_file
from core.errors import ConfigError, DatasetError
from core.images import load_rgb, prepare_for

DEFAULT_WARMUP = 3
DEFAULT_RUNS = 20


@dataclass(frozen=True)
class Latency:
    """Milliseconds per run over ``n`` timed runs."""

    n: int
    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Latency":
        arr = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99])
        return cls(n=len(arr), mean=float(arr.mean()), std=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                   p50=float(p50), p90=float(p90), p99=float(p99), min=float(arr.min()), max=float(arr.max()))

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "n"}


@dataclass
class BenchResult:
    """One model on one provider with one set of settings (see the module docstring for each figure)."""

    model: str
    path: str
    model_sha256: str
    contract: dict[str, str]
    provider: str
    providers_ran: list[str]
    fell_back: bool
    settings: dict[str, Any]
    latency: Latency
    samples_ms: list[float]
    session_seconds: float
    peak_rss_mb: float | None
    warmup: int
    batch: int
    image: str
    detections: int
    macs: int | None = None
    macs_note: str = ""
    machine_peak_gflops: float | None = None
    achieved_gflops: float | None = None
    fraction_of_peak: float | None = None
    native: dict[str, Any] | None = None
    nodes: dict[str, Any] | None = None
    peak: dict[str, Any] | None = None
    macs_full: tuple[dict[str, int], int, str] | None = field(default=None, repr=False)

    @property
    def throughput_ips(self) -> float:
        return self.batch * 1000.0 / self.latency.mean

    @property
    def native_ratio(self) -> float | None:
        return None if not self.native else self.native.get("ratio")

    def to_record(self) -> dict[str, Any]:
        """The store's ``bench`` data dict (schema in the project briefing)."""
        return {
            "latency_ms": self.latency.to_dict(), "throughput_ips": self.throughput_ips,
            "session_seconds": self.session_seconds, "peak_rss_mb": self.peak_rss_mb,
            "peak_rss_method": "VmHWM growth over session creation and runs (Linux /proc, whole process)",
            "runs": self.latency.n, "warmup": self.warmup, "batch": self.batch,
            "providers_ran": self.providers_ran, "fell_back": self.fell_back,
            "machine_peak_gflops": self.machine_peak_gflops, "achieved_gflops": self.achieved_gflops,
            "fraction_of_peak": self.fraction_of_peak, "macs": self.macs, "macs_note": self.macs_note,
            "native": self.native, "nodes": self.nodes, "image": self.image, "detections": self.detections,
            "samples_ms": self.samples_ms, "peak": self.peak, "path": self.path,
            "random_init": self.contract.get("detbench.weights") == "random-init",
        }


# --------------------------------------------------------------------------- inputs

def default_image() -> Path:
    """The COCO val2017 image of the shared subset with the most annotated objects.

    Deterministic, and busy enough that NMS has real work; raises DatasetError naming
    the folder and the ``--image`` option when the subset is absent.
    """
    import json

    from core.paths import data_dir

    root = data_dir() / "coco-val2017-subset"
    images = root / "val2017"
    if not images.is_dir():
        raise DatasetError(f"no COCO images at {images}; pass --image PATH or set DETBENCH_DATA")
    annotations = root / "annotations" / "instances_val2017.json"
    if annotations.is_file():
        with open(annotations, encoding="utf-8") as fh:
            doc = json.load(fh)
        counts: dict[int, int] = {}
        for ann in doc.get("annotations", []):
            if not ann.get("iscrowd", 0):
                counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
        files = {img["id"]: img["file_name"] for img in doc.get("images", [])}
        ranked = sorted(counts, key=lambda i: (-counts[i], i))
        for image_id in ranked:
            candidate = images / files.get(image_id, "")
            if candidate.is_file():
                return candidate
    jpgs = sorted(images.glob("*.jpg"))
    if not jpgs:
        raise DatasetError(f"no .jpg images in {images}; pass --image PATH")
    return jpgs[0]


def input_tensor(contract, image: Path, batch: int, input_shape: list[Any], source: str) -> np.ndarray:
    tensor, _ = prepare_for(load_rgb(image), contract)
    if batch < 1:
        raise ConfigError(f"--batch {batch}: must be at least 1")
    if batch > 1:
        dim0 = input_shape[0] if input_shape else 1
        if isinstance(dim0, int):
            raise ConfigError(
                f"{source}: input {INPUT_NAME!r} has a fixed batch of {dim0}; detbench's exported graphs are "
                f"batch-1 (their outputs boxes [K, 4] carry no image index), so --batch {batch} cannot run. "
                "Use --batch 1, or export a graph with a symbolic batch dimension.")
        tensor = np.ascontiguousarray(np.repeat(tensor, batch, axis=0))
    return tensor


# --------------------------------------------------------------------------- timing

def time_runs(run: Callable[[], Any], *, warmup: int, runs: int | None, seconds: float | None) -> list[float]:
    """Milliseconds of each timed call of ``run`` after ``warmup`` untimed ones.

    Exactly ``runs`` calls, or with ``seconds`` as many as start within that budget (at least one).
    """
    if warmup < 0:
        raise ConfigError(f"--warmup {warmup}: must be 0 or more")
    if runs is not None and seconds is not None:
        raise ConfigError("give --runs or --seconds, not both")
    if runs is None and seconds is None:
        runs = DEFAULT_RUNS
    if runs is not None and runs < 1:
        raise ConfigError(f"--runs {runs}: must be at least 1")
    if seconds is not None and seconds <= 0:
        raise ConfigError(f"--seconds {seconds}: must be positive")
    for _ in range(warmup):
        run()
    samples = []
    clock = time.perf_counter
    budget_end = clock() + seconds if seconds is not None else None
    while True:
        start = clock()
        run()
        samples.append((clock() - start) * 1e3)
        if runs is not None and len(samples) >= runs:
            break
        if budget_end is not None and clock() >= budget_end:
            break
    return samples


class _PeakRss:
    """Peak RSS growth of this process over a block (Linux /proc; None elsewhere)."""

    def __enter__(self):
        self.before = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self.resettable = True
        except OSError:
            self.resettable = False
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM")
        self.mb = None if (hwm is None or self.before is None or not self.resettable) else (hwm - self.before) / 1024
        return False


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- MACs

class AnalyzerMissing(ConfigError):
    """The graph analyzer (counting/) cannot be imported, so MACs are unknown."""


def model_macs(path: Path, image: Path) -> tuple[dict[str, int], int, str]:
    """Per-node MACs, total MACs and a note saying how they were counted (counting/ analyzer)."""
    try:
        from counting import profile_model
    except ImportError as exc:
        raise AnalyzerMissing(f"the graph analyzer (counting/) is not importable ({exc}); it provides the MACs "
                          "that --nodes and the fraction of peak need") from exc
    profile = profile_model(path, shapes="static", allow_unknown=True)
    mode = "static"
    if profile.unresolved:  # data-dependent shapes (two-stage detectors): count what this image produces
        profile = profile_model(path, shapes="measured", image=image, allow_unknown=True)
        mode = f"measured on {image.name}"
    top_level = {n.name for n in profile.nodes if not n.subgraph}
    per_node: dict[str, int] = {}
    for n in profile.nodes:
        # If/Loop bodies run inside their parent's kernel: their MACs go to the top-level parent
        key = n.name if not n.subgraph else max((t for t in top_level if n.name.startswith(t + "/")),
                                                key=len, default=n.name)
        per_node[key] = per_node.get(key, 0) + int(n.total_macs)
    note = f"counting.profile_model ({mode} shapes); 1 MAC = 2 FLOPs"
    if profile.unknown_ops:
        note += f"; uncounted ops: {', '.join(sorted(profile.unknown_ops))}"
    if profile.unresolved:
        note += f"; {len(profile.unresolved)} node(s) with unresolved shapes not counted"
    return per_node, int(profile.macs), note


# --------------------------------------------------------------------------- the benchmark

def bench_model(path, provider: str = "cpu", *, warmup: int = DEFAULT_WARMUP, runs: int | None = None,
                seconds: float | None = None, batch: int = 1, threads: int | None = None,
                inter_threads: int | None = None, optimization: str = "all", execution_mode: str = "sequential",
                provider_options: dict[str, Any] | None = None, allow_fallback: bool = False,
                trt_cache_dir: str | Path | None = None, include_copies: bool = False,
                image: str | Path | None = None, native: bool | dict[str, Any] = False, nodes: bool = False,
                node_runs: int = 5, peak: bool = True, native_weights: str | Path | None = None,
                macs: tuple[dict[str, int], int, str] | None = None) -> BenchResult:
    """Benchmark one ONNX file on one provider (see the module docstring for every figure).

    ``native`` may be True (run the source framework here) or an already measured native
    result dict (so several providers share one native run). ``macs`` may pass the
    analyzer's ``(per_node, total, note)`` in when known. Raises ProviderUnavailableError,
    ConfigError, ContractError, DatasetError with messages naming the file and option.
    """
    from runtime.sessions import create_session

    path = Path(path)
    contract = read_contract(path)
    image = Path(image) if image is not None else default_image()
    if native and batch != 1:
        raise ConfigError(f"--native compares single images: use --batch 1 with --native (got --batch {batch})")
    settings_extra = {"warmup": warmup, "runs": runs, "seconds": seconds, "batch": batch,
                      "include_copies": include_copies, "image": str(image)}

    gc.collect()
    with _PeakRss() as rss:
        session, info = create_session(path, provider, threads=threads, inter_threads=inter_threads,
                                       optimization=optimization, execution_mode=execution_mode,
                                       provider_options=provider_options, allow_fallback=allow_fallback,
                                       trt_cache_dir=trt_cache_dir)
        shape = session.get_inputs()[0].shape
        tensor = input_tensor(contract, image, batch, shape, str(path))
        run, outputs_of = _runner(session, info, tensor, include_copies, provider_options)
        samples = time_runs(run, warmup=warmup, runs=runs, seconds=seconds)
        detections = outputs_of()
    latency = Latency.of(samples)
    del session

    result = BenchResult(
        model=contract.name, path=str(path), model_sha256=sha256_file(path),
        contract=contract.to_props(),
        provider=info.settings["provider"], providers_ran=info.providers_ran, fell_back=info.fell_back,
        settings={**info.settings, **settings_extra}, latency=latency, samples_ms=samples,
        session_seconds=info.seconds, peak_rss_mb=rss.mb, warmup=warmup, batch=batch, image=str(image),
        detections=detections)

    if nodes and macs is None:
        macs = model_macs(path, image)
    if peak and macs is None:
        try:
            macs = model_macs(path, image)
        except AnalyzerMissing as exc:  # latency stays valid without the analyzer; the record says why
            result.macs_note = str(exc)
    if macs is not None:
        result.macs, result.macs_note, result.macs_full = macs[1], macs[2], macs
    if peak:
        from runtime.peak import measure_peak

        measured = measure_peak(threads)
        result.peak = {k: v for k, v in measured.to_dict().items() if k != "samples"}
        result.machine_peak_gflops = measured.for_provider(info.provider)
        if result.macs:
            result.achieved_gflops = 2.0 * result.macs * batch / (latency.p50 / 1e3) / 1e9
            if result.machine_peak_gflops:
                result.fraction_of_peak = result.achieved_gflops / result.machine_peak_gflops
    if native:
        if isinstance(native, dict):
            measured_native = dict(native)
        else:
            from runtime.native import bench_native

            measured_native = bench_native(path, tensor, warmup=warmup, runs=runs, seconds=seconds,
                                           threads=threads, weights=native_weights).to_dict()
        measured_native["ratio"] = latency.p50 / measured_native["latency_ms"]["p50"]
        measured_native["ratio_definition"] = "onnxruntime p50 / native p50 (below 1: onnxruntime faster)"
        result.native = measured_native
    if nodes:
        result.nodes = profile_nodes(path, provider, tensor, macs[0], runs=node_runs, warmup=max(1, min(warmup, 2)),
                                     threads=threads, inter_threads=inter_threads, optimization=optimization,
                                     execution_mode=execution_mode, provider_options=provider_options,
                                     allow_fallback=allow_fallback, trt_cache_dir=trt_cache_dir).to_dict()
    return result


def _runner(session, info, tensor: np.ndarray, include_copies: bool, provider_options: dict[str, Any] | None):
    """``(run, detections)``: the timed call and a function giving the detection count of its last output."""
    output_names = [o.name for o in session.get_outputs()]
    feeds = {INPUT_NAME: tensor}
    if info.on_cuda_device and not include_copies:
        import onnxruntime as ort

        device_id = int((provider_options or {}).get("device_id", 0))
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(tensor, "cuda", device_id))
        for name in output_names:
            binding.bind_output(name, "cuda", device_id)

        def run():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        def detections():
            return int(binding.get_outputs()[output_names.index("scores")].shape()[0])

        return run, detections
    last: dict[str, Any] = {}

    def run():
        last["out"] = session.run(output_names, feeds)

    def detections():
        return int(np.asarray(last["out"][output_names.index("scores")]).shape[0]) if "scores" in output_names else -1

    return run, detections


def profile_nodes(path: Path, provider: str, tensor: np.ndarray, node_macs: dict[str, int], *, runs: int,
                  warmup: int, **session_kwargs) -> "NodeTimes":
    """Per-kernel times from a profiled session (``warmup`` runs discarded) joined with ``node_macs``."""
    import onnx

    from runtime.nodes import attribute, kernel_times, load_trace
    from runtime.sessions import create_session

    with tempfile.TemporaryDirectory(prefix="detbench-profile-") as tmp:
        session, _ = create_session(path, provider, profile_prefix=os.path.join(tmp, "ort"), **session_kwargs)
        output_names = [o.name for o in session.get_outputs()]
        for _ in range(warmup + max(1, runs)):
            session.run(output_names, {INPUT_NAME: tensor})
        trace_path = session.end_profiling()
        trace = load_trace(trace_path)
        del session
    kernels, n = kernel_times(trace, skip_runs=warmup)
    graph = onnx.load(str(path), load_external_data=False).graph
    return attribute(graph, kernels, node_macs, n)


def bench_models(paths: list[Path], providers: list[str], **options) -> list[BenchResult]:
    """Every model on every provider, one store record each; providers are checked first.

    ``options`` are :func:`bench_model`'s keywords (``native`` runs the source framework once
    per model and shares it between providers); ``record=False`` skips the store.
    """
    from core import store
    from runtime.sessions import create_session, tiny_model_bytes

    record = options.pop("record", True)
    if not paths:
        raise ConfigError("name at least one ONNX file to benchmark")
    if not providers:
        raise ConfigError("name at least one --provider")
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"no ONNX file at {p}")
    # Fail before any measurement when a requested provider cannot run (or would fall back).
    for provider in providers:
        create_session(tiny_model_bytes(), provider, allow_fallback=options.get("allow_fallback", False),
                       provider_options=options.get("provider_options"))
    want_native = options.pop("native", False)
    given_macs = options.pop("macs", None)  # the analyzer's figures for a single model, when already known
    if len(paths) != 1:
        given_macs = None
    results = []
    for path in paths:
        native_done: dict[str, Any] | None = None
        macs = given_macs
        for provider in providers:
            result = bench_model(path, provider, native=native_done or want_native, macs=macs, **options)
            if want_native and native_done is None:
                native_done = {k: v for k, v in result.native.items() if k not in ("ratio", "ratio_definition")}
            if result.macs is not None and macs is None:
                macs = result.macs_full
            results.append(result)
            if record:
                store.append("bench", result.to_record(), model=result.model, model_sha256=result.model_sha256,
                             provider=result.provider, settings=result.settings, contract=result.contract)
    return results


__all__ = ["BenchResult", "Latency", "bench_model", "bench_models", "default_image", "model_macs", "profile_nodes",
           "time_runs"]
