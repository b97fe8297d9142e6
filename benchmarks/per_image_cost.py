"""Operations executed and latency per image over a COCO folder (the seed's per-proposal claim).

    python benchmarks/per_image_cost.py results/onnx/mask-rcnn-800.onnx results/onnx/yolov3-416.onnx \
        [--images 144] [--coco DIR] [--repeats 1]

For each model: GOps (2 x MACs, analyzer with measured shapes) and onnxruntime CPU latency on
each image (:func:`runtime.per_image.measure_images`), then min / median / max and the spread,
and the correlation of latency with the number of detections. Written to
``results/benchmarks/per_image_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.paths import data_dir, results_dir  # noqa: E402
from runtime.per_image import measure_images  # noqa: E402


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / statistics.median(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=144)
    parser.add_argument("--coco", type=Path, default=data_dir() / "coco-val2017-subset")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    images = sorted((args.coco / "val2017").glob("*.jpg"))[:args.images]
    out = {}
    for model in args.models:
        result = measure_images(model, images, repeats=args.repeats,
                                progress=lambda done, total, name: print(f"\r{model.name}: {done}/{total}", end=""))
        print()
        rows = result.images
        gops = [2 * r["macs"] / 1e9 for r in rows]
        network = [2 * r["network_macs"] / 1e9 for r in rows]
        latency = [r["latency_ms"] for r in rows]
        detections = [r["detections"] for r in rows]
        corr = float(np.corrcoef(latency, detections)[0, 1]) if len(set(detections)) > 1 else None
        out[result.model] = {"images": len(rows), "gops": summary(gops), "network_gops": summary(network),
                             "latency_ms": summary(latency), "latency_detections_correlation": corr,
                             "per_image": rows}
        print(json.dumps({k: v for k, v in out[result.model].items() if k != "per_image"}, indent=1))
    target = results_dir() / "benchmarks" / "per_image_cost.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1))
    print(f"written to {target}")


if __name__ == "__main__":
    main()
