r"""``python cli.py run``: the whole pipeline over the registry, then the report.

A *target* is one row of the report: a registered model at its registered input size,
at each further size models.toml lists under ``run_sizes`` (yolov3-tiny at 320, 416, 512
and 608: the seed's diminishing-returns claim), and its INT8 version (``NAME@int8``) for
the models ``RunSettings.int8_models`` names. For each target, in registry order:

1. **export** (and validate: the exporter does it) with the official weights when
   :func:`exporters.weights.locate_weights` finds them here, else deterministic random
   initialisation (the contract says ``random-init``; never downloads); an INT8 target is
   **quantize**\ d from its float export instead (:func:`quantization.quantize.quantize_model`,
   calibrated on the first images of the COCO folder);
2. **profile** with the analyzer (``counting.profile_model``): static shapes, or shapes
   measured on a real image when the graph has data-dependent RoI stages;
3. **bench** on every backend that really runs here, side by side in one process with the
   backends alternating (:func:`runtime.bench.bench_side_by_side`; each checked against
   onnxruntime CPU first); a backend that cannot run is recorded as ``skipped: <reason>``;
4. **images**: operations executed and latency on each of a few COCO images
   (:func:`runtime.per_image.measure_images`: the seed's per-proposal claim);
5. **eval** on COCO (``eval.coco.evaluate_model``, resumable) when the weights are trained
   and COCO data is available, on each of ``eval_backends``; an INT8 target is scored on
   the images it was not calibrated on;

6. **offline** / **server** (after every row's SingleStream timing): MLPerf's Offline and Server
   scenarios (:mod:`runtime.scenarios`) for the registered-size float row of the models
   ``RunSettings.scenario_models`` names (default: yolov3-tiny only, so the report's throughput
   and QPS tables are filled for about a minute of the run), Offline on ``offline_backends``
   (cpu, and openvino-bf16 where the CPU has bf16, else openvino) and Server on
   ``server_backends`` (cpu), with short knob searches but the same validity rules as
   ``bench --scenario``;

then the report (:func:`report.build_report`). Nothing is faked: a step that cannot run
here (missing module, no weights, no data, backend unavailable) is skipped with its
reason, a step that fails records the error; both reach the report.

Re-running skips a step whose inputs did not change (``core.manifest``): the model
name, the weights' sha256 or ``random-init``, the exporter version, the input size and
the step's own settings and code version; the ONNX file's sha256 chains the later steps
to the export. An interrupted run continues where it stopped (evaluation resumes inside
the image loop through its detection cache).

``run_pipeline`` never prints: it reports through ``progress(RunEvent)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import manifest as run_manifest
from core import store
from core.contract import RANDOM_INIT, read_contract, sha256_file
from core.errors import ClusterLostError, ConfigError, DetbenchError
from core.names import file_in
from core.paths import PROJECT_ROOT, data_dir, results_dir

STEPS = ("export", "profile", "bench", "images", "eval")
# Ops whose output shapes depend on the image (proposals): profile them with measured shapes.
DATA_DEPENDENT_OPS = frozenset({"RoiAlign", "MaxRoiPool"})
# Backends `run` considers besides the onnxruntime providers onnxruntime lists (each probed).
EXTRA_BACKENDS = ("openvino", "openvino-bf16")
RANDOM_INIT_CALIBRATION_IMAGES = 4
INT8 = "int8"
DEFAULT_BUDGET_MINUTES = 7.0


@dataclass(frozen=True)
class RunSettings:
    """How much work each step does (defaults keep `run` over the registry near 20 minutes on
    a 2-core CPU; ``quick`` bounds it further for smoke runs and CI).

    bench: ``bench_warmup`` untimed runs, then, by default, one timing budget of
    ``budget_minutes`` (wall time, opening models included) for every (row, backend) pair of
    the run (:mod:`runtime.schedule`: a VALID p50 for every pair first, then p90 for as many
    as the rest of the budget holds, pairs of all rows interleaved; a pair timed more than
    ``pair_cap_seconds`` without a VALID p50 gives up as unstable). ``bench_seconds`` (per
    backend) or ``bench_runs`` instead time each row on its own for that long / that many runs,
    in ``bench_rounds`` blocks with the backends alternating. ``parity_images`` COCO images
    compared with onnxruntime CPU first; ``nodes``/``node_runs``: per-layer profile.
    ``threads``: the intra-op threads of bench, the per-image step and evaluation (local or
    Ray), stated in every record; None means this machine's CPU count.
    images: ``per_image`` COCO images per target, at most ``per_image_seconds`` per target.
    eval: ``eval_limit`` images (None: all); ``eval_backends`` for the registered-size row of
    a trained model (other rows: onnxruntime CPU, and OpenVINO for INT8 rows).
    ``sizes``: also the ``run_sizes`` of models.toml. ``all_models``: without a model list, the
    whole registry rather than the paper's configurations. ``int8_models``: which models get an
    INT8 row (None: every model), calibrated on ``calibration_images`` COCO images (entropy;
    random-init models: MinMax on 4, as their accuracy is not measured).
    """

    bench_warmup: int = 1
    bench_runs: int | None = None
    bench_seconds: float | None = None
    bench_rounds: int = 2
    budget_minutes: float | None = DEFAULT_BUDGET_MINUTES  # timing budget of every bench pair (runtime.schedule)
    pair_cap_seconds: float = 30.0  # timing per pair without a VALID p50 before it is called unstable
    threads: int | None = None  # intra-op threads of every step; None: this machine's CPUs
    parity_images: int = 1
    node_runs: int = 1
    nodes: bool = True
    per_image: int = 2
    per_image_seconds: float = 8.0
    eval_limit: int | None = None  # None: every image of the dataset
    eval_backends: tuple[str, ...] = ("cpu", "openvino", "openvino-bf16")
    sizes: bool = True
    int8_models: tuple[str, ...] | None = ("yolov3-tiny", "ssd300")
    all_models: bool = False  # no --models: the paper's configurations only (True: the whole registry)
    calibration_images: int = 32
    smoke: bool = False  # --quick: latency records are marked smoke, never VALID
    # Offline/Server (runtime.scenarios): for these models' registered-size float rows (None: every model of
    # the run, (): none); the backends each scenario runs on (where they run here; "a|b": the first of them
    # that runs); the knob search is shortened (trials, search queries), the validity rules are bench
    # --scenario's own. Each Offline backend costs >= 10 s (the rule's minimum) plus the trials, Server on
    # cpu ~25 s (662 queries): one OpenVINO precision keeps the default near a minute on 2 cores.
    scenario_models: tuple[str, ...] | None = ("yolov3-tiny",)
    scenarios: tuple[str, ...] = ("offline", "server")
    offline_backends: tuple[str, ...] = ("cpu", "openvino-bf16|openvino")
    server_backends: tuple[str, ...] = ("cpu",)
    scenario_trial_seconds: float = 0.5
    server_trial_queries: int = 64
    server_max_trials: int = 4
    server_search_tolerance: float = 0.15

    def __post_init__(self):
        # Checked before any step runs: a NaN budget would never run out.
        for option, value in (("--bench-seconds", self.bench_seconds), ("per-image seconds", self.per_image_seconds)):
            if value is not None and not 0 < value < float("inf"):
                raise ConfigError(f"{option} {value}: must be a positive finite number of seconds")
        if self.budget_minutes is not None and not 0 < self.budget_minutes < float("inf"):
            raise ConfigError(f"--budget {self.budget_minutes}: must be a positive finite number of minutes")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads}: must be at least 1")
        from runtime.scenarios.settings import OFFLINE, SERVER

        unknown = [x for x in self.scenarios if x not in (OFFLINE, SERVER)]
        if unknown:
            raise ConfigError(f"--scenarios {','.join(unknown)}: run's scenarios are {OFFLINE} and {SERVER}")

    def scenario_settings(self, scenario: str):
        """The :class:`runtime.scenarios.ScenarioSettings` run measures ``scenario`` with."""
        from runtime.scenarios.settings import ScenarioSettings

        return ScenarioSettings(scenario=scenario, trial_seconds=self.scenario_trial_seconds,
                                server_trial_queries=self.server_trial_queries, max_trials=self.server_max_trials,
                                search_tolerance=self.server_search_tolerance)

    @property
    def scheduled(self) -> bool:
        """Timing by one budget over all pairs (the default) rather than per row."""
        return self.budget_minutes is not None and self.bench_runs is None and self.bench_seconds is None

    @classmethod
    def quick(cls) -> "RunSettings":
        return cls(bench_warmup=1, bench_runs=3, bench_seconds=None, bench_rounds=1, node_runs=1, nodes=True,
                   per_image=2, per_image_seconds=10.0, eval_limit=8, calibration_images=4, smoke=True,
                   scenario_models=())

    @property
    def eval_provider(self) -> str:
        return self.eval_backends[0] if self.eval_backends else "cpu"


@dataclass(frozen=True)
class ForeignSpec:
    """A foreign ONNX detector added to a run (``run --onnx FILE --describe FILE.toml``): wrapped
    into a contract file by :func:`exporters.foreign.wrap.wrap_onnx` instead of exported."""

    name: str
    input_size: tuple[int, int]
    onnx_file: Path
    describe_file: Path
    framework: str = "onnx"
    run_sizes: tuple = ()


def foreign_specs(pairs: list[tuple[Path, Path]]) -> list[ForeignSpec]:
    """One spec per (ONNX file, describe file); the describe file is read (and checked) now."""
    from exporters.foreign.describe import read_description

    specs = []
    for onnx_file, describe_file in pairs:
        if not Path(onnx_file).is_file():
            raise ConfigError(f"--onnx {onnx_file}: no such file")
        desc = read_description(describe_file)
        specs.append(ForeignSpec(desc.name, tuple(desc.input_size), Path(onnx_file), Path(describe_file)))
    return specs


@dataclass(frozen=True)
class Target:
    """One report row: ``spec`` at ``size`` in ``precision`` (``fp32`` or ``int8``)."""

    spec: Any
    size: tuple[int, int]
    precision: str = "fp32"

    @property
    def name(self) -> str:
        """The model name its records carry (``NAME@int8`` for the INT8 row)."""
        return self.spec.name + (f"@{INT8}" if self.precision == INT8 else "")

    @property
    def registered(self) -> bool:
        return self.size == self.spec.input_size

    @property
    def label(self) -> str:
        h, w = self.size
        return self.name if self.registered else f"{self.name} @{h}x{w}"


@dataclass(frozen=True)
class RunEvent:
    """One progress report. ``kind``: ``plan`` (``steps_total`` known), ``start``, ``update``
    (``completed``/``total`` within the step, e.g. images), ``done``, ``reused`` (inputs
    unchanged), ``skipped``, ``failed`` (``message`` says why), ``finished``."""

    kind: str
    model: str | None = None
    step: str | None = None
    provider: str | None = None
    message: str = ""
    completed: float | None = None
    total: float | None = None
    steps_done: int = 0
    steps_total: int = 0


@dataclass
class StepOutcome:
    model: str
    step: str
    provider: str | None
    status: str  # done | reused | skipped | failed
    reason: str = ""
    seconds: float = 0.0


@dataclass
class RunSummary:
    results_dir: Path
    outcomes: list[StepOutcome] = field(default_factory=list)
    report: Any = None  # report.ReportResult
    wall_seconds: float = 0.0
    providers: dict[str, str] = field(default_factory=dict)  # provider -> "" (usable) or the reason it is not
    # the timing budget's result (run --budget): pairs, VALID p50s, VALID p90s, and each pair not VALID with why
    latency_validity: dict[str, Any] = field(default_factory=dict)
    store_note: str | None = None  # the store's lines that are not records, skipped when deciding what to re-run

    @property
    def failures(self) -> list[StepOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


Progress = Callable[[RunEvent], None]


class _Skip(Exception):
    """A step that cannot run here; the message is the reason."""


def default_coco_dir() -> Path | None:
    """``$DETBENCH_DATA/coco-val2017-subset`` when it exists."""
    path = data_dir() / "coco-val2017-subset"
    return path if (path / "annotations" / "instances_val2017.json").is_file() else None


def source_version(*module_names: str) -> str:
    """sha256 (first 16 hex) of the Python sources of the named modules (a package: all its .py files)."""
    digest = hashlib.sha256()
    for name in module_names:
        module = importlib.import_module(name)
        paths = getattr(module, "__path__", None)  # a package (possibly a namespace one): all its .py files
        files = sorted(Path(next(iter(paths))).glob("*.py")) if paths else [Path(module.__file__)]
        for f in files:
            digest.update(f.relative_to(PROJECT_ROOT).as_posix().encode() if f.is_relative_to(PROJECT_ROOT)
                          else f.name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _importable(module: str, attr: str):
    """``module.attr``, or raise _Skip naming what is missing."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise _Skip(f"{module}.{attr} is not available in this checkout ({type(exc).__name__}: {exc})") from None


