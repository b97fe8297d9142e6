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
dimension is symbolic (a batch export, ``export NAME --batch``) is fed ``batch`` copies of the image.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.contract import read_contract, sha256_file
from core.errors import ConfigError
from runtime.backends.convert import ConversionFailed
from runtime.backends import REFERENCE, BackendSettings, get_backend
from runtime.backends.waiting import passive_openmp
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
        if self.seconds is not None and not 0 < self.seconds < math.inf:  # NaN too: the timed loop would never end
            raise ConfigError(f"--seconds {self.seconds}: must be a positive finite number of seconds")
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
    return node_macs(profile, mode)


def node_macs(profile, mode: str) -> tuple[dict[str, int], int, str]:
    """A :class:`counting.ModelProfile` in the form per-layer attribution takes: MACs per top-level
    node for every execution (If/Loop bodies run inside their parent's kernel, so their MACs, times
    their executions, go to the top-level parent), total MACs, and how they were counted."""
    top_level = {n.name for n in profile.nodes if not n.subgraph}
    per_node: dict[str, int] = {}
    for n in profile.nodes:
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
    peak_precision: str | None = None  # the precision whose peak fraction_of_peak refers to
    peak_note: str = ""
    schedule: dict[str, Any] | None = None  # run --budget's scheduler: pooling, rounds, why not VALID
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
            "scenario": "single-stream",
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
            "fraction_of_peak": self.fraction_of_peak, "peak_precision": self.peak_precision,
            "peak_note": self.peak_note, "schedule": self.schedule,
            "threads": self.backend.get("threads"), "macs": self.macs, "macs_note": self.macs_note,
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
    if any(get_backend(n).capabilities.native for n in names) and settings.batch != 1:
        raise ConfigError(f"--native compares single images: use --batch 1 with --native (got --batch {settings.batch})")
    if backend_settings.passive_wait is None:  # alternating backends: an idle one must not spin on the cores
        backend_settings = replace(backend_settings, passive_wait=len(names) > 1)
    waiting = passive_openmp() if backend_settings.passive_wait else None
    model = OpenModel(path, names, settings, backend_settings, macs=macs)
    try:
        samples = _alternate(model.calls, settings)
        results = model.results(samples)
    finally:
        model.close()
    _relate(results)
    for r in results:
        r.settings["openmp_waiting"] = waiting
    return results


