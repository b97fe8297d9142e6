"""The report's table: one line per configuration, as CSV (for tools) and Markdown.

Numbers are written unrounded in the CSV and rounded for reading in Markdown; every
accuracy says whether it was measured here or published (and where); every cost says
its convention (column names); latencies are p50 per execution provider, or the reason
the provider was skipped.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from report.collect import (AGREEING, REFERENCE_BACKEND, ModelRow, multi_host, provider_skips, providers,
                            validation_flagged)

GOPS_COLUMN = "GOps (2xMACs, all ops)"
# The accuracy of a (file, backend) pair is only ever its own evaluation: this column lists them;
# a backend absent from it has no accuracy for this file (the published figure is the float model's).
MEASURED_PER_BACKEND_COLUMN = "mAP@0.5 measured per backend (%)"
CONV_GOPS_COLUMN = "GOps conv-only (Darknet BFLOPs convention)"


# What CommonMark reads as markup: a "<" opening a tag, comment or declaration, an "&" opening
# an entity, "_" at a word's edge (inside a word it is literal, as in model names), a "]" that
# would close a link's text (before "(", "[" or ":"; the tables' own "[1]" source markers stay
# as they are), and backslash, code, emphasis and table-cell characters anywhere.
_MARKDOWN_MARKUP = re.compile(r"<(?=[A-Za-z/!?])|&(?=[A-Za-z#])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|\](?=[(\[:])"
                             r"|[\\`*|]")
_HTML_ENTITIES = {"<": "&lt;", "&": "&amp;"}


def md_text(value: Any) -> str:
    """``value`` as literal Markdown text: what could open an HTML tag or entity escaped as the
    HTML report escapes it, Markdown's own syntax backslash-escaped, so a model name or a reason
    from the store is shown as typed and never runs as markup."""
    return _MARKDOWN_MARKUP.sub(lambda m: _HTML_ENTITIES.get(m.group(), "\\" + m.group()), str(value))


def _weights(row: ModelRow) -> str:
    if row.weights is None:
        return "not exported here"
    return "random-init" if row.random_init else "trained " + row.weights[: len("sha256:") + 12]


def columns(rows: list[ModelRow]) -> list[str]:
    cols = ["network", "paper", "input HxW", "weights", "MParams", "params source", GOPS_COLUMN, CONV_GOPS_COLUMN,
            "profile shapes", "published GOps (source convention)", "mAP@0.5 (%)", "mAP@0.5 status", "mAP@0.5 source",
            "mAP@[.5:.95] (%)", "mAP@[.5:.95] status", "mAP@[.5:.95] source", "eval images",
            MEASURED_PER_BACKEND_COLUMN]
    cols += [f"p50 latency {p} (ms)" for p in providers(rows)]
    cols += [f"p50 verdict {p}" for p in providers(rows)]
    cols += [f"parity {p}" for p in providers(rows)]
    cols += ["precision", "export validation", "structure warnings", "not measured (reasons)", "onnx sha256",
             "host", "versions"]
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
            MEASURED_PER_BACKEND_COLUMN: "; ".join(
                f"{p} {acc.value:.2f} ({basis.split('(', 1)[-1].rstrip(')')})"
                for p in sorted(r.evals, key=lambda p: (p != REFERENCE_BACKEND, p))
                for acc, _m, basis in [r.accuracy_on(p)] if acc is not None) or None,
        }
        for key, acc in (("mAP@0.5", r.map50), ("mAP@[.5:.95]", r.map)):
            line[f"{key} (%)"] = acc.value if acc else None
            line[f"{key} status"] = acc.status if acc else None
            line[f"{key} source"] = acc.source if acc else None
        for p in providers(rows):
            lat = r.latency.get(p)
            line[f"p50 latency {p} (ms)"] = lat.p50_ms if lat else None
            line[f"p50 verdict {p}"] = (f"{lat.verdict}" + (f" ({lat.verdict_reason})" if lat.verdict_reason else "")
                                        if lat and lat.verdict else None)
            line[f"parity {p}"] = lat.parity_verdict if lat else None
        line["precision"] = r.precision
        line["export validation"] = r.validation
        line["structure warnings"] = "; ".join(r.structure_warnings) or None
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
    if any(validation_flagged(r.validation) or r.structure_warnings for r in rows):
        cols.append(("export validation", None))
    if multi_host(rows):
        cols.append(("host", None))
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
                if rows[len(out)].dataset is not None:
                    cells[f"{key} (%)"] += f" on {rows[len(out)].dataset}"
        cells["network"] += " *" if line["paper"] else ""
        row = rows[len(out)]
        for p in providers(rows):
            why = row.skipped.get(f"bench:{p}", "")
            lat = row.latency.get(p)
            if lat is None and why:
                cells[f"p50 latency {p} (ms)"] = why.split(":", 1)[0]  # "skipped" / "failed"
            elif lat is not None:
                cells[f"p50 latency {p} (ms)"] += latency_marks(lat)
        if "export validation" in cells:
            cells["export validation"] = "; ".join(
                x for x in [row.validation if validation_flagged(row.validation) else "",
                            f"{len(row.structure_warnings)} structure warning(s)" if row.structure_warnings else ""]
                if x) or "—"
        if "host" in cells:
            cells["host"] = ", ".join(row.hosts) or "—"
        machine = provider_skips(rows)
        cells["_notes"] = "; ".join(f"{k}: {' '.join(v.split())}" for k, v in sorted(row.skipped.items())
                                    if not (k.startswith("bench:") and k.split(":", 1)[1] in machine))
        out.append(cells)
    return out, sources


def latency_marks(lat) -> str:
    """Short marks after a p50: INVALID (reasons in the latency table's notes), DISAGREES
    (outputs outside the tolerance of onnxruntime CPU's), parity unchecked, bf16."""
    marks = []
    if lat.verdict == "INVALID":
        marks.append("INVALID")
    if lat.disagrees:
        marks.append("DISAGREES with cpu")
    elif lat.provider != REFERENCE_BACKEND and lat.parity_verdict not in AGREEING and lat.parity_verdict:
        marks.append(f"parity {lat.parity_verdict}")
    return (" (" + ", ".join(marks) + ")") if marks else ""


# --------------------------------------------------------------------------- latency per backend

def backend_latency(rows: list[ModelRow]) -> dict[str, Any]:
    """Per row with a latency, per backend: p50, its ratio to onnxruntime CPU, the p50 verdict,
    parity. The ratio is the bench record's own (measured side by side in one process) when it
    has one, else the two records' p50s divided ("separate runs").

    Returns ``{"backends": [...], "rows": [{"network", "host", "cells": {backend: {"p50_ms",
    "ratio", "ratio_basis", "verdict", "reason", "note", "n", "rsd", "precision", "parity",
    "parity_figures", "cold_start"}}}], "notes": [verdict reasons, numbered from 1]}``.
    """
    backends = [p for p in providers(rows) if any(p in r.latency for r in rows)]
    notes: list[str] = []
    out = []
    for r in rows:
        if not r.latency:
            continue
        cpu = r.latency.get(REFERENCE_BACKEND)
        cells = {}
        for p in backends:
            lat = r.latency.get(p)
            if lat is None:
                continue
            if p == REFERENCE_BACKEND:
                ratio, basis = 1.0, "reference"
            elif lat.ratio_to_cpu is not None:
                ratio, basis = float(lat.ratio_to_cpu), "side by side"
            elif cpu is not None and cpu.p50_ms:
                ratio, basis = lat.p50_ms / cpu.p50_ms, "separate runs"
            else:
                ratio, basis = None, "no cpu run"
            note = None
            if lat.verdict == "INVALID":
                reason = lat.verdict_reason or "no reason recorded"
                if reason not in notes:
                    notes.append(reason)
                note = notes.index(reason) + 1
            par = lat.parity or {}
            box = par.get("max_abs_box", par.get("max_box_px"))
            score = par.get("max_abs_score", par.get("max_score"))
            figures = None
            if par:
                figures = (f"{par.get('matched', '?')}/{par.get('total', '?')} matched, max |box| "
                           f"{'n/a' if box is None else format(box, '.2g')} px, max |score| "
                           f"{'n/a' if score is None else format(score, '.2g')}")
            cells[p] = {"p90_ms": lat.p90_ms, "fraction_of_peak": lat.fraction_of_peak,
                        "peak_precision": lat.peak_precision, "peak_note": lat.peak_note, "threads": lat.threads,
                        "p50_ms": lat.p50_ms, "ratio": ratio, "ratio_basis": basis, "verdict": lat.verdict,
                        "reason": lat.verdict_reason, "note": note, "n": lat.n, "rsd": lat.rsd,
                        "precision": lat.precision, "parity": lat.parity_verdict, "parity_figures": figures,
                        "cold_start": lat.cold_start, "host": lat.hostname}
        out.append({"network": r.label, "host": ", ".join(r.hosts), "cells": cells})
    return {"backends": backends, "rows": out, "notes": notes}


def backend_cell_text(cell: dict[str, Any]) -> str:
    text = f"{cell['p50_ms']:.1f} ms"
    if cell["ratio"] is not None and cell["ratio_basis"] != "reference":
        text += f" ×{cell['ratio']:.2f}" + ("" if cell["ratio_basis"] == "side by side" else " (separate runs)")
    if cell["verdict"]:
        text += f" {'✓' if cell['verdict'] == 'VALID' else '✗'}" + (f"[{cell['note']}]" if cell["note"] else "")
    if cell.get("p90_ms") is not None:
        text += f"; p90 {cell['p90_ms']:.1f} ms ✓"
    if cell.get("fraction_of_peak") is not None:
        text += f"; {100 * cell['fraction_of_peak']:.0f} % of {cell.get('peak_precision') or 'fp32'} peak"
    elif cell.get("peak_precision") and cell.get("peak_note"):
        text += f"; {cell['peak_precision']} peak: {cell['peak_note']}"
    if cell["parity"] == "disagree":
        text += " DISAGREES with cpu"
    elif cell["parity"] not in (None, "reference", "agree"):
        text += f" parity {cell['parity']}"
    if cell["precision"] and cell["precision"] not in ("f32", "float32", "fp32"):
        text += f" [{cell['precision']}]"
    return text


BACKEND_LATENCY_NOTE = ("p50 latency at batch 1 per backend (only backends that ran here are columns); ×R = p50 / "
                        "onnxruntime cpu p50, measured side by side in one process with the backends alternating, "
                        "unless marked (separate runs). ✓ p50 VALID, ✗[n] p50 INVALID with reason n (p50's own rule, "
                        "runtime.stats: 11 runs, 1 s, the median's 95 % interval within ±5 %); p90 is shown only where "
                        "its own rule (64 runs, 10 s, LoadGen early-stopping estimate) holds. '% of P peak': achieved "
                        "ops (2 × MACs / p50) over this machine's measured peak of the row's own precision P (fp32 "
                        "SGEMM/conv, int8 MLAS integer kernels; bf16 only where the CPU has a bf16 unit). DISAGREES with cpu: "
                        "the backend's detections are outside the stated tolerance of onnxruntime cpu's (parity on "
                        "real COCO images): its time is not that of an equivalent computation. [bf16]: the "
                        "precision the backend computed in, when not float32.")


def backend_latency_markdown(rows: list[ModelRow]) -> str:
    data = backend_latency(rows)
    if not data["rows"]:
        return "No latency measured yet.\n"
    show_host = multi_host(rows)
    cols = ["network"] + (["host"] if show_host else []) + data["backends"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for line in data["rows"]:
        cells = [line["network"]] + ([line["host"]] if show_host else [])
        cells += [backend_cell_text(line["cells"][b]) if b in line["cells"] else "—" for b in data["backends"]]
        lines.append("| " + " | ".join(md_text(c) for c in cells) + " |")
    lines += ["", BACKEND_LATENCY_NOTE]
    if data["notes"]:
        lines += ["", "INVALID because:", ""] + [f"{i}. {md_text(n)}" for i, n in enumerate(data["notes"], 1)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- int8 against float32

def _same_image_evals(f: ModelRow, q: ModelRow, backend: str):
    """(float eval, int8 eval, same images?) on ``backend``: the int8 file's largest evaluation,
    and the float file's evaluation on the same image ids when one exists, else its largest."""
    ev_q = q.evals.get(backend)
    if ev_q is None:
        return f.evals.get(backend), None, None
    if ev_q.image_ids:
        for ev in reversed(f.eval_list):
            if ev.provider == backend and ev.image_ids == ev_q.image_ids:
                return ev, ev_q, True
    ev_f = f.evals.get(backend)
    if ev_f is None:
        return None, ev_q, None
    same = (ev_f.image_ids == ev_q.image_ids) if ev_f.image_ids and ev_q.image_ids else None
    return ev_f, ev_q, same


def int8_rows(rows: list[ModelRow]) -> list[dict[str, Any]]:
    """Per quantized row and backend where both it and its float32 model (same name without
    ``@int8``, same input size) have a p50: the two p50s, speed-up = float p50 / int8 p50, the
    change of mAP@0.5 and mAP@[.5:.95] (in points, int8 - float) from evaluations on that backend
    (else on cpu), with the image counts and whether the images are the same, the GOps (MACs are
    unchanged by quantization: both shown) and the weight/file bytes of both."""
    by_key = {(r.name, r.input_size): r for r in rows}
    out = []
    for q in rows:
        if not q.quantized:
            continue
        f = by_key.get((q.base_name, q.input_size))
        if f is None:
            continue
        for backend in [p for p in providers(rows) if p in q.latency and p in f.latency]:
            lf, lq = f.latency[backend], q.latency[backend]
            line: dict[str, Any] = {
                "float": f.label, "int8": q.label, "backend": backend, "precision": q.precision,
                "float_p50_ms": lf.p50_ms, "int8_p50_ms": lq.p50_ms, "speedup": lf.p50_ms / lq.p50_ms,
                "float_verdict": lf.verdict, "int8_verdict": lq.verdict, "int8_parity": lq.parity_verdict,
                "float_gops": f.gops, "int8_gops": q.gops, "float_weight_bytes": f.weight_bytes,
                "int8_weight_bytes": q.weight_bytes, "float_file_bytes": f.file_bytes, "int8_file_bytes": q.file_bytes,
                "calibration": q.calibration, "map50_float": None, "map50_int8": None, "d_map50": None,
                "map_float": None, "map_int8": None, "d_map": None, "images_float": None, "images_int8": None,
                "same_images": None, "eval_backend": None,
            }
            line["kept_float"] = q.kept_float
            if q.random_init or f.random_init:
                line["accuracy_note"] = "accuracy of random weights not measured"
            else:
                eval_backend = backend if backend in q.evals else REFERENCE_BACKEND
                ev_f, ev_q, same = _same_image_evals(f, q, eval_backend)
                if ev_f is not None and ev_q is not None:
                    line.update(map50_float=ev_f.map50, map50_int8=ev_q.map50, d_map50=ev_q.map50 - ev_f.map50,
                                map_float=ev_f.map, map_int8=ev_q.map, d_map=ev_q.map - ev_f.map,
                                images_float=ev_f.images, images_int8=ev_q.images, same_images=same,
                                eval_backend=eval_backend)
                    where = {True: "the same images", False: "different images",
                             None: "image sets not recorded, may differ"}[same]
                    line["accuracy_note"] = (f"evaluated on {eval_backend}: float {ev_f.images} images, int8 "
                                             f"{ev_q.images} images ({where}; int8 images exclude its calibration "
                                             "and selection images)")
                    if same and ev_f.record and ev_q.record:
                        from report.compare import accuracy_intervals

                        intervals, why = accuracy_intervals(ev_f.record, ev_q.record, {"image_ids": ev_q.image_ids})
                        line["intervals"] = intervals
                        line["accuracy_note"] += "; " + ("; ".join(
                            f"{'mAP@0.5' if m == 'map50' else 'mAP@[.5:.95]'} 95 % paired bootstrap interval "
                            f"[{c['low']:+.2f}, {c['high']:+.2f}]" + (" (within the noise)" if c["within_noise"] else "")
                            for m, c in intervals.items()) if intervals else why)
                else:
                    line["accuracy_note"] = (f"no evaluation of {'the int8 file' if ev_q is None else 'the float file'}"
                                             f" on {eval_backend} yet")
            out.append(line)
    return out


def _mb(v) -> str:
    return "—" if v is None else f"{v / 1e6:.2f}"


INT8_COLUMNS = ("int8 model", "backend", "float32 p50 (ms)", "int8 p50 (ms)", "speed-up",
                "mAP@0.5 float → int8 (Δ)", "mAP@[.5:.95] float → int8 (Δ)", "accuracy basis",
                "layers kept float (accuracy budget)", "GOps float / int8",
                "weight MB float / int8", "file MB float / int8")


def int8_cells(d: dict[str, Any]) -> list[str]:
    """One :func:`int8_rows` entry as text cells in :data:`INT8_COLUMNS` order."""
    def acc(a, b, delta):
        return "—" if delta is None else f"{a:.1f} → {b:.1f} ({delta:+.2f})"

    valid = d["int8_verdict"] in (None, "VALID") and d["float_verdict"] in (None, "VALID")
    return [d["int8"], d["backend"], f"{d['float_p50_ms']:.1f}", f"{d['int8_p50_ms']:.1f}",
            f"{d['speedup']:.2f}x" + ("" if valid else " (INVALID p50)")
            + (" DISAGREES with cpu" if d["int8_parity"] == "disagree" else ""),
            acc(d["map50_float"], d["map50_int8"], d["d_map50"]), acc(d["map_float"], d["map_int8"], d["d_map"]),
            d["accuracy_note"],
            "—" if d.get("kept_float") is None else (", ".join(d["kept_float"]) or "none"),
            f"{_fmt(d['float_gops'], 2)} / {_fmt(d['int8_gops'], 2)}",
            f"{_mb(d['float_weight_bytes'])} / {_mb(d['int8_weight_bytes'])}",
            f"{_mb(d['float_file_bytes'])} / {_mb(d['int8_file_bytes'])}"]


def int8_markdown(rows: list[ModelRow]) -> str:
    data = int8_rows(rows)
    if not data:
        return "No quantized model measured beside its float32 model yet.\n"
    lines = ["| " + " | ".join(INT8_COLUMNS) + " |", "|" + "|".join("---" for _ in INT8_COLUMNS) + "|"]
    lines += ["| " + " | ".join(md_text(c) for c in int8_cells(d)) + " |" for d in data]
    lines += ["", INT8_NOTE]
    return "\n".join(lines) + "\n"


INT8_NOTE = ("Speed-up = float32 p50 / int8 p50 on the same backend (batch 1, separate bench records). Δ = int8 − "
             "float32 in mAP points, measured here; a quantized file never gets a published accuracy. GOps = 2 × "
             "GMACs: quantization leaves the operations unchanged and shrinks the weights, so both are shown. "
             "Weight MB: the profile's weight bytes; file MB: the ONNX file.")


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
    lines += ["| " + " | ".join(md_text(c[col]) for col in cols) + " |" for c in cells]
    lines += ["", "`*` a configuration of Sheik, Chaurasia & Culurciello (2018). GOps = GFLOPs = 2 x GMACs counted by "
              "the analyzer; 'all ops' is every counted node of the exported graph, 'conv-only' the convolutions alone "
              "(Darknet's BFLOPs). MParams: trainable parameters / 1e6. Latency: p50 over the bench runs, batch 1. "
              "*measured* = here, with trained weights; *published* = models.toml (the model has no trained weights "
              "here, its export is random-init and only its cost is measured).", "", "Accuracy sources:", ""]
    lines += [f"{i}. {md_text(s)}" for i, s in enumerate(sources, 1)]
    notes = [(c["network"], c["_notes"]) for c in cells if c["_notes"]]
    machine = provider_skips(rows)
    if notes or machine:
        lines += ["", "Not measured, and why:", ""] + [f"- provider {md_text(p)} (every model): {md_text(why)}"
                                                        for p, why in machine.items()]
        lines += [f"- {md_text(n)}: {md_text(why)}" for n, why in notes]
    lines += ["", "## Latency per backend", "", backend_latency_markdown(rows)]
    lines += ["## INT8 against float32", "", int8_markdown(rows)]
    from report.scenario_tables import scenario_markdown

    lines += [scenario_markdown(rows)]
    from report.claims import diminishing_returns_data, per_image_data

    lines += ["## The seed's claims, measured", "",
              "**Only diminishing returns in accuracy come from more operations on the same architecture.** "
              + diminishing_returns_data(rows)["text"], "",
              "**Two-stage detectors spend compute per proposal; one-stage compute is constant whatever the image.** "
              + per_image_data(rows)["text"], ""]
    lines += ["", "Host and versions:", ""]
    for h in hosts(rows):
        versions = ", ".join(f"{k} {v}" for k, v in sorted(h["versions"].items()))
        lines.append(md_text(f"{h['host'].get('hostname')} — {h['host'].get('cpu')}, {h['host'].get('cores')} cores, "
                             f"{h['host'].get('system')}, Python {h['host'].get('python')}; {versions} "
                             f"(models: {', '.join(h['models'])})").join(("- ", "")))
    return "\n".join(lines) + "\n"


def write_markdown(rows: list[ModelRow], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(rows), encoding="utf-8")
    return path
