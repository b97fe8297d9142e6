"""The ONNX graph of a Darknet YOLO plan, with decoding and NMS to the detbench contract.

Layer semantics follow Darknet (pjreddie) exactly:

- convolutional: Conv, then BatchNormalization kept as its own node (so the parameter
  count reads off the graph; onnxruntime folds it at session creation). Darknet
  normalises with ``(x - mean) / (sqrt(var) + 1e-6)``, not ``sqrt(var + eps)``: the
  node has ``epsilon = 0`` and its variance input holds ``(sqrt(var) + 1e-6) ** 2``,
  which reproduces Darknet's denominator exactly. Activation leaky (slope 0.1) or linear.
- maxpool: Darknet pads ``padding`` (default ``size - 1``) with the window starting at
  ``-padding / 2`` (C integer division), i.e. the odd extra pixel goes right/bottom
  (yolov3-tiny's size-2 stride-1 pool keeps 13x13); padded cells never win.
- upsample: nearest neighbour (each pixel repeated ``stride`` times).
- route: the one layer, or a channel concatenation; shortcut: addition (+ activation).
- reorg: Darknet's reorg (``reorg_cpu(..., forward=0)``) is not SpaceToDepth: it views
  the input ``[C, H, W]`` as ``[C/s², H·s, W·s]``, gathers with ``out[k, j, i] =
  in'[k % (C/s²), j·s + (k / (C/s²)) / s, i·s + (k / (C/s²)) % s]`` and views the result
  as ``[C·s², H/s, W/s]`` — here a Reshape/Transpose/Reshape with that element order.
- region (YOLOv2): logistic x, y, objectness, softmax over classes; ``(col + σ(tx)) / gw``,
  ``anchor_w · exp(tw) / gw`` with anchors in grid cells.
- yolo (YOLOv3): logistic x, y, objectness, classes; anchors in input pixels via ``mask``.

Post-processing (the contract): score = objectness × class probability; per-class
NonMaxSuppression with the model's IoU and score thresholds (Darknet's ``do_nms_sort``:
greedy, suppress IoU > threshold, candidates at or below the threshold dropped first);
then the ``max_detections`` best by score. Outputs ``boxes`` [K, 4] (x1, y1, x2, y2 in
input-tensor pixels), ``scores`` [K], ``labels`` int64 [K] (the Darknet class index).

Batch (``build_model(..., batch=True)``, ``export NAME --batch``): the input's first dimension
is the symbolic ``N``; every reshape copies it (0) instead of fixing 1. ONNX's
NonMaxSuppression already works per batch entry (boxes of image i never suppress those of
image j, and ``max_output_boxes_per_class`` counts per image); the cap to ``max_detections`` is
made per image too: the kept candidates are ranked by score over the whole batch (TopK:
descending, ties to the lower index, as the batch-1 graph ranks them), then stably grouped by
image (a second TopK on ``image * S + rank``, integers, so nothing rounds), and within each
image the first ``max_detections`` are kept (rank in the image = position - the image's first
position). An extra output ``batch_index`` int64 [K] names each detection's image. Image i's
detections come out in the order the batch-1 graph gives them for that image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.darknet.cfg import Conv, Detection, MaxPool, Plan, Reorg, Route, Shortcut, Upsample
from exporters.darknet.weights import DarknetWeights
from core.contract import BATCH_INDEX_OUTPUT, DEFAULT_OPSET, INPUT_NAME, IR_VERSION

# Darknet's normalize_cpu adds this to sqrt(variance).
DARKNET_BN_EPSILON = 1e-6
LEAKY_SLOPE = 0.1
BATCH_DIM = "N"  # the symbolic batch dimension of a batch export's input


@dataclass(frozen=True)
class PostProcess:
    score_threshold: float
    iou_threshold: float
    max_detections: int


def head_output_name(layer: Detection) -> str:
    """Name of the raw head tensor (the conv output feeding a region/yolo layer)."""
    return f"head_{layer.inputs[0]}"


class _Graph:
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


def build_model(plan: Plan, weights: DarknetWeights, post: PostProcess, *, expose_heads: bool = False,
                graph_name: str = "darknet", batch: bool = False) -> onnx.ModelProto:
    """The ONNX model for ``plan`` with ``weights``; ``expose_heads`` adds the raw head
    tensors (``head_<layer>``, [N, C, gh, gw]) as extra outputs, for validation; ``batch`` makes
    N symbolic, with per-image NMS and the ``batch_index`` output (module docstring)."""
    g = _Graph()
    n = 0 if batch else 1  # Reshape's 0 copies the input's dimension: the batch, whatever it is
    h, w = plan.height, plan.width
    x = g.node("Div", [INPUT_NAME, g.const("pixel_scale", np.array(255.0, np.float32))], "input_01", "normalise")
    outputs: dict[int, str] = {}
    conv_weights = iter(weights.convs)

    def src(i: int) -> str:
        return x if i < 0 else outputs[i]

    for layer in plan.layers:
        i, name = layer.index, f"{layer.kind}_{layer.index}"
        if isinstance(layer, Conv):
            cw = next(conv_weights)
            inputs = [src(layer.inputs[0]), g.const(f"{name}.weight", np.asarray(cw.weights, np.float32))]
            if not layer.batch_normalize:
                inputs.append(g.const(f"{name}.bias", np.asarray(cw.biases, np.float32)))
            y = g.node("Conv", inputs, f"{name}.conv", f"{name}.conv", kernel_shape=[layer.size] * 2,
                       strides=[layer.stride] * 2, pads=[layer.padding] * 4, group=layer.groups, dilations=[1, 1])
            if layer.batch_normalize:
                denominator_sq = (np.sqrt(cw.rolling_variance.astype(np.float64)) + DARKNET_BN_EPSILON) ** 2
                y = g.node("BatchNormalization", [
                    y,
                    g.const(f"{name}.bn.scale", np.asarray(cw.scales, np.float32)),
                    g.const(f"{name}.bn.bias", np.asarray(cw.biases, np.float32)),
                    g.const(f"{name}.bn.mean", np.asarray(cw.rolling_mean, np.float32)),
                    g.const(f"{name}.bn.var", denominator_sq.astype(np.float32)),
                ], f"{name}.bn", f"{name}.bn", epsilon=0.0)
            out = _activation(g, y, layer.activation, name)
        elif isinstance(layer, MaxPool):
            begin = layer.padding // 2
            end = layer.padding - begin
            out = g.node("MaxPool", [src(layer.inputs[0])], name, name, kernel_shape=[layer.size] * 2,
                         strides=[layer.stride] * 2, pads=[begin, begin, end, end])
        elif isinstance(layer, Upsample):
            s = float(layer.stride)
            out = g.node("Resize", [src(layer.inputs[0]), "", g.const(f"{name}.scales", np.array([1, 1, s, s], np.float32))],
                         name, name, mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        elif isinstance(layer, Route):
            if len(layer.inputs) == 1:
                out = src(layer.inputs[0])
            else:
                out = g.node("Concat", [src(j) for j in layer.inputs], name, name, axis=1)
        elif isinstance(layer, Shortcut):
            y = g.node("Add", [src(layer.inputs[0]), src(layer.inputs[1])], f"{name}.add", f"{name}.add")
            out = _activation(g, y, layer.activation, name)
        elif isinstance(layer, Reorg):
            s = layer.stride
            j = layer.inputs[0]
            c, hh, ww = (plan.layers[j].out.c, plan.layers[j].out.h, plan.layers[j].out.w) if j >= 0 else (3, h, w)
            v = g.node("Reshape", [src(layer.inputs[0]), g.const(f"{name}.view", np.array([n, c // (s * s), hh, s, ww, s], np.int64))],
                       f"{name}.view", f"{name}.view")
            t = g.node("Transpose", [v], f"{name}.gather", f"{name}.gather", perm=[0, 3, 5, 1, 2, 4])
            out = g.node("Reshape", [t, g.const(f"{name}.shape", np.array([n, layer.out.c, layer.out.h, layer.out.w], np.int64))],
                         name, name)
        elif isinstance(layer, Detection):
            out = src(layer.inputs[0])
        else:  # pragma: no cover - the plan only holds the classes above
            raise TypeError(type(layer))
        outputs[i] = out

    boxes, scores = [], []
    for head in plan.heads:
        b, s = _decode(g, head, outputs[head.index], plan, n)
        boxes.append(b)
        scores.append(s)
    all_boxes = g.node("Concat", boxes, "candidates.boxes", "candidates.boxes", axis=1) if len(boxes) > 1 else boxes[0]
    all_scores = g.node("Concat", scores, "candidates.scores", "candidates.scores", axis=1) if len(scores) > 1 else scores[0]
    if batch:
        _postprocess_batch(g, all_boxes, all_scores, post)
    else:
        _postprocess(g, all_boxes, all_scores, post)
    batch_dim = BATCH_DIM if batch else 1

    graph_outputs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["K"]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["K"]),
    ]
    if batch:
        graph_outputs.append(helper.make_tensor_value_info(BATCH_INDEX_OUTPUT, TensorProto.INT64, ["K"]))
    if expose_heads:
        for head in plan.heads:
            g.node("Identity", [outputs[head.index]], head_output_name(head), f"expose_{head_output_name(head)}")
            graph_outputs.append(helper.make_tensor_value_info(
                head_output_name(head), TensorProto.FLOAT, [batch_dim, head.out.c, head.out.h, head.out.w]))
    graph = helper.make_graph(
        g.nodes, graph_name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch_dim, 3, h, w])],
        graph_outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)],
                              producer_name="detbench.exporters.darknet.export")
    model.ir_version = IR_VERSION  # what save_model writes; the session used for validation needs it too
    return model


def drop_head_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The contract model: the validation variant without its ``head_*`` outputs and their Identity nodes."""
    keep_outputs = [o for o in model.graph.output if not o.name.startswith("head_")]
    del model.graph.output[:]
    model.graph.output.extend(keep_outputs)
    keep_nodes = [n for n in model.graph.node if not n.name.startswith("expose_head_")]
    del model.graph.node[:]
    model.graph.node.extend(keep_nodes)
    return model


