"""The report's Offline throughput table and Server "QPS at p99 bound" table, one column per backend.

Cells come from each row's latest Offline / Server ``bench`` record per backend
(:attr:`report.collect.ModelRow.offline` / ``server``, written by ``bench --scenario``).
"""

from __future__ import annotations

from typing import Any

from report.collect import ModelRow

OFFLINE_NOTE = ("Offline: images/s with every sample available at once (MLPerf Offline), the best configuration "
                "found over streams x threads per stream x batch (batch only for a batch export, `export NAME --batch`); "
                "per core = images/s / usable cores. VALID needs the sample count and duration the record states "
                "(scaled down from LoadGen's 24,576 samples and 600 s).")
SERVER_NOTE = ("Server: highest QPS of Poisson arrivals (seeded) whose p99 latency, measured from each query's "
               "scheduled arrival (queueing included), stays under the bound; the p99 is LoadGen's early-stopping "
               "estimate from a confirmation run of at least 662 queries (a record judged at another percentile says "
               "which in its cell). '—': no QPS was supported.")


def _backends(rows: list[ModelRow], attr: str) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for b in getattr(r, attr):
            if b not in seen:
                seen.append(b)
    return seen


def offline_cell(d: dict[str, Any]) -> str:
    cfg = d.get("config") or {}
    text = (f"{d['images_per_s']:.2f} img/s ({d['images_per_s_per_core']:.2f}/core; {cfg.get('streams')}s x "
            f"{cfg.get('threads_per_stream')}t x b{cfg.get('batch')})")
    verdict = (d.get("validity") or {}).get("verdict")
    if verdict != "VALID":
        text += " INVALID"
    if d.get("parity_verdict") == "disagree":
        text += " DISAGREES"
    return text


def server_cell(d: dict[str, Any]) -> str:
    cfg = d.get("config") or {}
    if d.get("qps") is None:
        return f"— (bound {d['bound_ms']:.0f} ms: {(d.get('validity') or {}).get('reason', '')})"
    tail = f"p{100 * float(d.get('percentile', 0.99)):g}"  # the percentile the record judged
    text = (f"{d['qps']:.2f} QPS, {tail} {d['tail_ms']:.0f} ≤ {d['bound_ms']:.0f} ms ({cfg.get('streams')}s x "
            f"{cfg.get('threads_per_stream')}t)")
    if d.get("parity_verdict") == "disagree":
        text += " DISAGREES"
    return text


def scenario_tables(rows: list[ModelRow]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """``(title, header, body rows, note)`` for each scenario table that has data."""
    out = []
    for attr, title, cell, note in (("offline", "Offline throughput per backend", offline_cell, OFFLINE_NOTE),
                                    ("server", "QPS at p99 bound per backend (Server)", server_cell, SERVER_NOTE)):
        backends = _backends(rows, attr)
        if not backends:
            continue
        body = [[r.label] + [cell(getattr(r, attr)[b]) if b in getattr(r, attr) else "—" for b in backends]
                for r in rows if getattr(r, attr)]
        out.append((title, ["network"] + backends, body, note))
    return out


def scenario_markdown(rows: list[ModelRow]) -> str:
    lines: list[str] = []
    for title, head, body, note in scenario_tables(rows):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
        lines += ["", note, ""]
    return "\n".join(lines)


def scenario_html(rows: list[ModelRow]) -> list[str]:
    import html

    e = html.escape
    out = []
    for title, head, body, note in scenario_tables(rows):
        out.append(f"<h2>{e(title)}</h2><table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in head)
                   + "</tr></thead><tbody>")
        for line in body:
            out.append("<tr>" + "".join(f'<td{" class=invalid" if "INVALID" in c else ""}>{e(c)}</td>'
                                         for c in line) + "</tr>")
        out.append(f'</tbody></table><p class="note">{e(note)}</p>')
    return out


def offline_vs_single_stream(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per Offline record, its throughput against the same file's SingleStream rate on the same backend
    (1000 / p50 of the newest batch-1 SingleStream record): ``ratio`` = Offline images/s / that rate.
    Offline may use every core through several streams, so it should never fall below one stream's
    rate; a ratio under 1 points at a broken Offline search or a machine whose load changed between
    the two measurements."""
    from report.collect import scenario_of

    single: dict[tuple[Any, Any], dict[str, Any]] = {}
    for rec in records:  # oldest first: the newest wins
        if rec.get("kind") == "bench" and scenario_of(rec) == "single-stream" and \
                (rec.get("settings") or {}).get("batch", (rec.get("data") or {}).get("batch", 1)) == 1:
            single[(rec.get("model_sha256"), rec.get("provider"))] = rec
    out = []
    for rec in records:
        if rec.get("kind") != "bench" or scenario_of(rec) != "offline":
            continue
        ss = single.get((rec.get("model_sha256"), rec.get("provider")))
        if ss is None:
            continue
        p50 = ss["data"]["latency_ms"]["p50"]
        ips = rec["data"]["images_per_s"]
        out.append({"model": rec.get("model"), "provider": rec.get("provider"), "offline_ips": ips,
                    "single_stream_p50_ms": p50, "single_stream_ips": 1000.0 / p50, "ratio": ips * p50 / 1000.0})
    return out
