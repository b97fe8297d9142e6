"""How long `profile` takes: static profiles and measured profiles, median over several runs.

Goals (issue 5): a static profile of any Darknet export under 2 s; a measured profile of
mask-rcnn-800 under 30 s, on the project's 2-core machine.

    python benchmarks/profile_speed.py --static results/onnx/yolov3-608.onnx \\
        --measured results/onnx/mask-rcnn-800.onnx [--runs 5] [--measured-runs 3]

Each argument is an ONNX file or a registered model name (exported random-init into
$DETBENCH_RESULTS/onnx first when no file exists: counts do not depend on weight values).
Every run is a fresh `counting.profile_model` call (file loading included), without the
onnx-tool cross-check unless ``--onnx-tool`` (what `cli.py profile` does by default; issue 12's
goal: every registered export under 15 s with it). The 1-minute load average is printed beside each figure, because
the machine is shared and wall-clock times depend on it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from counting import profile_model  # noqa: E402


def resolve(target: str) -> Path:
    path = Path(target)
    if path.suffix == ".onnx":
        if not path.is_file():
            sys.exit(f"no ONNX file at {path}")
        return path
    from exporters import default_output, export_model
    from exporters.registry import load_registry
    from core.paths import results_dir

    spec = load_registry().get(target)
    out = default_output(spec, results_dir() / "onnx")
    if not out.is_file():
        print(f"exporting {target} (random-init) to {out} ...", flush=True)
        export_model(spec, out)
    return out


def measure(path: Path, shapes: str, runs: int, cross_check: bool = False) -> dict:
    times, loads, last = [], [], None
    for _ in range(runs):
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        last = profile_model(path, shapes=shapes, cross_check=cross_check)
        times.append(time.perf_counter() - start)
    return {"path": str(path), "shapes": shapes, "runs": runs, "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times), "times": times, "load1": loads, "profile": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--static", nargs="*", default=[], help="ONNX files / model names to profile statically")
    parser.add_argument("--measured", nargs="*", default=[], help="ONNX files / model names to profile measured")
    parser.add_argument("--runs", type=int, default=5, help="runs per static profile (median reported)")
    parser.add_argument("--measured-runs", type=int, default=3, help="runs per measured profile")
    parser.add_argument("--onnx-tool", action="store_true", help="include the onnx-tool cross-check (cli default)")
    args = parser.parse_args()
    if not args.static and not args.measured:
        parser.error("give at least one --static or --measured target")
    results = [measure(resolve(t), "static", args.runs, args.onnx_tool) for t in args.static]
    results += [measure(resolve(t), "measured", args.measured_runs, args.onnx_tool) for t in args.measured]
    print(f"{'model':<28} {'shapes':<9} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7} "
          f"{'load1':>11}  figures")
    for r in results:
        p = r["profile"]
        load = f"{min(r['load1']):.1f}-{max(r['load1']):.1f}"
        figures = (f"MACs {p.macs / 1e9:.3f} G, conv-only FLOPs {2 * p.conv_macs / 1e9:.3f} G, "
                   f"linear MACs {p.linear_macs / 1e9:.3f} G, params {p.params:,}, "
                   f"unresolved {len(p.unresolved)}")
        if p.onnx_tool is not None:
            figures += f", onnx-tool {p.onnx_tool['status']} ({p.onnx_tool.get('seconds', '-')} s)"
        print(f"{Path(r['path']).stem:<28} {r['shapes']:<9} {r['runs']:>4} {r['median_s']:>9.2f} "
              f"{r['min_s']:>7.2f} {r['max_s']:>7.2f} {load:>11}  {figures}")
        print(f"{'':<28} per run: " + ", ".join(f"{t:.2f}" for t in r["times"]))


if __name__ == "__main__":
    main()
