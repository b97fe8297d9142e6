"""The report's table: one line per configuration, as CSV (for tools) and Markdown.

Numbers are written unrounded in the CSV and rounded for reading in Markdown; every
accuracy says whether it was measured here or published (and where); every cost says
its convention (column names); latencies are p50 per execution provider, or the reason
the provider was skipped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from report.collect import ModelRow, provider_skips, providers

GOPS_COLUMN = "GOps (2xMACs, all ops)"
CONV_GOPS_COLUMN = "GOps conv-only (Darknet BFLOPs convention)"


def _weights(row: ModelRow) -> str:
    if row.weights is None:
        return "not exported here"
    return "random-init" if row.random_init else "trained " + row.weights[: len("sha256:") + 12]


def columns(rows: list[ModelRow]) -> list[str]:
    cols = ["network", "paper", "input HxW", "weights", "MParams", "params source", GOPS_COLUMN, CONV_GOPS_COLUMN,
            "profile shapes", "published GOps (source convention)", "mAP@0.5 (%)", "mAP@0.5 status", "mAP@0.5 source",
            "mAP@[.5:.95] (%)", "mAP@[.5:.95] status", "mAP@[.5:.95] source", "eval images"]
    cols += [f"p50 latency {p} (ms)" for p in providers(rows)]
    cols += ["not measured (reasons)", "onnx sha256", "host", "versions"]
    return cols


def table_rows(rows: list[ModelRow]) -> list[dict[str, Any]]:
    """The table as dicts keyed by :func:`columns` (raw numbers; None where absent)."""
    out = []
    for r in rows:
        line: dict[str, Any] = {
            "network": r.label, "paper": "yes" if r.paper else "", "input HxW": f"{r.input_size[0]}x{r.input_size[1]}",
            "weights": _weights(r), "MParams": r.mparams, "params source": r.params_source or None,
            GOPS_COLUMN: r.gops, CONV_GOPS_COLUMN: r.conv_gops, "profile shapes": r.profile_mode,
            "published GOps (source convention)": (f"{r.published_gflops.value:g} ({r.published_gflops.convention}; "
                                                   f"{r.published_gflops.source})" if r.published_gflops else None),
            "eval images": r.eval_images, "onnx sha256": r.onnx_sha256,
        }
        for key, acc in (("mAP@0.5", r.map50), ("mAP@[.5:.95]", r.map)):
            line[f"{key} (%)"] = acc.value if acc else None
            line[f"{key} status"] = acc.status if acc else None
            line[f"{key} source"] = acc.source if acc else None
        for p in providers(rows):
            lat = r.latency.get(p)
            line[f"p50 latency {p} (ms)"] = lat.p50_ms if lat else None
        line["not measured (reasons)"] = "; ".join(f"{k}: {v}" for k, v in sorted(r.skipped.items())) or None
        line["host"] = (f"{r.host.get('hostname', '?')} ({r.host.get('cpu', '?')}, {r.host.get('cores', '?')} cores)"
                        if r.host else None)
        line["versions"] = json.dumps(r.versions, sort_keys=True) if r.versions else None
        out.append(line)
    return out


def write_csv(rows: list[ModelRow], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for line in table_rows(rows):
            writer.writerow({k: ("" if v is None else v) for k, v in line.items()})
    return path


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# Columns shown in the Markdown/HTML view, with their rounding (None = as text).
def display_columns(rows: list[ModelRow]) -> list[tuple[str, int | None]]:
    cols = [("network", None), ("input HxW", None), ("weights", None), ("MParams", 2), (GOPS_COLUMN, 2),
            (CONV_GOPS_COLUMN, 2), ("mAP@0.5 (%)", 1), ("mAP@[.5:.95] (%)", 1)]
    cols += [(f"p50 latency {p} (ms)", 1) for p in providers(rows)]
    return cols


def display_rows(rows: list[ModelRow]) -> tuple[list[dict[str, str]], list[str]]:
    """The table as text cells (accuracy marked measured/published with a footnote number) and the
    footnotes: the accuracy sources, numbered from 1."""
    out = []
    sources: list[str] = []
    for line in table_rows(rows):
        cells = {}
        for col, digits in display_columns(rows):
            cells[col] = _fmt(line[col], digits if digits is not None else 0)
        for key in ("mAP@0.5", "mAP@[.5:.95]"):
            if line[f"{key} (%)"] is not None:
                src = line[f"{key} source"]
                if src not in sources:
                    sources.append(src)
                cells[f"{key} (%)"] += f" {line[f'{key} status']} [{sources.index(src) + 1}]"
        cells["network"] += " *" if line["paper"] else ""
        row = rows[len(out)]
        for p in providers(rows):
            why = row.skipped.get(f"bench:{p}", "")
            if p not in row.latency and why:
                cells[f"p50 latency {p} (ms)"] = why.split(":", 1)[0]  # "skipped" / "failed"
        machine = provider_skips(rows)
        cells["_notes"] = "; ".join(f"{k}: {' '.join(v.split())}" for k, v in sorted(row.skipped.items())
                                    if not (k.startswith("bench:") and k.split(":", 1)[1] in machine))
        out.append(cells)
    return out, sources


def hosts(rows: list[ModelRow]) -> list[dict[str, Any]]:
    """Distinct (host, versions) pairs the rows were measured with."""
    seen, out = set(), []
    for r in rows:
        if not r.host:
            continue
        key = json.dumps([r.host, r.versions], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({"host": r.host, "versions": r.versions, "models": [x.label for x in rows
                                                                            if json.dumps([x.host, x.versions], sort_keys=True) == key]})
    return out


def markdown(rows: list[ModelRow]) -> str:
    cols = [c for c, _ in display_columns(rows)]
    cells, sources = display_rows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(c[col].replace("|", "\\|") for col in cols) + " |" for c in cells]
    lines += ["", "`*` a configuration of Sheik, Chaurasia & Culurciello (2018). GOps = GFLOPs = 2 x GMACs counted by "
              "the analyzer; 'all ops' is every counted node of the exported graph, 'conv-only' the convolutions alone "
              "(Darknet's BFLOPs). MParams: trainable parameters / 1e6. Latency: p50 over the bench runs, batch 1. "
              "*measured* = here, with trained weights; *published* = models.toml (the model has no trained weights "
              "here, its export is random-init and only its cost is measured).", "", "Accuracy sources:", ""]
    lines += [f"{i}. {s}" for i, s in enumerate(sources, 1)]
    notes = [(c["network"], c["_notes"]) for c in cells if c["_notes"]]
    machine = provider_skips(rows)
    if notes or machine:
        lines += ["", "Not measured, and why:", ""] + [f"- provider {p} (every model): {why}" for p, why in machine.items()]
        lines += [f"- {n}: {why}" for n, why in notes]
    lines += ["", "Host and versions:", ""]
    for h in hosts(rows):
        versions = ", ".join(f"{k} {v}" for k, v in sorted(h["versions"].items()))
        lines.append(f"- {h['host'].get('hostname')} — {h['host'].get('cpu')}, {h['host'].get('cores')} cores, "
                     f"{h['host'].get('system')}, Python {h['host'].get('python')}; {versions} "
                     f"(models: {', '.join(h['models'])})")
    return "\n".join(lines) + "\n"


def write_markdown(rows: list[ModelRow], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(rows), encoding="utf-8")
    return path
