"""Rich renderers for the terminal: what `bench` and `backends` print (cli.py only calls them).

They take the library's result objects (duck-typed: nothing here imports the runtime) and a
``rich.console.Console``.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table


def _table(title: str, cols: list[str], left: int = 2) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
              padding=(0, 1), collapse_padding=True)
    for i, col in enumerate(cols):
        t.add_column(col, justify="left" if i < left else "right", no_wrap=True)
    return t


def render_backends(console, rows) -> None:
    """``rows``: (name, description, ok, reason) per registered backend."""
    table = Table(title="backends (names for --provider/-p)", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, padding=(0, 1))
    table.add_column("name", no_wrap=True, min_width=13)
    table.add_column("runs here", no_wrap=True)
    table.add_column("what")
    for name, description, ok, _reason in rows:
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", description)
    console.print(table)
    for name, _description, ok, reason in rows:
        if not ok:
            lines = reason.splitlines()
            fix = next((ln for ln in lines if ln.startswith("To run on it")), "")
            console.print(f"[red]{name}[/]: {lines[0]}" + (f" {fix}" if fix else ""), highlight=False,
                          soft_wrap=True)


def _label(r) -> str:
    return r.model + ("*" if r.contract.get("detbench.weights") == "random-init" else "")


def _ran(r) -> str:
    name = r.providers_ran[0].removesuffix("ExecutionProvider")
    return f"[red]{name} (asked {r.provider})[/]" if r.fell_back else name


def _parity_cell(r) -> str:
    verdict = r.parity_verdict
    if verdict == "reference":
        return "reference"
    if verdict == "unchecked":
        return "[yellow]unchecked[/]"
    colour = "green" if verdict == "agree" else "bold red"
    return f"[{colour}]{verdict}[/] {r.parity['matched']}/{r.parity['total']}"


def _ms(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _verdict(judged) -> str:
    """VALID / INVALID of the p50 (the figure the tables compare), smoke runs said as such."""
    if judged.smoke:
        return "[yellow]smoke[/]"
    return "[green]VALID[/]" if judged.verdicts["p50"].valid else "[red]INVALID[/]"


def render_bench(console, results, top: int) -> None:
    """Every model x backend with its p50 ratio to onnxruntime CPU, then parity and cold start, then costs."""
    latency = _table("latency, ms per run (backends side by side, alternating)",
                     ["model", "backend", "prec", "n", "p50", "x cpu", "mean±std", "RSD", "p90", "p99", "p50 is"])
    judged = {id(r): r.judged for r in results}
    for r in results:
        j = judged[id(r)]
        latency.add_row(_label(r), r.provider, r.precision, str(j.n), f"{r.latency.p50:.1f}",
                        "" if r.ratio_to_cpu is None else f"{r.ratio_to_cpu:.2f}",
                        f"{r.latency.mean:.1f}±{r.latency.std:.1f}", f"{100 * j.rsd:.0f}%",
                        # a tail percentile is shown only where its own rule holds
                        _ms(j.p90 if j.verdicts["p90"].valid else None), _ms(j.p99 if j.verdicts["p99"].valid else None),
                        _verdict(j))
    console.print(latency)
    checks = _table("parity with onnxruntime CPU, and cold start", ["model", "backend", "parity", "max |box| px",
                                                                    "max |score|", "open s", "1st run ms"])
    for r in results:
        p = r.parity or {}
        checks.add_row(_label(r), r.provider, _parity_cell(r),
                       "" if p.get("max_box_px") is None else f"{p['max_box_px']:.2g}",
                       "" if p.get("max_score") is None else f"{p['max_score']:.2g}",
                       f"{r.session_seconds:.2f}", "" if r.first_run_ms is None else f"{r.first_run_ms:.0f}")
    console.print(checks)
    cost = _table("cost", ["model", "backend", "ran on", "RSS MB", "GMACs", "GOP/s", "% own-precision peak", "dets"])
    for r in results:
        # each row against the peak of its own precision (fp32 / int8 / bf16: runtime.peak.peak_for)
        fraction = (f"{100 * r.fraction_of_peak:.1f} ({r.peak_precision})" if r.fraction_of_peak is not None
                    else f"n/a ({r.peak_note})" if r.peak_note and r.peak_precision != "fp32" else "n/a")
        cost.add_row(_label(r), r.provider, _ran(r), "n/a" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}",
                     "n/a" if r.macs is None else f"{r.macs / 1e9:.2f}",
                     "n/a" if r.achieved_gflops is None else f"{r.achieved_gflops:.1f}", fraction, str(r.detections))
    console.print(cost)
    for r in results:
        j = judged[id(r)]
        if not j.smoke and not j.verdicts["p50"].valid:
            console.print(f"{r.model} on {r.provider}: p50 INVALID: {j.verdicts['p50'].reason}",
                          highlight=False, soft_wrap=True, markup=False)
    first = results[0]
    notes = [f"{first.latency.n} timed runs per backend in {first.rounds} round(s), backends' order rotating, after "
             f"{first.warmup} warm-up run(s) on {Path(first.image).name} (batch {first.batch}, prepared before "
             "timing); * = random-init weights (latency valid, accuracy not); x cpu = p50 / onnxruntime CPU p50 of "
             "the same run (below 1: faster); open s = session creation / model compilation, 1st ms = first "
             "inference (cold start, not in the latency); RSS MB = growth of the process's peak resident memory "
             "over the backend's open and first run."]
    parities = [r.parity for r in results if r.parity]
    if parities:
        rules = sorted({f"{p['precision']}: {p['tolerance_text']}" for p in parities})
        notes.append(f"parity: detections against onnxruntime CPU on {len(parities[0]['images'])} COCO images "
                     f"({', '.join(parities[0]['images'])}); tolerance " + "; ".join(rules) + ".")
        for r in results:
            if r.parity and r.parity["verdict"] == "disagree":
                notes.append(f"[bold red]{r.model} on {r.provider} DISAGREES with onnxruntime CPU[/]: "
                             + "; ".join(r.parity["reasons"][:3]))
            elif r.parity and r.parity["verdict"] != "agree":
                notes.append(f"[yellow]{r.model} on {r.provider}: parity {r.parity['verdict']}[/] (not shown equal to "
                             "onnxruntime CPU): " + "; ".join(r.parity["reasons"][:3]))
            if r.parity and r.parity.get("score_floor"):
                notes.append(f"{r.model} on {r.provider}: compared above score {r.parity['score_floor']:g} (its own "
                             "post-processing drops lower scores)")
    if first.peak:
        by = ", ".join(f"{k} {v:.1f}" for k, v in first.peak["by_backend"].items())
        notes.append(f"GFLOP/s = 2 x MACs (counting/ analyzer) / p50; % peak = that over the machine's measured "
                     f"float32 rate ({first.machine_peak_gflops:.1f} GFLOP/s: the best of several "
                     f"{first.peak['size']}^2 SGEMMs and 3x3 convolutions; {by}). p90/p99: MLPerf LoadGen's "
                     "early-stopping estimates, "
                     "shown only where VALID (64 runs and 10 s); p50 has its own rule (11 runs, 1 s, the median's 95 % "
                     "interval within 5 %). int8 rows: % of the int8 peak (onnxruntime MLAS integer kernels), bf16 "
                     "rows: % of the bf16 peak where the CPU has a bf16 unit.")
    for r in results:
        if r.macs is None and r.macs_note:
            notes.append(f"{r.model}: no MACs ({r.macs_note})")
        if r.nodes_note:
            notes.append(f"{r.model}: {r.nodes_note}")
    runtimes = sorted({f"{r.provider}: {r.backend.get('library')} {r.backend.get('version')}" for r in results})
    notes.append("backends: " + "; ".join(runtimes))
    for failed in sorted({(n, why) for r in results for n, why in r.conversion_failures.items()}):
        notes.append(f"not measured on {failed[0]}: conversion failed: {failed[1]}")
    natives = sorted({r.backend["detail"]["runtime"] for r in results
                      if (r.backend.get("capabilities") or {}).get("native")})
    if natives:
        notes.append("native = " + "; ".join(natives))
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)
    for r in results:
        if r.nodes:
            render_nodes(console, r, top)


def render_nodes(console, r, top: int) -> None:
    nodes = r.nodes
    title = (f"{r.model} on {r.provider} ({r.providers_ran[0]}): top {min(top, nodes['nodes_total'])} of "
             f"{nodes['nodes_total']} kernels (per-layer profiler, mean over {nodes['runs']} runs; kernel total "
             f"{nodes['total_us'] / 1e3:.1f} ms)")
    table = Table(title=title, title_justify="left")
    for col in ("kernel", "ran as", "op", "ONNX nodes", "ms", "share", "GMACs", "GMAC/s"):
        table.add_column(col, justify="right" if col in ("ms", "share", "GMACs", "GMAC/s") else "left")
    for g in nodes["nodes"][:top]:
        table.add_row(g["kernel"], g["kernel_op"], g["op_type"], str(len(g["originals"])),
                      f"{g['mean_us'] / 1e3:.2f}", f"{100 * g['share']:.1f}%", f"{g['macs'] / 1e9:.3f}",
                      "" if g["gmacs_per_s"] is None else f"{g['gmacs_per_s']:.1f}")
    console.print(table)
    by_op = Table(title=f"{r.model} on {r.provider}: by op type", title_justify="left")
    for col in ("op", "kernels", "ms", "share", "GMACs", "GMAC/s"):
        by_op.add_column(col, justify="left" if col == "op" else "right")
    for op, e in sorted(nodes["by_op"].items(), key=lambda kv: -kv[1]["us"]):
        by_op.add_row(op, str(e["kernels"]), f"{e['us'] / 1e3:.2f}", f"{100 * e['share']:.1f}%",
                      f"{e['macs'] / 1e9:.3f}", "" if e["gmacs_per_s"] is None else f"{e['gmacs_per_s']:.1f}")
    console.print(by_op)
    console.print(f"GMAC/s = analyzer MACs of the ONNX nodes a kernel runs / its time (1 MAC = 2 FLOPs). Fused "
                  f"nodes are mapped back as {nodes['mapping']}; {len(nodes['unattributed_nodes'])} ONNX node(s) "
                  f"ran no kernel that can be told ({nodes['unattributed_macs'] / 1e9:.3f} GMACs unattributed).",
                  highlight=False, soft_wrap=True)


def render_scenarios(console, results) -> None:
    """Offline (images/s) or Server (QPS at the tail bound) results, one row per model x backend."""
    if not results:
        return
    offline = results[0].scenario == "offline"
    if offline:
        table = _table("Offline: maximum throughput (all samples at once)",
                       ["model", "backend", "images/s", "per core", "configuration", "samples", "s", "parity",
                        "verdict"], left=2)
    else:
        table = _table("Server: highest QPS (Poisson arrivals) with the tail latency under its bound",
                       ["model", "backend", "QPS", "tail ms", "bound ms", "bound from", "configuration", "parity",
                        "verdict"], left=2)
    for r in results:
        f = r.figures
        validity = f["validity"]
        verdict = ("[green]VALID[/]" if validity["verdict"] == "VALID" else f"[red]INVALID[/] {validity['reason']}")
        if offline:
            table.add_row(r.model, r.provider, f"{f['images_per_s']:.2f}", f"{f['images_per_s_per_core']:.2f}",
                          f["config_text"], str(f["samples"]), f"{f['duration_s']:.1f}", str(f["parity_verdict"]),
                          verdict)
        else:
            table.add_row(r.model, r.provider, "-" if f["qps"] is None else f"{f['qps']:.2f}",
                          _ms(f["tail_ms"]), f"{f['bound_ms']:.1f}", f["bound_source"], f["config_text"],
                          str(f["parity_verdict"]), verdict)
    console.print(table)
    for r in results:
        if not r.figures["batch_axis"]["batchable"]:
            console.print(f"{r.model}: {r.figures['batch_axis']['note']}", highlight=False, soft_wrap=True)
            break
