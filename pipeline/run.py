"""``python cli.py run``: the whole pipeline over the registry, then the report.

For each selected model, in registry order:

1. **export** (and validate: the exporter does it) with the official weights when
   :func:`exporters.weights.locate_weights` finds them here, else deterministic random
   initialisation (the contract says ``random-init``; never downloads);
2. **profile** with the analyzer (``counting.profile_model``): static shapes, or shapes
   measured on a real image when the graph has data-dependent RoI stages (RoiAlign /
   MaxRoiPool) or static inference leaves dimensions unresolved;
3. **bench** on every execution provider that really runs here (cpu always; every other
   provider onnxruntime lists is probed with :func:`runtime.sessions.provider_usable`, and a
   provider that cannot run is recorded as ``skipped: <reason>``);
4. **eval** on COCO (``eval.coco.evaluate_model``, resumable) when the weights are
   trained and COCO data is available;

then the report (:func:`report.build_report`). Nothing is faked: a step that cannot run
here (missing module, no weights, no data, provider unavailable) is skipped with its
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import manifest as run_manifest
from core import store
from core.contract import RANDOM_INIT, read_contract, sha256_file
from core.errors import ConfigError, DetbenchError
from core.paths import PROJECT_ROOT, data_dir, results_dir

STEPS = ("export", "profile", "bench", "eval")
# Ops whose output shapes depend on the image (proposals): profile them with measured shapes.
DATA_DEPENDENT_OPS = frozenset({"RoiAlign", "MaxRoiPool"})


@dataclass(frozen=True)
class RunSettings:
    """How much work each step does. ``quick`` bounds it for smoke runs and CI."""

    bench_warmup: int = 3
    bench_runs: int = 20
    node_runs: int = 5
    nodes: bool = True
    eval_limit: int | None = None  # None: every image of the dataset
    eval_provider: str = "cpu"

    @classmethod
    def quick(cls) -> "RunSettings":
        return cls(bench_warmup=1, bench_runs=3, node_runs=2, nodes=True, eval_limit=8)


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


def _provider_candidates() -> list[str]:
    """cpu, then every other provider onnxruntime lists (short names)."""
    import onnxruntime as ort

    from runtime.sessions import short_name

    names = ["cpu"]
    for full in ort.get_available_providers():
        short = short_name(full)
        if short not in names:
            names.append(short)
    return names


class _Pipeline:
    def __init__(self, specs, settings: RunSettings, coco_dir: Path | None, providers: list[str] | None,
                 progress: Progress | None, strict: bool):
        self.specs, self.settings, self.coco_dir, self.strict = specs, settings, coco_dir, strict
        self.progress = progress or (lambda _e: None)
        self.root = results_dir()
        self.manifest = run_manifest.Manifest(self.root)
        self.summary = RunSummary(results_dir=self.root)
        self.requested_providers = providers
        self.have = {(r["kind"], r.get("model_sha256"), r.get("provider")) for r in store.load(root=self.root).records}
        self.steps_done = 0
        self.steps_total = 0

    # ------------------------------------------------------------------ events

    def emit(self, kind: str, model=None, step=None, provider=None, message="", completed=None, total=None):
        self.progress(RunEvent(kind, model, step, provider, message, completed, total, self.steps_done, self.steps_total))

    def outcome(self, spec, step, provider, status, reason="", seconds=0.0, *, key="", **extra):
        if status != "reused":
            self.manifest.put(spec.name, spec.input_size, step, provider, key=key, status=status, reason=reason, **extra)
        self.summary.outcomes.append(StepOutcome(spec.name, step, provider, status, reason, seconds))
        self.steps_done += 1
        self.emit(status, spec.name, step, provider, reason)

    def step(self, spec, step: str, provider: str | None, key_inputs: dict[str, Any], fn, reuse_ok) -> Any:
        """Run ``fn`` unless the manifest has this step done with the same inputs (and
        ``reuse_ok(entry)`` confirms its products are still there). ``fn`` returns
        ``(value, extra manifest fields)``; a _Skip or an error is recorded; returns the
        value, the previous entry when reused, or None."""
        key = run_manifest.input_key(key_inputs)
        entry = self.manifest.get(spec.name, spec.input_size, step, provider)
        if entry and entry.get("status") == "done" and entry.get("key") == key and reuse_ok(entry):
            self.outcome(spec, step, provider, "reused", "inputs unchanged since " + entry.get("finished", "?"))
            return entry
        self.emit("start", spec.name, step, provider)
        started = time.perf_counter()
        try:
            value, extra = fn()
        except _Skip as exc:
            self.outcome(spec, step, provider, "skipped", str(exc), key=key)
            return None
        except DetbenchError as exc:
            self.outcome(spec, step, provider, "failed", str(exc), time.perf_counter() - started, key=key)
            return None
        except Exception as exc:
            if self.strict:
                raise
            # One broken family must not stop the others from being measured; the failure is
            # recorded in the manifest, shown in the report and makes `run` exit non-zero.
            self.outcome(spec, step, provider, "failed", f"unexpected {type(exc).__name__}: {exc}",
                         time.perf_counter() - started, key=key)
            return None
        self.outcome(spec, step, provider, "done", "", time.perf_counter() - started, key=key, **extra)
        return value

    # ------------------------------------------------------------------ providers

    def usable_providers(self) -> dict[str, str]:
        """provider -> "" when it runs here, else the reason it does not."""
        try:
            provider_usable = _importable("runtime.sessions", "provider_usable")
        except _Skip as exc:
            return {"cpu": str(exc)}
        candidates = self.requested_providers or _provider_candidates()
        return {p: ("" if ok else reason) for p in candidates for ok, reason in [provider_usable(p)]}

    # ------------------------------------------------------------------ the steps

    def weights_sha256(self, path: Path) -> str:
        """sha256 of a weights file, cached in the manifest by (path, size, mtime)."""
        cache = self.manifest.doc.setdefault("weights_sha256", {})
        stat = path.stat()
        entry = cache.get(str(path))
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        digest = sha256_file(path)
        cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        return digest

    def export(self, spec) -> Path | None:
        from exporters import _FRAMEWORK_MODULES, default_output, export_model
        from exporters.weights import locate_weights

        weights = locate_weights(spec)
        tag = RANDOM_INIT if weights is None else "sha256:" + self.weights_sha256(weights)
        module_name = _FRAMEWORK_MODULES.get(spec.framework, "")
        try:
            module = importlib.import_module(module_name)
            version = getattr(module, "EXPORTER_VERSION", None) or source_version(module_name)
        except ImportError as exc:
            module, version = None, f"unavailable: {exc}"
        out = default_output(spec, self.root / "onnx")
        inputs = {"model": spec.name, "weights": tag, "exporter": f"{module_name} {version}",
                  "input_size": list(spec.input_size)}

        def run():
            if module is None:
                raise _Skip(f"no exporter for framework {spec.framework!r} in this checkout ({version})")
            self.emit("update", spec.name, "export", None,
                      f"{'random-init' if weights is None else weights.name}")
            result = export_model(spec, out, weights=weights,
                                  progress=lambda msg: self.emit("update", spec.name, "export", None, msg))
            sha = sha256_file(result.path)
            data = {"seconds": result.seconds, "path": str(result.path), "file_bytes": result.path.stat().st_size,
                    "random_init": result.contract.random_init, "validation": result.validation,
                    "weights_file": str(weights) if weights else None}
            store.append("export", data, model=spec.name, model_sha256=sha, contract=result.contract.to_props(),
                         settings={"exporter": inputs["exporter"], "input_size": list(spec.input_size)}, root=self.root)
            self.have.add(("export", sha, None))
            return result.path, {"onnx_sha256": sha, "path": str(result.path)}

        def reuse_ok(entry):
            return (out.is_file() and ("export", entry.get("onnx_sha256"), None) in self.have
                    and sha256_file(out) == entry.get("onnx_sha256"))

        value = self.step(spec, "export", None, inputs, run, reuse_ok)
        if value is None:
            return None
        return out

    def profile(self, spec, path: Path, onnx_sha: str, contract_props: dict[str, str]):
        """Returns the analyzer's (per-node MACs, total, note) for bench, or None."""
        try:
            version = source_version("counting")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        inputs = {"onnx_sha256": onnx_sha, "counting": version, "allow_unknown": False}
        holder: dict[str, Any] = {}

        def run():
            profile_model = _importable("counting", "profile_model")
            mode = "measured" if _graph_ops(path) & DATA_DEPENDENT_OPS else "static"
            self.emit("update", spec.name, "profile", None, f"{mode} shapes")
            profile = profile_model(path, shapes=mode)
            if mode == "static" and getattr(profile, "unresolved", None):
                mode = "measured"
                self.emit("update", spec.name, "profile", None, "static shapes left dims unresolved: measuring")
                profile = profile_model(path, shapes=mode)
            data = profile.to_dict()
            data.setdefault("mode", mode)
            store.append("profile", data, model=spec.name, model_sha256=onnx_sha, contract=contract_props,
                         settings={"shapes": mode, "allow_unknown": False}, root=self.root)
            self.have.add(("profile", onnx_sha, None))
            holder["macs"] = _bench_macs(profile, mode)
            return profile, {"onnx_sha256": onnx_sha, "mode": mode}

        self.step(spec, "profile", None, inputs, run, lambda e: ("profile", onnx_sha, None) in self.have)
        return holder.get("macs")

    def bench(self, spec, path: Path, onnx_sha: str, provider: str, reason: str, macs) -> None:
        s = self.settings
        try:
            version = source_version("runtime.bench", "runtime.sessions", "runtime.nodes")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        try:
            _importable("counting", "profile_model")
            analyzer = True
        except _Skip:
            analyzer = False
        # per-node times need the analyzer's MACs: a bench done without it is redone once it lands
        inputs = {"onnx_sha256": onnx_sha, "provider": provider, "warmup": s.bench_warmup, "runs": s.bench_runs,
                  "nodes": s.nodes and analyzer, "node_runs": s.node_runs, "runtime": version}

        def run():
            if reason:
                raise _Skip(reason)
            bench_model = _importable("runtime.bench", "bench_model")
            nodes = inputs["nodes"]  # latency is valid without the analyzer; per-node MACs are not
            result = bench_model(path, provider, warmup=s.bench_warmup, runs=s.bench_runs, nodes=nodes,
                                 node_runs=s.node_runs, macs=macs)
            store.append("bench", result.to_record(), model=result.model, model_sha256=result.model_sha256,
                         provider=result.provider, settings=result.settings, contract=result.contract, root=self.root)
            self.have.add(("bench", result.model_sha256, result.provider))
            return result, {"onnx_sha256": onnx_sha, "p50_ms": result.latency.p50}

        self.step(spec, "bench", provider, inputs, run, lambda e: ("bench", onnx_sha, provider) in self.have)

    def evaluate(self, spec, path: Path, onnx_sha: str, random_init: bool) -> None:
        s = self.settings
        coco = self.coco_dir
        ann = coco / "annotations" / "instances_val2017.json" if coco else None
        try:
            version = source_version("eval")
        except ImportError as exc:
            version = f"unavailable: {exc}"
        inputs = {"onnx_sha256": onnx_sha, "coco": str(coco), "limit": s.eval_limit, "provider": s.eval_provider,
                  "annotations": [ann.stat().st_size, ann.stat().st_mtime_ns] if ann and ann.is_file() else None,
                  "eval": version}

        def run():
            if random_init:
                raise _Skip("random-init weights: accuracy is not measured (the report shows the published figure)")
            if coco is None:
                raise _Skip(f"no COCO data: pass --coco DIR (COCO layout: annotations/instances_val2017.json, "
                            f"val2017/), or put it at {data_dir() / 'coco-val2017-subset'}")
            evaluate_model = _importable("eval.coco", "evaluate_model")

            def on_image(p):
                self.emit("update", spec.name, "eval", s.eval_provider, p.image or "", completed=p.done, total=p.total)

            result = evaluate_model(path, coco_dir=coco, provider=s.eval_provider, limit=s.eval_limit, resume=True,
                                    progress=on_image)
            self.have.add(("eval", result.model_sha256, result.provider))
            return result, {"onnx_sha256": onnx_sha, "map50": result.scores["map50"],
                            "images": result.images_evaluated}

        self.step(spec, "eval", s.eval_provider, inputs, run,
                  lambda e: ("eval", onnx_sha, s.eval_provider) in self.have)

    def run_model(self, spec, providers: dict[str, str]) -> None:
        path = self.export(spec)
        if path is None:
            why = self.manifest.get(spec.name, spec.input_size, "export") or {}
            reason = f"not exported (export {why.get('status', '?')}; its reason is on the export step)"
            for step, provider in [("profile", None)] + [("bench", p) for p in providers] + [("eval", self.settings.eval_provider)]:
                self.outcome(spec, step, provider, "skipped", reason, key="")
            return
        onnx_sha = sha256_file(path)
        contract = read_contract(path)
        props = contract.to_props()
        macs = self.profile(spec, path, onnx_sha, props)
        for provider, reason in providers.items():
            self.bench(spec, path, onnx_sha, provider, reason, macs)
        self.evaluate(spec, path, onnx_sha, contract.random_init)


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
    """The analyzer's figures in the form ``runtime.bench.bench_model(macs=...)`` takes."""
    nodes = getattr(profile, "nodes", None)
    if nodes is None:
        return None
    note = f"counting.profile_model ({mode} shapes); 1 MAC = 2 FLOPs"
    return {n.name: int(n.macs or 0) for n in nodes}, int(profile.macs), note