def _backend_candidates() -> list[str]:
    """cpu, every other onnxruntime provider onnxruntime lists, then OpenVINO (registered names)."""
    import onnxruntime as ort

    from runtime.backends import backend_names, get_backend

    known = set(backend_names())
    names = ["cpu"]
    for full in ort.get_available_providers():
        try:
            name = get_backend(full).name
        except ConfigError:  # a provider detbench registers no backend for: nothing to compare
            continue
        if name in known and name not in names:
            names.append(name)
    return names + [b for b in EXTRA_BACKENDS if b in known and b not in names]


class _Pipeline:
    def __init__(self, targets: list[Target], settings: RunSettings, coco_dir: Path | None,
                 providers: list[str] | None, progress: Progress | None, strict: bool):
        self.targets, self.settings, self.coco_dir, self.strict = targets, settings, coco_dir, strict
        self.progress = progress or (lambda _e: None)
        self.root = results_dir()
        self.manifest = run_manifest.Manifest(self.root)
        self.summary = RunSummary(results_dir=self.root)
        self.requested_providers = providers
        loaded = store.load(root=self.root)
        self.have = {(r["kind"], r.get("model_sha256"), r.get("provider")) for r in loaded.records}
        self.summary.store_note = loaded.skipped_note()
        self.steps_done = 0
        self.steps_total = 0
        self.exported: dict[str, Path] = {}  # spec name -> its float export at the registered size
        # `run --ray` (pipeline.ray_run.RayRun): measuring functions run as Ray tasks, targets concurrently;
        # the lock keeps the manifest, the store and the events single-writer on the driver.
        self.ray = None
        self.lock = threading.RLock()
        self.pending: list[tuple] = []  # bench pairs deferred to the run's one timing budget

    # ------------------------------------------------------------------ events

    def emit(self, kind: str, model=None, step=None, provider=None, message="", completed=None, total=None):
        with self.lock:
            self.progress(RunEvent(kind, model, step, provider, message, completed, total, self.steps_done, self.steps_total))

    def outcome(self, target: Target, step, provider, status, reason="", seconds=0.0, *, key="", **extra):
        with self.lock:
            if status != "reused":
                self.manifest.put(target.name, target.size, step, provider, key=key, status=status, reason=reason,
                                  **extra)
            self.summary.outcomes.append(StepOutcome(target.label, step, provider, status, reason, seconds))
            self.steps_done += 1
            self.emit(status, target.label, step, provider, reason)

    def write(self, kind: str, data: dict, *, host: dict | None = None, **fields) -> None:
        """The one place steps' records reach the results store (always from this process; under
        Ray ``host`` names the worker that measured)."""
        with self.lock:
            store.write(store.new_record(kind, data, host=host, **fields), self.root)
            self.have.add((kind, fields.get("model_sha256"), fields.get("provider")))

    def measure(self, fn, *args, model: Path | None = None, produces: Path | None = None, exclusive: bool = False,
                progress=None, **kwargs):
        """Run a step's measuring function and write the records it returns; returns its value.

        ``fn(*args, **kwargs)`` returns ``(value, records)``, each record ``store.append``'s keyword
        arguments. ``model``: the ONNX file it reads (passed first); ``produces``: the file it
        writes (passed as ``out``). Under Ray it runs as a task (``exclusive``: alone on its node,
        for timing) and the model file travels through the object store; else here, with ``progress``."""
        if self.ray is not None:
            value, records, host = self.ray.call(fn, args, kwargs, model=model, produces=produces,
                                                 exclusive=exclusive)
        else:
            args = args if model is None else (model, *args)
            kwargs = kwargs if produces is None else {**kwargs, "out": produces}
            (value, records), host = fn(*args, progress=progress, **kwargs), None
        for record in records:
            self.write(host=host, **record)
        return value

    def step(self, target: Target, step: str, provider: str | None, key_inputs: dict[str, Any], fn, reuse_ok) -> Any:
        """Run ``fn`` unless the manifest has this step done with the same inputs (and
        ``reuse_ok(entry)`` confirms its products are still there). ``fn`` returns
        ``(value, extra manifest fields)``; a _Skip or an error is recorded; returns the
        value, the previous entry when reused, or None."""
        key = run_manifest.input_key(key_inputs)
        entry = self.manifest.get(target.name, target.size, step, provider)
        if entry and entry.get("status") == "done" and entry.get("key") == key and reuse_ok(entry):
            self.outcome(target, step, provider, "reused", "inputs unchanged since " + entry.get("finished", "?"))
            return entry
        self.emit("start", target.label, step, provider)
        started = time.perf_counter()
        try:
            value, extra = fn()
        except _Skip as exc:
            self.outcome(target, step, provider, "skipped", str(exc), key=key)
            return None
        except ClusterLostError:
            raise  # no node can run any step now: the run stops, the steps done stay recorded
        except DetbenchError as exc:
            self.outcome(target, step, provider, "failed", str(exc), time.perf_counter() - started, key=key)
            return None
        except Exception as exc:
            if self.strict:
                raise
            # One broken family must not stop the others from being measured; the failure is
            # recorded in the manifest, shown in the report and makes `run` exit non-zero.
            self.outcome(target, step, provider, "failed", f"unexpected {type(exc).__name__}: {exc}",
                         time.perf_counter() - started, key=key)
            return None
        said = extra.pop("said", "")  # a figure worth showing with the outcome (scenario steps)
        self.outcome(target, step, provider, "done", said, time.perf_counter() - started, key=key, **extra)
        return value

    # ------------------------------------------------------------------ backends

    def usable_backends(self) -> dict[str, str]:
        """backend -> "" when it runs here, else the reason it does not."""
        try:
            provider_usable = _importable("runtime.backends", "provider_usable")
        except _Skip as exc:
            return {"cpu": str(exc)}
        candidates = self.requested_providers or _backend_candidates()
        return {p: ("" if ok else reason) for p in candidates for ok, reason in [provider_usable(p)]}

    # ------------------------------------------------------------------ the steps

    def weights_sha256(self, path: Path) -> str:
        """sha256 of a weights file, cached in the manifest by (path, size, mtime)."""
        with self.lock:
            cache = self.manifest.doc.setdefault("weights_sha256", {})
            stat = path.stat()
            entry = cache.get(str(path))
            if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
                return entry["sha256"]
            digest = sha256_file(path)
            cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
            return digest

    def export(self, target: Target) -> Path | None:
        from exporters import FRAMEWORKS, default_output
        from exporters.weights import locate_weights

        spec = target.spec
        try:
            weights = locate_weights(spec)
        except DetbenchError as exc:  # only damaged copies here: this model fails, the others go on
            weights, weights_error = None, exc
        else:
            weights_error = None
        tag = RANDOM_INIT if weights is None else "sha256:" + self.weights_sha256(weights)
        module_name = FRAMEWORKS[spec.framework].export if spec.framework in FRAMEWORKS else ""
        try:
            module = importlib.import_module(module_name)
            version = getattr(module, "EXPORTER_VERSION", None) or source_version(module_name)
        except (ImportError, ValueError, ConfigError) as exc:
            module, version = None, f"unavailable: {exc}"
        size = None if target.registered else target.size
        out = default_output(spec, self.root / "onnx", size)
        inputs = {"model": spec.name, "weights": tag, "exporter": f"{module_name} {version}",
                  "input_size": list(target.size)}

        def run():
            if weights_error is not None:
                raise weights_error
            if module is None:
                raise _Skip(f"no exporter for framework {spec.framework!r} in this checkout ({version})")
            self.emit("update", target.label, "export", None, f"{'random-init' if weights is None else weights.name}")
            sha = self.measure(_export_file, spec, weights, size, inputs["exporter"], list(target.size), produces=out,
                               progress=lambda msg: self.emit("update", target.label, "export", None, msg))
            return out, {"onnx_sha256": sha, "path": str(out)}

        def reuse_ok(entry):
            return (out.is_file() and ("export", entry.get("onnx_sha256"), None) in self.have
                    and sha256_file(out) == entry.get("onnx_sha256"))

        value = self.step(target, "export", None, inputs, run, reuse_ok)
        return None if value is None else out

    def wrap(self, target: Target) -> Path | None:
        """The contract file of a foreign ONNX detector (see :class:`ForeignSpec`)."""
        spec = target.spec
        try:
            version = source_version("exporters.foreign.wrap", "exporters.foreign.describe")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        out = file_in(self.root / "onnx", spec.name, where=f"--describe {spec.describe_file}: name")
        inputs = {"onnx_sha256": sha256_file(spec.onnx_file), "describe": spec.describe_file.read_text("utf-8"),
                  "wrapper": version}

        def run():
            wrap_onnx = _importable("exporters.foreign.wrap", "wrap_onnx")
            result = wrap_onnx(spec.onnx_file, spec.describe_file, out,
                               progress=lambda msg: self.emit("update", target.label, "export", None, msg))
            sha = sha256_file(result.path)
            data = {"seconds": result.seconds, "path": str(result.path), "file_bytes": result.path.stat().st_size,
                    "random_init": False, "validation": result.validation, "source_file": str(spec.onnx_file),
                    "describe_file": str(spec.describe_file)}
            # foreign files are wrapped here, on the driver, also under Ray (they are given by local path)
            self.write("export", data, model=spec.name, model_sha256=sha, contract=result.contract.to_props(),
                       settings={"exporter": f"exporters.foreign.wrap {version}", "input_size": list(target.size)})
            return result.path, {"onnx_sha256": sha, "path": str(result.path)}

        def reuse_ok(entry):
            return (out.is_file() and ("export", entry.get("onnx_sha256"), None) in self.have
                    and sha256_file(out) == entry.get("onnx_sha256"))

        value = self.step(target, "export", None, inputs, run, reuse_ok)
        return None if value is None else out

    def quantize(self, target: Target, source: Path) -> Path | None:
        """The INT8 file of ``target``, quantized from its float export ``source``."""
        s = self.settings
        try:
            version = source_version("quantization.quantize", "core.calibration")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        source_sha = sha256_file(source)
        out = source.with_name(f"{source.stem}@{INT8}{source.suffix}")
        inputs = {"source_sha256": source_sha, "quantize": version, "calibration": str(self.coco_dir),
                  "images": s.calibration_images}

        def run():
            if self.coco_dir is None:
                raise _Skip("no COCO data to calibrate on: pass --coco DIR")
            row = _Int8Row(target.name, list(target.size), str(source), source_sha)
            sha = self.measure(_quantize_file, self.coco_dir, s.calibration_images, row, model=source, produces=out,
                               progress=lambda msg: self.emit("update", target.label, "quantize", None, msg))
            return out, {"onnx_sha256": sha, "path": str(out)}

        def reuse_ok(entry):
            return (out.is_file() and ("quantize", entry.get("onnx_sha256"), None) in self.have
                    and sha256_file(out) == entry.get("onnx_sha256"))

        value = self.step(target, "quantize", None, inputs, run, reuse_ok)
        return None if value is None else out

    def profile(self, target: Target, path: Path, onnx_sha: str, contract_props: dict[str, str]):
        """Returns the analyzer's (per-node MACs, total, note) for bench, or None."""
        try:
            version = source_version("counting")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        inputs = {"onnx_sha256": onnx_sha, "counting": version, "allow_unknown": False}
        holder: dict[str, Any] = {}

        def run():
            holder["macs"], mode = self.measure(
                _profile_file, target.name, onnx_sha, contract_props, target.precision == INT8, model=path,
                progress=lambda msg: self.emit("update", target.label, "profile", None, msg))
            return holder["macs"], {"onnx_sha256": onnx_sha, "mode": mode}

        self.step(target, "profile", None, inputs, run, lambda e: ("profile", onnx_sha, None) in self.have)
        return holder.get("macs")

    def bench(self, target: Target, path: Path, onnx_sha: str, backends: dict[str, str], macs) -> None:
        """Every usable backend side by side (one step); each unusable one a skipped step of its own."""
        s = self.settings
        for name, reason in backends.items():
            if reason:
                self.outcome(target, "bench", name, "skipped", reason)
        usable = [n for n, r in backends.items() if not r]
        if target.precision == INT8:  # bf16 hints do not apply to a graph whose convolutions are int8
            from runtime.backends import get_backend

            usable = [n for n in usable if get_backend(n).capabilities.precision == "f32"]
        if not usable:
            return
        try:
            version = source_version("runtime.bench", "runtime.backends", "runtime.nodes", "runtime.parity")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        try:
            _importable("counting", "profile_model")
            analyzer = True
        except _Skip:
            analyzer = False
        # per-node times need the analyzer's MACs: a bench done without it is redone once it lands
        inputs = {"onnx_sha256": onnx_sha, "backends": usable, "warmup": s.bench_warmup, "runs": s.bench_runs,
                  "seconds": s.bench_seconds, "rounds": s.bench_rounds, "parity_images": s.parity_images,
                  "nodes": s.nodes and analyzer, "node_runs": s.node_runs, "runtime": version, "threads": s.threads}
        label = "+".join(usable)
        settings = {"warmup": s.bench_warmup, "runs": s.bench_runs, "seconds": s.bench_seconds,
                    "rounds": s.bench_rounds, "nodes": inputs["nodes"], "node_runs": s.node_runs,
                    "parity_images": s.parity_images, "smoke": s.smoke}
        if s.scheduled:
            # the budget is not part of the key: a second run with more budget continues from these samples
            key = run_manifest.input_key({k: v for k, v in inputs.items() if k not in ("runs", "seconds")})
            prior = self.prior_samples(onnx_sha, usable, key)
            if all(prior.get(n) and _fully_valid(prior[n]) for n in usable):
                self.outcome(target, "bench", label, "reused", "p50 and p90 VALID on every backend in earlier runs")
                return
            if self.ray is None:  # timed with every other row at the end of the run (bench_pending)
                self.pending.append((target, path, onnx_sha, usable, macs, key, prior, settings))
                return
            share = 60.0 * s.budget_minutes / max(1, len(self.targets))
            settings = {**settings, "schedule": {"budget_s": share, "pair_cap_s": s.pair_cap_seconds,
                                                 "key": key, "prior": prior}}

        def run():
            self.emit("update", target.label, "bench", label, "side by side: " + ", ".join(usable))
            p50 = self.measure(_bench_file, usable, settings, macs, s.threads, model=path, exclusive=True)
            return p50, {"onnx_sha256": onnx_sha, "p50_ms": p50}

        self.step(target, "bench", label, inputs, run,
                  lambda e: all(("bench", onnx_sha, n) in self.have for n in usable))

    def prior_samples(self, onnx_sha: str, backends: list[str], key: str) -> dict[str, list[float]]:
        """Per backend, the samples of the latest bench record of this file timed under the same
        settings key by an earlier run (what runtime.schedule reuses)."""
        out: dict[str, list[float]] = {}
        if not any(("bench", onnx_sha, b) in self.have for b in backends):
            return out
        for rec in store.load(root=self.root).records:
            if (rec["kind"] == "bench" and rec.get("model_sha256") == onnx_sha and rec.get("provider") in backends
                    and (rec.get("settings") or {}).get("schedule_key") == key):
                out[rec["provider"]] = list(rec["data"].get("samples_ms") or [])
        return out

    def bench_pending(self) -> None:
        """Every deferred bench pair of the run under one timing budget (runtime.schedule), then
        one record per pair timed and one bench outcome per row."""
        if not self.pending:
            return
        s = self.settings
        bench_scheduled = _importable("runtime.bench", "bench_scheduled")
        scheduled_model = _importable("runtime.bench", "ScheduledModel")
        bench_settings = _importable("runtime.bench", "BenchSettings")
        backend_settings = _importable("runtime.backends", "BackendSettings")
        schedule_settings = _importable("runtime.schedule", "ScheduleSettings")
        models = [scheduled_model(key=t.label, path=path, backends=usable, macs=macs, prior=prior)
                  for t, path, _sha, usable, macs, _key, prior, _st in self.pending]
        first = self.pending[0][7]
        timing = schedule_settings(budget_s=60.0 * s.budget_minutes, pair_cap_s=s.pair_cap_seconds,
                                   memory_mb=_memory_allowance_mb())
        self.emit("start", "all rows", "bench", None)
        started = time.perf_counter()
        results, outcomes, failed = bench_scheduled(
            models, bench_settings(**{k: v for k, v in first.items() if k not in ("runs", "seconds")}),
            backend_settings(threads=s.threads), timing,
            progress=lambda msg: self.emit("update", "all rows", "bench", None, msg))
        seconds = time.perf_counter() - started
        self.summary.latency_validity = {
            "pairs": len(outcomes), "p50_valid": sum(o.p50_valid for o in outcomes.values()),
            "p90_valid": sum(o.p90_valid for o in outcomes.values()), "seconds": seconds,
            "p50_invalid": {f"{m} on {b}": o.reason for (m, b), o in outcomes.items() if not o.p50_valid}}
        for target, _path, onnx_sha, usable, _macs, key, _prior, _st in self.pending:
            label = "+".join(usable)
            for r in results.get(target.label, []):
                r.settings["schedule_key"] = key
                self.write("bench", r.to_record(), model=r.model, model_sha256=r.model_sha256, provider=r.provider,
                           settings=r.settings, contract=r.contract)
            if target.label in failed:
                self.outcome(target, "bench", label, "failed", failed[target.label], seconds, key=key)
                continue
            said = []
            for b in usable:
                o = outcomes[(target.label, b)]
                said.append(f"{b}: p50 {'VALID' if o.p50_valid else 'INVALID'}"
                            + (", p90 VALID" if o.p90_valid else "") + (f" ({o.reason})" if o.reason else ""))
            self.outcome(target, "bench", label, "done", "; ".join(said), seconds, key=key, onnx_sha256=onnx_sha,
                         p50_ms={b: (statistics.median(outcomes[(target.label, b)].samples)
                                     if outcomes[(target.label, b)].samples else None) for b in usable})
        self.pending = []

    def scenario_rows(self, backends: dict[str, str]) -> list[tuple[Target, str, str]]:
        """(row, scenario, backend) measured after the SingleStream timing (RunSettings.scenario_models)."""
        s = self.settings
        out = []
        for target in self.targets:
            if target.precision == INT8 or not target.registered or isinstance(target.spec, ForeignSpec):
                continue
            if s.scenario_models is not None and target.spec.name not in s.scenario_models:
                continue
            for scenario in s.scenarios:
                for entry in s.offline_backends if scenario == "offline" else s.server_backends:
                    known = [b for b in entry.split("|") if b in backends]
                    chosen = next((b for b in known if not backends[b]), known[0] if known else None)
                    if chosen is not None:
                        out.append((target, scenario, chosen))
        return out

    def run_scenarios(self, backends: dict[str, str]) -> None:
        """Offline and Server for :meth:`scenario_rows`, one step each (manifest-reused when unchanged)."""
        s = self.settings
        try:
            version = source_version("runtime.scenarios", "runtime.backends", "runtime.bench", "runtime.parity")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        for target, scenario, backend in self.scenario_rows(backends):
            path = self.exported.get(target.spec.name)
            if path is None:
                self.outcome(target, scenario, backend, "skipped", "its export did not succeed")
                continue
            if backends[backend]:
                self.outcome(target, scenario, backend, "skipped", backends[backend])
                continue
            onnx_sha = sha256_file(path)
            chosen = s.scenario_settings(scenario).to_dict()
            inputs = {"onnx_sha256": onnx_sha, "scenario": chosen, "code": version, "threads": s.threads,
                      "parity_images": s.parity_images}

            def run(path=path, scenario=scenario, backend=backend, chosen=chosen, onnx_sha=onnx_sha, target=target):
                self.emit("update", target.label, scenario, backend, f"{scenario} on {backend}")
                said = self.measure(_scenario_file, backend, chosen, s.parity_images, s.threads, model=path,
                                    exclusive=True)
                return said, {"onnx_sha256": onnx_sha, "said": said}

            self.step(target, scenario, backend, inputs, run,
                      lambda e, sha=onnx_sha, b=backend: ("bench", sha, b) in self.have)

    def per_image(self, target: Target, path: Path, onnx_sha: str) -> None:
        s = self.settings
        if s.per_image <= 0:
            return
        try:
            version = source_version("runtime.per_image", "counting")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        inputs = {"onnx_sha256": onnx_sha, "images": s.per_image, "seconds": s.per_image_seconds,
                  "coco": str(self.coco_dir), "code": version, "threads": s.threads}

        def run():
            if self.coco_dir is None:
                raise _Skip("no COCO images: pass --coco DIR")
            images = _coco_images(self.coco_dir, s.per_image)
            count = self.measure(_images_file, images, s.per_image_seconds, target.name, onnx_sha,
                                 {"images": s.per_image, "seconds": s.per_image_seconds, "threads": s.threads},
                                 s.threads, model=path, exclusive=True,
                                 progress=lambda done, total, name: self.emit(
                                     "update", target.label, "images", "cpu", name, completed=done, total=total))
            return count, {"onnx_sha256": onnx_sha, "images": count}

        self.step(target, "images", "cpu", inputs, run, lambda e: ("images", onnx_sha, "cpu") in self.have)

    def evaluate(self, target: Target, path: Path, onnx_sha: str, random_init: bool, backend: str,
                 reason: str) -> None:
        s = self.settings
        coco = self.coco_dir
        ann = coco / "annotations" / "instances_val2017.json" if coco else None
        try:
            version = source_version("eval")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        inputs = {"onnx_sha256": onnx_sha, "coco": str(coco), "limit": s.eval_limit, "provider": backend,
                  "threads": s.threads,
                  "annotations": [ann.stat().st_size, ann.stat().st_mtime_ns] if ann and ann.is_file() else None,
                  "eval": version}

        def run():
            if random_init:
                raise _Skip("random-init weights: accuracy is not measured (the report shows the published figure)")
            if coco is None:
                raise _Skip(f"no COCO data: pass --coco DIR (COCO layout: annotations/instances_val2017.json, "
                            f"val2017/), or put it at {data_dir() / 'coco-val2017-subset'}")
            if reason:
                raise _Skip(reason)
            evaluate_model = _importable("eval.coco", "evaluate_model")
            image_ids = None
            if target.precision == INT8:  # never scored on its own calibration images
                calibration_ids = _importable("core.calibration", "calibration_ids")
                used = set(calibration_ids(read_contract(path)))
                image_ids = tuple(i for i in _coco_ids(ann) if i not in used)

            def on_image(p):
                self.emit("update", target.label, "eval", backend, p.image or "", completed=p.done, total=p.total)

            # the evaluation writes its own eval record, from this process (under Ray: images on the cluster,
            # scoring here)
            evaluate = self.ray.evaluate if self.ray is not None else evaluate_model
            result = evaluate(path, coco_dir=coco, provider=backend, limit=s.eval_limit, image_ids=image_ids,
                              resume=True, progress=on_image, threads=s.threads)
            self.have.add(("eval", result.model_sha256, result.provider))
            extra = {}
            source = self.exported.get(target.spec.name)
            if target.precision == INT8 and source is not None:
                # the float model on exactly these images: the accuracy change is measured, not inferred
                # from two different image sets
                float_result = evaluate(source, coco_dir=coco, provider=backend, limit=s.eval_limit,
                                        image_ids=image_ids, resume=True, progress=on_image, threads=s.threads)
                extra["float_map50_same_images"] = float_result.scores["map50"]
            return result, {"onnx_sha256": onnx_sha, "map50": result.scores["map50"],
                            "images": result.images_evaluated, **extra}

        self.step(target, "eval", backend, inputs, run, lambda e: ("eval", onnx_sha, backend) in self.have)

    def eval_backends(self, target: Target, backends: dict[str, str]) -> list[str]:
        if target.precision == INT8:
            wanted = ["cpu", "openvino"]
        elif target.registered:
            wanted = list(self.settings.eval_backends)
        else:
            wanted = ["cpu"]
        return [b for b in wanted if b in backends] or ["cpu"]

    def run_target(self, target: Target, backends: dict[str, str]) -> None:
        if target.precision == INT8:
            source = self.exported.get(target.spec.name)
            path = self.quantize(target, source) if source is not None else None
            first = "quantize"
        elif isinstance(target.spec, ForeignSpec):
            path = self.wrap(target)
            if path is not None:
                self.exported[target.spec.name] = path
            first = "export"
        else:
            path = self.export(target)
            if path is not None and target.registered:
                self.exported[target.spec.name] = path
            first = "export"
        evals = self.eval_backends(target, backends)
        if path is None:
            why = self.manifest.get(target.name, target.size, first) or {}
            reason = (f"not {first}ed (its {first} step: {why.get('status', 'not run')})" if why
                      else "its float export did not succeed")
            steps = [("profile", None)] + [("bench", p) for p in backends] + [("images", "cpu")]
            steps += [("eval", b) for b in evals]
            for step, provider in steps:
                self.outcome(target, step, provider, "skipped", reason, key="")
            return
        onnx_sha = sha256_file(path)
        contract = read_contract(path)
        macs = self.profile(target, path, onnx_sha, contract.to_props())
        self.bench(target, path, onnx_sha, backends, macs)
        self.per_image(target, path, onnx_sha)
        for backend in evals:
            self.evaluate(target, path, onnx_sha, contract.random_init, backend, backends.get(backend, ""))


