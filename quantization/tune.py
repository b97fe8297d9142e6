"""`tune`: the fastest backend x precision x thread setting within an accuracy budget.

Every backend that runs here is tried on every precision it computes natively (a backend that
would only emulate one refuses, and is listed with its reason), on the float32 file and on
the INT8 file :mod:`quantization.budget` writes, at each thread setting worth trying (1 and
every core count up to the machine's). Accuracy is measured on the selection images (never
the evaluation ones) per (file, backend): threads do not change the arithmetic. Latency is
the p50 of runs alternating between backends in one process (``runtime.bench``), judged
VALID or not by the same rules as ``bench``. The table's Pareto front is latency against
accuracy drop (the larger of the mAP@0.5 and mAP@[.5:.95] point drops against onnxruntime CPU
float32); a configuration is within the budget by the rule ``quantize --max-drop`` stops on
(:func:`quantization.budget.budget_verdict`: the paired bootstrap interval of each change
reaches -budget), so that a file that rule accepted is
not refused here on the noise of the same images; the configuration named is the fastest
within the budget, with its speed-up against onnxruntime CPU float32 at
the same thread count sweep's best (onnxruntime's own default uses every core).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from core.contract import read_contract
from core.errors import ConfigError, DetbenchError
from quantization.budget import RESAMPLES, BudgetSettings, budget_verdict, check_budget, default_coco, quantize_within_budget

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class TuneSettings:
    """``max_drop``: the budget (points); ``coco_dir``: COCO folder (split as ``quantize --max-drop``
    does, by ``seed``); ``backends``: names to try (default: every backend whose probe passes);
    ``threads``: settings to try (default 1 .. the machine's cores); ``bench_seconds``: timed
    seconds per configuration (None: until VALID, as ``bench``); ``int8``: an INT8 file to use
    instead of quantizing (it must record its selection ids)."""

    max_drop: float
    coco_dir: Path | None = None
    seed: int = 0
    backends: tuple[str, ...] | None = None
    threads: tuple[int, ...] | None = None
    bench_seconds: float | None = None
    int8: Path | None = None
    record: bool = True


@dataclass
class Point:
    """One configuration's measurements; ``drop`` None when accuracy was not measured."""

    backend: str
    precision: str
    threads: int
    file: str
    p50_ms: float
    valid: bool
    drop: float | None = None
    map50: float | None = None
    map: float | None = None
    pareto: bool = False
    within_budget: bool | None = None
    changes: dict | None = None  # metric -> {delta, low, high} against onnxruntime CPU float32, points

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision} {self.threads}t"


