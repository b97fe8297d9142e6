"""Export time per Darknet configuration (median of N runs), with what each export validated.

    python benchmarks/export_darknet.py                 # every darknet entry, 3 runs each
    python benchmarks/export_darknet.py yolov3-tiny --runs 5 --json out.json

An export here is the whole job ``python cli.py export`` does: parse the cfg, read (or
draw random) weights, build the ONNX graph, run onnxruntime and OpenCV's Darknet
importer on dog.jpg and compare the raw heads, full onnx check, write. Weights are the
official file when present locally (``exporters.weights.locate_weights``), else
random-init; the table says which. Times are wall-clock seconds on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporters import export_model  # noqa: E402
from exporters.registry import load_registry  # noqa: E402
from exporters.weights import locate_weights  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="registry names (default: every framework=darknet entry)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    registry = load_registry()
    specs = registry.select(args.names) if args.names else [s for s in registry if s.framework == "darknet"]
    rows = []
    print(f"Darknet export time, median of {args.runs} runs (wall-clock s, {platform.node()}, "
          f"{platform.processor() or platform.machine()})")
    print(f"{'model':<16} {'weights':<12} {'median s':>9} {'min s':>7} {'max s':>7} {'params':>12} "
          f"{'max|head diff| vs OpenCV':>25} {'detections':>10}")
    with tempfile.TemporaryDirectory(prefix="detbench-bench-") as tmp:
        for spec in specs:
            weights = locate_weights(spec)
            times, result = [], None
            for run in range(args.runs):
                start = time.perf_counter()
                result = export_model(spec, Path(tmp) / f"{spec.name}.onnx", weights=weights)
                times.append(time.perf_counter() - start)
            row = {
                "model": spec.name, "weights": "official" if weights else "random-init",
                "median_s": statistics.median(times), "runs_s": times,
                "params": result.contract.source_params,
                "max_abs_head_diff_vs_opencv": result.validation["max_abs_diff"],
                "validation_image": result.validation["image"],
                "detections_on_validation_image": result.validation["detections"],
            }
            rows.append(row)
            print(f"{spec.name:<16} {row['weights']:<12} {row['median_s']:>9.1f} {min(times):>7.1f} {max(times):>7.1f} "
                  f"{row['params']:>12,} {row['max_abs_head_diff_vs_opencv']:>25.2e} {row['detections_on_validation_image']:>10}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
