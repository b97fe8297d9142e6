"""An independent reference for Darknet detectors: OpenCV's Darknet importer + Darknet's decoding.

This module shares nothing with ``exporters/darknet/``: OpenCV 4.x reads the ``.cfg``
and ``.weights`` itself (``cv2.dnn.readNetFromDarknet``) and computes the network up to
each ``[yolo]`` layer's input (the raw 1x1-convolution output); the decoding that
turns those raw values into detections is written here from Darknet's C code
(``yolo_layer.c``: ``get_yolo_box``, ``get_yolo_detections``, ``correct_yolo_boxes``;
``box.c``: ``do_nms_sort``; ``detector.c``: ``print_cocos``). OpenCV's own ``[yolo]``
layer is not used for detections because it zeroes class probabilities below a fixed
0.2, while evaluation needs Darknet's 0.005.

The input tensor is the one ``core.images.prepare`` makes (the same letterboxed or
stretched image every detbench consumer gets), divided by 255 as Darknet does.
It lives in ``eval/`` rather than in a test so that tests, benchmarks and a user
checking an export (``python -m eval.reference_darknet``) all run the same reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import ModelDefinitionError

# Darknet's evaluation settings (detector.c validate_detector / print_cocos).
DARKNET_EVAL_THRESHOLD = 0.005
DARKNET_NMS = 0.45


@dataclass(frozen=True)
class YoloHead:
    """One ``[yolo]`` section: which anchors (``mask``) of ``anchors`` it predicts, and its class count."""

    mask: tuple[int, ...]
    anchors: tuple[tuple[float, float], ...]
    classes: int


def yolo_heads(cfg_path: Path) -> list[YoloHead]:
    """The ``[yolo]`` sections of a Darknet cfg, in file order (a minimal parser of just those keys)."""
    heads, current = [], None
    for raw in Path(cfg_path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if current is not None:
                heads.append(current)
            current = {} if line == "[yolo]" else None
            continue
        if current is not None and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            current[key] = value
    if current is not None:
        heads.append(current)
    out = []
    for i, h in enumerate(heads):
        try:
            numbers = [float(v) for v in re.split(r"[,\s]+", h["anchors"].strip()) if v]
            anchors = tuple(zip(numbers[0::2], numbers[1::2]))
            mask = tuple(int(v) for v in h["mask"].split(","))
            classes = int(h["classes"])
        except (KeyError, ValueError) as exc:
            raise ModelDefinitionError(f"{cfg_path}: [yolo] section {i} lacks or mangles mask/anchors/classes ({exc})") from exc
        out.append(YoloHead(mask, anchors, classes))
    if not out:
        raise ModelDefinitionError(f"{cfg_path} has no [yolo] section; this reference decodes YOLOv3-style heads only")
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class DarknetReference:
    """A Darknet cfg + weights run by OpenCV, decoded as Darknet decodes.

    :meth:`detect` takes the detbench input tensor (``[1, 3, H, W]``, RGB 0..255) and
    returns Darknet's detections in tensor-relative coordinates (0..1).
    """

    def __init__(self, cfg: Path, weights: Path):
        import cv2

        self.heads = yolo_heads(cfg)
        self.net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        names = list(self.net.getLayerNames())
        yolo_layers = [n for n in names if n.startswith("yolo_")]
        if len(yolo_layers) != len(self.heads):
            raise ModelDefinitionError(f"{cfg}: OpenCV built {len(yolo_layers)} yolo layers, the cfg has {len(self.heads)}")
        # OpenCV's importer places a permute between each head's 1x1 conv and its yolo layer:
        # conv_i -> permute_j -> yolo_j. The conv output is the raw [1, A*(5+C), h, w] map.
        self.raw_layers = []
        for name in yolo_layers:
            i = names.index(name)
            if not (names[i - 1].startswith("permute_") and names[i - 2].startswith("conv_")):
                raise ModelDefinitionError(f"unexpected OpenCV layer order before {name}: {names[i - 2:i + 1]}")
            self.raw_layers.append(names[i - 2])

    def raw_outputs(self, tensor: np.ndarray) -> list[np.ndarray]:
        """The raw head maps ``[1, A*(5+C), h, w]`` for a detbench input tensor."""
        self.net.setInput(np.ascontiguousarray(tensor, dtype=np.float32) / 255.0)
        return [np.asarray(o, dtype=np.float64) for o in self.net.forward(self.raw_layers)]

    def detect(self, tensor: np.ndarray, thresh: float = DARKNET_EVAL_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
        """Darknet's ``get_yolo_detections``: ``(boxes [N, 4] as cx, cy, w, h relative to the tensor, probs [N, C])``.

        ``probs[i, j]`` = objectness x class probability, set to 0 where it is not above
        ``thresh``; boxes whose objectness is not above ``thresh`` are left out.
        """
        net_h, net_w = tensor.shape[2], tensor.shape[3]
        boxes, probs = [], []
        for head, raw in zip(self.heads, self.raw_outputs(tensor)):
            _, channels, lh, lw = raw.shape
            per = 5 + head.classes
            if channels != len(head.mask) * per:
                raise ModelDefinitionError(f"head output has {channels} channels, expected {len(head.mask)} x {per}")
            maps = raw[0].reshape(len(head.mask), per, lh, lw)
            rows, cols = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
            for a, anchor_index in enumerate(head.mask):
                m = maps[a]
                objectness = _sigmoid(m[4])
                keep = objectness > thresh
                if not keep.any():
                    continue
                aw, ah = head.anchors[anchor_index]
                x = (cols[keep] + _sigmoid(m[0][keep])) / lw
                y = (rows[keep] + _sigmoid(m[1][keep])) / lh
                w = np.exp(m[2][keep]) * aw / net_w
                h = np.exp(m[3][keep]) * ah / net_h
                p = objectness[keep][:, None] * _sigmoid(m[5:, keep].T)
                p[p <= thresh] = 0.0
                boxes.append(np.stack([x, y, w, h], axis=1))
                probs.append(p)
        if not boxes:
            return np.zeros((0, 4)), np.zeros((0, self.heads[0].classes))
        return np.concatenate(boxes), np.concatenate(probs)


def correct_boxes(boxes: np.ndarray, image_w: int, image_h: int, net_w: int, net_h: int, letterbox: bool) -> np.ndarray:
    """Darknet's ``correct_yolo_boxes`` (relative=0): tensor-relative cx, cy, w, h to image pixels."""
    out = boxes.astype(np.float64).copy()
    if letterbox:
        # integer new size exactly as Darknet computes it
        if net_w / image_w < net_h / image_h:
            new_w, new_h = net_w, (image_h * net_w) // image_w
        else:
            new_h, new_w = net_h, (image_w * net_h) // image_h
        out[:, 0] = (out[:, 0] - (net_w - new_w) / 2.0 / net_w) / (new_w / net_w)
        out[:, 1] = (out[:, 1] - (net_h - new_h) / 2.0 / net_h) / (new_h / net_h)
        out[:, 2] *= net_w / new_w
        out[:, 3] *= net_h / new_h
    out[:, [0, 2]] *= image_w
    out[:, [1, 3]] *= image_h
    return out


