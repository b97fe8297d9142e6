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
from report.collect import ModelRow, collect
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
    ("accuracy_vs_latency", "Accuracy vs measured latency, per execution provider",
     "p50 latency at batch 1 against mAP@0.5, with the Pareto front (no other model is both faster and more accurate).",
     _charts.accuracy_vs_latency),
    ("input_size_scaling", "Cost and accuracy against input size",
     "The same network at several input sizes: operations grow with the pixel count, latency follows, "
     "accuracy saturates (the diminishing-returns point).", _charts.input_size_scaling),
    ("time_per_op_type", "Time per op type, per execution provider",
     "onnxruntime's node profiling summed per op type (bench --nodes).", _charts.time_per_op_type),
)


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
    rows = collect(root=root, registry=registry, all_registered=all_registered)
    result = ReportResult(out_dir=out, rows=rows)
    for stem, _heading, _caption, fn in CHARTS:
        path = out / f"{stem}.png"
        result.chart_data[stem] = fn(rows, path)
        result.charts[stem] = path
    result.csv = write_csv(rows, out / "table.csv")
    result.markdown = write_markdown(rows, out / "table.md")
    result.html = write_html(rows, [(h, result.charts[s], c) for s, h, c, _ in CHARTS], out / "report.html")
    return result