def _activation(g: _Graph, x: str, activation: str, name: str) -> str:
    if activation == "leaky":
        return g.node("LeakyRelu", [x], name, f"{name}.leaky", alpha=LEAKY_SLOPE)
    if activation == "linear":
        return x
    raise ValueError(activation)  # plan_network only admits the two above


def _decode(g: _Graph, head: Detection, raw: str, plan: Plan, n: int = 1) -> tuple[str, str]:
    """Candidate boxes [N, A·gh·gw, 4] (x1, y1, x2, y2, input pixels) and scores [N, A·gh·gw, classes];
    ``n`` is the batch in reshapes (0: copied from the input)."""
    name = f"decode_{head.index}"
    a, c, gh, gw = len(head.anchors), head.classes, head.out.h, head.out.w
    cells = gh * gw
    stride_x, stride_y = plan.width / gw, plan.height / gh
    t = g.node("Reshape", [raw, g.const(f"{name}.split", np.array([n, a, 5 + c, cells], np.int64))], f"{name}.split", f"{name}.split")
    t = g.node("Transpose", [t], f"{name}.entries", f"{name}.entries", perm=[0, 1, 3, 2])  # [1, A, cells, 5 + C]

    def entries(start: int, end: int, label: str) -> str:
        return g.node("Slice", [t, g.const(f"{name}.{label}.start", np.array([start], np.int64)),
                                g.const(f"{name}.{label}.end", np.array([end], np.int64)),
                                g.const(f"{name}.{label}.axis", np.array([3], np.int64))],
                      f"{name}.{label}.raw", f"{name}.{label}.raw")

    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    grid = np.stack([cols.ravel(), rows.ravel()], axis=1)[None, None]  # [1, 1, cells, 2], cell index = row * gw + col
    xy = g.node("Sigmoid", [entries(0, 2, "xy")], f"{name}.xy.sigmoid", f"{name}.xy.sigmoid")
    xy = g.node("Add", [xy, g.const(f"{name}.grid", grid)], f"{name}.xy.cells", f"{name}.xy.cells")
    xy = g.node("Mul", [xy, g.const(f"{name}.stride", np.array([stride_x, stride_y], np.float32))], f"{name}.xy", f"{name}.xy")
    anchors = np.array(head.anchors, np.float32)
    if head.kind == "region":  # anchors in grid cells
        anchors = anchors * np.array([stride_x, stride_y], np.float32)
    wh = g.node("Exp", [entries(2, 4, "wh")], f"{name}.wh.exp", f"{name}.wh.exp")
    half = g.node("Mul", [wh, g.const(f"{name}.half_anchors", (anchors / 2).reshape(1, a, 1, 2))], f"{name}.half_wh", f"{name}.half_wh")
    x1y1 = g.node("Sub", [xy, half], f"{name}.x1y1", f"{name}.x1y1")
    x2y2 = g.node("Add", [xy, half], f"{name}.x2y2", f"{name}.x2y2")
    box = g.node("Concat", [x1y1, x2y2], f"{name}.box", f"{name}.box", axis=3)
    box = g.node("Reshape", [box, g.const(f"{name}.box_shape", np.array([n, a * cells, 4], np.int64))], f"{name}.boxes", f"{name}.boxes")
    obj = g.node("Sigmoid", [entries(4, 5, "obj")], f"{name}.objectness", f"{name}.objectness")
    if head.kind == "region":
        cls = g.node("Softmax", [entries(5, 5 + c, "cls")], f"{name}.class_prob", f"{name}.class_prob", axis=3)
    else:
        cls = g.node("Sigmoid", [entries(5, 5 + c, "cls")], f"{name}.class_prob", f"{name}.class_prob")
    score = g.node("Mul", [obj, cls], f"{name}.score", f"{name}.score")
    score = g.node("Reshape", [score, g.const(f"{name}.score_shape", np.array([n, a * cells, c], np.int64))],
                   f"{name}.scores", f"{name}.scores")
    return box, score


def _postprocess(g: _Graph, boxes: str, scores: str, post: PostProcess) -> None:
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


def _postprocess_batch(g: _Graph, boxes: str, scores: str, post: PostProcess) -> None:
    """Per-image NMS and per-image ``max_detections`` over a batch (module docstring)."""
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
