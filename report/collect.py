"""The results store and models.toml as one row per model configuration.

A row is one registered model at one input size. Every measured figure of a row comes
from records of the SAME ONNX file: the one written by the row's latest ``export``
record (its ``model_sha256``); without an export record, the file of the row's latest
record of any kind. So a re-export (other weights, other exporter version) never mixes
with measurements of the file it replaced.

Accuracy is *measured* when an ``eval`` record of that file exists and the file carries
trained weights; a random-init export never gets a measured accuracy. Otherwise the
published figure of models.toml is used (only for the registered input size) and marked
``published`` with its source. What could not be measured says why, from the run
manifest (``core.manifest``) when the pipeline recorded a reason.

Units in a row: ``map50``/``map`` in percent; ``params`` in parameters; ``gops`` and
``conv_gops`` in GFLOPs (= 2 x GMACs, the analyzer's ``flops`` / ``conv_macs``);
latencies in milliseconds.

Precision is a dimension of its own: a quantized file is the row ``NAME@int8`` (its contract
says ``detbench.precision = int8``). Registry facts (family, framework, paper) come from
``NAME``; published accuracy never does, since it describes the float model. Latency is kept
per backend with its validity verdict (``runtime.stats``) and its parity with onnxruntime
CPU (``runtime.parity``); accuracy is kept per backend too (an ``eval`` record per backend),
and :meth:`ModelRow.accuracy_on` gives a (file, backend) pair only the accuracy measured for
that pair: never another backend's, never a published one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import store
from core.contract import PREFIX, RANDOM_INIT

MEASURED = "measured"
PUBLISHED = "published"
FLOAT32 = "float32"
REFERENCE_BACKEND = "cpu"
# parity verdicts under which a backend computes what onnxruntime CPU computes (within its tolerance)
AGREEING = ("reference", "agree")


def split_name(name: str) -> tuple[str, str | None]:
    """``"yolov3-tiny@int8"`` -> ``("yolov3-tiny", "int8")``; a registry name -> ``(name, None)``."""
    base, _, variant = name.partition("@")
    return base, (variant or None)


@dataclass
class Accuracy:
    """One accuracy figure in percent, and where it comes from."""

    value: float
    status: str  # MEASURED | PUBLISHED
    source: str


@dataclass
class Latency:
    """Measured latency of one provider (milliseconds), from one bench record."""

    provider: str
    p50_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    providers_ran: list[str]
    nodes: dict[str, Any] | None = None
    n: int | None = None  # timed runs behind the figures
    rsd: float | None = None  # relative standard deviation of the runs
    verdict: str | None = None  # "VALID" | "INVALID" for p50 (runtime.stats); None: record predates verdicts
    verdict_reason: str = ""
    smoke: bool = False
    precision: str | None = None  # what the backend computed in ("f32", "bf16", ...)
    parity_verdict: str | None = None  # "reference" (cpu) | "agree" | "disagree" | "unchecked"
    parity: dict[str, Any] | None = None
    ratio_to_cpu: float | None = None  # p50 / cpu p50 measured side by side in one process
    cold_start: dict[str, Any] | None = None
    backend: dict[str, Any] = field(default_factory=dict)
    hostname: str | None = None
    p90_ms: float | None = None  # only where p90's own verdict is VALID
    fraction_of_peak: float | None = None
    peak_precision: str | None = None  # the precision whose measured peak fraction_of_peak refers to
    peak_note: str = ""
    threads: int | None = None

    @property
    def disagrees(self) -> bool:
        """Outputs outside the tolerance of onnxruntime CPU's: never to be shown as equivalent."""
        return self.parity_verdict == "disagree"


@dataclass
class Evaluation:
    """One backend's COCO evaluation of the row's file (percent)."""

    provider: str
    map50: float
    map: float
    images: int | None
    image_ids: list[int] | None
    source: str
    dataset: str | None = None  # a dataset other than COCO's categories (custom data), else None
    record: dict | None = None  # the eval record's data (results file, dataset) for intervals


