"""Benchmark figures for the runtime issue: CPU latency, ONNX/native ratio, fraction of peak.

    python benchmarks/bench_models.py [--repeats 3] [--runs 5] [--warmup 2] [--threads 2] [--out DIR]

Measures, on this machine's CPU, with onnxruntime's CPU provider:

- p50 latency of yolov3-tiny (official COCO weights when present), yolov3-416 and
  retinanet-800 (random-init: no published weights; latency does not depend on weight values);
- the onnxruntime / native ratio (p50 over p50, same tensor, warm-up, runs and threads) for
  yolov3-416 (OpenCV DNN reading the cfg + weights), retinanet-800 (PyTorch eager) and
  ssd300 (TensorFlow);
- yolov3-416's achieved GFLOP/s (2 x the analyzer's MACs / p50) as a fraction of the measured
  float32 matmul peak at the same thread count, and its per-kernel profile (what limits it).

Each figure is the median over ``--repeats`` independent repetitions, each of ``--runs``
timed runs after ``--warmup``; ONNX and native runs alternate within every repetition so a
change of load hits both. The machine is shared: the 1-minute load average before and after
is printed and saved with the figures. Exports are made once into ``--out``/onnx and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import _load_order  # noqa: E402,F401  (triton before tensorflow)

LATENCY_MODELS = ("yolov3-tiny", "yolov3-416", "retinanet-800")
NATIVE_MODELS = ("yolov3-416", "retinanet-800", "ssd300")
PEAK_MODEL = "yolov3-416"


def export_once(name: str, out_dir: Path) -> Path:
    from exporters import default_output, export_model
    from exporters.registry import load_registry
    from exporters.weights import locate_weights
    from core.contract import read_contract

    spec = load_registry().get(name)
    weights = locate_weights(spec)
    target = default_output(spec, out_dir / ("trained" if weights else "random"))
    if target.is_file():
        read_contract(target)  # a readable, contract-following file from an earlier run
        return target
    started = time.perf_counter()
    export_model(spec, target, weights=weights)
    print(f"exported {name} ({'weights ' + weights.name if weights else 'random-init'}) in "
          f"{time.perf_counter() - started:.0f} s -> {target}", flush=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    parser.add_argument("--models", nargs="*", default=None, help="subset of the models above")
    parser.add_argument("--model-file", action="append", default=[], metavar="NAME=PATH",
                        help="use this existing ONNX file for NAME instead of exporting it (its contract must "
                             "name NAME); it is reported as supplied, with the file's path")
    args = parser.parse_args()
    supplied = {}
    for item in args.model_file:
        name, _, path = item.partition("=")
        supplied[name] = Path(path)

    from runtime.bench import bench_models, model_macs, default_image
    from runtime.peak import measure_peak

    wanted = args.models or sorted(set(LATENCY_MODELS) | set(NATIVE_MODELS), key=list(
        LATENCY_MODELS + NATIVE_MODELS).index)
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          f"on {os.cpu_count()} cores; threads {args.threads}", flush=True)
    paths = {name: supplied.get(name) or export_once(name, args.out / "onnx") for name in wanted}
    for name, path in supplied.items():
        from core.contract import read_contract

        if read_contract(path).name != name:
            raise SystemExit(f"--model-file {name}={path}: the file's contract names {read_contract(path).name!r}")
        print(f"{name}: using the supplied file {path} (not exported by this script)", flush=True)
    image = default_image()

    figures: dict[str, dict] = {}
    for name in wanted:
        native = name in NATIVE_MODELS
        peak = name == PEAK_MODEL
        macs = model_macs(paths[name], image) if peak else None
        p50s, ratios, native_p50s, fractions, achieved, peaks = [], [], [], [], [], []
        for rep in range(args.repeats):
            if peak:
                measure_peak.cache_clear()  # re-measure the peak in every repetition, next to the model
            (r,) = bench_models([paths[name]], ["cpu"], warmup=args.warmup, runs=args.runs, threads=args.threads,
                                native=native, peak=peak, macs=macs, image=image)
            p50s.append(r.latency.p50)
            if native:
                ratios.append(r.native["ratio"])
                native_p50s.append(r.native["latency_ms"]["p50"])
            if peak:
                fractions.append(r.fraction_of_peak)
                achieved.append(r.achieved_gflops)
                peaks.append(r.machine_peak_gflops)
            print(f"  {name} rep {rep + 1}/{args.repeats}: ORT p50 {r.latency.p50:.1f} ms"
                  + (f", native p50 {r.native['latency_ms']['p50']:.1f} ms ({r.native['framework']}), "
                     f"ratio {r.native['ratio']:.2f}" if native else "")
                  + (f", {r.achieved_gflops:.1f} GFLOP/s of {r.machine_peak_gflops:.1f} peak "
                     f"({100 * r.fraction_of_peak:.1f} %)" if peak else "")
                  + f" [load {os.getloadavg()[0]:.2f}]", flush=True)
        entry = {"weights": r.contract.get("detbench.weights"), "file": str(paths[name]),
                 "supplied_file": name in supplied, "p50_ms_median": statistics.median(p50s),
                 "p50_ms_each": p50s, "runs": args.runs, "warmup": args.warmup, "repeats": args.repeats,
                 "threads": args.threads}
        if native:
            entry.update({"native_framework": r.native["framework"], "native_runtime": r.native["runtime"],
                          "native_p50_ms_median": statistics.median(native_p50s),
                          "ratio_median": statistics.median(ratios), "ratio_each": ratios})
        if peak:
            entry.update({"macs": r.macs, "macs_note": r.macs_note,
                          "achieved_gflops_median": statistics.median(achieved),
                          "machine_peak_gflops_median": statistics.median(peaks),
                          "fraction_of_peak_median": statistics.median(fractions), "fraction_each": fractions,
                          "peak_backends_last": r.peak["by_backend"]})
            (rn,) = bench_models([paths[name]], ["cpu"], warmup=1, runs=1, threads=args.threads, nodes=True,
                                 node_runs=3, peak=False, macs=macs, image=image)
            entry["nodes_by_op"] = rn.nodes["by_op"]
            entry["nodes_top"] = rn.nodes["nodes"][:12]
            entry["nodes_kernel_total_us"] = rn.nodes["total_us"]
        figures[name] = entry
    load_after = os.getloadavg()

    print(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"{'model':16s} {'weights':12s} {'ORT p50 ms':>11s} {'native p50':>11s} {'ORT/native':>11s}")
    for name, e in figures.items():
        print(f"{name:16s} {('random-init' if e['weights'] == 'random-init' else 'trained'):12s} "
              f"{e['p50_ms_median']:11.1f} "
              + (f"{e['native_p50_ms_median']:11.1f} {e['ratio_median']:11.2f}  ({e['native_framework']})"
                 if 'ratio_median' in e else "")
              + (f"  [supplied file {e['file']}]" if e["supplied_file"] else ""))
    if PEAK_MODEL in figures:
        e = figures[PEAK_MODEL]
        print(f"\n{PEAK_MODEL}: {e['macs'] / 1e9:.2f} GMACs ({e['macs_note']}); achieved "
              f"{e['achieved_gflops_median']:.1f} GFLOP/s vs measured peak {e['machine_peak_gflops_median']:.1f} "
              f"GFLOP/s = {100 * e['fraction_of_peak_median']:.1f} % of peak (median of {args.repeats})")
        conv = e["nodes_by_op"].get("Conv")
        if conv:
            print(f"  per-node profile: Conv kernels {100 * conv['share']:.1f} % of kernel time at "
                  f"{conv['gmacs_per_s']:.1f} GMAC/s = {2 * conv['gmacs_per_s']:.1f} GFLOP/s")
        for g in e["nodes_top"][:8]:
            rate = "" if g["gmacs_per_s"] is None else f"{2 * g['gmacs_per_s']:.1f} GFLOP/s"
            print(f"    {g['kernel']:32s} {g['op_type']:10s} {g['mean_us'] / 1e3:7.1f} ms {100 * g['share']:5.1f} % "
                  f"{g['macs'] / 1e9:6.3f} GMACs {rate}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / ("bench_models.json" if not args.models else f"bench_models-{'-'.join(wanted)}.json")
    out.write_text(json.dumps({"figures": figures, "load_before": load_before, "load_after": load_after,
                               "cores": os.cpu_count(), "image": str(image)}, indent=2, default=str))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