# ---------------------------------------------------------------------- measuring functions
# What each step computes, apart from the pipeline's bookkeeping so that `run --ray` can run it
# as a Ray task: plain arguments in, ``(value, records)`` out, each record the keyword arguments
# of ``store.append`` (the pipeline writes them: ``_Pipeline.measure``).


def _export_file(spec, weights: Path | None, size, exporter: str, input_size: list, *, out: Path, progress=None):
    from exporters import export_model

    result = export_model(spec, out, weights=weights, input_size=size, progress=progress)
    sha = sha256_file(result.path)
    data = {"seconds": result.seconds, "path": str(result.path), "file_bytes": result.path.stat().st_size,
            "random_init": result.contract.random_init, "validation": result.validation,
            "weights_file": str(weights) if weights else None,
            "warnings": list(getattr(result, "warnings", []) or [])}
    return sha, [dict(kind="export", data=data, model=spec.name, model_sha256=sha, contract=result.contract.to_props(),
                      settings={"exporter": exporter, "input_size": input_size})]


@dataclass(frozen=True)
class _Int8Row:
    """Which INT8 row a quantize step makes: its name and size, and the float file it comes from."""

    name: str
    input_size: list
    source_name: str
    source_sha: str


def _quantize_file(source: Path, coco: Path, images: int, row: _Int8Row, *, out: Path, progress=None):
    quantize_model = _importable("quantization.quantize", "quantize_model")
    settings_cls = _importable("quantization.quantize", "QuantizeSettings")
    if read_contract(source).random_init:
        # random weights: accuracy is not measured, and the ranges do not change speed — MinMax on a
        # few images is enough for the INT8 file's cost and latency
        settings = settings_cls(calibration=coco, images=min(images, RANDOM_INIT_CALIBRATION_IMAGES),
                                method="minmax", out=out)
    else:  # trained: the recipe measured within 0.5 point of float mAP@0.5 (entropy, 32 images)
        settings = settings_cls(calibration=coco, images=images, method="entropy", out=out)
    result = quantize_model(source, settings, progress=progress)
    sha = sha256_file(result.path)
    data = {"seconds": result.seconds, "path": str(result.path), "file_bytes": result.path.stat().st_size,
            "source": row.source_name, "source_sha256": row.source_sha, "calibration_ids": result.calibration_ids,
            "quantized_nodes": len(result.quantized_nodes), "float_nodes": len(result.float_nodes),
            "activation_type": result.activation_type, "weight_type": result.weight_type,
            "settings": {k: str(v) for k, v in result.settings.items()}}
    return sha, [dict(kind="quantize", data=data, model=row.name, model_sha256=sha,
                      contract=result.contract.to_props(), settings={"input_size": row.input_size, **data["settings"]})]


