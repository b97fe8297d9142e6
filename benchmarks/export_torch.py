"""Export time and ONNX file size of every PyTorch (torchvision) detector in models.toml.

Each export is the full ``exporters.export_model`` path: build (random init unless a
weights file is located or given), trace, onnx full check, and onnxruntime-vs-PyTorch
validation on real COCO images. Seconds are wall-clock, median over ``--runs`` exports;
file size is the ONNX file in bytes (MB = 10^6 bytes). Parameters follow torchvision's
num_params convention (FrozenBatchNorm buffers excluded).

    python benchmarks/export_torch.py [NAME ...] [--runs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporters import default_output, export_model  # noqa: E402
from exporters.registry import load_registry  # noqa: E402
from core.errors import DetbenchError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="registry names (default: every framework = 'pytorch' entry)")
    parser.add_argument("--runs", type=int, default=1, help="exports per model (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the ONNX files (default: a temp folder)")
    args = parser.parse_args()
    registry = load_registry()
    specs = registry.select(args.names) if args.names else [s for s in registry if s.framework == "pytorch"]
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="detbench-export-torch-"))
    rows = []
    for spec in specs:
        seconds = []
        try:
            for _ in range(args.runs):
                result = export_model(spec, default_output(spec, out_dir))
                seconds.append(result.seconds)
        except DetbenchError as exc:  # report it and measure the other models
            print(json.dumps({"name": spec.name, "error": type(exc).__name__, "message": str(exc)[:2000]}), flush=True)
            continue
        size = result.path.stat().st_size
        v = result.validation
        row = {
            "name": spec.name,
            "export_seconds_median": round(statistics.median(seconds), 1),
            "runs": args.runs,
            "file_bytes": size,
            "source_params": result.contract.source_params,
            "weights": result.contract.weights,
            "detections_compared": sum(val for key, val in v.items() if key.endswith(":detections")),
            "max_abs_diff_boxes": max((val for key, val in v.items() if key.endswith("boxes:max_abs_diff")), default=0.0),
            "max_abs_diff_scores": max((val for key, val in v.items() if key.endswith("scores:max_abs_diff")), default=0.0),
            "max_abs_diff_masks": max((val for key, val in v.items() if key.endswith("masks:max_abs_diff")), default=None),
            "near_tie_reorders": sum(val for key, val in v.items() if key.endswith(":near_tie_reorders")),
            "cut_ties": sum(val for key, val in v.items() if key.endswith(":cut_ties")),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'model':26} {'export s (wall, median)':>24} {'ONNX MB':>9} {'params (torch)':>15} {'weights':>12}")
    for r in rows:
        print(f"{r['name']:26} {r['export_seconds_median']:>24} {r['file_bytes'] / 1e6:>9.1f} "
              f"{r['source_params']:>15,} {r['weights'][:12]:>12}")


if __name__ == "__main__":
    main()