def nms_sort(boxes: np.ndarray, probs: np.ndarray, nms: float = DARKNET_NMS) -> np.ndarray:
    """Darknet's ``do_nms_sort``: per class, greedy suppression (IoU > ``nms``) in descending probability.

    Returns a copy of ``probs`` with suppressed entries set to 0.
    """
    probs = probs.copy()
    x1, x2 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 0] + boxes[:, 2] / 2
    y1, y2 = boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 1] + boxes[:, 3] / 2
    area = boxes[:, 2] * boxes[:, 3]
    for k in range(probs.shape[1]):
        candidates = np.flatnonzero(probs[:, k] > 0)
        if candidates.size < 2:
            continue
        order = candidates[np.argsort(-probs[candidates, k], kind="stable")]
        alive = np.ones(order.size, dtype=bool)
        for i in range(order.size):
            if not alive[i]:
                continue
            a, rest = order[i], order[i + 1:]
            iw = np.clip(np.minimum(x2[a], x2[rest]) - np.maximum(x1[a], x1[rest]), 0, None)
            ih = np.clip(np.minimum(y2[a], y2[rest]) - np.maximum(y1[a], y1[rest]), 0, None)
            inter = iw * ih
            iou = inter / (area[a] + area[rest] - inter)
            alive[i + 1:] &= ~(iou > nms)
        probs[order[~alive], k] = 0.0
    return probs