def _profile_file(path: Path, name: str, onnx_sha: str, contract_props: dict, int8: bool, progress=None):
    """Returns ((per-node MACs, total, note) for bench, shape mode)."""
    profile_model = _importable("counting", "profile_model")
    say = progress or (lambda _msg: None)
    mode = "measured" if _graph_ops(path) & DATA_DEPENDENT_OPS else "static"
    say(f"{mode} shapes")
    # INT8 graphs hold Quantize/DequantizeLinear: counted, but never an unknown-op failure
    profile = profile_model(path, shapes=mode, allow_unknown=int8)
    if mode == "static" and getattr(profile, "unresolved", None):
        mode = "measured"
        say("static shapes left dims unresolved: measuring")
        profile = profile_model(path, shapes=mode, allow_unknown=int8)
    data = profile.to_dict()
    data.setdefault("mode", mode)
    return (_bench_macs(profile, mode), mode), [dict(kind="profile", data=data, model=name, model_sha256=onnx_sha,
                                                     contract=contract_props,
                                                     settings={"shapes": mode, "allow_unknown": False})]


def _bench_file(path: Path, backends: list[str], settings: dict, macs, threads: int | None = None, progress=None):
    """Returns p50 ms per backend. With ``settings["schedule"]`` (``run --ray``: one row's share of
    the budget) the row's pairs are timed by runtime.schedule, else for the fixed runs/seconds."""
    settings_cls = _importable("runtime.bench", "BenchSettings")
    backend_settings = _importable("runtime.backends", "BackendSettings")(threads=threads)
    settings = dict(settings)
    plan = settings.pop("schedule", None)
    if plan is None:
        bench_side_by_side = _importable("runtime.bench", "bench_side_by_side")
        results = bench_side_by_side(path, backends, settings_cls(**settings), backend_settings, macs=macs)
    else:
        from runtime.bench import ScheduledModel, bench_scheduled
        from runtime.schedule import ScheduleSettings

        model = ScheduledModel(key=str(path), path=Path(path), backends=backends, macs=macs, prior=plan["prior"])
        timed, _outcomes, failed = bench_scheduled(
            [model], settings_cls(**{k: v for k, v in settings.items() if k not in ("runs", "seconds")}),
            backend_settings, ScheduleSettings(budget_s=plan["budget_s"], pair_cap_s=plan["pair_cap_s"]))
        if failed:
            raise DetbenchError(next(iter(failed.values())))
        results = timed.get(str(path), [])
        for r in results:
            r.settings["schedule_key"] = plan["key"]
    records = [dict(kind="bench", data=r.to_record(), model=r.model, model_sha256=r.model_sha256, provider=r.provider,
                    settings=r.settings, contract=r.contract) for r in results]
    return {r.provider: r.latency.p50 for r in results}, records