def run_pipeline(models: list[str] | None = None, *, quick: bool = False, settings: RunSettings | None = None,
                 coco_dir: Path | None = None, providers: list[str] | None = None, report: bool = True,
                 progress: Progress | None = None, registry=None, strict: bool = False) -> RunSummary:
    """Export, validate, profile, bench and evaluate ``models`` (default: the whole registry),
    then write the report; results go to the results folder (``DETBENCH_RESULTS``).

    ``coco_dir`` defaults to :func:`default_coco_dir`; ``providers`` (short names) defaults
    to cpu plus every provider onnxruntime lists, each probed before use. ``strict``
    re-raises unexpected (non-detbench) exceptions instead of recording them as failures.
    Raises RegistryError for unknown model names and ConfigError for a missing --coco folder.
    """
    from exporters.registry import load_registry

    started = time.perf_counter()
    registry = registry if registry is not None else load_registry()
    specs = registry.select(models)
    if coco_dir is not None and not Path(coco_dir).is_dir():
        raise ConfigError(f"--coco {coco_dir}: no such folder (expected COCO's layout: annotations/"
                          "instances_val2017.json and val2017/)")
    coco = Path(coco_dir) if coco_dir is not None else default_coco_dir()
    settings = settings or (RunSettings.quick() if quick else RunSettings())
    pipe = _Pipeline(specs, settings, coco, providers, progress, strict)
    usable = pipe.usable_providers()
    pipe.summary.providers = usable
    pipe.steps_total = len(specs) * (3 + len(usable)) + (1 if report else 0)
    pipe.emit("plan", message=f"{len(specs)} model(s); providers: "
              + ", ".join(p if not r else f"{p} (skipped)" for p, r in usable.items()))
    for spec in specs:
        pipe.run_model(spec, usable)
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
        "models": [s.name for s in specs], "settings": dataclasses.asdict(settings), "coco": str(coco),
        "outcomes": {k: pipe.summary.count(k) for k in ("done", "reused", "skipped", "failed")}})
    pipe.manifest.save()
    pipe.emit("finished", message=f"{pipe.summary.wall_seconds:.1f} s")
    return pipe.summary
