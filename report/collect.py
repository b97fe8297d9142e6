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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import store
from core.contract import PREFIX, RANDOM_INIT

MEASURED = "measured"
PUBLISHED = "published"


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

    @property
    def label(self) -> str:
        h, w = self.input_size
        return self.name if self.in_registry and self.registered_size else f"{self.name} @{h}x{w}"

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
    keys += sorted(k for k in by_key if k[0] not in registry)

    rows = []
    for name, size in keys:
        spec = registry.get(name) if name in registry else None
        rows.append(_row(name, size, spec, by_key.get((name, size), []), manifest))
    return rows


def _row(name: str, size: tuple[int, int], spec, records: list[dict[str, Any]],
         manifest: dict[str, Any]) -> ModelRow:
    row = ModelRow(name=name, input_size=size, in_registry=spec is not None)
    if spec is not None:
        row.family, row.framework, row.paper = spec.family, spec.framework, spec.paper
        row.registered_size = size == spec.input_size
        row.published_gflops = spec.published.get("gflops") if row.registered_size else None
    exports = [r for r in records if r["kind"] == "export"]
    current = _latest(exports) or _latest(records)
    if current is not None:
        row.onnx_sha256 = current.get("model_sha256")
        c = contract_fields(current)
        row.weights = c.get("weights")
        row.family = row.family or c.get("family", "")
        row.framework = row.framework or c.get("framework", "")
        row.host, row.versions = current.get("host") or {}, current.get("versions") or {}
        if c.get("source_params"):
            row.params, row.params_source = int(float(c["source_params"])), "source framework (export metadata)"
    same_file = [r for r in records if r.get("model_sha256") == row.onnx_sha256] if row.onnx_sha256 else []

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

    for rec in same_file:
        if rec["kind"] != "bench" or (rec.get("settings") or {}).get("batch", rec["data"].get("batch", 1)) != 1:
            continue
        lat = rec["data"]["latency_ms"]
        provider = rec.get("provider") or "cpu"
        row.latency[provider] = Latency(provider, float(lat["p50"]), float(lat["mean"]), float(lat["std"]),
                                        int(rec["data"].get("runs", 0)), list(rec["data"].get("providers_ran") or []),
                                        rec["data"].get("nodes"))
        row.host, row.versions = rec.get("host") or row.host, rec.get("versions") or row.versions

    # The largest evaluation of this file wins (a later --quick run over a few images does not
    # replace a full one); among equals, the latest.
    evals = [r for r in same_file if r["kind"] == "eval"]
    evaluation = max(reversed(evals), key=lambda r: r["data"].get("images_evaluated") or 0) if evals else None
    if evaluation is not None and row.random_init is False:
        d = evaluation["data"]
        n = d.get("images_evaluated")
        row.eval_images = n
        where = (f"measured here: {n} COCO val2017 images, annotations sha256 "
                 f"{str(d.get('annotations_sha256', '?'))[:12]}, provider {evaluation.get('provider') or 'cpu'}")
        row.map50 = Accuracy(100.0 * float(d["map50"]), MEASURED, where)
        row.map = Accuracy(100.0 * float(d["map"]), MEASURED, where)
    elif spec is not None and row.registered_size:
        for attr, key in (("map50", "map50"), ("map", "map")):
            pub = spec.published.get(key)
            if pub is not None:
                setattr(row, attr, Accuracy(float(pub.value), PUBLISHED, pub.source))

    attempted = any(e.get("model") == name and tuple(e.get("input_size") or ()) == size
                    for e in manifest.get("entries", {}).values())
    if row.weights is None and not attempted:
        row.skipped["run"] = f"not run here yet (python cli.py run --models {name})"
    if row.map50 is None and row.map is None and row.weights is not None:
        row.skipped["accuracy"] = ("random-init weights (no trained weights here) and models.toml publishes no "
                                   "accuracy for this configuration" if row.random_init else
                                   "trained weights but no COCO evaluation recorded (python cli.py run --coco DIR)")
    for entry in manifest.get("entries", {}).values():
        if entry.get("model") != name or tuple(entry.get("input_size") or ()) != size:
            continue
        if entry.get("status") in ("skipped", "failed"):
            step = entry["step"] + (f":{entry['provider']}" if entry.get("provider") else "")
            row.skipped[step] = f"{entry['status']}: {entry.get('reason', '')}"
    return row


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
    """Every provider measured or attempted in ``rows``; cpu first, then by name."""
    seen = {p for r in rows for p in r.latency}
    seen |= {k.split(":", 1)[1] for r in rows for k in r.skipped if k.startswith("bench:")}
    return sorted(seen, key=lambda p: (p != "cpu", p))