def _scenario_file(path: Path, backend: str, scenario: dict, parity_images: int, threads: int | None,
                   progress=None):
    """One Offline or Server measurement (``scenario``: ScenarioSettings as a dict); returns the
    figure in words (for the step's outcome) and its bench record."""
    from runtime.backends import BackendSettings
    from runtime.bench import BenchSettings
    from runtime.scenarios import OFFLINE, ScenarioSettings, bench_scenario

    chosen = ScenarioSettings(**{**scenario, "batches": tuple(scenario.get("batches", (1, 2, 4)))})
    timing = BenchSettings(parity=parity_images > 0, parity_images=max(parity_images, 1), peak=False)
    (r,) = bench_scenario([path], [backend], chosen, timing, BackendSettings(threads=threads), record=False)
    f = r.figures
    verdict = f["validity"]["verdict"] + (f" ({f['validity']['reason']})" if f["validity"]["reason"] else "")
    if chosen.scenario == OFFLINE:
        said = f"{f['images_per_s']:.1f} img/s, {f['config_text']}: {verdict}"
    elif f["qps"] is not None:
        said = (f"{f['qps']:.1f} QPS, p{100 * f['percentile']:g} {f['tail_ms']:.1f} <= {f['bound_ms']:.1f} ms, "
                f"{f['config_text']}: {verdict}")
    else:
        said = f"no QPS supported under {f['bound_ms']:.1f} ms: {verdict}"
    return said, [dict(kind="bench", data=r.to_record(), model=r.model, model_sha256=r.model_sha256,
                       provider=r.provider, settings=r.settings, contract=r.contract)]


