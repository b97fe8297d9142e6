"""A ModelProfile as rows for tools: the CSV (one line per node) and the JSON file.

The JSON is ``ModelProfile.to_dict(nodes=True)``: totals, per-op summary, conventions and
every node; later commands (report) read it. Both files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from counting.analyzer import ModelProfile
from counting.ops import shape_str
from core.files import write_text_atomic

CSV_COLUMNS = ("name", "op_type", "part", "status", "input_shapes", "output_shapes", "macs", "executions",
               "total_macs", "flops", "params", "bytes_read", "bytes_written", "arithmetic_intensity",
               "shape_source", "subgraph", "note")


def node_rows(profile: ModelProfile) -> list[dict]:
    """One dict per node; ``macs`` per execution, ``total_macs`` = macs x executions (0 if not counted)."""
    rows = []
    for n in profile.nodes:
        rows.append({
            "name": n.name, "op_type": n.op_type, "part": n.part, "status": n.status,
            "input_shapes": " ".join(shape_str(s) for _name, s in n.inputs),
            "output_shapes": " ".join(shape_str(s) for _name, s in n.outputs),
            "macs": "" if n.macs is None else n.macs, "executions": n.executions,
            "total_macs": n.total_macs, "flops": 2 * n.total_macs, "params": n.params,
            "bytes_read": "" if n.bytes_read is None else n.bytes_read,
            "bytes_written": "" if n.bytes_written is None else n.bytes_written,
            "arithmetic_intensity": "" if n.intensity is None else round(n.intensity, 4),
            "shape_source": n.shape_source, "subgraph": n.subgraph, "note": n.note,
        })
    return rows


def write_csv(profile: ModelProfile, path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(node_rows(profile))
    return write_text_atomic(path, buf.getvalue(), newline="")


def write_json(profile: ModelProfile, path: Path) -> Path:
    return write_text_atomic(path, json.dumps(profile.to_dict(nodes=True), indent=1, default=str) + "\n")
