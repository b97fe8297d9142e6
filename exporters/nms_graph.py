"""The contract's in-graph post-processing as ONNX nodes: per-class NMS and the detection cap.

Shared by the graphs detbench builds itself: the Darknet exporter (``exporters.darknet.graph``)
and the foreign-ONNX wrapper's epilogue (``exporters.foreign.wrap``), so that both follow the
contract the same way.

Batch 1 (:func:`postprocess`): per-class ``NonMaxSuppression`` (``center_point_box = 0``) with the
model's IoU and score thresholds and ``max_detections`` per class, then the ``max_detections``
best by score (TopK: descending, ties to the lower index). Outputs ``boxes`` [K, 4], ``scores``
[K], ``labels`` int64 [K] (the class index; the caller maps it to its label space).

Batch (:func:`postprocess_batch`, ``export NAME --batch``): ONNX's NonMaxSuppression already
works per batch entry (boxes of image i never suppress those of image j, and
``max_output_boxes_per_class`` counts per image); the cap to ``max_detections`` is made per
image too: the kept candidates are ranked by score over the whole batch (TopK: descending, ties
to the lower index, as the batch-1 graph ranks them), then stably grouped by image (a second
TopK on ``image * S + rank``, integers, so nothing rounds), and within each image the first
``max_detections`` are kept (rank in the image = position - the image's first position). An
extra output ``batch_index`` int64 [K] names each detection's image. Image i's detections come
out in the order the batch-1 graph gives them for that image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from core.contract import BATCH_INDEX_OUTPUT


@dataclass(frozen=True)
class PostProcess:
    """The contract's post-processing settings (they are the registry's / the describe file's)."""

    score_threshold: float
    iou_threshold: float
    max_detections: int