def _fully_valid(samples: list[float]) -> bool:
    """p50 and p90 both VALID on these samples (runtime.stats' default rules)."""
    from runtime.stats import Latency

    if not samples:
        return False
    verdicts = Latency.of(samples).verdicts
    return verdicts["p50"].valid and verdicts["p90"].valid


def _memory_allowance_mb() -> float | None:
    """How much memory the timing may keep in open models: half of what is available now, at most
    8 GiB (the machine is shared; None when /proc/meminfo cannot be read: no limit)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return min(0.5 * int(line.split()[1]) / 1024, 8192.0)
    except OSError:
        return None
    return None


def _images_file(path: Path, images: list[Path], seconds: float, name: str, onnx_sha: str, settings: dict,
                 threads: int | None = None, progress=None):
    """Returns the number of images measured."""
    _importable("counting.image_counts", "ImageCounter")  # the operation counts need the analyzer
    measure_images = _importable("runtime.per_image", "measure_images")
    result = measure_images(path, images, budget_seconds=seconds, progress=progress, threads=threads)
    return len(result.images), [dict(kind="images", data=result.to_record(), model=name, model_sha256=onnx_sha,
                                     provider="cpu", settings=settings, contract=read_contract(path).to_props())]


def _coco_ids(annotations: Path) -> list[int]:
    import json

    with open(annotations, encoding="utf-8") as fh:
        return sorted(int(img["id"]) for img in json.load(fh).get("images", []))


def _coco_images(coco: Path, count: int) -> list[Path]:
    """``count`` images of the COCO folder spread over it by id (deterministic), not its first ones,
    so the per-image figures see varied scenes."""
    folder = coco / "val2017"
    files = sorted(folder.glob("*.jpg"))
    if not files:
        raise _Skip(f"no .jpg images in {folder}")
    step = max(1, len(files) // max(count, 1))
    return files[::step][:count]


def _graph_ops(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = set()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:  # If/Loop bodies
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return ops


def _bench_macs(profile, mode: str):
    """The analyzer's figures in the form ``runtime.bench`` takes (``macs=``), counted as ``bench --nodes`` counts them."""
    from runtime.bench import node_macs

    if getattr(profile, "nodes", None) is None:
        return None
    return node_macs(profile, mode)