@dataclass
class ModelRow:
    name: str
    input_size: tuple[int, int]
    family: str = ""
    framework: str = ""
    paper: bool = False
    in_registry: bool = False
    registered_size: bool = True  # input size is the one models.toml registers (published figures apply)
    onnx_sha256: str | None = None
    weights: str | None = None  # "sha256:<hex>" | "random-init" | None (never exported here)
    params: int | None = None
    params_source: str = ""
    macs: float | None = None
    conv_macs: float | None = None
    postprocess_macs: float | None = None
    profile_mode: str | None = None
    unknown_ops: list[str] = field(default_factory=list)
    map50: Accuracy | None = None
    map: Accuracy | None = None
    latency: dict[str, Latency] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # "<step>[:<provider>]" -> reason
    eval_images: int | None = None
    host: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    published_gflops: Any = None  # runtime Published or None (convention differs per source)
    precision: str = FLOAT32  # the file's detbench.precision ("int8" for a quantized file)
    quantized_from: str | None = None
    calibration: str | None = None  # calibration method and image count, as the contract says
    dataset: str | None = None  # the headline accuracy's dataset when it is not COCO's categories
    kept_float: list[str] | None = None  # layers an accuracy budget kept float (quantize --max-drop)
    evals: dict[str, Evaluation] = field(default_factory=dict)  # backend -> its largest evaluation
    eval_list: list[Evaluation] = field(default_factory=list)  # every evaluation of the file, oldest first
    images: dict[str, Any] | None = None  # the latest ``images`` record's data (per-image MACs and latency)
    validation: str | None = None  # export contract's detbench.validation (e.g. "failed-accepted")
    structure_warnings: list[str] = field(default_factory=list)
    weight_bytes: int | None = None  # bytes of the graph's weights, as the profile counts them
    file_bytes: int | None = None  # size of the ONNX file (export record)
    hosts: list[str] = field(default_factory=list)  # hostnames of every record behind the row
    by_op: dict[str, Any] = field(default_factory=dict)  # the profile's op types
    # the latest Offline / Server bench record's data per backend (runtime.scenarios)
    offline: dict[str, dict[str, Any]] = field(default_factory=dict)
    server: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def base_name(self) -> str:
        return split_name(self.name)[0]

    @property
    def quantized(self) -> bool:
        return self.precision != FLOAT32 or split_name(self.name)[1] is not None

    @property
    def label(self) -> str:
        h, w = self.input_size
        label = self.name if self.in_registry and self.registered_size else f"{self.name} @{h}x{w}"
        # accuracy on custom data is never plotted as if it were COCO's without saying so
        return label if self.dataset is None else f"{label} [on {self.dataset}]"

    @property
    def random_init(self) -> bool | None:
        return None if self.weights is None else self.weights == RANDOM_INIT

    @property
    def mparams(self) -> float | None:
        return None if self.params is None else self.params / 1e6

    @property
    def gops(self) -> float | None:
        """GFLOPs of the whole exported graph: 2 x all counted MACs / 1e9."""
        return None if self.macs is None else 2.0 * self.macs / 1e9

    @property
    def conv_gops(self) -> float | None:
        """GFLOPs of the convolutions only (Darknet's BFLOPs convention)."""
        return None if self.conv_macs is None else 2.0 * self.conv_macs / 1e9

    @property
    def map50_per_mparam(self) -> float | None:
        if self.map50 is None or not self.params:
            return None
        return self.map50.value / self.mparams

    @property
    def map50_per_gops(self) -> float | None:
        if self.map50 is None or not self.macs:
            return None
        return self.map50.value / self.gops

    def accuracy_on(self, provider: str) -> tuple[Accuracy | None, Accuracy | None, str]:
        """(mAP@0.5, mAP@[.5:.95], basis) measured for THIS file on ``provider`` (its precision), or
        (None, None, why not). Only that backend's own evaluation counts: another backend's figure,
        even one whose outputs agree within tolerance, is not a measurement of this pair, and a
        published figure describes the float model on onnxruntime-independent test data, never a
        (file, backend precision) pair measured here (see :meth:`published_accuracy`)."""
        ev = self.evals.get(provider) if self.random_init is False else None
        if ev is not None:
            return (Accuracy(ev.map50, MEASURED, ev.source), Accuracy(ev.map, MEASURED, ev.source),
                    f"measured on {provider} ({ev.images} images)")
        if self.random_init:
            return None, None, "not measured (random-init weights)"
        if self.weights is None:
            return None, None, "not measured (not exported here)"
        return None, None, f"not measured on {provider}"

    def published_accuracy(self) -> Accuracy | None:
        """The published mAP@0.5 of the float model at its registered size, when that is what the row
        carries (the row has no measured accuracy): a separate layer, never a measured point."""
        return self.map50 if self.map50 is not None and self.map50.status == PUBLISHED else None