class OpenModel:
    """One ONNX file open on several backends side by side: each backend opened (cold start and
    peak RSS measured), checked against onnxruntime CPU (parity), warmed up and, with
    ``settings.nodes``, profiled per layer, all before any timing. ``calls`` are the bound runs
    to time; :meth:`close` releases the backends and :meth:`reopen` opens them again (warmed up;
    cold start, parity and the per-layer profile stay those of the first opening), so a timing
    scheduler can keep only some models in memory; :meth:`results` turns samples into results."""

    def __init__(self, path, names: list[str], settings: BenchSettings, backend_settings: BackendSettings,
                 *, macs: tuple[dict[str, int], int, str] | None = None):
        self.path, self.names, self.settings, self.backend_settings = Path(path), list(names), settings, backend_settings
        self.contract = read_contract(self.path)
        self.image = Path(settings.image) if settings.image is not None else default_image()
        self.tensor = input_tensor(self.contract, self.image, settings.batch, model_input_shape(self.path),
                                   str(self.path))
        self.macs = macs
        self.runners: dict[str, Any] = {}
        self.calls: dict[str, Callable[[], Any]] = {}
        self.opened: dict[str, dict[str, Any]] = {}
        self.parity: dict[str, Any] = {}
        self.nodes: dict[str, tuple[Any, str]] = {}
        self.info: dict[str, Any] = {}
        self.detections: dict[str, int] = {}
        # backends whose conversion of this model failed: name -> operator/reason (a per-model outcome)
        self.failures: dict[str, str] = {}
        self.sha256 = sha256_file(self.path)
        try:
            self._open(first=True)
            if not self.names:
                raise ConversionFailed("; ".join(f"{n}: {why}" for n, why in self.failures.items()))
            if settings.parity and any(n != REFERENCE or self.runners[n].info.fell_back for n in self.names):
                self.parity = _parities(self.path, self.contract, self.runners, backend_settings,
                                        settings.parity_images)
            if settings.nodes:
                if self.macs is None:
                    self.macs = model_macs(self.path, self.image)
                for name, runner in self.runners.items():
                    times = runner.layer_profile(self.tensor, self.macs[0], runs=settings.node_runs,
                                                 warmup=max(1, min(settings.warmup, 2)))
                    self.nodes[name] = ((None, f"backend {name!r} has no per-layer profiler") if times is None
                                        else (times.to_dict(), ""))
            self._warm()
        except BaseException:
            self.close()
            raise

    @property
    def rss_mb(self) -> float:
        """Resident memory the backends took when opened (MB; 0 when unknown)."""
        return sum(o.get("rss") or 0.0 for o in self.opened.values())

    def _open(self, first: bool) -> None:
        for name in list(self.names):
            gc.collect()
            with _PeakRss() as rss:
                runner = None
                try:
                    runner = get_backend(name).open(self.path, self.backend_settings)
                    call = runner.bind(self.tensor)
                    start = time.perf_counter()
                    call()  # the first inference: part of the cold start, reported apart
                    first_ms = (time.perf_counter() - start) * 1e3
                except ConversionFailed as exc:  # also raised by a first run that shows the conversion broken
                    if runner is not None:
                        runner.close()
                    if not first:  # converted once already: the cached artifact must open again
                        raise
                    self.failures[name] = str(exc)
                    self.names.remove(name)
                    continue
                self.runners[name] = runner
            self.calls[name] = call
            if first:
                self.opened[name] = {"first_ms": first_ms, "rss": rss.mb}
                self.info[name] = runner.info
                self.detections[name] = runner.detections()

    def _warm(self) -> None:
        for name in self.names:
            for _ in range(max(0, self.settings.warmup - 1)):  # the first inference was one warm-up run
                self.calls[name]()

    def reopen(self) -> None:
        if not self.runners:
            self._open(first=False)
            self._warm()

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.runners, self.calls = {}, {}

    def results(self, samples: dict[str, list[float]], rounds: int | None = None,
                schedule: dict[str, dict[str, Any]] | None = None) -> list[BenchResult]:
        """One result per backend of ``samples`` (milliseconds per run)."""
        settings, backend_settings = self.settings, self.backend_settings
        results = []
        for name in [n for n in self.names if n in samples]:
            info = self.info[name]
            result = BenchResult(
                model=self.contract.name, path=str(self.path), model_sha256=self.sha256,
                contract=self.contract.to_props(), provider=name,
                providers_ran=list(info.detail.get("providers_ran") or [f"{info.library} {info.device} ({info.precision})"]),
                fell_back=info.fell_back,
                settings={"provider": name, **backend_settings.to_dict(), **settings.to_dict(), "image": str(self.image),
                          "session": info.detail.get("session")},
                latency=Latency.of(samples[name]), samples_ms=list(samples[name]), session_seconds=info.load_seconds,
                peak_rss_mb=self.opened[name]["rss"], warmup=settings.warmup, batch=settings.batch,
                image=str(self.image), detections=self.detections[name],
                backend={**info.to_dict(), "capabilities": get_backend(name).capabilities.to_dict()},
                first_run_ms=self.opened[name]["first_ms"], parity=self.parity.get(name),
                parts=_parts(self.runners[name], len(samples[name])) if name in self.runners else None,
                conversion_failures=dict(self.failures),
                rounds=rounds if rounds is not None else (min(settings.rounds, settings.runs) if settings.runs
                                                          else settings.rounds))
            if name in self.nodes:
                result.nodes, result.nodes_note = self.nodes[name]
            if schedule is not None:
                result.schedule = schedule.get(name)
            results.append(result)
        if settings.peak:
            _add_macs_and_peak(results, self.info, self.path, self.image, settings, backend_settings, self.macs)
        elif self.macs is not None:
            for r in results:
                r.macs, r.macs_note, r.macs_full = self.macs[1], self.macs[2], self.macs
        return results


@dataclass
class ScheduledModel:
    """One ONNX file for :func:`bench_scheduled`: its backends, the analyzer's MACs when known and,
    per backend, the samples an earlier process recorded (reused per :mod:`runtime.schedule`)."""

    key: str
    path: Path
    backends: list[str]
    macs: tuple[dict[str, int], int, str] | None = None
    prior: dict[str, list[float]] = field(default_factory=dict)


class _ModelTimer:
    """:class:`runtime.schedule.PairTimer` over open models (pair key = (model key, backend))."""

    def __init__(self, models: dict[str, ScheduledModel], settings: BenchSettings, backend_settings: BackendSettings,
                 progress: Callable[[str], None]):
        self.models, self.settings, self.backend_settings, self.say = models, settings, backend_settings, progress
        self.open_models: dict[str, OpenModel] = {}

    def open(self, group: str) -> float:
        model = self.open_models.get(group)
        if model is None:
            spec = self.models[group]
            self.say(f"{group}: opening {', '.join(spec.backends)} (parity, warm-up)")
            model = OpenModel(spec.path, spec.backends, self.settings, self.backend_settings, macs=spec.macs)
            self.open_models[group] = model
        else:
            self.say(f"{group}: reopening")
            model.reopen()
        return model.rss_mb

    def close(self, group: str) -> None:
        if group in self.open_models:
            self.open_models[group].close()

    def run(self, key, seconds: float) -> list[float]:
        call = self.open_models[key[0]].calls[key[1]]
        clock, out = time.perf_counter, []
        end = clock() + seconds
        while True:
            start = clock()
            call()
            out.append((clock() - start) * 1e3)
            if clock() >= end:
                return out