class GraphBuilder:
    """ONNX nodes and initializers collected in order; ``const`` names never collide with node outputs."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = set()

    def const(self, name: str, array) -> str:
        name = "const." + name  # initializers never collide with node outputs
        assert name not in self._names, name
        self._names.add(name)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, name: str, **attrs) -> list[str] | str:
        single = isinstance(outputs, str)
        outs = [outputs] if single else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if single else outs


def postprocess(g: GraphBuilder, boxes: str, scores: str, post: PostProcess) -> None:
    """Per-class NMS of ``boxes`` [1, M, 4] (x1, y1, x2, y2) with ``scores`` [1, M, C], then the
    ``max_detections`` best by score: adds ``scores``, ``boxes`` and ``labels`` (class indices)."""
    per_class = g.node("Transpose", [scores], "nms.scores", "nms.scores", perm=[0, 2, 1])  # [1, C, M]
    selected = g.node("NonMaxSuppression", [
        boxes, per_class,
        g.const("nms.max_per_class", np.array([post.max_detections], np.int64)),
        g.const("nms.iou_threshold", np.array([post.iou_threshold], np.float32)),
        g.const("nms.score_threshold", np.array([post.score_threshold], np.float32)),
    ], "nms.selected", "nms", center_point_box=0)  # [S, 3]: (batch, class, box)
    box_index = g.node("Gather", [selected, g.const("nms.batch_box", np.array([0, 2], np.int64))], "nms.batch_box", "nms.batch_box", axis=1)
    sel_boxes = g.node("GatherND", [boxes, box_index], "nms.boxes", "nms.boxes")
    sel_scores = g.node("GatherND", [per_class, selected], "nms.scores_selected", "nms.scores_selected")
    sel_labels = g.node("Gather", [selected, g.const("nms.class_column", np.array(1, np.int64))], "nms.labels", "nms.labels", axis=1)
    count = g.node("Shape", [sel_scores], "nms.count", "nms.count")
    k = g.node("Min", [count, g.const("max_detections", np.array([post.max_detections], np.int64))], "topk.k", "topk.k")
    values, order = g.node("TopK", [sel_scores, k], ["scores", "topk.order"], "topk", axis=0, largest=1, sorted=1)
    g.node("Gather", [sel_boxes, order], "boxes", "boxes", axis=0)
    g.node("Gather", [sel_labels, order], "labels", "labels", axis=0)


def postprocess_batch(g: GraphBuilder, boxes: str, scores: str, post: PostProcess) -> None:
    """Per-image NMS and per-image ``max_detections`` over a batch (module docstring): adds
    ``scores``, ``boxes``, ``labels`` and ``batch_index``."""
    per_class = g.node("Transpose", [scores], "nms.scores", "nms.scores", perm=[0, 2, 1])  # [N, C, M]
    selected = g.node("NonMaxSuppression", [
        boxes, per_class,
        g.const("nms.max_per_class", np.array([post.max_detections], np.int64)),
        g.const("nms.iou_threshold", np.array([post.iou_threshold], np.float32)),
        g.const("nms.score_threshold", np.array([post.score_threshold], np.float32)),
    ], "nms.selected", "nms", center_point_box=0)  # [S, 3]: (image, class, box), image-major
    box_index = g.node("Gather", [selected, g.const("nms.batch_box", np.array([0, 2], np.int64))], "nms.batch_box", "nms.batch_box", axis=1)
    sel_boxes = g.node("GatherND", [boxes, box_index], "nms.boxes", "nms.boxes")
    sel_scores = g.node("GatherND", [per_class, selected], "nms.scores_selected", "nms.scores_selected")
    sel_labels = g.node("Gather", [selected, g.const("nms.class_column", np.array(1, np.int64))], "nms.labels", "nms.labels", axis=1)
    sel_images = g.node("Gather", [selected, g.const("nms.image_column", np.array(0, np.int64))], "nms.images", "nms.images", axis=1)
    count = g.node("Shape", [sel_scores], "nms.count", "nms.count")  # [S]
    # 1. every kept candidate of the batch by descending score (ties: lower index first, as batch 1)
    _, by_score = g.node("TopK", [sel_scores, count], ["rank.scores", "rank.order"], "rank", axis=0, largest=1, sorted=1)
    positions = g.node("Range", [g.const("rank.zero", np.array(0, np.int64)),
                                 g.node("Squeeze", [count, g.const("rank.squeeze_axis", np.array([0], np.int64))],
                                        "rank.count", "rank.count"),
                                 g.const("rank.one", np.array(1, np.int64))], "rank.positions", "rank.positions")
    # 2. grouped by image, keeping that order: key = image * S + global rank, an exact integer
    images_by_score = g.node("Gather", [sel_images, by_score], "group.images_by_score", "group.images_by_score", axis=0)
    key = g.node("Add", [g.node("Mul", [images_by_score, count], "group.image_offset", "group.image_offset"), positions],
                 "group.key", "group.key")
    _, grouped = g.node("TopK", [key, count], ["group.keys", "group.order"], "group", axis=0, largest=0, sorted=1)
    order = g.node("Gather", [by_score, grouped], "group.candidates", "group.candidates", axis=0)
    image_of = g.node("Gather", [sel_images, order], "group.image", "group.image", axis=0)
    # 3. rank within its image = position - number of candidates of earlier images; keep the first max_detections
    images = g.node("Range", [g.const("cap.zero", np.array(0, np.int64)),
                              g.node("Gather", [g.node("Shape", [boxes], "cap.boxes_shape", "cap.boxes_shape"),
                                                g.const("cap.batch_axis", np.array(0, np.int64))], "cap.batch", "cap.batch", axis=0),
                              g.const("cap.one", np.array(1, np.int64))], "cap.images", "cap.images")  # [N]
    of_image = g.node("Equal", [g.node("Unsqueeze", [image_of, g.const("cap.col", np.array([1], np.int64))], "cap.image_col", "cap.image_col"),
                                g.node("Unsqueeze", [images, g.const("cap.row", np.array([0], np.int64))], "cap.images_row", "cap.images_row")],
                       "cap.of_image", "cap.of_image")  # [S, N]: S x N, not S x S (S reaches thousands)
    per_image = g.node("ReduceSum", [g.node("Cast", [of_image], "cap.of_image_count", "cap.of_image_count", to=TensorProto.INT64),
                                     g.const("cap.sum_axis", np.array([0], np.int64))], "cap.per_image", "cap.per_image", keepdims=0)
    starts = g.node("CumSum", [per_image, g.const("cap.cum_axis", np.array(0, np.int64))], "cap.starts", "cap.starts", exclusive=1)
    first = g.node("Gather", [starts, image_of], "cap.first", "cap.first", axis=0)
    in_image = g.node("Sub", [positions, first], "cap.rank", "cap.rank")
    keep = g.node("Less", [in_image, g.const("max_detections", np.array(post.max_detections, np.int64))], "cap.keep", "cap.keep")
    kept = g.node("Squeeze", [g.node("NonZero", [keep], "cap.kept_index", "cap.kept_index"),
                              g.const("cap.squeeze_axis", np.array([0], np.int64))], "cap.kept", "cap.kept")
    final = g.node("Gather", [order, kept], "final.order", "final.order", axis=0)
    g.node("Gather", [sel_scores, final], "scores", "scores", axis=0)
    g.node("Gather", [sel_boxes, final], "boxes", "boxes", axis=0)
    g.node("Gather", [sel_labels, final], "labels", "labels", axis=0)
    g.node("Gather", [sel_images, final], BATCH_INDEX_OUTPUT, BATCH_INDEX_OUTPUT, axis=0)