def targets_of(specs, settings: RunSettings) -> list[Target]:
    """The report rows ``run`` measures for ``specs`` (registered size, run_sizes, INT8)."""
    targets = []
    for spec in specs:
        targets.append(Target(spec, spec.input_size))
        if settings.sizes:
            targets += [Target(spec, size) for size in spec.run_sizes]
        if settings.int8_models is None or spec.name in settings.int8_models:
            targets.append(Target(spec, spec.input_size, INT8))
    return targets


@dataclass(frozen=True)
class RunRequest:
    """What ``run`` is asked to measure. ``models``: registry names (default: the paper's
    configurations; ``["all"]``: the whole registry); ``quick``: :meth:`RunSettings.quick` when no
    settings are given; ``coco_dir`` defaults to :func:`default_coco_dir`; ``providers`` (backend
    names) defaults to cpu plus every provider onnxruntime lists and OpenVINO, each probed before
    use; ``report``: write the report at the end; ``strict`` re-raises unexpected (non-detbench)
    exceptions instead of recording them as failures; ``foreign`` adds (ONNX file, describe file)
    pairs: foreign detectors wrapped into contract files and measured like registered ones (with
    ``foreign`` and no ``models``, only them)."""

    models: list[str] | None = None
    quick: bool = False
    coco_dir: Path | None = None
    providers: list[str] | None = None
    report: bool = True
    strict: bool = False
    foreign: list[tuple[Path, Path]] | None = None


