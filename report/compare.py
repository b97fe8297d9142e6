"""Two results stores side by side: what got slower, less accurate, or changed size.

``compare_stores(a, b)`` pairs the records of two stores (results folders as
``DETBENCH_RESULTS`` names them, or their ``results.jsonl`` files) by configuration,
(model, backend, precision, input size), and for every configuration present in both:

- **latency** from the raw per-run samples (``samples_ms`` of ``bench`` records): the
  ratio of medians B / A with a 95 % bootstrap confidence interval, and a one-sided
  Mann-Whitney U rank test of "B is slower than A by more than the threshold": B's
  samples against A's samples multiplied by (1 + threshold). B is flagged *slower* only
  when that test is significant (p < alpha) and the ratio of medians is above
  1 + threshold; symmetrically *faster*. A rank test needs no assumption about the
  latency distribution (skewed, with a long tail) and one slow outlier moves it by one
  rank only. Repeated measurements of the same configuration in one store (same model
  file and settings as its newest record) are pooled, so interleaved runs share the
  machine's load; and since two processes of the very same benchmark differ by a few
  per cent here (placement, clocks: 8.5 % once between two pooled triples of yolov3-tiny
  runs), the threshold is raised to the spread the repeated runs themselves show.
- **accuracy** from ``eval`` records: mAP@0.5 and mAP@[.5:.95] in COCO points; B is
  *less accurate* when either drops by more than ``max_map_drop`` points, compared only
  when both evaluated the same annotations and number of images.
- **size**: parameters and MACs of ``profile`` records (same shape mode), listed when
  they differ (a change, not a regression).

The result lists every regression in words; the command exits non-zero when there is one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import store
from core.errors import ConfigError, DetbenchError
from report.collect import scenario_of

DEFAULT_MAX_SLOWDOWN = 0.05
DEFAULT_MAX_MAP_DROP = 0.1  # COCO AP points
DEFAULT_ALPHA = 0.01
MIN_SAMPLES = 8  # below this the rank test's normal approximation says little
BOOTSTRAP_RESAMPLES = 2000
# settings that say how long a bench ran, not what ran: they may differ between pooled records
_VOLATILE_SETTINGS = ("runs", "seconds", "warmup")

TEST_DESCRIPTION = ("one-sided Mann-Whitney U (normal approximation, tie and continuity corrected) of B's samples "
                    "against A's x (1 + threshold); ratio = median(B) / median(A) with a 95 % percentile-bootstrap "
                    f"interval ({BOOTSTRAP_RESAMPLES} resamples)")


# --------------------------------------------------------------------------- statistics

def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_greater(x, y) -> tuple[float, float]:
    """``(U, p)``: U of ``x`` and the one-sided p-value of "x tends to be larger than y".

    U counts pairs with x > y (ties count one half); under the null hypothesis it has mean
    n_x n_y / 2 and the variance below, corrected for ties; the p-value is the normal
    approximation's upper tail with a continuity correction of one half.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    nx, ny = x.size, y.size
    if nx == 0 or ny == 0:
        raise ConfigError("the rank test needs samples on both sides")
    both = np.concatenate([x, y])
    order = np.argsort(both, kind="mergesort")
    ordered = both[order]
    ranks = np.empty(both.size, dtype=np.float64)
    # average ranks over runs of equal values
    starts = np.r_[0, np.nonzero(np.diff(ordered))[0] + 1]
    ends = np.r_[starts[1:], ordered.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[:nx].sum() - nx * (nx + 1) / 2.0
    n = nx + ny
    ties = (ends - starts).astype(np.float64)
    var = nx * ny / 12.0 * ((n + 1) - (ties ** 3 - ties).sum() / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:  # every value equal: no evidence either way
        return float(u), 0.5 if u == nx * ny / 2.0 else (0.0 if u > nx * ny / 2.0 else 1.0)
    z = (u - nx * ny / 2.0 - 0.5) / math.sqrt(var)
    return float(u), _normal_sf(z)


def bootstrap_median_ratio(a, b, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(b) / median(a), each side resampled on its own."""
    rng = np.random.default_rng(seed)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ratios = np.empty(resamples)
    chunk = max(1, 4_000_000 // max(a.size, b.size))  # bounds memory for long runs
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        ma = np.median(a[rng.integers(0, a.size, size=(m, a.size))], axis=1)
        mb = np.median(b[rng.integers(0, b.size, size=(m, b.size))], axis=1)
        ratios[start:start + m] = mb / ma
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- records

def read_records(source: str | Path) -> tuple[list[dict[str, Any]], list[int], Path]:
    """``(records, corrupt line numbers, file)`` of a results folder or a results .jsonl file."""
    path = Path(source)
    if path.is_dir():
        file = store.store_path(path)
        if not file.is_file():
            raise ConfigError(f"{path}: no {store.STORE_NAME} in this folder; give a results folder (as "
                              "DETBENCH_RESULTS names it) or its results.jsonl")
        loaded = store.load(root=path)
        return loaded.records, loaded.corrupt_lines, file
    if path.is_file():
        if path.name == store.STORE_NAME:
            loaded = store.load(root=path.parent)
            return loaded.records, loaded.corrupt_lines, path
        loaded = store.read_file(path)
        return loaded.records, loaded.corrupt_lines, path
    raise ConfigError(f"{path}: no such results folder or file; give a results folder (as DETBENCH_RESULTS names "
                      "it) or its results.jsonl")


def _precision(rec: dict[str, Any]) -> str:
    contract, data, settings = rec.get("contract") or {}, rec.get("data") or {}, rec.get("settings") or {}
    raw = contract.get("detbench.precision") or data.get("precision") or settings.get("precision") or "f32"
    return {"float32": "f32", "fp32": "f32", "float16": "fp16", "f16": "fp16"}.get(str(raw).lower(), str(raw).lower())


def _input_size(rec: dict[str, Any]) -> str:
    contract, data = rec.get("contract") or {}, rec.get("data") or {}
    h, w = contract.get("detbench.input_height"), contract.get("detbench.input_width")
    if (h is None or w is None) and data.get("input_size"):
        h, w = data["input_size"]
    return f"{h}x{w}" if h is not None and w is not None else "?"


def _backend(rec: dict[str, Any]) -> str:
    provider = rec.get("provider") or "?"
    # bench records of a non-onnxruntime backend name it in their settings; eval's "backend" is the scorer
    backend = (rec.get("settings") or {}).get("backend") if rec.get("kind") == "bench" else None
    return f"{backend}/{provider}" if backend and backend != provider else str(provider)


@dataclass(frozen=True, order=True)
class ConfigKey:
    model: str
    backend: str
    precision: str
    input_size: str

    def __str__(self) -> str:
        return f"{self.model} {self.input_size} {self.precision} on {self.backend}"

    def to_dict(self) -> dict[str, str]:
        return {"model": self.model, "backend": self.backend, "precision": self.precision,
                "input_size": self.input_size}


def _key(rec: dict[str, Any]) -> ConfigKey:
    return ConfigKey(str(rec.get("model")), _backend(rec), _precision(rec), _input_size(rec))


def _signature(rec: dict[str, Any]) -> str:
    settings = {k: v for k, v in (rec.get("settings") or {}).items() if k not in _VOLATILE_SETTINGS}
    return json.dumps([rec.get("model_sha256"), settings], sort_keys=True, default=str)


@dataclass
class BenchSide:
    samples_ms: list[float]
    records: int
    settings: dict[str, Any]
    model_sha256: str | None
    run_medians: list[float] = field(default_factory=list)  # one per pooled record (process run)

    @property
    def run_spread(self) -> float:
        """Relative spread of the medians of repeated runs of this same configuration (0 with one run):
        how much two processes of the same benchmark differ on this machine."""
        if len(self.run_medians) < 2:
            return 0.0
        return max(self.run_medians) / min(self.run_medians) - 1.0


def bench_sides(records: list[dict[str, Any]]) -> dict[ConfigKey, BenchSide]:
    """Per configuration, the samples of its newest bench record and of earlier repeats of exactly it."""
    newest: dict[ConfigKey, dict[str, Any]] = {}
    # like with like: latency samples exist for SingleStream only (Offline/Server records are other figures)
    records = [r for r in records if r.get("kind") != "bench" or scenario_of(r) == "single-stream"]
    for rec in records:
        if rec.get("kind") == "bench":
            newest[_key(rec)] = rec  # the store is oldest first
    sides = {}
    for key, last in newest.items():
        sig = _signature(last)
        pooled = [r for r in records if r.get("kind") == "bench" and _key(r) == key and _signature(r) == sig]
        runs = [[float(x) for x in ((r.get("data") or {}).get("samples_ms") or [])] for r in pooled]
        samples = [x for run in runs for x in run]
        sides[key] = BenchSide(samples, len(pooled), dict(last.get("settings") or {}), last.get("model_sha256"),
                               [float(np.median(run)) for run in runs if run])
    return sides


def _newest(records: list[dict[str, Any]], kind: str) -> dict[ConfigKey, dict[str, Any]]:
    out: dict[ConfigKey, dict[str, Any]] = {}
    for rec in records:
        if rec.get("kind") == kind:
            out[_key(rec)] = rec
    return out


# --------------------------------------------------------------------------- comparison

@dataclass
class LatencyChange:
    n_a: int
    n_b: int
    median_a: float | None
    median_b: float | None
    ratio: float | None
    ci: tuple[float, float] | None
    u: float | None
    p_slower: float | None
    p_faster: float | None
    verdict: str  # slower / faster / unchanged / not judged
    note: str = ""
    settings_changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass
class AccuracyChange:
    map50_a: float
    map50_b: float
    map_a: float
    map_b: float
    verdict: str  # less accurate / more accurate / unchanged / within the noise / not comparable
    note: str = ""
    intervals: dict[str, Any] = field(default_factory=dict)  # metric -> eval.bootstrap.Change.to_dict()
    interval_note: str = ""  # why there is no interval

    @property
    def delta_map50_points(self) -> float:
        return 100 * (self.map50_b - self.map50_a)

    @property
    def delta_map_points(self) -> float:
        return 100 * (self.map_b - self.map_a)


@dataclass
class Row:
    key: ConfigKey
    latency: LatencyChange | None = None
    accuracy: AccuracyChange | None = None
    size_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass
class Comparison:
    a: str
    b: str
    max_slowdown: float
    max_map_drop: float
    alpha: float
    rows: list[Row]
    only_in_a: list[ConfigKey]
    only_in_b: list[ConfigKey]
    regressions: list[str]
    notes: list[str]

    @property
    def method(self) -> str:
        return (f"slower/faster: {TEST_DESCRIPTION}; flagged when p < {self.alpha:g} and the ratio is beyond "
                f"1 {chr(177)} {100 * self.max_slowdown:g} %; less accurate: mAP@0.5 or mAP@[.5:.95] down by more "
                f"than {self.max_map_drop:g} COCO points on the same images")

    def to_dict(self) -> dict[str, Any]:
        def lat(c: LatencyChange | None):
            if c is None:
                return None
            return {"n_a": c.n_a, "n_b": c.n_b, "median_ms_a": c.median_a, "median_ms_b": c.median_b,
                    "ratio_b_over_a": c.ratio, "ratio_ci95": list(c.ci) if c.ci else None, "u": c.u,
                    "p_slower": c.p_slower, "p_faster": c.p_faster, "verdict": c.verdict, "note": c.note,
                    "settings_changed": {k: list(v) for k, v in c.settings_changed.items()}}

        def acc(c: AccuracyChange | None):
            if c is None:
                return None
            return {"map50_a": c.map50_a, "map50_b": c.map50_b, "map_a": c.map_a, "map_b": c.map_b,
                    "delta_map50_points": c.delta_map50_points, "delta_map_points": c.delta_map_points,
                    "intervals": c.intervals, "interval_note": c.interval_note,
                    "verdict": c.verdict, "note": c.note}

        return {
            "a": self.a, "b": self.b, "max_slowdown": self.max_slowdown, "max_map_drop_points": self.max_map_drop,
            "alpha": self.alpha, "method": self.method, "regressed": bool(self.regressions),
            "regressions": self.regressions, "notes": self.notes,
            "rows": [{**r.key.to_dict(), "latency": lat(r.latency), "accuracy": acc(r.accuracy),
                      "size_changes": {k: list(v) for k, v in r.size_changes.items()}} for r in self.rows],
            "only_in_a": [k.to_dict() for k in self.only_in_a], "only_in_b": [k.to_dict() for k in self.only_in_b],
        }


def compare_latency(a_ms, b_ms, max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
                    alpha: float = DEFAULT_ALPHA, run_spread: float = 0.0) -> LatencyChange:
    """Latency verdict of B against A from raw samples (module docstring).

    ``run_spread``: the run-to-run spread seen between repeated runs of one configuration in either
    store. Samples of one process are not independent of that process (placement, clocks), so a
    change smaller than the spread two runs of the same benchmark already show is not called one:
    the threshold is the larger of ``max_slowdown`` and ``run_spread``."""
    note = ""
    if run_spread > max_slowdown:
        note = (f"threshold raised from {100 * max_slowdown:g} % to the {100 * run_spread:.1f} % that repeated "
                "runs of one configuration differ by")
        max_slowdown = run_spread
    a = np.asarray(a_ms, dtype=np.float64)
    b = np.asarray(b_ms, dtype=np.float64)
    med_a = float(np.median(a)) if a.size else None
    med_b = float(np.median(b)) if b.size else None
    if a.size < MIN_SAMPLES or b.size < MIN_SAMPLES:
        return LatencyChange(a.size, b.size, med_a, med_b, med_b / med_a if med_a and med_b else None, None, None,
                             None, None, "not judged",
                             f"{min(a.size, b.size)} samples on one side: the rank test needs {MIN_SAMPLES} a side")
    ratio = med_b / med_a
    u, p_slower = mann_whitney_greater(b, a * (1 + max_slowdown))
    _, p_faster = mann_whitney_greater(a, b * (1 + max_slowdown))
    ci = bootstrap_median_ratio(a, b)
    if p_slower < alpha and ratio > 1 + max_slowdown:
        verdict = "slower"
    elif p_faster < alpha and ratio * (1 + max_slowdown) < 1:
        verdict = "faster"
    else:
        verdict = "unchanged"
    return LatencyChange(int(a.size), int(b.size), med_a, med_b, ratio, ci, u, p_slower, p_faster, verdict, note)


def accuracy_intervals(a: dict[str, Any], b: dict[str, Any], settings: dict[str, Any] | None = None
                       ) -> tuple[dict[str, Any], str]:
    """Paired bootstrap intervals (``eval.bootstrap``) of B's mAPs against A's from the two eval
    records' COCO results files, or ``({}, why not)`` when the files are gone."""
    from eval.bootstrap import paired_change
    from eval.dataset import read_annotations

    files = [a.get("results_file"), b.get("results_file")]
    annotations = (a.get("dataset") or {}).get("annotations_file")
    if not all(files) or not annotations or not all(Path(f).is_file() for f in [*files, annotations]):
        return {}, "no interval: the results files of both evaluations are needed (kept under results/eval)"
    try:
        gt = read_annotations(Path(annotations))
        results = [json.loads(Path(f).read_text(encoding="utf-8")) for f in files]
    except (OSError, ValueError, DetbenchError) as exc:
        return {}, f"no interval: {exc}"
    ids = (settings or {}).get("image_ids") or sorted(int(i["id"]) for i in gt["images"])
    limit = (settings or {}).get("limit")
    ids = sorted(int(i) for i in ids)[:limit] if limit else sorted(int(i) for i in ids)
    skipped = {int(s.get("image_id")) for rec in (a, b) for s in rec.get("images_skipped") or [] if "image_id" in s}
    ids = [i for i in ids if i not in skipped]
    if len(ids) < 2:
        return {}, "no interval: fewer than 2 images"
    return {m: c.to_dict() for m, c in paired_change(results[0], results[1], gt, ids).items()}, ""


def compare_accuracy(a: dict[str, Any], b: dict[str, Any],
                     max_map_drop: float = DEFAULT_MAX_MAP_DROP, *, intervals: bool = True,
                     settings: dict[str, Any] | None = None) -> AccuracyChange:
    """mAP verdict of B's eval record against A's (``data`` dicts of the store's eval records).

    With ``intervals`` and both results files on disk, each change carries a paired bootstrap
    interval over images; a drop beyond ``max_map_drop`` whose interval holds 0 is reported
    as within the noise, not as a loss."""
    change = AccuracyChange(float(a["map50"]), float(b["map50"]), float(a["map"]), float(b["map"]), "unchanged")
    same_images = (a.get("annotations_sha256") == b.get("annotations_sha256")
                   and a.get("images_evaluated") == b.get("images_evaluated"))
    if not same_images:
        change.verdict = "not comparable"
        change.note = (f"different image sets (A: {a.get('images_evaluated')} images, B: {b.get('images_evaluated')}; "
                       "annotations " + ("same" if a.get("annotations_sha256") == b.get("annotations_sha256")
                                         else "differ") + ")")
        return change
    drops = [name for name, d in (("mAP@0.5", change.delta_map50_points), ("mAP@[.5:.95]", change.delta_map_points))
             if -d > max_map_drop]
    gains = [d for d in (change.delta_map50_points, change.delta_map_points) if d > max_map_drop]
    if intervals:
        change.intervals, change.interval_note = accuracy_intervals(a, b, settings)
    if drops:
        noisy = [n for n in drops if change.intervals.get(_METRIC_OF[n], {}).get("within_noise")]
        if change.intervals and len(noisy) == len(drops):
            change.verdict = "within the noise"
            change.note = "; ".join(_interval_text(change.intervals[_METRIC_OF[n]]) for n in drops)
        else:
            change.verdict = "less accurate"
            change.note = ", ".join(drops)
    elif gains:
        change.verdict = "more accurate"
    return change


_METRIC_OF = {"mAP@0.5": "map50", "mAP@[.5:.95]": "map"}


def _interval_text(c: dict[str, Any]) -> str:
    return (f"{c['metric']} {c['delta']:+.2f} point, {100 * c['confidence']:.0f} % interval "
            f"[{c['low']:+.2f}, {c['high']:+.2f}] over {c['images']} images")


def parse_fraction(text: str, option: str) -> float:
    """``5%`` or ``0.05`` to 0.05; anything else is a ConfigError naming ``option``."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0 or (not raw.endswith("%") and value >= 1):
        raise ConfigError(f"{option} {text!r}: give a percentage such as 5% or a fraction below 1 such as 0.05")
    return value


def compare_stores(a: str | Path, b: str | Path, *, max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
                   max_map_drop: float = DEFAULT_MAX_MAP_DROP, alpha: float = DEFAULT_ALPHA,
                   allow_nothing_in_common: bool = False) -> Comparison:
    """Compare store B against store A (A is the reference): see the module docstring.

    A guard fails closed: when no (model, backend, precision, input size) is in both stores
    nothing was compared, and that is a :class:`ConfigError` unless ``allow_nothing_in_common``."""
    if not (0 <= max_slowdown < math.inf and 0 <= max_map_drop < math.inf):  # NaN fails every comparison
        raise ConfigError("--max-slowdown and --max-map-drop must be 0 or more")
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha {alpha}: must be between 0 and 1, e.g. 0.01")
    recs_a, corrupt_a, file_a = read_records(a)
    recs_b, corrupt_b, file_b = read_records(b)
    notes: list[str] = []
    for name, file, corrupt in (("A", file_a, corrupt_a), ("B", file_b, corrupt_b)):
        if corrupt:
            notes.append(f"{name} ({file}): {len(corrupt)} line(s) that are not records were skipped "
                         f"(line {', '.join(map(str, corrupt[:5]))}{' ...' if len(corrupt) > 5 else ''})")
    for name, file, recs in (("A", file_a, recs_a), ("B", file_b, recs_b)):
        if not any(r.get("kind") in ("bench", "eval", "profile") for r in recs):
            raise ConfigError(f"{name} ({file}) holds no bench, eval or profile record: nothing to compare")

    bench_a, bench_b = bench_sides(recs_a), bench_sides(recs_b)
    eval_a, eval_b = _newest(recs_a, "eval"), _newest(recs_b, "eval")
    keys_a, keys_b = set(bench_a) | set(eval_a), set(bench_b) | set(eval_b)
    if not keys_a & keys_b and not allow_nothing_in_common:
        def listing(keys):
            shown = sorted(str(k) for k in keys)
            return ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "") or "none"

        raise ConfigError(f"A ({file_a}) and B ({file_b}) have no (model, backend, precision, input size) in common: "
                          f"nothing was compared, so no regression can be ruled out. A has {listing(keys_a)}; B has "
                          f"{listing(keys_b)}. Pass --allow-nothing-in-common to accept this.")
    rows: list[Row] = []
    regressions: list[str] = []
    for key in sorted(keys_a & keys_b):
        row = Row(key)
        if key in bench_a and key in bench_b:
            sa, sb = bench_a[key], bench_b[key]
            row.latency = compare_latency(sa.samples_ms, sb.samples_ms, max_slowdown, alpha,
                                          max(sa.run_spread, sb.run_spread))
            row.latency.settings_changed = {
                k: (sa.settings.get(k), sb.settings.get(k))
                for k in sorted(set(sa.settings) | set(sb.settings))
                if k not in _VOLATILE_SETTINGS and sa.settings.get(k) != sb.settings.get(k)}
            if sa.model_sha256 != sb.model_sha256:
                row.latency.settings_changed["model_sha256"] = (sa.model_sha256, sb.model_sha256)
            if row.latency.verdict == "slower":
                c = row.latency
                threshold = max(max_slowdown, sa.run_spread, sb.run_spread)
                regressions.append(f"{key}: slower, p50 {c.median_a:.2f} -> {c.median_b:.2f} ms "
                                   f"(x{c.ratio:.3f}, 95 % CI x{c.ci[0]:.3f}-x{c.ci[1]:.3f}; p = {c.p_slower:.2g} "
                                   f"for more than {100 * threshold:.3g} % slower)")
        if key in eval_a and key in eval_b:
            row.accuracy = compare_accuracy(eval_a[key].get("data") or {}, eval_b[key].get("data") or {},
                                            max_map_drop, settings=eval_b[key].get("settings"))
            if row.accuracy.verdict == "less accurate":
                c = row.accuracy
                regressions.append(f"{key}: less accurate, mAP@0.5 {100 * c.map50_a:.2f} -> {100 * c.map50_b:.2f}, "
                                   f"mAP@[.5:.95] {100 * c.map_a:.2f} -> {100 * c.map_b:.2f} (COCO points; "
                                   f"allowed drop {max_map_drop:g})")
        rows.append(row)
    _attach_sizes(rows, recs_a, recs_b)
    return Comparison(a=str(file_a), b=str(file_b), max_slowdown=max_slowdown, max_map_drop=max_map_drop, alpha=alpha,
                      rows=rows, only_in_a=sorted(keys_a - keys_b), only_in_b=sorted(keys_b - keys_a),
                      regressions=regressions, notes=notes)


def _attach_sizes(rows: list[Row], recs_a, recs_b) -> None:
    """Parameters and MACs of the newest profile of the same model, input size, precision and shape mode."""
    def profiles(recs):
        out = {}
        for rec in recs:
            if rec.get("kind") == "profile":
                k = _key(rec)
                mode = (rec.get("data") or {}).get("mode") or (rec.get("settings") or {}).get("shapes")
                out[(k.model, k.precision, k.input_size, mode)] = rec.get("data") or {}
        return out

    pa, pb = profiles(recs_a), profiles(recs_b)
    for row in rows:
        k = row.key
        for (model, precision, size, mode), da in pa.items():
            if (model, precision, size) != (k.model, k.precision, k.input_size):
                continue
            db = pb.get((model, precision, size, mode))
            if db is None:
                continue
            for figure in ("params", "macs", "conv_macs"):
                if figure in da and figure in db and da[figure] != db[figure]:
                    row.size_changes[f"{figure} ({mode} shapes)"] = (da[figure], db[figure])


__all__ = ["AccuracyChange", "Comparison", "ConfigKey", "LatencyChange", "Row", "bootstrap_median_ratio",
           "compare_accuracy", "compare_latency", "compare_stores", "mann_whitney_greater", "parse_fraction",
           "read_records"]
