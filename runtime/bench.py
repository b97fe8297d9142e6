"""Latency of an exported detector on one or several backends, measured side by side.

:func:`bench_side_by_side` measures one ONNX file on several backends (names of
:mod:`runtime.backends`) in one process; :func:`bench_models` does that for several files,
checks every backend before measuring anything, and appends one ``bench`` record per
model x backend x settings to the results store. Options travel as two settings objects,
:class:`BenchSettings` (how to time) and :class:`~runtime.backends.base.BackendSettings`
(how to open the model); both are stored with every record.

What is measured (all figures in a :class:`BenchResult`):

- the input is a real COCO image brought to the contract's size and resize mode with
  :func:`core.images.prepare_for` (NMS cost depends on the content, so never zeros),
  prepared before any clock starts;
- parity before timing: every backend other than onnxruntime CPU is first compared with it on
  a few real COCO images (:mod:`runtime.parity`); a backend outside its tolerance is measured
  but marked ``disagree`` in its result and record;
- cold start, apart from the steady state: ``session_seconds`` (open: session creation or
  model compilation), ``first_run_ms`` (the first inference), then the steady-state latency;
- ``warmup`` untimed runs per backend, then the timed runs in rounds: each round runs every
  backend for a block of runs, the backends' order rotating from round to round, so that a
  slow drift of the machine (other load, thermal state) spreads over all of them alike; each
  run is timed alone with ``time.perf_counter`` around the backend's bound call (outputs
  fetched to numpy included; they are a few kB);
- latency mean/std/p50/p90/p99/min/max in milliseconds (:class:`Latency`), with
  :mod:`runtime.stats`' VALID/INVALID verdicts beside them in the record; throughput in
  images/s (= batch x 1000 / mean latency); ``ratio_to_cpu`` = p50 / onnxruntime CPU's p50
  in the same side-by-side measurement (below 1: faster than onnxruntime CPU);
- ``peak_rss_mb``: the process's peak resident memory growth over the backend's open and
  first run (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus the
  RSS before);
- on CUDA devices, inputs bound on the device (IO binding) so timing excludes host copies
  (``include_copies=True`` times the run with host arrays instead);
- ``fraction_of_peak``: achieved GFLOP/s (2 x the analyzer's MACs x batch / p50 latency)
  over the machine's measured matmul rate (:mod:`runtime.peak`) on the same device and threads;
- ``native``: on onnxruntime CPU's result, the native backend's figures of the same
  measurement and ``ratio`` = onnxruntime p50 / native p50 (kept for the report);
- ``nodes``: per-layer time, share and achieved GMAC/s where the backend has a per-layer
  profiler (onnxruntime: :mod:`runtime.nodes`; OpenVINO: its performance counters), from a
  separate profiled model so profiling overhead never reaches the latency figures.

Batch: the contract's graphs have a fixed batch of 1 (``boxes [K, 4]`` carries no image
index), so ``batch > 1`` is a :class:`ConfigError` for them; a graph whose first input
dimension is symbolic is fed ``batch`` copies of the image.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.contract import read_contract, sha256_file
from core.errors import ConfigError
from runtime.backends.convert import ConversionFailed
from runtime.backends import REFERENCE, BackendSettings, get_backend
from runtime.inputs import busiest_images, default_image, input_tensor, model_input_shape

DEFAULT_WARMUP = 3
DEFAULT_RUNS = 20
DEFAULT_ROUNDS = 5


@dataclass(frozen=True)
class BenchSettings:
    """How to time: ``warmup`` untimed runs per backend; ``runs`` timed runs per backend, or as
    many as fit in ``seconds`` per backend, or (neither given, the default) as many as
    :class:`runtime.stats.ValidityRules` needs for a VALID p50 and p90: at least 64 runs and
    10 s per backend, whichever is later, stopping at 60 s per backend (then INVALID, capped); ``rounds``: how many blocks the timed runs
    are split into, backends alternating between blocks; ``batch``; ``image`` (default: the
    busiest COCO image of the shared subset); ``nodes``/``node_runs``: per-layer profile;
    ``peak``: measure the machine's matmul peak; ``parity``/``parity_images``: compare each
    backend with onnxruntime CPU on that many real COCO images before timing it."""

    warmup: int = DEFAULT_WARMUP
    runs: int | None = None
    seconds: float | None = None
    rounds: int = DEFAULT_ROUNDS
    batch: int = 1
    image: str | None = None
    nodes: bool = False
    node_runs: int = 5
    peak: bool = True
    parity: bool = True
    parity_images: int = 3
    smoke: bool = False  # a bounded smoke run (--quick): its latency is marked smoke, never VALID

    def __post_init__(self):
        if self.warmup < 0:
            raise ConfigError(f"--warmup {self.warmup}: must be 0 or more")
        if self.runs is not None and self.seconds is not None:
            raise ConfigError("give --runs or --seconds, not both")
        if self.runs is not None and self.runs < 1:
            raise ConfigError(f"--runs {self.runs}: must be at least 1")
        if self.seconds is not None and self.seconds <= 0:
            raise ConfigError(f"--seconds {self.seconds}: must be positive")
        if self.rounds < 1:
            raise ConfigError(f"--rounds {self.rounds}: must be at least 1")
        if self.batch < 1:
            raise ConfigError(f"--batch {self.batch}: must be at least 1")
        if isinstance(self.image, Path):
            object.__setattr__(self, "image", str(self.image))

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_options(options: dict[str, Any], bench: BenchSettings | None = None,
                  backend: BackendSettings | None = None) -> tuple[BenchSettings, BackendSettings, bool]:
    """Keyword options (the names of both settings objects' fields, plus ``native``) into the two
    settings objects and whether the native backend is wanted; ConfigError for an unknown name."""
    options = dict(options)
    native = bool(options.pop("native", False))
    unknown = set(options) - BenchSettings.names() - BackendSettings.names()
    if unknown:
        raise ConfigError(f"unknown benchmark option(s): {', '.join(sorted(unknown))}")
    ours = {k: v for k, v in options.items() if k in BenchSettings.names()}
    theirs = {k: v for k, v in options.items() if k in BackendSettings.names()}
    if theirs.get("provider_options") is None:
        theirs.pop("provider_options", None)
    return (replace(bench or BenchSettings(), **ours), replace(backend or BackendSettings(), **theirs), native)


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


# --------------------------------------------------------------------------- timing

def time_runs(run: Callable[[], Any], *, warmup: int, runs: int | None, seconds: float | None) -> list[float]:
    """Milliseconds of each timed call of ``run`` after ``warmup`` untimed ones: exactly ``runs``
    calls (default 20), or with ``seconds`` as many as start within that budget (at least one).
    :func:`runtime.stats.time_runs` with a fixed count instead of the validity rules."""
    from runtime.stats import time_runs as timed

    if runs is None and seconds is None:
        runs = DEFAULT_RUNS
    return timed(run, warmup=warmup, runs=runs, seconds=seconds).samples_ms


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


# --------------------------------------------------------------------------- results

@dataclass
class BenchResult:
    """One model on one backend with one set of settings (see the module docstring for each figure)."""

    model: str
    path: str
    model_sha256: str
    contract: dict[str, str]
    provider: str                       # the backend's registered name
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
    backend: dict[str, Any] = field(default_factory=dict)     # RunnerInfo: library, version, device, precision
    first_run_ms: float | None = None
    parity: dict[str, Any] | None = None
    ratio_to_cpu: float | None = None
    rounds: int = 1
    macs: int | None = None
    macs_note: str = ""
    machine_peak_gflops: float | None = None
    achieved_gflops: float | None = None
    fraction_of_peak: float | None = None
    native: dict[str, Any] | None = None
    nodes: dict[str, Any] | None = None
    nodes_note: str = ""
    peak: dict[str, Any] | None = None
    parts: dict[str, Any] | None = None  # network / post-processing latency when run in parts
    # backends of this side-by-side run whose conversion of this model failed: name -> operator/reason
    conversion_failures: dict[str, str] = field(default_factory=dict)
    macs_full: tuple[dict[str, int], int, str] | None = field(default=None, repr=False)

    @property
    def throughput_ips(self) -> float:
        return self.batch * 1000.0 / self.latency.mean

    @property
    def native_ratio(self) -> float | None:
        return None if not self.native else self.native.get("ratio")

    @property
    def precision(self) -> str:
        return self.backend.get("precision", "f32")

    @property
    def parity_verdict(self) -> str:
        """``agree``/``disagree`` against onnxruntime CPU, ``reference`` for onnxruntime CPU itself,
        ``unchecked`` when parity was not run."""
        if self.provider == REFERENCE and not self.fell_back:
            return "reference"
        return self.parity["verdict"] if self.parity else "unchecked"

    @property
    def judged(self):
        """The samples judged by :mod:`runtime.stats`: n, RSD, p90/p99 only where the sample supports
        them (MLPerf LoadGen's early-stopping estimate), and a VALID/INVALID verdict per figure."""
        from runtime.stats import Latency as Judged

        return Judged.of(self.samples_ms, smoke=bool(self.settings.get("smoke")))

    def to_record(self) -> dict[str, Any]:
        """The store's ``bench`` data dict (schema in the project briefing)."""
        judged = self.judged
        validity = judged.to_dict()
        # percentiles the sample cannot support are stored as None, never as if it could
        latency = {**self.latency.to_dict(), "p90": validity["p90"], "p99": validity["p99"]}
        return {
            "latency_ms": latency, "latency_validity": validity,
            "throughput_ips": self.throughput_ips,
            "session_seconds": self.session_seconds, "first_run_ms": self.first_run_ms,
            "cold_start": {"open_seconds": self.session_seconds, "first_run_ms": self.first_run_ms,
                           "steady_p50_ms": self.latency.p50},
            "peak_rss_mb": self.peak_rss_mb,
            "peak_rss_method": "VmHWM growth over the backend's open and first run (Linux /proc, whole process)",
            "runs": self.latency.n, "warmup": self.warmup, "batch": self.batch, "rounds": self.rounds,
            "providers_ran": self.providers_ran, "fell_back": self.fell_back,
            "backend": self.backend, "precision": self.precision, "parity": self.parity,
            "parity_verdict": self.parity_verdict, "ratio_to_cpu": self.ratio_to_cpu,
            "machine_peak_gflops": self.machine_peak_gflops, "achieved_gflops": self.achieved_gflops,
            "fraction_of_peak": self.fraction_of_peak, "macs": self.macs, "macs_note": self.macs_note,
            "native": self.native, "nodes": self.nodes, "nodes_note": self.nodes_note, "image": self.image,
            "detections": self.detections, "samples_ms": self.samples_ms, "peak": self.peak, "path": self.path,
            "random_init": self.contract.get("detbench.weights") == "random-init",
            "latency_parts_ms": self.parts, "conversion_failures": self.conversion_failures,
        }


# --------------------------------------------------------------------------- the benchmark

# Each backend is timed in slices of about this long per round when the validity rules decide how
# long to time: short enough that the backends really alternate, long enough to amortise the switch.
_SLICE_SECONDS = 1.0


def _alternate_until_valid(calls: dict[str, Callable[[], None]], names: list[str], rounds: int,
                           rules=None, slice_seconds: float = _SLICE_SECONDS) -> dict[str, list[float]]:
    """Rounds of ~``slice_seconds`` per backend (order rotating) until every backend has the runs
    and the timed duration ``rules`` (default :class:`runtime.stats.ValidityRules`) ask for, or
    one reached its time cap; at least ``rounds`` rounds."""
    from runtime.stats import ValidityRules

    rules = rules or ValidityRules()
    samples: dict[str, list[float]] = {n: [] for n in names}
    k = 0
    while True:
        _timed_round(calls, names, samples, k, slice_seconds)
        k += 1
        timed = {n: sum(v) / 1e3 for n, v in samples.items()}
        met = all(len(samples[n]) >= rules.min_queries and timed[n] >= rules.min_duration_s for n in names)
        capped = any(t >= rules.max_duration_s for t in timed.values())
        if k >= rounds and (met or capped):
            return samples


def _timed_round(calls: dict[str, Callable[[], None]], names: list[str], samples: dict[str, list[float]], k: int,
                 seconds: float) -> None:
    """Round ``k``: each backend in turn (order rotated by ``k``) runs for ``seconds`` (at least once)."""
    clock = time.perf_counter
    for name in names[k % len(names):] + names[:k % len(names)]:
        call, out = calls[name], samples[name]
        end = clock() + seconds
        while True:
            start = clock()
            call()
            out.append((clock() - start) * 1e3)
            if clock() >= end:
                break


def _blocks(total: int, rounds: int) -> list[int]:
    """``total`` runs split into at most ``rounds`` blocks as even as possible."""
    rounds = min(rounds, total)
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


def _alternate(calls: dict[str, Callable[[], None]], settings: BenchSettings) -> dict[str, list[float]]:
    """Timed runs per backend, in rounds with the backends' order rotating (see the module docstring)."""
    names = list(calls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter
    rounds = settings.rounds
    if settings.seconds is not None:
        for k in range(rounds):
            _timed_round(calls, names, samples, k, settings.seconds / rounds)
        return samples
    if settings.runs is None:
        return _alternate_until_valid(calls, names, rounds)
    for k, block in enumerate(_blocks(settings.runs, rounds)):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            call, out = calls[name], samples[name]
            for _ in range(block):
                start = clock()
                call()
                out.append((clock() - start) * 1e3)
    return samples


def bench_side_by_side(path, backends: list[str], settings: BenchSettings | None = None,
                       backend_settings: BackendSettings | None = None, *,
                       macs: tuple[dict[str, int], int, str] | None = None) -> list[BenchResult]:
    """Benchmark one ONNX file on every backend of ``backends``, side by side in this process.

    All backends are opened first (cold start measured for each), checked against onnxruntime
    CPU (parity), warmed up, then timed alternating (module docstring). ``macs`` may pass the
    analyzer's ``(per_node, total, note)`` in when known. Raises ProviderUnavailableError,
    ConfigError, ContractError, DatasetError with messages naming the file and option.
    """
    settings = settings or BenchSettings()
    backend_settings = backend_settings or BackendSettings()
    names = list(dict.fromkeys(get_backend(b).name for b in backends))
    if not names:
        raise ConfigError("name at least one --provider")
    for name in names:
        get_backend(name).require(backend_settings)
    path = Path(path)
    contract = read_contract(path)
    image = Path(settings.image) if settings.image is not None else default_image()
    if any(get_backend(n).capabilities.native for n in names) and settings.batch != 1:
        raise ConfigError(f"--native compares single images: use --batch 1 with --native (got --batch {settings.batch})")
    tensor = input_tensor(contract, image, settings.batch, model_input_shape(path), str(path))
    if backend_settings.passive_wait is None:  # alternating backends: an idle one must not spin on the cores
        backend_settings = replace(backend_settings, passive_wait=len(names) > 1)

    runners: dict[str, Any] = {}
    opened: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    try:
        for name in list(names):
            gc.collect()
            with _PeakRss() as rss:
                try:
                    runner = get_backend(name).open(path, backend_settings)
                except ConversionFailed as exc:  # a per-model outcome of a converting backend, not the run's end
                    failures[name] = str(exc)
                    names.remove(name)
                    continue
                runners[name] = runner
                call = runner.bind(tensor)
                start = time.perf_counter()
                call()  # the first inference: part of the cold start, reported apart
                first_ms = (time.perf_counter() - start) * 1e3
            opened[name] = {"call": call, "first_ms": first_ms, "rss": rss.mb}

        parity: dict[str, Any] = {}
        if settings.parity and any(n != REFERENCE or runners[n].info.fell_back for n in names):
            parity = _parities(path, contract, runners, backend_settings, settings.parity_images)

        for name in names:
            for _ in range(max(0, settings.warmup - 1)):  # the first inference was one warm-up run
                opened[name]["call"]()
        samples = _alternate({n: opened[n]["call"] for n in names}, settings)
        results = []
        for name in names:
            runner = runners[name]
            info = runner.info
            results.append(BenchResult(
                model=contract.name, path=str(path), model_sha256=sha256_file(path), contract=contract.to_props(),
                provider=name, providers_ran=list(info.detail.get("providers_ran")
                                                  or [f"{info.library} {info.device} ({info.precision})"]),
                fell_back=info.fell_back,
                settings={"provider": name, **backend_settings.to_dict(), **settings.to_dict(), "image": str(image),
                          "session": info.detail.get("session")},
                latency=Latency.of(samples[name]), samples_ms=samples[name], session_seconds=info.load_seconds,
                peak_rss_mb=opened[name]["rss"], warmup=settings.warmup, batch=settings.batch, image=str(image),
                detections=runner.detections(),
                backend={**info.to_dict(), "capabilities": get_backend(name).capabilities.to_dict()},
                first_run_ms=opened[name]["first_ms"],
                parity=parity.get(name), parts=_parts(runner, len(samples[name])), rounds=min(settings.rounds, settings.runs) if settings.runs else settings.rounds
                if settings.seconds is None else settings.rounds))
        if settings.nodes or settings.peak:
            _add_macs_and_peak(results, runners, path, image, tensor, settings, backend_settings, macs)
    finally:
        for runner in runners.values():
            runner.close()
    if not names:
        raise ConversionFailed("; ".join(f"{n}: {why}" for n, why in failures.items()))
    for r in results:
        r.conversion_failures = dict(failures)
    _relate(results)
    return results


def _parts(runner, n: int) -> dict[str, Any] | None:
    """Network and post-processing latency of the last ``n`` (the timed) calls of a runner that runs
    the graph in parts; total = the timed call (the two parts plus the hand-over between them)."""
    parts = runner.part_samples()
    if not parts or n == 0:
        return None
    out: dict[str, Any] = {k: Latency.of(v[-n:]).to_dict() for k, v in parts.items() if len(v) >= n}
    out["note"] = (runner.info.detail.get("split", {}).get("method", "") +
                   "; network on the backend, postprocess on onnxruntime CPU, total = latency_ms")
    return out


def _parities(path: Path, contract, runners: dict, backend_settings: BackendSettings, count: int) -> dict[str, Any]:
    """Parity of every non-reference runner against onnxruntime CPU (opened here when not benched)."""
    from core.images import load_rgb, prepare_for
    from runtime.parity import check_parity

    images = busiest_images(count)
    tensors = [prepare_for(load_rgb(image), contract)[0] for image in images]
    reference = runners.get(REFERENCE)
    own = reference is None or reference.info.fell_back
    if own:
        reference = get_backend(REFERENCE).open(path, replace(backend_settings, allow_fallback=False, provider_options={},
                                                              trt_cache_dir=None))
    try:
        out = {}
        for name, runner in runners.items():
            if name != REFERENCE or runner.info.fell_back:
                out[name] = check_parity(runner, reference, images, tensors).to_dict()
                network = runner.network_parity(tensors)
                if network is not None:  # run in parts: the network outputs are compared too
                    out[name]["network"] = network
        return out
    finally:
        if own:
            reference.close()


def _add_macs_and_peak(results, runners, path, image, tensor, settings: BenchSettings,
                       backend_settings: BackendSettings, macs) -> None:
    if settings.nodes and macs is None:
        macs = model_macs(path, image)
    if settings.peak and macs is None:
        try:
            macs = model_macs(path, image)
        except AnalyzerMissing as exc:  # latency stays valid without the analyzer; the record says why
            for r in results:
                r.macs_note = str(exc)
    measured = None
    if settings.peak:
        from runtime.peak import measure_peak

        measured = measure_peak(backend_settings.threads)
    for r in results:
        runner = runners[r.provider]
        if macs is not None:
            r.macs, r.macs_note, r.macs_full = macs[1], macs[2], macs
        if measured is not None:
            r.peak = {k: v for k, v in measured.to_dict().items() if k != "samples"}
            r.machine_peak_gflops = measured.for_device(runner.info.device)
            if r.macs:
                r.achieved_gflops = 2.0 * r.macs * r.batch / (r.latency.p50 / 1e3) / 1e9
                if r.machine_peak_gflops:
                    r.fraction_of_peak = r.achieved_gflops / r.machine_peak_gflops
        if settings.nodes:
            times = runner.layer_profile(tensor, macs[0], runs=settings.node_runs,
                                         warmup=max(1, min(settings.warmup, 2)))
            if times is None:
                r.nodes_note = f"backend {r.provider!r} has no per-layer profiler"
            else:
                r.nodes = times.to_dict()


def _relate(results: list[BenchResult]) -> None:
    """Ratios to onnxruntime CPU measured in the same run, and the native figures on its result."""
    by_name = {r.provider: r for r in results}
    reference = by_name.get(REFERENCE)
    if reference is not None and not reference.fell_back:
        for r in results:
            r.ratio_to_cpu = r.latency.p50 / reference.latency.p50
    native = next((r for r in results if get_backend(r.provider).capabilities.native), None)
    if native is not None:
        for r in results:
            if r is native:
                continue
            detail = native.backend.get("detail", {})
            r.native = {"framework": detail.get("framework"), "runtime": detail.get("runtime"),
                        "latency_ms": native.latency.to_dict(), "runs": native.latency.n, "warmup": native.warmup,
                        "threads": native.backend.get("threads"), "what": detail.get("what"),
                        "samples_ms": native.samples_ms, "setup_seconds": native.session_seconds,
                        "ratio": r.latency.p50 / native.latency.p50,
                        "ratio_definition": f"{r.provider} p50 / native p50 (below 1: {r.provider} faster), "
                                            "measured side by side"}


def bench_models(paths: list[Path], backends: list[str], settings: BenchSettings | None = None,
                 backend_settings: BackendSettings | None = None, *, record: bool = True,
                 macs: tuple[dict[str, int], int, str] | None = None, **options) -> list[BenchResult]:
    """Every model on every backend (side by side per model), one store record each.

    Every backend is checked before anything is measured. ``options`` are field names of the two
    settings objects (and ``native=True`` for the native backend), applied over them; ``macs``
    (the analyzer's figures) applies when there is one model; ``record=False`` skips the store.
    """
    from core import store

    settings, backend_settings, native = split_options(options, settings, backend_settings)
    backends = list(backends) + (["native"] if native else [])
    if not paths:
        raise ConfigError("name at least one ONNX file to benchmark")
    if not backends:
        raise ConfigError("name at least one --provider")
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"no ONNX file at {p}")
    for name in backends:  # fail before any measurement when a backend cannot run here
        get_backend(name).require(backend_settings)
    results = []
    for path in paths:
        measured = bench_side_by_side(path, backends, settings, backend_settings,
                                      macs=macs if len(paths) == 1 else None)
        results.extend(measured)
        if record:
            for result in measured:
                store.append("bench", result.to_record(), model=result.model, model_sha256=result.model_sha256,
                             provider=result.provider, settings=result.settings, contract=result.contract)
    return results


def bench_model(path, backend: str = "cpu", settings: BenchSettings | None = None,
                backend_settings: BackendSettings | None = None, *,
                macs: tuple[dict[str, int], int, str] | None = None, **options) -> BenchResult:
    """One ONNX file on one backend (with ``native=True``: side by side with the native backend,
    whose figures land in the result's ``native``); ``options`` as for :func:`bench_models`.
    Nothing is recorded (the caller writes the record)."""
    settings, backend_settings, native = split_options(options, settings, backend_settings)
    names = [backend] + (["native"] if native else [])
    return bench_side_by_side(path, names, settings, backend_settings, macs=macs)[0]


__all__ = ["BenchResult", "BenchSettings", "Latency", "bench_model", "bench_models", "bench_side_by_side",
           "default_image", "model_macs", "split_options", "time_runs"]
