"""The runtime x model table of issue 22: converted runtimes against onnxruntime CPU on the paper's models.

For every paper configuration of models.toml (``paper = true``), one ONNX export (an existing one
found in a ``--reuse`` folder when it is the same model with the right weights, else exported into
``--scratch``; random init except where official weights are on the machine: yolov3-tiny), then one
side-by-side ``bench`` (:func:`runtime.bench.bench_side_by_side`, the code ``python cli.py bench``
calls) of onnxruntime CPU with every converting backend that runs here (mnn, ncnn, onnx2torch, and
litert when registered and usable). Per cell:

- conversion: seconds (the cached artifact's, marked ``cached``) or the operator/reason it failed;
- parity with onnxruntime CPU on real COCO images (agree / DISAGREES / nothing-compared), with the
  network outputs' largest relative difference and the detections' worst box and score difference;
- p50 latency ratio to onnxruntime CPU, both timed alternating in one process (passive waiting, as
  ``bench`` does), with the backend's n and the p50's VALID/INVALID verdict. A backend that disagrees
  shows its ratio only struck through as DISAGREES (never as a plain latency).

Each model runs in a child process (a converter or runtime that crashes the process costs that
model, not the table; then each backend is retried alone with onnxruntime CPU). Models go in the
registry's order, the three largest last; a model not started before ``--budget-minutes`` is listed as not run.
Conversions are cached under ``--scratch``/converted (``DETBENCH_RESULTS``), so a second run
measures again without converting again.

    python benchmarks/runtime_table.py --reuse ../cc20b/results/onnx [--seconds 8] [--big-seconds 10]
        [--budget-minutes 45] [--models a,b] [--json table.json]

The Markdown table goes to stdout, progress to stderr, every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONVERTING = ("mnn", "ncnn", "onnx2torch", "litert")
BIG = ("retinanet-800", "faster-rcnn-vgg16", "mask-rcnn-800")  # seconds per run on 2 cores: timed last, bounded


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- parent: models, exports

def paper_models() -> list[str]:
    from exporters.registry import load_registry

    return [s.name for s in load_registry() if s.paper]


def find_or_export(name: str, reuse: list[Path], scratch: Path) -> tuple[Path, str]:
    """An export of ``name``: a contract file of that model found in a ``reuse`` folder whose weights are
    what this machine would export with (official where located, else random init), or a new export."""
    from core.contract import read_contract
    from exporters import default_output, export_model
    from exporters.registry import load_registry
    from exporters.weights import locate_weights

    spec = load_registry().get(name)
    weights = locate_weights(spec)
    for folder in reuse + [scratch / "onnx"]:
        candidate = default_output(spec, folder)
        if not candidate.is_file():
            continue
        props = read_contract(candidate).to_props()
        random = props.get("detbench.weights") == "random-init"
        if props.get("detbench.name", name) == name and random == (weights is None):
            return candidate, f"reused {candidate}"
    target = default_output(spec, scratch / "onnx")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    export_model(spec, target, weights=weights)
    return target, f"exported in {time.perf_counter() - started:.0f} s ({'weights ' + weights.name if weights else 'random-init'})"


def usable_converting() -> tuple[list[str], dict[str, str]]:
    """The converting backends that run here, and why each other one does not."""
    from core.errors import ConfigError
    from runtime.backends import get_backend

    ok, why = [], {}
    for name in CONVERTING:
        try:
            backend = get_backend(name)
        except ConfigError:
            why[name] = "not registered in this checkout"
            continue
        usable, reason = backend.probe()
        if usable:
            ok.append(name)
        else:
            why[name] = reason.splitlines()[0] if reason else "probe failed"
    return ok, why


# --------------------------------------------------------------------------- child: one model

def cell(result, cpu) -> dict:
    """The figures of one backend's BenchResult (cpu: onnxruntime CPU's result of the same run)."""
    conv = (result.backend.get("detail") or {}).get("conversion") or {}
    judged = result.judged
    parity = result.parity or {}
    network = parity.get("network") or {}
    out = {
        "conversion": {"ok": True, "seconds": conv.get("seconds"), "cached": conv.get("cached"),
                       "converter": conv.get("converter"), "converter_version": conv.get("converter_version")},
        "parity": {"verdict": result.parity_verdict, "matched": parity.get("matched"), "total": parity.get("total"),
                   "max_box_px": parity.get("max_box_px"), "max_score": parity.get("max_score"),
                   "network_max_rel": network.get("max_rel"), "network_max_abs": network.get("max_abs"),
                   "images": len(parity.get("images") or []), "reasons": parity.get("reasons") or []},
        "p50_ms": result.latency.p50, "n": result.latency.n, "timed_s": sum(result.samples_ms) / 1e3,
        "p50_verdict": judged.verdicts["p50"].label, "p50_reason": judged.verdicts["p50"].reason,
        "ratio_to_cpu": result.ratio_to_cpu,
        "session_seconds": result.session_seconds, "first_run_ms": result.first_run_ms,
        "parts_ms": {k: v.get("p50") for k, v in (result.parts or {}).items() if isinstance(v, dict)},
    }
    return out


def child(args) -> int:
    from runtime.backends import BackendSettings
    from runtime.bench import BenchSettings, bench_side_by_side

    names = ["cpu"] + [b for b in args.backends.split(",") if b]
    settings = BenchSettings(seconds=args.seconds, rounds=args.rounds, warmup=args.warmup, peak=False,
                             parity_images=args.parity_images)
    started = time.perf_counter()
    results = bench_side_by_side(Path(args.path), names, settings, BackendSettings(threads=args.threads))
    by = {r.provider: r for r in results}
    cpu = by["cpu"]
    out = {"model": args.one, "path": args.path, "seconds": time.perf_counter() - started,
           "cpu": {"p50_ms": cpu.latency.p50, "n": cpu.latency.n, "p50_verdict": cpu.judged.verdicts["p50"].label,
                   "p50_reason": cpu.judged.verdicts["p50"].reason, "timed_s": sum(cpu.samples_ms) / 1e3},
           "backends": {}}
    for name in names[1:]:
        if name in by:
            out["backends"][name] = cell(by[name], cpu)
        else:
            reason = cpu.conversion_failures.get(name, "not measured (no result and no conversion failure recorded)")
            out["backends"][name] = {"conversion": {"ok": False, "reason": reason}}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def run_child(model: str, path: Path, backends: list[str], opts: dict, out: Path, timeout: float, env) -> dict | None:
    cmd = [sys.executable, __file__, "--one", model, "--path", str(path), "--backends", ",".join(backends),
           "--out", str(out)] + [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    out.unlink(missing_ok=True)
    log = out.with_suffix(".log")
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if rc == 0 and out.is_file():
        return json.loads(out.read_text())
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
    return {"error": f"child exit {rc}: " + " | ".join(tail)[:400]}


def unconverted_layers(reason: str) -> str:
    """For an ncnn artifact that ncnn refused to load: the layer types in its .param that are pnnx's
    own (``Tensor.reshape``, ``torch.xxx``, ``F.xxx``: left for ncnn, which has no such layer)."""
    import re

    match = re.search(r"(\S+\.ncnn\.param)", reason)
    if not match or not Path(match.group(1)).is_file():
        return ""
    lines = Path(match.group(1)).read_text(errors="replace").splitlines()[2:]
    types = sorted({ln.split()[0] for ln in lines if ln.split() and "." in ln.split()[0]})
    return f" (layer types pnnx left unconverted: {', '.join(types)})" if types else ""


# --------------------------------------------------------------------------- rendering

LEGEND = ("Parity on real COCO images against onnxruntime CPU: net = largest difference of the network part's "
          "outputs relative to each output's largest magnitude, box = worst matched box difference (px); "
          "conv = conversion seconds (network part); a DISAGREES ratio is struck through: not a latency.")

def fmt_cell(b: dict) -> str:
    conv = b.get("conversion") or {}
    if not conv.get("ok"):
        return "conversion failed" if "reason" in conv else "not run"
    p = b["parity"]
    verdict = {"agree": "agree", "disagree": "DISAGREES"}.get(p["verdict"], p["verdict"])
    fig = []
    if p.get("network_max_rel") is not None:
        fig.append(f"net {p['network_max_rel']:.2g}")
    if p.get("max_box_px") is not None:
        fig.append(f"box {p['max_box_px']:.2g} px")
    parity = verdict + (f" ({', '.join(fig)})" if fig else "")
    ratio = b.get("ratio_to_cpu")
    valid = "" if b.get("p50_verdict") == "VALID" else " INVALID"
    if p["verdict"] == "disagree":
        timing = f"~~{ratio:.2f}x~~ not a latency" if ratio else "not timed"
    else:
        timing = f"{ratio:.2f}x (n={b['n']}{valid})" if ratio else "no ratio"
    secs = conv.get("seconds")
    return f"{timing}; {parity}; conv {secs:.0f} s" if secs is not None else f"{timing}; {parity}"


def render(rows: list[dict], backends: list[str], unusable: dict[str, str], notes: list[str]) -> str:
    lines = ["| model | onnxruntime CPU p50 | " + " | ".join(backends) + " |",
             "|---|---|" + "---|" * len(backends)]
    failures = []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['error'][:120]} |" + " |" * len(backends))
            continue
        cpu = row["cpu"]
        valid = "" if cpu["p50_verdict"] == "VALID" else " INVALID"
        cells = []
        for b in backends:
            c = row["backends"].get(b, {"conversion": {}})
            cells.append(fmt_cell(c))
            conv = c.get("conversion") or {}
            if not conv.get("ok") and conv.get("reason"):
                failures.append(f"- {row['model']} on {b}: {conv['reason'][:300]}")
            elif c.get("parity", {}).get("verdict") in ("disagree", "nothing-compared"):
                # the last reason is the network outputs' (when run in parts): the one that says most
                reasons = "; ".join(r[:220] for r in reversed(c["parity"].get("reasons") or []))
                failures.append(f"- {row['model']} on {b}: parity {c['parity']['verdict']}"
                                f"{': ' + reasons if reasons else ''}")
        lines.append(f"| {row['model']} | {cpu['p50_ms']:.0f} ms (n={cpu['n']}{valid}) | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if failures:
        text += "\n\nConversion failures and parity outcomes other than agree:\n" + "\n".join(failures)
    if unusable:
        text += "\n\nNot in the table: " + "; ".join(f"{k}: {v}" for k, v in unusable.items())
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text


def rerender(path: Path) -> int:
    """The table of an earlier ``--json`` file (ncnn load failures get their unconverted layer types)."""
    data = json.loads(path.read_text())
    for row in data["rows"]:
        for c in (row.get("backends") or {}).values():
            conv = c.get("conversion") or {}
            if not conv.get("ok") and conv.get("reason") and "left unconverted" not in conv["reason"]:
                conv["reason"] += unconverted_layers(conv["reason"])
    notes = data.get("notes")
    if notes is None:
        (before, *_), (after, *_) = data["load"]
        notes = [f"Load average (1 min) {before:.2f} before / {after:.2f} after; "
                 f"{data['settings']['threads']} threads per runtime; ratio = backend p50 / onnxruntime CPU p50 "
                 "timed alternating in one process (passive waiting); n = timed runs; INVALID = the p50 did not "
                 "meet the validity rules (runtime.stats) in the time given. " + LEGEND]
        if data.get("not_run"):
            notes.append(f"Not run (budget spent): {', '.join(data['not_run'])}")
    print(render(data["rows"], data["backends"], data["unusable"], notes))
    return 0


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", type=Path, action="append", default=[], help="folder of existing exports (NAME.onnx)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/detbench-runtime-table"))
    parser.add_argument("--models", default="", help="comma-separated subset of the paper models")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per backend, per model")
    parser.add_argument("--big-seconds", type=float, default=10.0, help="the same for " + ", ".join(BIG))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-minutes", type=float, default=45.0, help="no model starts after this")
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE in the measuring processes (PyTorch's OpenMP threads sleep "
                             "between runs; no detbench setting does this; see fair_alternation.py)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, help="print the table of an earlier --json file")
    # child mode (one model in its own process)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--parity-images", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    args.scratch = args.scratch.resolve()
    os.environ["DETBENCH_RESULTS"] = str(args.scratch)  # conversion cache and any export stay in the scratch folder
    from core import _load_order  # noqa: F401  (triton before tensorflow)

    if args.one:
        return child(args)
    if args.render:
        return rerender(args.render)

    started = time.monotonic()
    load_before = os.getloadavg()
    models = [m for m in args.models.split(",") if m] or paper_models()
    models = [m for m in models if m not in BIG] + [m for m in BIG if m in models]
    backends, unusable = usable_converting()
    say(f"models: {', '.join(models)}; backends: {', '.join(backends)}; not usable: {unusable}")
    env = dict(os.environ)
    if args.omp_passive:  # read by the OpenMP runtime when it starts: it must be in the child's environment
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    rows, not_run = [], []
    for model in models:
        elapsed = (time.monotonic() - started) / 60
        if elapsed > args.budget_minutes:
            not_run.append(model)
            continue
        try:
            path, how = find_or_export(model, [p.resolve() for p in args.reuse], args.scratch)
        except Exception as exc:  # noqa: BLE001 - an export failure is this model's row, the table goes on
            rows.append({"model": model, "error": f"export failed: {exc}"})
            continue
        big = model in BIG
        opts = {"seconds": args.big_seconds if big else args.seconds, "threads": args.threads,
                "rounds": 3 if big else 4, "warmup": 1 if big else 2, "parity_images": 1 if big else 3}
        out = args.scratch / "table" / f"{model}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        remaining = max(120.0, (args.budget_minutes + 15 - elapsed) * 60)
        say(f"{model}: {how}; {', '.join(['cpu'] + backends)} side by side ({opts['seconds']:g} s each)")
        row = run_child(model, path, backends, opts, out, min(remaining, 1200.0), env)
        if "error" in row and not row["error"].startswith("timed out"):
            # the process died: each backend alone with onnxruntime CPU, so one crash costs one cell
            say(f"{model}: {row['error']}; retrying each backend on its own")
            merged, cells = None, {}
            for b in backends:
                one = run_child(model, path, [b], opts, out.with_name(f"{model}.{b}.json"), 600.0, env)
                if "error" in one:
                    cells[b] = {"conversion": {"ok": False, "reason": f"process died: {one['error']}"}}
                else:
                    merged = merged or one
                    cells[b] = one["backends"][b]
            row = {**merged, "backends": cells, "retried": "each backend alone with onnxruntime CPU"} if merged \
                else {"error": row["error"]}
        row["model"], row["export"] = model, how
        for c in (row.get("backends") or {}).values():
            conv = c.get("conversion") or {}
            if not conv.get("ok") and conv.get("reason"):
                conv["reason"] += unconverted_layers(conv["reason"])
        say(f"{model}: done in {(row.get('seconds') or 0):.0f} s")
        rows.append(row)
    load_after = os.getloadavg()
    notes = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs, "
             f"{args.threads} threads per runtime, load average {load_before[0]:.2f} before / {load_after[0]:.2f} "
             f"after (1 min); whole table {(time.monotonic() - started) / 60:.1f} min. Ratio = backend p50 / "
             "onnxruntime CPU p50 timed alternating in one process (passive waiting); n = timed runs; INVALID = "
             "the p50 did not meet the validity rules (runtime.stats) in the time given (too few runs or unstable). " + LEGEND
             + (" OMP_WAIT_POLICY=PASSIVE in the measuring processes." if args.omp_passive else "")]
    if not_run:
        notes.append(f"Not run (budget of {args.budget_minutes:g} min spent): {', '.join(not_run)}")
    print(render(rows, backends, unusable, notes))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "backends": backends, "unusable": unusable, "notes": notes,
                                         "not_run": not_run, "load": [load_before, load_after],
                                         "settings": {"seconds": args.seconds, "big_seconds": args.big_seconds,
                                                      "threads": args.threads}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