def coco_entries(boxes: np.ndarray, probs: np.ndarray, image_id: int, image_w: int, image_h: int,
                 category_ids) -> list[dict[str, Any]]:
    """Darknet's ``print_cocos``: one entry per (box, class) with a non-zero probability, boxes clipped."""
    out = []
    for (cx, cy, w, h), row in zip(boxes, probs):
        xmin, xmax = max(cx - w / 2, 0.0), min(cx + w / 2, float(image_w))
        ymin, ymax = max(cy - h / 2, 0.0), min(cy + h / 2, float(image_h))
        for j in np.flatnonzero(row):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[j]),
                        "bbox": [float(xmin), float(ymin), float(xmax - xmin), float(ymax - ymin)],
                        "score": float(row[j])})
    return out


def reference_results(cfg: Path, weights: Path, images, *, size: tuple[int, int], resize: str,
                      thresh: float = DARKNET_EVAL_THRESHOLD, nms: float = DARKNET_NMS,
                      progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """COCO results of the Darknet model over ``images`` (``eval.dataset.CocoImage``s), as Darknet's validator makes them.

    Images are prepared with ``core.images.prepare`` (``resize`` = letterbox|stretch,
    ``size`` = (height, width)), so the reference sees the very tensors an exported model
    is fed. Labels are COCO's 80 categories in Darknet's ``coco_ids`` order. Like
    Darknet, no cap on detections per image (see :func:`top_per_image` for the
    exported-model contract's cap).
    """
    from eval.dataset import COCO80_CATEGORY_IDS
    from core.images import load_rgb, prepare

    height, width = size
    ref = DarknetReference(cfg, weights)
    results = []
    for n, image in enumerate(images, 1):
        rgb = load_rgb(image.path)
        tensor, _ = prepare(rgb, height, width, resize)
        boxes, probs = ref.detect(tensor, thresh)
        probs = nms_sort(boxes, probs, nms)
        h0, w0 = rgb.shape[:2]
        pixels = correct_boxes(boxes, w0, h0, width, height, letterbox=(resize == "letterbox"))
        results.extend(coco_entries(pixels, probs, image.id, w0, h0, COCO80_CATEGORY_IDS))
        if progress is not None:
            progress(n, len(images))
    return results


def top_per_image(results: list[dict[str, Any]], max_detections: int) -> list[dict[str, Any]]:
    """The ``max_detections`` highest-scoring entries of each image (the contract caps exports at 100)."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for det in results:
        by_image.setdefault(det["image_id"], []).append(det)
    return [d for dets in by_image.values() for d in sorted(dets, key=lambda d: -d["score"])[:max_detections]]


def main(argv: list[str] | None = None) -> None:
    """``python -m eval.reference_darknet CFG WEIGHTS COCO_DIR --resize letterbox [--size 416]``: print mAP figures."""
    import argparse
    import json

    from eval.coco import score_results
    from eval.dataset import load_coco

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("cfg", type=Path)
    parser.add_argument("weights", type=Path)
    parser.add_argument("coco", type=Path)
    parser.add_argument("--resize", choices=("letterbox", "stretch"), default="letterbox")
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the COCO results here")
    args = parser.parse_args(argv)
    dataset = load_coco(args.coco)
    selection = dataset.select(args.limit)
    results = reference_results(args.cfg, args.weights, selection, size=(args.size, args.size), resize=args.resize)
    if args.out:
        args.out.write_text(json.dumps(results))
    ids = [i.id for i in selection]
    for label, dets in (("darknet (uncapped)", results), ("top 100 per image", top_per_image(results, 100))):
        scores = score_results(dets, dataset, image_ids=ids)
        print(f"OpenCV-Darknet reference, {args.resize} {args.size}, {label}: {len(ids)} images, "
              f"{scores['detections']} detections, mAP@0.5 {100 * scores['map50']:.3f}, "
              f"mAP@[.5:.95] {100 * scores['map']:.3f} (measured, pycocotools)")


if __name__ == "__main__":
    main()
