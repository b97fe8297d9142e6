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
is the symbolic ``N``; every reshape copies it (0) instead of fixing 1; NMS and the
``max_detections`` cap are per image, with an extra output ``batch_index``
(:mod:`exporters.nms_graph`, which builds the post-processing of both graphs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.darknet.cfg import Conv, Detection, MaxPool, Plan, Reorg, Route, Shortcut, Upsample
from exporters.darknet.weights import DarknetWeights
from exporters.nms_graph import GraphBuilder, PostProcess, postprocess, postprocess_batch
from core.contract import BATCH_INDEX_OUTPUT, DEFAULT_OPSET, INPUT_NAME, IR_VERSION

# Darknet's normalize_cpu adds this to sqrt(variance).
DARKNET_BN_EPSILON = 1e-6
LEAKY_SLOPE = 0.1
BATCH_DIM = "N"  # the symbolic batch dimension of a batch export's input


def head_output_name(layer: Detection) -> str:
    """Name of the raw head tensor (the conv output feeding a region/yolo layer)."""
    return f"head_{layer.inputs[0]}"


def build_model(plan: Plan, weights: DarknetWeights, post: PostProcess, *, expose_heads: bool = False,
                graph_name: str = "darknet", batch: bool = False) -> onnx.ModelProto:
    """The ONNX model for ``plan`` with ``weights``; ``expose_heads`` adds the raw head
    tensors (``head_<layer>``, [N, C, gh, gw]) as extra outputs, for validation; ``batch`` makes
    N symbolic, with per-image NMS and the ``batch_index`` output (module docstring)."""
    g = GraphBuilder()
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
        postprocess_batch(g, all_boxes, all_scores, post)
    else:
        postprocess(g, all_boxes, all_scores, post)
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


def _activation(g: GraphBuilder, x: str, activation: str, name: str) -> str:
    if activation == "leaky":
        return g.node("LeakyRelu", [x], name, f"{name}.leaky", alpha=LEAKY_SLOPE)
    if activation == "linear":
        return x
    raise ValueError(activation)  # plan_network only admits the two above


def _decode(g: GraphBuilder, head: Detection, raw: str, plan: Plan, n: int = 1) -> tuple[str, str]:
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