def contract_fields(record: dict[str, Any]) -> dict[str, str]:
    """A record's contract metadata with the ``detbench.`` prefix removed (either spelling is accepted)."""
    raw = record.get("contract") or {}
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}


def record_size(record: dict[str, Any]) -> tuple[int, int] | None:
    c = contract_fields(record)
    try:
        return int(c["input_height"]), int(c["input_width"])
    except (KeyError, TypeError, ValueError):
        size = (record.get("settings") or {}).get("input_size")
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return int(size[0]), int(size[1])
        return None


def scenario_of(record: dict[str, Any]) -> str:
    """The MLPerf scenario of a ``bench`` record (records from before scenarios existed: single-stream)."""
    return (record.get("data") or {}).get("scenario") or (record.get("settings") or {}).get("scenario") \
        or "single-stream"


def _latest(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    # The store is append-only: file order is time order, so the last one wins.
    return records[-1] if records else None


def collect(*, root: Path | None = None, registry=None, manifest: dict[str, Any] | None = None,
            all_registered: bool = False) -> list[ModelRow]:
    """One :class:`ModelRow` per configuration: every paper configuration of the registry
    (always, measured or not), every other registered model that has records (or all with
    ``all_registered``), and any (model, input size) found in the store, in registry order.

    ``manifest`` is the run manifest (``core.manifest.load``); when None it is read from
    the results folder ``root``.
    """
    from exporters.registry import load_registry
    from core import manifest as run_manifest

    registry = registry if registry is not None else load_registry()
    if manifest is None:
        manifest = run_manifest.load(root)
    loaded = store.load(root=root)
    by_key: dict[tuple[str, tuple[int, int]], list[dict[str, Any]]] = {}
    for rec in loaded.records:
        size = record_size(rec)
        if rec.get("model") is None or size is None:
            continue
        by_key.setdefault((rec["model"], size), []).append(rec)

    keys: list[tuple[str, tuple[int, int]]] = []
    for spec in registry:
        if spec.paper or all_registered or any(name == spec.name for name, _ in by_key):
            keys.append((spec.name, spec.input_size))
        keys += sorted(k for k in by_key if k[0] == spec.name and k[1] != spec.input_size)
        # quantized (and other) variants right below their float model, registered size first
        keys += sorted((k for k in by_key if k[0] != spec.name and split_name(k[0])[0] == spec.name),
                       key=lambda k: (k[0], k[1] != spec.input_size, k[1]))
    keys += sorted(k for k in by_key if split_name(k[0])[0] not in registry)

    rows = []
    for name, size in keys:
        base = split_name(name)[0]
        spec = registry.get(base) if base in registry else None
        rows.append(_row(name, size, spec, by_key.get((name, size), []), manifest))
    return rows


def _row(name: str, size: tuple[int, int], spec, records: list[dict[str, Any]],
         manifest: dict[str, Any]) -> ModelRow:
    row = ModelRow(name=name, input_size=size, in_registry=spec is not None)
    if spec is not None:
        row.registered_size = size == spec.input_size
        # a paper configuration is the registered network at its size in float: not its other sizes or INT8
        row.family, row.framework = spec.family, spec.framework
        row.paper = spec.paper and row.registered_size and name == spec.name
    # a quantized file is written by ``quantize``, which plays for it the part ``export`` plays for a float one
    exports = [r for r in records if r["kind"] in ("export", "quantize")]
    current = _latest(exports) or _latest(records)
    if current is not None:
        row.onnx_sha256 = current.get("model_sha256")
        c = contract_fields(current)
        row.precision = c.get("precision") or FLOAT32
        row.quantized_from = c.get("quantized_from")
        method = c.get("calibration_method")
        ids = _json_list(c.get("calibration_image_ids"))
        if method or ids:
            row.calibration = f"{method or '?'} on {len(ids) if ids else '?'} COCO image(s)"
        if c.get("kept_float_by_accuracy") is not None:
            row.kept_float = [str(n) for n in _json_list(c.get("kept_float_by_accuracy"))]
        row.validation = c.get("validation")
        row.structure_warnings = [str(w) for w in _json_list(c.get("structure_warnings"))]
        if current["kind"] in ("export", "quantize"):
            row.file_bytes = (current.get("data") or {}).get("file_bytes")
        row.weights = c.get("weights")
        row.family = row.family or c.get("family", "")
        row.framework = row.framework or c.get("framework", "")
        row.host, row.versions = current.get("host") or {}, current.get("versions") or {}
        if c.get("source_params"):
            row.params, row.params_source = int(float(c["source_params"])), "source framework (export metadata)"
    if spec is not None and row.registered_size and not row.quantized:
        row.published_gflops = spec.published.get("gflops")
    same_file = [r for r in records if r.get("model_sha256") == row.onnx_sha256] if row.onnx_sha256 else []
    row.hosts = sorted({(r.get("host") or {}).get("hostname") for r in same_file} - {None})

    profile = _latest([r for r in same_file if r["kind"] == "profile"])
    if profile is not None:
        d = profile["data"]
        row.macs, row.conv_macs = d.get("macs"), d.get("conv_macs")
        row.postprocess_macs, row.profile_mode = d.get("postprocess_macs"), d.get("mode")
        row.unknown_ops = list(d.get("unknown_ops") or [])
        if row.unknown_ops or d.get("unresolved_nodes"):
            row.skipped["profile"] = (f"incomplete count (lower bound): uncounted op types {row.unknown_ops}, "
                                      f"{len(d.get('unresolved_nodes') or [])} node(s) with unresolved shapes")
        if d.get("params") is not None:
            row.params, row.params_source = int(d["params"]), f"analyzer ({d.get('mode', '?')} shapes)"
        row.weight_bytes = d.get("weight_bytes", d.get("param_bytes"))
        row.by_op = dict(d.get("by_op") or {})

    for rec in same_file:
        if rec["kind"] == "bench" and scenario_of(rec) in ("offline", "server"):
            getattr(row, scenario_of(rec))[rec.get("provider") or REFERENCE_BACKEND] = rec["data"]
            continue
        if rec["kind"] != "bench" or (rec.get("settings") or {}).get("batch", rec["data"].get("batch", 1)) != 1:
            continue
        row.latency[rec.get("provider") or REFERENCE_BACKEND] = _latency(rec)
        row.host, row.versions = rec.get("host") or row.host, rec.get("versions") or row.versions

    images = _latest([r for r in same_file if r["kind"] == "images"])
    row.images = images["data"] if images is not None else None

    # Per backend, the largest evaluation of this file wins (a later --quick run over a few images
    # does not replace a full one); among equals, an unrestricted one, then the latest.
    for rec in same_file:
        if rec["kind"] != "eval":
            continue
        p, d = rec.get("provider") or REFERENCE_BACKEND, rec["data"]
        n = d.get("images_evaluated")
        dataset = _foreign_dataset(d)
        where = (f"measured here: {n} {'COCO val2017 images' if dataset is None else f'images of dataset {dataset!r}'}"
                 f"{'' if dataset is None else ' (its own classes: not comparable with COCO accuracy)'}, annotations "
                 f"sha256 {str(d.get('annotations_sha256', '?'))[:12]}, provider {p}")
        ids = d.get("image_ids") or (rec.get("settings") or {}).get("image_ids")
        ev = Evaluation(p, 100.0 * float(d["map50"]), 100.0 * float(d["map"]), n,
                        sorted(int(i) for i in ids) if ids else None, where, dataset, record=d)
        row.eval_list.append(ev)
        # an evaluation of the whole (limited) folder beats one restricted to chosen image ids (the
        # float model rerun on its INT8 row's images) of the same size
        if p not in row.evals or (n or 0, ev.image_ids is None) >= (row.evals[p].images or 0,
                                                                     row.evals[p].image_ids is None):
            row.evals[p] = ev
    # The headline accuracy is onnxruntime CPU's (the reference backend), else the largest evaluation.
    headline = row.evals.get(REFERENCE_BACKEND) or max(
        row.evals.values(), key=lambda e: e.images or 0, default=None)
    if row.random_init is not False:
        row.evals, row.eval_list = {}, []  # random weights: no accuracy is measured, whatever records say
    if headline is not None and row.random_init is False:
        row.eval_images = headline.images
        row.map50 = Accuracy(headline.map50, MEASURED, headline.source)
        row.map = Accuracy(headline.map, MEASURED, headline.source)
        row.dataset = headline.dataset
    elif spec is not None and row.registered_size and not row.quantized:
        for attr, key in (("map50", "map50"), ("map", "map")):
            pub = spec.published.get(key)
            if pub is not None:
                setattr(row, attr, Accuracy(float(pub.value), PUBLISHED, pub.source))

    attempted = any(e.get("model") == name and tuple(e.get("input_size") or ()) == size
                    for e in manifest.get("entries", {}).values())
    if row.weights is None and not attempted:
        row.skipped["run"] = f"not run here yet (python cli.py run --models {name})"
    if row.map50 is None and row.map is None and row.weights is not None:
        if row.random_init and row.quantized:
            why = ("accuracy of random weights not measured; a published figure describes the float model, "
                   "never this quantized file")
        elif row.random_init:
            why = ("random-init weights (no trained weights here) and models.toml publishes no accuracy for "
                   "this configuration")
        else:
            why = "trained weights but no COCO evaluation recorded (python cli.py run --coco DIR)"
        row.skipped["accuracy"] = why
    if validation_flagged(row.validation):
        row.skipped["export validation"] = (
            f"{row.validation}: the export did not match its source framework and was kept with "
            "--accept-mismatch; its figures describe the ONNX file, not a validated copy of the source model")
    if row.structure_warnings:
        row.skipped["structure warnings"] = "; ".join(row.structure_warnings)
    for entry in manifest.get("entries", {}).values():
        if entry.get("model") != name or tuple(entry.get("input_size") or ()) != size:
            continue
        if entry.get("status") in ("skipped", "failed"):
            # a step run for several backends side by side is named "cpu+openvino+...": its outcome
            # is each of theirs
            for provider in (entry.get("provider") or "").split("+"):
                step = entry["step"] + (f":{provider}" if provider else "")
                row.skipped[step] = f"{entry['status']}: {entry.get('reason', '')}"
    return row


def _json_list(value: Any) -> list[Any]:
    """A contract value that holds a list (contract metadata stores lists as JSON text)."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return [value]
    return parsed if isinstance(parsed, list) else [parsed]


def _latency(rec: dict[str, Any]) -> Latency:
    d = rec["data"]
    lat = d["latency_ms"]
    validity = d.get("latency_validity") or {}
    p50_verdict = (validity.get("verdicts") or {}).get("p50") or {}
    backend = d.get("backend") if isinstance(d.get("backend"), dict) else {}
    precision = d.get("precision") or backend.get("precision")
    provider = rec.get("provider") or REFERENCE_BACKEND
    parity = d.get("parity") if isinstance(d.get("parity"), dict) else None
    parity_verdict = d.get("parity_verdict") or (parity or {}).get("verdict")
    if parity_verdict is None and provider == REFERENCE_BACKEND:
        parity_verdict = "reference"
    p90_verdict = (validity.get("verdicts") or {}).get("p90") or {}
    schedule = d.get("schedule") if isinstance(d.get("schedule"), dict) else {}
    p50_reason = p50_verdict.get("reason") or ""
    if p50_verdict.get("verdict") == "INVALID" and schedule.get("reason") and not schedule.get("p50_valid"):
        # why the timing budget did not buy a VALID p50 (too slow for the budget, capped as unstable)
        # the scheduler's reason usually quotes the rule's own already: never say it twice
        p50_reason = (schedule["reason"] if not p50_reason or p50_reason in schedule["reason"]
                      else f"{schedule['reason']} ({p50_reason})")
    p90 = lat.get("p90") if p90_verdict.get("verdict") == "VALID" else None
    return Latency(provider, float(lat["p50"]), float(lat["mean"]), float(lat["std"]),
                   int(d.get("runs", validity.get("n", 0)) or 0), list(d.get("providers_ran") or []), d.get("nodes"),
                   n=validity.get("n", d.get("runs")), rsd=validity.get("rsd"),
                   verdict=p50_verdict.get("verdict"), verdict_reason=p50_reason,
                   smoke=bool(validity.get("smoke")), precision=precision, parity_verdict=parity_verdict,
                   parity=parity, ratio_to_cpu=d.get("ratio_to_cpu"), cold_start=d.get("cold_start"),
                   backend=backend, hostname=(rec.get("host") or {}).get("hostname"),
                   p90_ms=None if p90 is None else float(p90), fraction_of_peak=d.get("fraction_of_peak"),
                   peak_precision=d.get("peak_precision"), peak_note=d.get("peak_note") or "",
                   threads=d.get("threads", backend.get("threads")))


def validation_flagged(value: str | None) -> bool:
    """An export kept although its validation failed (``export --accept-mismatch``)."""
    return bool(value) and ("fail" in value or "accept" in value)


def multi_host(rows: list[ModelRow]) -> bool:
    """Whether the rows' records come from more than one machine (then each row names its host)."""
    return len({h for r in rows for h in r.hosts}) > 1


def provider_skips(rows: list[ModelRow]) -> dict[str, str]:
    """Providers measured on no row, with the reason given by the rows that got as far as
    trying them (exported models): provider -> reason. These are properties of the machine
    (e.g. no CUDA), said once instead of per model."""
    measured = {p for r in rows for p in r.latency}
    reasons: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r.onnx_sha256 is None):  # exported rows' reasons first
        for k, v in r.skipped.items():
            if k.startswith("bench:") and k.split(":", 1)[1] not in measured:
                reasons.setdefault(k.split(":", 1)[1], []).append(v)
    return {p: max(set(v), key=v.count) if len(set(v)) > 1 else v[0] for p, v in reasons.items()}


def providers(rows: list[ModelRow]) -> list[str]:
    """Every provider with a latency measured on some row of ``rows``; cpu first, then by name.
    A backend that ran nowhere is no column or series: :func:`provider_skips` says why, once."""
    seen = {p for r in rows for p in r.latency}
    return sorted(seen, key=lambda p: (p != "cpu", p))


def _foreign_dataset(data: dict) -> str | None:
    """The name of an eval record's dataset when its categories are not COCO's (None for COCO data
    and for records written before datasets were named)."""
    dataset = data.get("dataset") or {}
    if dataset.get("coco_categories", True):
        return None
    return str(dataset.get("name") or dataset.get("annotations_file") or "custom data")