def bench_scheduled(models: list[ScheduledModel], settings: BenchSettings, backend_settings: BackendSettings,
                    schedule_settings, progress: Callable[[str], None] | None = None):
    """Time every (model, backend) pair of ``models`` within one budget (:func:`runtime.schedule.schedule`:
    VALID p50 first, then p90; pairs of different models interleaved; earlier samples reused).

    Returns ``({model key: [BenchResult of each backend timed in this process]}, {(model key, backend):
    PairOutcome}, {model key: why it could not be opened})``; a pair not timed again (its earlier
    record already VALID) has no new result. Each result's ``schedule`` holds its pair's outcome
    and the schedule's settings; its samples are the pooled ones the verdicts judge."""
    from runtime.schedule import PairSpec, schedule

    say = progress or (lambda _m: None)
    if backend_settings.passive_wait is None:  # pairs alternate: an idle backend must not spin on the cores
        backend_settings = replace(backend_settings, passive_wait=True)
    waiting = passive_openmp() if backend_settings.passive_wait else None
    by_key = {m.key: m for m in models}
    with_macs = all(m.macs for m in models)

    def cost(m: ScheduledModel) -> float:
        """Orders the models slowest first: the analyzer's MACs when every model has them, else file sizes."""
        return float(m.macs[1]) if with_macs else float(Path(m.path).stat().st_size)

    pairs = []
    for m in models:
        estimate = 3.0 * Path(m.path).stat().st_size / 1e6 + 150.0  # weights copied per backend, plus arenas
        for b in m.backends:
            pairs.append(PairSpec(key=(m.key, b), group=m.key, prior=tuple(m.prior.get(b) or ()),
                                  memory_mb=estimate * len(m.backends), cost=cost(m)))
    timer = _ModelTimer(by_key, settings, backend_settings, say)
    try:
        outcomes = schedule(pairs, timer, schedule_settings, progress=say)
        results: dict[str, list[BenchResult]] = {}
        for key, model in timer.open_models.items():
            timed = [b for b in model.names if outcomes[(key, b)].new_samples]
            if not timed:
                continue
            samples = {b: outcomes[(key, b)].samples for b in timed}
            info = {b: {**outcomes[(key, b)].to_dict(), "settings": schedule_settings.to_dict()} for b in timed}
            results[key] = model.results(samples, rounds=max(outcomes[(key, b)].rounds for b in timed), schedule=info)
            for r in results[key]:
                r.settings["openmp_waiting"] = waiting
            _relate(results[key])
    finally:
        for model in timer.open_models.values():
            model.close()
    failed = {m: o.reason for (m, _b), o in outcomes.items() if o.reason.startswith("failed to open")}
    return results, outcomes, failed


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


# Largest difference of a converted network's outputs from onnxruntime CPU's, relative to each
# output's largest magnitude, still taken for the same computation: float32 conversions measured
# 7e-5 (ncnn, yolo), 9e-5 (onnx2torch), 1e-4 (MNN); ncnn's ssd300 (channel flip lost) 17.6.
NETWORK_MAX_REL = 1e-2


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
                    if network["max_rel"] > NETWORK_MAX_REL:
                        # detections alone can "agree" on nothing: random-init SSD scores all tie, so
                        # every detection is explained as the top-k cap's and none needs matching
                        out[name]["verdict"] = "disagree"
                        out[name].setdefault("reasons", []).append(
                            f"network outputs differ from onnxruntime CPU's by {network['max_rel']:.3g} of their "
                            f"range (> {NETWORK_MAX_REL:g}): the converted network computes something else")
        return out
    finally:
        if own:
            reference.close()


def _add_macs_and_peak(results, infos, path, image, settings: BenchSettings,
                       backend_settings: BackendSettings, macs) -> None:
    if macs is None:
        try:
            macs = model_macs(path, image)
        except AnalyzerMissing as exc:  # latency stays valid without the analyzer; the record says why
            for r in results:
                r.macs_note = str(exc)
    from runtime.peak import measure_peak, peak_for

    measured = measure_peak(backend_settings.threads)
    for r in results:
        info = infos[r.provider]
        if macs is not None:
            r.macs, r.macs_note, r.macs_full = macs[1], macs[2], macs
        r.peak = {k: v for k, v in measured.to_dict().items() if k != "samples"}
        r.machine_peak_gflops, r.peak_precision, r.peak_note = peak_for(measured, info.device, r.precision,
                                                                        r.contract, backend_settings.threads)
        if r.macs:
            r.achieved_gflops = 2.0 * r.macs * r.batch / (r.latency.p50 / 1e3) / 1e9
            if r.machine_peak_gflops:
                r.fraction_of_peak = r.achieved_gflops / r.machine_peak_gflops


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


__all__ = ["BenchResult", "BenchSettings", "Latency", "OpenModel", "ScheduledModel", "bench_model", "bench_models",
           "bench_scheduled", "bench_side_by_side",
           "default_image", "model_macs", "split_options", "time_runs"]
