"""One self-contained HTML page: the charts embedded as base64 PNG, and the table.

The page loads nothing from the network or the disk. A few lines of inline script
check that every chart decoded (``console.error`` otherwise) and record the count in
``<body data-charts-decoded=N>``, which the browser test reads.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from pathlib import Path

from report.collect import ModelRow, multi_host, provider_skips
from report.table import (BACKEND_LATENCY_NOTE, INT8_COLUMNS, INT8_NOTE, backend_cell_text, backend_latency,
                          display_columns, display_rows, hosts, int8_cells, int8_rows)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; white-space: nowrap; }
.note { color: #555; font-size: 0.9em; } td.published { color: #666; font-style: italic; } .notes li { font-size: 0.85em; }
td.disagree { background: #fde2e2; font-weight: bold; } td.invalid { color: #a33; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.chart'), ok = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; }
    else { console.error('chart did not decode: ' + img.alt); }
  });
  document.body.setAttribute('data-charts-decoded', String(ok));
  document.body.setAttribute('data-charts-total', String(imgs.length));
});
"""


def render(rows: list[ModelRow], charts: list[tuple[str, Path, str]], *, title: str = "detbench report") -> str:
    """The page as a string. ``charts``: (heading, PNG path, caption) in display order."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             f'<p class="note">Generated {e(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))} from '
             "the detbench results store. Accuracy is <b>measured</b> here (trained weights, COCO val2017 images) or "
             "<b>published</b> (models.toml, for models without trained weights here: drawn hollow or hatched). "
             "GOps = GFLOPs = 2 × GMACs counted by the analyzer over the whole exported graph.</p>"]
    for heading, path, caption in charts:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<h2>{e(heading)}</h2><figure><img class=\"chart\" alt=\"{e(heading)}\" "
                     f"src=\"data:image/png;base64,{data}\"><figcaption>{e(caption)}</figcaption></figure>")
    cols = [c for c, _ in display_columns(rows)]
    cells, sources = display_rows(rows)
    parts.append('<h2>Table</h2><table id="main-table"><thead><tr>' + "".join(f"<th>{e(c)}</th>" for c in cols)
                 + "</tr></thead><tbody>")
    for c in cells:
        tds = []
        for col in cols:
            marked = (' class="disagree"' if "DISAGREES" in c[col] else ' class="invalid"' if "INVALID" in c[col]
                      else ' class="published"' if " published [" in c[col] else "")
            tds.append(f"<td{marked}>{e(c[col])}</td>")
        parts.append("<tr>" + "".join(tds) + "</tr>")
    parts.append("</tbody></table>")
    parts.append('<p class="note">* a configuration of Sheik, Chaurasia &amp; Culurciello (2018). Conv-only GOps: '
                 "Darknet's BFLOPs convention. Latency: p50, batch 1.</p>")
    parts += _backend_latency_html(rows) + _int8_html(rows)
    from report.scenario_tables import scenario_html

    parts += scenario_html(rows)
    parts.append("<h2>Accuracy sources</h2><ol class=\"notes\">" + "".join(f"<li>{e(s)}</li>" for s in sources) + "</ol>")
    notes = [(c["network"], c["_notes"]) for c in cells if c["_notes"]]
    machine = provider_skips(rows)
    if notes or machine:
        parts.append("<h2>Not measured, and why</h2><ul class=\"notes\">"
                     + "".join(f"<li><b>provider {e(p)}</b> (every model): {e(why)}</li>" for p, why in machine.items())
                     + "".join(f"<li><b>{e(n)}</b>: {e(why)}</li>" for n, why in notes) + "</ul>")
    parts.append("<h2>Host and versions</h2><ul class=\"notes\">")
    for h in hosts(rows):
        versions = ", ".join(f"{k} {v}" for k, v in sorted(h["versions"].items()))
        parts.append(f"<li>{e(str(h['host'].get('hostname')))} — {e(str(h['host'].get('cpu')))}, "
                     f"{e(str(h['host'].get('cores')))} cores, {e(str(h['host'].get('system')))}; {e(versions)} "
                     f"(models: {e(', '.join(h['models']))})</li>")
    parts.append("</ul>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _backend_latency_html(rows: list[ModelRow]) -> list[str]:
    e = html.escape
    data = backend_latency(rows)
    if not data["rows"]:
        return []
    show_host = multi_host(rows)
    head = ["network"] + (["host"] if show_host else []) + data["backends"]
    out = ['<h2>Latency per backend</h2><table id="backend-latency"><thead><tr>'
           + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr></thead><tbody>"]
    for line in data["rows"]:
        tds = [f"<td>{e(line['network'])}</td>"] + ([f"<td>{e(line['host'])}</td>"] if show_host else [])
        for b in data["backends"]:
            cell = line["cells"].get(b)
            if cell is None:
                tds.append("<td>—</td>")
                continue
            cls = ' class="disagree"' if cell["parity"] == "disagree" else \
                ' class="invalid"' if cell["verdict"] == "INVALID" else ""
            title = f' title="parity: {e(cell["parity_figures"])}"' if cell["parity_figures"] else ""
            tds.append(f"<td{cls}{title}>{e(backend_cell_text(cell))}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append(f'</tbody></table><p class="note">{e(BACKEND_LATENCY_NOTE)}</p>')
    if data["notes"]:
        out.append('<p class="note">INVALID because:</p><ol class="notes">'
                   + "".join(f"<li>{e(n)}</li>" for n in data["notes"]) + "</ol>")
    return out


def _int8_html(rows: list[ModelRow]) -> list[str]:
    e = html.escape
    data = int8_rows(rows)
    if not data:
        return []
    out = ['<h2>INT8 against float32</h2><table id="int8"><thead><tr>'
           + "".join(f"<th>{e(c)}</th>" for c in INT8_COLUMNS) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in int8_cells(d)) + "</tr>" for d in data]
    out.append(f'</tbody></table><p class="note">{e(INT8_NOTE)}</p>')
    return out


def write_html(rows: list[ModelRow], charts: list[tuple[str, Path, str]], path: Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(rows, charts, **kwargs), encoding="utf-8")
    return path