@dataclass
class TuneResult:
    points: list[Point]
    chosen: Point | None
    reference: Point | None
    speedup: float | None
    accuracy_measured: bool
    notes: list[str] = field(default_factory=list)
    split: dict | None = None

    def to_dict(self) -> dict:
        return {"points": [asdict(p) for p in self.points], "chosen": asdict(self.chosen) if self.chosen else None,
                "reference": asdict(self.reference) if self.reference else None, "speedup": self.speedup,
                "accuracy_measured": self.accuracy_measured, "notes": self.notes, "split": self.split}


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both latency and drop (drop None counts as unknown: then
    latency alone decides). Marks ``pareto`` on each point; returns the front, fastest first."""
    known = all(p.drop is not None for p in points)
    for p in points:
        p.pareto = not any(_dominates(q, p, known) for q in points if q is not p)
    return sorted((p for p in points if p.pareto), key=lambda p: p.p50_ms)


def _dominates(q: Point, p: Point, known: bool) -> bool:
    if not known:
        return q.p50_ms < p.p50_ms
    return q.p50_ms <= p.p50_ms and q.drop <= p.drop and (q.p50_ms < p.p50_ms or q.drop < p.drop)


def choose(points: list[Point], max_drop: float, reference: Point | None) -> tuple[Point | None, float | None]:
    """The fastest point within ``max_drop`` (VALID latencies preferred) and its speed-up over ``reference``.
    A point judged from its intervals (``changes``, by :func:`budget_verdict`) keeps that judgement;
    otherwise its point drop decides."""
    for p in points:
        if p.changes is None:
            p.within_budget = None if p.drop is None else p.drop <= max_drop
    eligible = [p for p in points if p.within_budget or (p.drop is None and all(q.drop is None for q in points))]
    if not eligible:
        return None, None
    valid = [p for p in eligible if p.valid] or eligible
    best = min(valid, key=lambda p: p.p50_ms)
    speedup = reference.p50_ms / best.p50_ms if reference is not None and best.p50_ms > 0 else None
    return best, speedup


def tune(path, settings: TuneSettings, progress: ProgressFn | None = None) -> TuneResult:
    """Measure every configuration (see the module docstring) and choose."""
    from eval.coco import evaluate_model
    from eval.dataset import load_coco
    from core.calibration import selection_ids
    from runtime.backends import REFERENCE, BackendSettings, get_backend, list_backends
    from runtime.bench import BenchSettings, bench_side_by_side

    say = progress or (lambda message: None)
    max_drop = check_budget(settings.max_drop)
    path = Path(path)
    contract = read_contract(path)
    notes: list[str] = []
    threads = tuple(settings.threads or range(1, (os.cpu_count() or 1) + 1))
    if any(t < 1 or t > (os.cpu_count() or 1) for t in threads):
        raise ConfigError(f"--threads {threads}: each must be between 1 and this machine's {os.cpu_count()} cores")
    names = list(settings.backends) if settings.backends else [b.name for b in list_backends() if b.probe()[0]]
    runnable = []
    for name in names:
        try:
            get_backend(name).require(BackendSettings())
            runnable.append(get_backend(name).name)
        except DetbenchError as exc:
            notes.append(f"{name}: not tried ({exc})")
    accuracy = not contract.random_init
    split_info = None
    files = {"f32": path}
    selection: tuple[int, ...] = ()
    coco_dir = Path(settings.coco_dir) if settings.coco_dir is not None else default_coco()
    if not accuracy:
        notes.append(f"{contract.name} has no trained weights ({contract.weights}): accuracy cannot be measured; "
                     "speed only (float32; an INT8 file without a measured drop is not offered)")
    else:
        dataset = load_coco(coco_dir)  # DatasetError when there is no COCO data
        if settings.int8 is not None:
            int8 = Path(settings.int8)
            selection = tuple(selection_ids(read_contract(int8)))
            if not selection:
                raise ConfigError(f"--int8 {int8} records no selection images: make it with `quantize --max-drop`")
        else:
            say("quantizing within the budget (selection images)")
            budget = quantize_within_budget(path, BudgetSettings(max_drop=max_drop, coco_dir=coco_dir,
                                                                  seed=settings.seed), progress=say)
            int8, selection = budget.path, budget.split.selection
            split_info = {"seed": budget.split.seed, "calibration": list(budget.split.calibration),
                          "selection": list(budget.split.selection), "kept_float": budget.kept_float,
                          "selection_drop": budget.drop,
                          "selection_changes": {m: {"delta": c.delta, "low": c.low, "high": c.high}
                                                for m, c in budget.changes.items()}}
        files["int8"] = int8

    points: list[Point] = []
    scores: dict[tuple[str, str], dict] = {}
    results_files: dict[tuple[str, str], str] = {}
    for precision, file in files.items():
        opened = list(runnable)  # a backend whose conversion of this file fails is dropped, with a note
        for t in threads:
            say(f"timing {precision} on {', '.join(opened)} with {t} thread(s)")
            timing = BenchSettings(warmup=3, seconds=settings.bench_seconds, rounds=4, peak=False,
                                   parity=True, parity_images=1)
            try:
                results = bench_side_by_side(file, opened, timing, BackendSettings(threads=t))
            except DetbenchError:  # one backend refuses this file (e.g. native on an INT8 file): find it, go on
                refused = _refusing(file, opened, BackendSettings(threads=t))
                if not refused:
                    raise
                notes.extend(f"{name}: not tried on the {precision} file ({why})" for name, why in refused.items())
                opened = [name for name in opened if name not in refused]
                results = bench_side_by_side(file, opened, timing, BackendSettings(threads=t))
            timed = [r.provider for r in results]
            notes.extend(f"{name}: not tried on the {precision} file (it does not run it: "
                         f"{_failure(results, name)})" for name in opened if name not in timed)
            opened = [name for name in opened if name in timed]
            for r in results:
                judged = r.judged
                points.append(Point(backend=r.provider, precision=_precision(precision, r.precision), threads=t, file=str(file),
                                    p50_ms=float(r.latency.p50), valid=bool(judged.verdicts["p50"].valid)))
                if settings.record:
                    from core import store

                    store.append("bench", r.to_record(), model=r.model, model_sha256=r.model_sha256,
                                 provider=r.provider, settings={**r.settings, "tune": True}, contract=r.contract)
        if accuracy:
            for name in opened:
                say(f"scoring {precision} on {name} (selection images)")
                result = evaluate_model(file, coco_dir=coco_dir, image_ids=selection, provider=name,
                                        store=settings.record, allow_calibration_overlap=True)
                scores[(precision, name)] = {"map50": 100 * result.scores["map50"], "map": 100 * result.scores["map"]}
                results_files[(precision, name)] = result.results_file
    if accuracy:
        from eval.bootstrap import paired_change

        base_key = ("f32", REFERENCE) if ("f32", REFERENCE) in scores else next(k for k in scores if k[0] == "f32")
        loaded = {k: json.loads(Path(f).read_text()) for k, f in results_files.items()}
        verdicts = {}
        for key in scores:
            changes = paired_change(loaded[base_key], loaded[key], dataset, selection, resamples=RESAMPLES)
            verdicts[key] = (budget_verdict(changes, max_drop), {m: {"delta": c.delta, "low": c.low, "high": c.high}
                                                                 for m, c in changes.items()})
        for p in points:
            key = ("int8" if p.file == str(files.get("int8")) else "f32", p.backend)
            s = scores[key]
            p.map50, p.map = s["map50"], s["map"]
            verdict, p.changes = verdicts[key]
            p.drop, p.within_budget = verdict.drop, verdict.ok
    pareto_front(points)
    refs = [p for p in points if p.backend == REFERENCE and p.file == str(path)]
    reference = min(refs, key=lambda p: (-p.threads, p.p50_ms)) if refs else None
    chosen, speedup = choose(points, max_drop, reference)
    result = TuneResult(points=points, chosen=chosen, reference=reference, speedup=speedup,
                        accuracy_measured=accuracy, notes=notes, split=split_info)
    if settings.record:
        from core import store

        store.append("tune", {**result.to_dict(), "max_drop": max_drop}, model=contract.name,
                     model_sha256=None, provider=None, settings=asdict(settings), contract=contract.to_props())
    return result


def _failure(results, name: str) -> str:
    for r in results:
        reason = r.conversion_failures.get(name)
        if reason:
            return reason
    return "it could not be opened"


def _refusing(path, names: list[str], backend_settings) -> dict[str, str]:
    """The backends among ``names`` that cannot open and run ``path`` once, with their reasons."""
    from runtime.backends import get_backend
    from runtime.inputs import default_image, input_tensor, model_input_shape

    tensor = input_tensor(read_contract(path), default_image(), 1, model_input_shape(path), str(path))
    refused = {}
    for name in names:
        try:
            with get_backend(name).open(path, backend_settings) as runner:
                runner.run(tensor)
        except DetbenchError as exc:
            refused[name] = str(exc).splitlines()[0]
    return refused


def _precision(file_kind: str, computed: str) -> str:
    """The table's precision: the INT8 file is int8 whatever float type its backend reports computing in."""
    return "int8" if file_kind == "int8" else computed
