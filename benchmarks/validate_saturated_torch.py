"""Export and validate torchvision detectors whose box regression saturates its clamp.

For each model: a state_dict of its own (tests/saturated_weights.py: torchvision's init,
BatchNorm statistics from a COCO photo, box-regression weights x40, so a share of the
width/height deltas reach ``bbox_xform_clip = log(1000/16)``), then the full
``exporters.export_model`` path at the registry's input size (800 x 800). Printed per
validation image: detections, matched, unexplained, largest IoU deficit and score difference
of a pair, degenerate pairs and explained ones by rule; the uniform grey image's figures
(compared above the first tie); and the share of saturated deltas.
Random-init-like weights, not trained: the figures say how closely onnxruntime follows
PyTorch, nothing about accuracy. Exports run one after another.

    python benchmarks/validate_saturated_torch.py [NAME ...] [--size HxW] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import saturated_weights  # noqa: E402
from exporters import default_output, export_model  # noqa: E402
from exporters.registry import load_registry  # noqa: E402
from exporters.pytorch.builders import coco_images_dir  # noqa: E402

NAMES = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn")
PHOTO_INDEX = 4  # the COCO photo the BatchNorm statistics come from (not a validation image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(NAMES))
    parser.add_argument("--size", default=None, help="input size HxW (default: the registry's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    registry = load_registry()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="detbench-saturated-"))
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    photos = sorted(coco_images_dir().glob("*.jpg"))
    for name in args.names:
        spec = registry.get(name)
        start = time.perf_counter()
        model = saturated_weights.build(name, photos[PHOTO_INDEX])
        shares = saturated_weights.saturation(model, photos[1], size or spec.input_size)
        weights = out_dir / f"{name}-saturated.pth"
        saturated_weights.torch.save(model.state_dict(), weights)
        del model
        # accept_mismatch: a failure is reported with its figures instead of ending the script.
        result = export_model(spec, default_output(spec, out_dir, size), weights=weights, input_size=size,
                              accept_mismatch=True)
        v = result.validation
        print(json.dumps({"name": name, "input_size": list(size or spec.input_size), "status": v["status"],
                          "saturated_delta_share": {k: round(x, 4) for k, x in shares.items()},
                          "seconds_total_wall_loaded": round(time.perf_counter() - start, 1),
                          "matching": v["matching"],
                          "uniform_image": {k: x for k, x in v.items() if k.startswith("uniform")},
                          "mismatches": v.get("mismatches", [])[:10]}, indent=1),
              flush=True)


if __name__ == "__main__":
    main()
