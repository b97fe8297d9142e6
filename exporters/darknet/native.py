"""Darknet models in their native runtime: OpenCV's DNN module reading the cfg and .weights.

``cv2.dnn.readNetFromDarknet`` is the runtime Python users run Darknet models with. For a
random-init export the very same deterministic random weights the exporter drew are written
as a Darknet ``.weights`` file. One call is ``net.forward`` of the YOLO/region outputs plus
OpenCV's batched per-class NMS (``cv2.dnn.NMSBoxesBatched``) at the contract's score and IoU
thresholds, so both sides do decode + NMS; the kept detections come back in the contract's
form (boxes x1, y1, x2, y2 in input pixels, best first, at most max_detections).

OpenCV's YOLO/region layer zeroes class scores at or below its ``thresh`` (0.2 unless the cfg
sets one), so detections the contract graph keeps between its low evaluation threshold and
0.2 do not exist here: ``min_score`` says so, and comparisons leave that tail out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from core.contract import sha256_file
from core.errors import ModelDefinitionError
from exporters.native_model import NativeModel, matching_weights


def open_native(path: Path, contract, *, threads: int | None = None, weights: Path | None = None) -> NativeModel:
    import cv2

    if threads is not None:
        cv2.setNumThreads(int(threads))
    with tempfile.TemporaryDirectory(prefix="detbench-native-") as tmp:
        cfg, weights_file = darknet_files(path, contract, Path(tmp), weights)
        net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights_file))  # reads both files now; tmp may go
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    outputs = net.getUnconnectedOutLayersNames()
    height, width = contract.input_height, contract.input_width
    scale = np.array([width, height, width, height], dtype=np.float32)
    score_threshold, iou_threshold = contract.score_threshold, contract.iou_threshold
    top_k = contract.max_detections
    opencv_thresh = _yolo_thresh(cfg)

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        net.setInput(np.ascontiguousarray(images / np.float32(255.0), dtype=np.float32))  # Darknet: RGB in 0..1
        heads = net.forward(outputs)
        rows = np.concatenate([h.reshape(-1, h.shape[-1]) for h in heads], axis=0)
        # OpenCV's yolo/region rows: cx, cy, w, h (relative), objectness, class scores (already x objectness)
        class_scores = rows[:, 5:]
        labels = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(rows)), labels]
        keep = scores >= score_threshold
        cxcywh = rows[keep, :4] * scale
        xywh = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, 2:]], axis=1)
        scores, labels = scores[keep], labels[keep]
        # cv2's batched NMS is class-aware like the graph's
        kept = np.asarray(cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), labels.tolist(),
                                                  score_threshold, iou_threshold), dtype=np.int64).reshape(-1)
        kept = kept[np.argsort(-scores[kept], kind="stable")][:top_k]
        boxes = np.concatenate([xywh[kept, :2], xywh[kept, :2] + xywh[kept, 2:]], axis=1).astype(np.float32)
        return {"boxes": boxes.reshape(-1, 4), "scores": scores[kept].astype(np.float32),
                "labels": labels[kept].astype(np.int64)}

    return NativeModel("darknet", "OpenCV DNN", cv2.__version__,
                       f"OpenCV DNN {cv2.__version__} (readNetFromDarknet, CPU backend)",
                       "net.forward on the cfg+weights, then per-class NMS (cv2.dnn.NMSBoxesBatched)", run, threads,
                       min_score=opencv_thresh)


def _yolo_thresh(cfg: Path) -> float:
    """OpenCV's class-score cut of the cfg's yolo/region layers: their ``thresh``, 0.2 by default."""
    from exporters.darknet.cfg import parse_cfg

    values = [float(section.options.get("thresh", 0.2)) for section in parse_cfg(cfg).layers
              if section.kind in ("yolo", "region")]
    return max(values, default=0.2)


def darknet_files(path: Path, contract, tmp: Path, weights: Path | None = None) -> tuple[Path, Path]:
    """The cfg and .weights the Darknet export of ``path`` was built from.

    The cfg is the registry's, checked against the sha256 the export recorded. Trained
    exports need the weights file whose sha256 the contract records (``weights``, else the
    located official file); random-init exports get the exporter's deterministic random
    weights written to ``tmp`` as a Darknet .weights file.
    """
    from exporters.darknet.export import find_cfg
    from exporters.registry import load_registry

    spec = load_registry().get(contract.name)
    cfg = find_cfg(spec)
    recorded = contract.extra.get("cfg_sha256")
    if recorded and sha256_file(cfg) != recorded:
        raise ModelDefinitionError(f"{path} was exported from a cfg with sha256 {recorded}, but {cfg} has another; "
                                   "re-export the model or restore its cfg")
    if contract.random_init:
        from exporters.darknet.cfg import parse_cfg, plan_network
        from exporters.darknet.weights import random_weights, write_weights

        plan = plan_network(parse_cfg(cfg), contract.input_size)
        return cfg, write_weights(tmp / f"{contract.name}-random.weights", random_weights(plan, contract.name))
    return cfg, matching_weights(path, contract, spec, weights)