def run_pipeline(request: RunRequest | None = None, settings: RunSettings | None = None, *,
                 progress: Progress | None = None, registry=None, ray=None) -> RunSummary:
    """Export, validate, quantize, profile, bench and evaluate what ``request`` names (:class:`RunRequest`),
    then write the report; results go to the results folder (``DETBENCH_RESULTS``).

    ``ray`` (a :class:`pipeline.ray_run.RayRun`) runs the steps as Ray tasks (``run --ray``).
    Raises RegistryError for unknown model names and ConfigError for a missing --coco folder.
    """
    request = request or RunRequest()
    models, quick, coco_dir, providers = request.models, request.quick, request.coco_dir, request.providers
    report, strict, foreign = request.report, request.strict, request.foreign
    from exporters.registry import load_registry

    from runtime.backends.waiting import passive_openmp

    started = time.perf_counter()
    # before the backends are probed (PyTorch, ncnn and OpenCV load OpenMP): every pair alternates
    passive_openmp()
    registry = registry if registry is not None else load_registry()
    if models == ["all"]:
        specs = registry.select(None)
    elif models or foreign:
        specs = registry.select(models) if models else []
    else:  # the default rows: the paper's configurations (the cross-check models behind --models all)
        specs = registry.select(None) if settings and settings.all_models else [s for s in registry if s.paper]
    specs += foreign_specs(foreign or [])
    if coco_dir is not None and not Path(coco_dir).is_dir():
        raise ConfigError(f"--coco {coco_dir}: no such folder (expected COCO's layout: annotations/"
                          "instances_val2017.json and val2017/)")
    coco = Path(coco_dir) if coco_dir is not None else default_coco_dir()
    settings = settings or (RunSettings.quick() if quick else RunSettings())
    if settings.threads is None:  # one explicit count for every step, so every record states what ran
        settings = dataclasses.replace(settings, threads=len(os.sched_getaffinity(0)) if hasattr(
            os, "sched_getaffinity") else (os.cpu_count() or 1))
    elif settings.threads < 1:
        raise ConfigError(f"--threads {settings.threads}: must be at least 1")
    if settings.budget_minutes is not None and settings.budget_minutes <= 0:
        raise ConfigError(f"--budget {settings.budget_minutes:g}: must be positive (minutes)")
    if settings.int8_models is not None:
        unknown = [n for n in settings.int8_models if n not in registry]
        if unknown:
            raise ConfigError(f"--int8 {','.join(unknown)}: not registered models; registered: "
                              f"{', '.join(registry.names)}")
    if settings.scenario_models:
        unknown = [n for n in settings.scenario_models if n not in registry]
        if unknown:
            raise ConfigError(f"--scenarios {','.join(unknown)}: neither offline, server nor registered models; "
                              f"registered: {', '.join(registry.names)}")
    from runtime.backends import backend_names

    unknown = [b for entry in settings.offline_backends + settings.server_backends for b in entry.split("|")
               if b not in backend_names()]
    if unknown:
        raise ConfigError(f"--server-backends {','.join(unknown)}: not backend names (`python cli.py backends`)")
    targets = targets_of(specs, settings)
    pipe = _Pipeline(targets, settings, coco, providers, progress, strict)
    usable = pipe.usable_backends()
    pipe.summary.providers = usable
    pipe.steps_total = sum(2 + len(usable) + 1 + len(pipe.eval_backends(t, usable)) for t in targets)
    pipe.steps_total += len(pipe.scenario_rows(usable)) + (1 if report else 0)
    pipe.emit("plan", message=f"{len(specs)} model(s), {len(targets)} row(s); backends: "
              + ", ".join(p if not r else f"{p} (skipped)" for p, r in usable.items()))
    if ray is None:
        for target in targets:
            pipe.run_target(target, usable)
        pipe.bench_pending()
        pipe.run_scenarios(usable)
    else:
        with ray.connected():
            pipe.ray = ray
            ray.run_targets(pipe, targets, usable)
            pipe.run_scenarios(usable)
    if report:
        from report import build_report

        pipe.emit("start", step="report")
        t0 = time.perf_counter()
        pipe.summary.report = build_report(root=pipe.root, registry=registry)
        pipe.steps_done += 1
        pipe.summary.outcomes.append(StepOutcome("*", "report", None, "done", "", time.perf_counter() - t0))
        pipe.emit("done", step="report", message=str(pipe.summary.report.html))
    pipe.summary.wall_seconds = time.perf_counter() - started
    # The run's own record (wall time, what it did), kept beside the step entries.
    pipe.manifest.doc.setdefault("runs", []).append({
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_seconds": pipe.summary.wall_seconds,
        "models": [s.name for s in specs], "rows": [t.label for t in targets],
        "settings": dataclasses.asdict(settings), "coco": str(coco), "latency_validity": pipe.summary.latency_validity,
        "outcomes": {k: pipe.summary.count(k) for k in ("done", "reused", "skipped", "failed")}})
    pipe.manifest.save()
    pipe.emit("finished", message=f"{pipe.summary.wall_seconds:.1f} s")
    return pipe.summary
