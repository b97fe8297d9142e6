"""The report: from the results store (and models.toml's published figures) to a folder of
charts (PNG), a table (CSV + Markdown) and one self-contained HTML page.

``build_report`` is the library entry point (``python cli.py report`` calls it); the
data behind every chart is returned in :class:`ReportResult` so that callers and tests
can check what was drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from report import charts as _charts
from report import claims as _claims
from report.collect import ModelRow, collect
from core import store
from core.errors import ConfigError
from core.paths import results_dir

# (file stem, heading, caption, chart function): the paper's four charts first.
CHARTS = (
    ("map50_per_mparam_vs_gops", "mAP@0.5 per million parameters vs GOps",
     "The paper's main chart: accuracy per parameter against operations; marker area is proportional to MParams. "
     "Hollow markers: published accuracy.", _charts.map50_per_mparam_vs_gops),
    ("map50_per_network", "mAP@0.5 per network", "Hatched bars: published accuracy (models.toml).",
     _charts.map50_per_network),
    ("map50_per_mparam_per_network", "mAP@0.5 per million parameters, per network",
     "mAP@0.5 (%) divided by MParams. Hatched: published accuracy over measured parameters.",
     _charts.map50_per_mparam_per_network),
    ("map50_per_gops_per_network", "mAP@0.5 per GOps, per network",
     "mAP@0.5 (%) divided by GOps (2 x GMACs, whole graph). Hatched: published accuracy over measured operations.",
     _charts.map50_per_gops_per_network),
    ("accuracy_vs_latency", "Accuracy vs measured latency, every (model, backend) pair",
     "Measured p50 latency at batch 1 on each backend against mAP@0.5 measured for that file on that backend, "
     "with the Pareto front over those pairs whose p50 is VALID (no other such pair is both faster and more "
     "accurate). Colour: backend; marker: precision the pair computes in (float32 circle, bf16 square, int8 "
     "triangle); a cross: p50 INVALID (off the front). Only a backend's own COCO evaluation of the file gives a "
     "pair its accuracy; pairs without one are listed under the chart. Grey hollow diamonds: the published mAP "
     "of a float model (models.toml) at its measured cpu p50 — a separate layer, never on the front.",
     _charts.accuracy_vs_latency),
    ("input_size_scaling", "Cost and accuracy against input size",
     "The same network at several input sizes: GOps (2 × GMACs, analyzer), measured p50 latency per backend, "
     "mAP@0.5 measured here (filled) or published (hollow; e.g. YOLOv3 320/416/608 from models.toml); float32 and "
     "int8 files are separate series.", _charts.input_size_scaling),
    ("time_per_op_type", "Time per op type, per backend",
     "The backend's per-layer profile (bench --nodes: onnxruntime node profiling; OpenVINO performance counters "
     "attributed to the ONNX op types they came from) summed per op type, as a share of the layer time; measured, "
     "one bar per model and precision.", _charts.time_per_op_type),
    ("claim_diminishing_returns", "Claim: only diminishing returns from more operations (same architecture)",
     "mAP@0.5 against GOps (2 × GMACs) for one network measured here at several input sizes (filled, solid), beside "
     "the published figures of the same family (hollow, dashed), with the mAP@0.5 points gained per extra GOps "
     "between consecutive sizes.", _claims.diminishing_returns),
    ("claim_per_image_cost", "Claim: two-stage compute grows per proposal, one-stage is constant",
     "Per model, over the images of its per-image record: GOps executed on each image (2 × MACs counted with the "
     "shapes that occurred), latency of one float32 onnxruntime cpu run per image (not a VALID latency figure), and "
     "latency against the number of detections.", _claims.per_image_cost),
)
# charts whose data carries a generated paragraph (``text``) saying what the measurements show
_WORDED = {"claim_diminishing_returns", "claim_per_image_cost"}


@dataclass
class ReportResult:
    """What ``build_report`` wrote, and the data behind each chart (keyed by file stem)."""

    out_dir: Path
    rows: list[ModelRow]
    charts: dict[str, Path] = field(default_factory=dict)
    chart_data: dict[str, Any] = field(default_factory=dict)
    csv: Path | None = None
    markdown: Path | None = None
    html: Path | None = None
    skipped_lines: str | None = None  # the store's lines that are not records, said in words (None: none)


def default_report_dir(root: Path | None = None) -> Path:
    return (root or results_dir()) / "report"


def build_report(out_dir: Path | None = None, *, root: Path | None = None, registry=None,
                 all_registered: bool = False) -> ReportResult:
    """Write the report for the results store under ``root`` (default: the results folder)
    into ``out_dir`` (default ``<root>/report``): ``*.png``, ``table.csv``, ``table.md``,
    ``report.html``. Overwrites earlier files of the same names."""
    from report.html import write_html
    from report.table import write_csv, write_markdown

    out = Path(out_dir) if out_dir else default_report_dir(root)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: the report is several files (charts, table.csv, "
                          "table.md, report.html); give a folder (created when missing)")
    rows = collect(root=root, registry=registry, all_registered=all_registered)
    result = ReportResult(out_dir=out, rows=rows, skipped_lines=store.load(root=root).skipped_note())
    for stem, _heading, _caption, fn in CHARTS:
        path = out / f"{stem}.png"
        result.chart_data[stem] = fn(rows, path)
        result.charts[stem] = path
    result.csv = write_csv(rows, out / "table.csv")
    result.markdown = write_markdown(rows, out / "table.md")
    captions = {s: c + (" " + result.chart_data[s]["text"] if s in _WORDED else "") for s, _h, c, _ in CHARTS}
    result.html = write_html(rows, [(h, result.charts[s], captions[s]) for s, h, _c, _ in CHARTS], out / "report.html")
    return result
