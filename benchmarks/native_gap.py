"""Why the native backend (OpenCV's Darknet importer) scores below onnxruntime on the same file.

Both run the same network on the same images. Two post-processing differences are known and
documented in ``exporters/darknet/native.py``: OpenCV's YOLO layer zeroes class scores at or
below its ``thresh`` (0.2), and the native runner keeps one label per box (the arg-max class)
where the contract graph runs NMS per class on every class score above 0.005 (one box may be
kept under several labels). This script evaluates both backends, then applies those two
differences to onnxruntime's detections and scores each step, so the gap is either explained
by them (expected) or not (a bug):

- ``ort``: the contract graph's detections;
- ``ort > thresh``: only scores above OpenCV's thresh;
- ``ort one label``: per image, detections sharing one box (the same anchor) keep only the best label;
- ``ort both``: both; this is what the native runner computes, up to NMS order effects.

    python benchmarks/native_gap.py results/onnx/yolov3-tiny.onnx [--coco DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

THRESH = 0.2  # OpenCV's yolo/region layer default (the cfg sets none)


def one_label_per_box(results: list[dict]) -> list[dict]:
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["image_id"], *(round(v, 3) for v in r["bbox"]))
        if key not in best or r["score"] > best[key]["score"]:
            best[key] = r
    return list(best.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--coco", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    from eval.coco import evaluate_model, score_results
    from eval.dataset import load_coco
    from quantization.budget import default_coco

    coco = args.coco or default_coco()
    dataset = load_coco(coco)
    ids = sorted(dataset.images)[:args.limit] if args.limit else sorted(dataset.images)
    gt = dataset.data
    runs = {}
    with tempfile.TemporaryDirectory(prefix="native-gap-") as tmp:
        for provider in ("cpu", "native"):
            result = evaluate_model(args.model, coco_dir=coco, image_ids=tuple(ids), provider=provider, store=False,
                                    results_file=Path(tmp) / f"{provider}.json", cache_file=Path(tmp) / f"{provider}.jsonl")
            runs[provider] = json.loads(Path(result.results_file).read_text())
    ort = runs["cpu"]
    variants = {"ort": ort, f"ort > {THRESH}": [r for r in ort if r["score"] > THRESH],
                "ort one label": one_label_per_box(ort),
                "ort both": one_label_per_box([r for r in ort if r["score"] > THRESH]),
                "native": runs["native"]}
    print(f"{args.model} on {len(ids)} COCO images (mAP points)")
    for name, results in variants.items():
        scores = score_results(results, gt, image_ids=ids)
        print(f"{name:<16} detections {len(results):>6}  mAP@0.5 {100 * scores['map50']:6.2f}  "
              f"mAP@[.5:.95] {100 * scores['map']:6.2f}")


if __name__ == "__main__":
    main()
