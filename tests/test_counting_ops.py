"""Counting rules on one-node (or few-node) graphs built with onnx.helper.

Every expected figure is worked out by hand in the test from the op's definition, not
taken from the analyzer's own output.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from counting import profile_model
from core.errors import ConfigError, UnsupportedOperatorError


def vi(name, shape, elem=T.FLOAT):
    return h.make_tensor_value_info(name, elem, shape)


def init(name, shape, dtype=np.float32, value=None):
    arr = np.full(shape, 0.5, dtype) if value is None else np.asarray(value, dtype)
    return nh.from_array(arr, name)


def build(tmp_path, nodes, inputs, outputs, inits=(), name="m", contract=None):
    graph = h.make_graph(nodes, name, inputs, outputs, list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 10
    if contract is not None:
        from core.contract import attach

        attach(model, contract)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def only(profile, op):
    found = [n for n in profile.nodes if n.op_type == op]
    assert len(found) == 1, [n.name for n in profile.nodes]
    return found[0]


# ----------------------------------------------------------------------------- convolutions
def test_conv_groups_dilation_stride_pads(tmp_path):
    # x [1,8,20,20], W [16, 8/2, 3, 3], groups 2, dilation 2 (effective kernel 5), stride 2, pads 2:
    # out = floor((20 + 2 + 2 - 5) / 2) + 1 = 10 -> [1,16,10,10]; each output: 4 ch x 9 taps.
    path = build(tmp_path, [h.make_node("Conv", ["x", "W", "B"], ["y"], group=2, dilations=[2, 2],
                                        strides=[2, 2], pads=[2, 2, 2, 2])],
                 [vi("x", [1, 8, 20, 20])], [vi("y", None)], [init("W", [16, 4, 3, 3]), init("B", [16])])
    p = profile_model(path)
    conv = only(p, "Conv")
    assert conv.outputs[0][1] == (1, 16, 10, 10)
    assert conv.macs == 16 * 10 * 10 * 4 * 3 * 3 == 57600
    assert p.conv_macs == p.linear_macs == 57600 and p.flops == 2 * p.macs
    assert p.params == 16 * 4 * 9 + 16  # weights + bias
    # bytes read: x (8*400) + W (576) + B (16) floats; written: 1600 floats
    assert conv.bytes_read == 4 * (8 * 400 + 576 + 16) and conv.bytes_written == 4 * 1600


def test_depthwise_conv_asymmetric_kernel(tmp_path):
    # depthwise: groups = C = 6, W [6,1,3,1], pads only along H: out [1,6,12,12]; 3 taps per output
    path = build(tmp_path, [h.make_node("Conv", ["x", "W"], ["y"], group=6, pads=[1, 0, 1, 0])],
                 [vi("x", [1, 6, 12, 12])], [vi("y", None)], [init("W", [6, 1, 3, 1])])
    p = profile_model(path)
    assert only(p, "Conv").macs == 6 * 12 * 12 * 3
    assert p.params == 18


def test_conv_transpose_plain_and_grouped(tmp_path):
    # x [1,4,5,5], W [Cin=4, Cout/g, k, k]: every input value is scattered through Cout/g x k x k taps.
    nodes = [h.make_node("ConvTranspose", ["x", "W1"], ["y1"], strides=[2, 2], name="plain"),
             h.make_node("ConvTranspose", ["x", "W2"], ["y2"], group=2, pads=[1, 1, 1, 1], name="grouped")]
    path = build(tmp_path, nodes, [vi("x", [1, 4, 5, 5])], [vi("y1", None), vi("y2", None)],
                 [init("W1", [4, 3, 2, 2]), init("W2", [4, 2, 3, 3])])
    p = profile_model(path)
    by = {n.name: n for n in p.nodes}
    assert by["plain"].outputs[0][1] == (1, 3, 10, 10)
    assert by["plain"].macs == 4 * 25 * 3 * 2 * 2 == 1200
    assert by["grouped"].macs == 4 * 25 * 2 * 3 * 3 == 1800
    assert p.conv_macs == 3000
    assert p.params == 48 + 72


def test_gemm_transposes(tmp_path):
    # A [2,5] x B^T with B [3,5]: M=2, K=5, N=3 -> 30 MACs; the bias C [3] is a parameter, not a MAC.
    path = build(tmp_path, [h.make_node("Gemm", ["a", "B", "C"], ["y"], transB=1)],
                 [vi("a", [2, 5])], [vi("y", None)], [init("B", [3, 5]), init("C", [3])])
    p = profile_model(path)
    assert only(p, "Gemm").macs == 30
    assert p.params == 18 and p.linear_macs == 30 and p.conv_macs == 0
    # transA: A is [K, M] = [5, 2]
    path = build(tmp_path, [h.make_node("Gemm", ["a", "B"], ["y"], transA=1)],
                 [vi("a", [5, 2])], [vi("y", None)], [init("B", [5, 7])], name="ta")
    assert only(profile_model(path), "Gemm").macs == 2 * 5 * 7


def test_matmul_broadcast_and_linear_bias(tmp_path):
    # [2,1,4,5] @ [3,5,6] broadcasts to [2,3,4,6]: 144 outputs x K=5 = 720 MACs.
    nodes = [h.make_node("MatMul", ["a", "W"], ["m"]), h.make_node("Add", ["m", "b"], ["y"])]
    path = build(tmp_path, nodes, [vi("a", [2, 1, 4, 5])], [vi("y", None)],
                 [init("W", [3, 5, 6]), init("b", [6])])
    p = profile_model(path)
    mm = only(p, "MatMul")
    assert mm.outputs[0][1] == (2, 3, 4, 6) and mm.macs == 720
    assert only(p, "Add").macs == 144  # one op per output element
    assert p.params == 90 + 6  # the weight, and the bias added right after a constant-weight MatMul


def test_matmul_vector_operands(tmp_path):
    # 1-D x 2-D: [5] @ [5,3] -> [3], K = 5 -> 15 MACs
    path = build(tmp_path, [h.make_node("MatMul", ["a", "W"], ["y"])], [vi("a", [5])], [vi("y", None)],
                 [init("W", [5, 3])])
    assert only(profile_model(path), "MatMul").macs == 15


# ----------------------------------------------------------------------------- normalisation and parameters
def test_batchnorm_counts_scale_and_bias_not_running_stats(tmp_path):
    nodes = [h.make_node("Conv", ["x", "W"], ["c"]),
             h.make_node("BatchNormalization", ["c", "s", "b", "mean", "var"], ["y"])]
    path = build(tmp_path, nodes, [vi("x", [1, 3, 6, 6])], [vi("y", None)],
                 [init("W", [4, 3, 1, 1]), init("s", [4]), init("b", [4]), init("mean", [4]), init("var", [4])])
    p = profile_model(path)
    assert only(p, "BatchNormalization").macs == 4 * 36  # y = x*a + b: one MAC per element
    assert p.params == 12 + 4 + 4
    assert p.bn_running_stats == 8


def test_folded_norm_pairs_and_input_normalisation_are_not_parameters(tmp_path):
    # images -> (x - mean) / std -> Conv -> x*a + b (FrozenBatchNorm2d as exported) -> Conv
    #        -> x*gamma (a stand-alone learned per-channel scale, e.g. L2Norm) -> Conv
    nodes = [h.make_node("Sub", ["x", "mean"], ["s"]), h.make_node("Div", ["s", "std"], ["n"]),
             h.make_node("Conv", ["n", "W1"], ["c1"]),
             h.make_node("Mul", ["c1", "a"], ["m"]), h.make_node("Add", ["m", "b"], ["f"]),
             h.make_node("Conv", ["f", "W2", "B2"], ["c2"]),
             h.make_node("Mul", ["gamma", "c2"], ["g"]),
             h.make_node("Conv", ["g", "W3"], ["y"])]
    inits = [init("mean", [3, 1, 1]), init("std", [3, 1, 1]), init("W1", [8, 3, 3, 3]),
             init("a", [1, 8, 1, 1]), init("b", [1, 8, 1, 1]), init("W2", [5, 8, 1, 1]), init("B2", [5]),
             init("gamma", [1, 5, 1, 1]), init("W3", [2, 5, 1, 1])]
    path = build(tmp_path, nodes, [vi("x", [1, 3, 10, 10])], [vi("y", None)], inits)
    p = profile_model(path)
    assert p.params == 8 * 27 + (5 * 8 + 5) + 5 + 2 * 5
    assert p.folded_norm_constants == 3 + 3 + 8 + 8
    assert p.conv_macs == 8 * 64 * 27 + 5 * 64 * 8 + 2 * 64 * 5  # 3x3 valid conv: 10 -> 8


def test_shared_weights_identity_alias_and_constant_node_weights(tmp_path):
    # One weight used by two Convs (and once more through an Identity) counts once;
    # a float Constant node feeding a weight input counts like an initializer.
    wconst = nh.from_array(np.ones((2, 2, 1, 1), np.float32), "wc")
    nodes = [h.make_node("Identity", ["W"], ["W_alias"]),
             h.make_node("Conv", ["x", "W"], ["a"]), h.make_node("Conv", ["a", "W_alias"], ["b"]),
             h.make_node("Constant", [], ["Wc"], value=wconst), h.make_node("Conv", ["b", "Wc"], ["y"])]
    path = build(tmp_path, nodes, [vi("x", [1, 2, 4, 4])], [vi("y", None)], [init("W", [2, 2, 1, 1])])
    p = profile_model(path)
    assert p.params == 4 + 4
    assert p.conv_macs == 3 * (2 * 16 * 2)


def test_merged_bias_counts_once_per_weight_it_serves(tmp_path):
    # torch.onnx merges identical initializers: two different layers' zero biases become one
    # tensor "Z". Layers A (W1) and B (W2) each own a bias: 2 x 3. Layer A applied a second time
    # (same W1, same Z: a shared head) adds nothing.
    nodes = [h.make_node("Conv", ["x", "W1", "Z"], ["a"]), h.make_node("Conv", ["a", "W2", "Z"], ["b"]),
             h.make_node("Conv", ["b", "W1", "Z"], ["y"])]
    path = build(tmp_path, nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)],
                 [init("W1", [3, 3, 1, 1]), init("W2", [3, 3, 1, 1], value=np.ones((3, 3, 1, 1))),
                  init("Z", [3], value=np.zeros(3))])
    p = profile_model(path)
    assert p.params == 9 + 9 + 2 * 3


# ----------------------------------------------------------------------------- pooling, resize, element-wise
def test_pools(tmp_path):
    # MaxPool k3 s2 pad1 on 8x8 -> 4x4: 2 ch x 16 x 9 taps; AveragePool k2 s2 -> 4x4: x 4 taps;
    # GlobalAveragePool reads every input element once.
    nodes = [h.make_node("MaxPool", ["x"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             h.make_node("AveragePool", ["x"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             h.make_node("GlobalAveragePool", ["x"], ["p3"])]
    path = build(tmp_path, nodes, [vi("x", [1, 2, 8, 8])], [vi("p1", None), vi("p2", None), vi("p3", None)])
    p = profile_model(path)
    assert only(p, "MaxPool").macs == 2 * 16 * 9
    assert only(p, "AveragePool").macs == 2 * 16 * 4
    assert only(p, "GlobalAveragePool").macs == 128


def test_resize_nearest_is_free_linear_costs_taps(tmp_path):
    scales = init("scales", [4], value=[1, 1, 2, 2])
    nodes = [h.make_node("Resize", ["x", "", "scales"], ["n"], mode="nearest"),
             h.make_node("Resize", ["x", "", "scales"], ["l"], mode="linear")]
    path = build(tmp_path, nodes, [vi("x", [1, 2, 4, 4])], [vi("n", None), vi("l", None)], [scales])
    p = profile_model(path)
    by = {n.outputs[0][0]: n for n in p.nodes}
    assert by["n"].macs == 0
    assert by["l"].outputs[0][1] == (1, 2, 8, 8)
    assert by["l"].macs == 128 * 2 * 2  # bilinear: 2 taps along each of the 2 resized axes


def test_elementwise_activations_softmax(tmp_path):
    nodes = [h.make_node("Add", ["x", "c"], ["a"]), h.make_node("Sigmoid", ["a"], ["s"]),
             h.make_node("LeakyRelu", ["s"], ["r"], alpha=0.1), h.make_node("Exp", ["r"], ["e"]),
             h.make_node("Softmax", ["e"], ["y"], axis=-1)]
    path = build(tmp_path, nodes, [vi("x", [2, 3, 4]), vi("c", [4])], [vi("y", None)])
    p = profile_model(path)
    for op in ("Add", "Sigmoid", "LeakyRelu", "Exp"):
        assert only(p, op).macs == 24, op  # broadcast Add: one op per output element
    assert only(p, "Softmax").macs == 3 * 24
    assert p.macs == 4 * 24 + 72


def test_data_movement_ops_cost_zero(tmp_path):
    shape = init("shape", [2], np.int64, [4, 6])
    idx = init("idx", [2], np.int64, [0, 2])
    starts, ends = init("st", [1], np.int64, [0]), init("en", [1], np.int64, [2])
    nodes = [h.make_node("Concat", ["x", "x"], ["c"], axis=1), h.make_node("Reshape", ["c", "shape"], ["r"]),
             h.make_node("Transpose", ["r"], ["t"], perm=[1, 0]), h.make_node("Gather", ["t", "idx"], ["g"]),
             h.make_node("Slice", ["g", "st", "en"], ["y"])]
    path = build(tmp_path, nodes, [vi("x", [2, 6])], [vi("y", None)], [shape, idx, starts, ends])
    p = profile_model(path)
    assert all(n.status == "counted" and n.macs == 0 for n in p.nodes)
    assert p.macs == 0 and p.params == 0
    assert p.other_constants == 2 + 2 + 1 + 1


# ----------------------------------------------------------------------------- detection ops
def test_roialign_and_maxroipool(tmp_path):
    # 5 RoIs x 4 channels x 7 x 7 = 980 output values; sampling_ratio 2 -> 2x2 points x 4 taps;
    # sampling_ratio 0 (adaptive, data-dependent) -> counted as 1 point x 4 taps (a lower bound).
    nodes = [h.make_node("RoiAlign", ["x", "rois", "bi"], ["r2"], output_height=7, output_width=7,
                         sampling_ratio=2, name="ra2"),
             h.make_node("RoiAlign", ["x", "rois", "bi"], ["r0"], output_height=7, output_width=7,
                         sampling_ratio=0, name="ra0"),
             h.make_node("MaxRoiPool", ["x", "rois5"], ["mp"], pooled_shape=[7, 7])]
    path = build(tmp_path, nodes, [vi("x", [1, 4, 16, 16]), vi("rois", [5, 4]), vi("bi", [5], T.INT64),
                                   vi("rois5", [5, 5])], [vi("r2", None), vi("r0", None), vi("mp", None)])
    p = profile_model(path)
    by = {n.name: n for n in p.nodes}
    assert by["ra2"].macs == 980 * 4 * 4
    assert by["ra0"].macs == 980 * 4
    assert only(p, "MaxRoiPool").macs == 980
    assert {n.part for n in p.nodes} == {"postprocess"}


def test_topk_and_nms(tmp_path):
    # TopK k=10 over 100 scores: 100 x ceil(log2(11)) = 400. NMS over [1, 3 classes, 50 boxes]:
    # one threshold test per score = 150.
    nodes = [h.make_node("TopK", ["s", "k"], ["v", "i"], axis=-1),
             h.make_node("NonMaxSuppression", ["boxes", "scores", "maxo", "iou", "thr"], ["sel"])]
    inits = [init("k", [1], np.int64, [10]), init("maxo", [1], np.int64, [5]),
             init("iou", [1], np.float32, [0.5]), init("thr", [1], np.float32, [0.1])]
    path = build(tmp_path, nodes, [vi("s", [1, 100]), vi("boxes", [1, 50, 4]), vi("scores", [1, 3, 50])],
                 [vi("v", None), vi("i", None), vi("sel", None)], inits)
    p = profile_model(path)
    assert only(p, "TopK").macs == 400
    assert only(p, "NonMaxSuppression").macs == 150
    assert p.postprocess_macs == 550 and p.network_macs == 0


def test_postprocess_delimited_after_last_learned_op(tmp_path):
    # x -> Conv -> Sigmoid -> Mul(scale) : the Sigmoid/Mul feed no learned op: post-processing.
    # The Div before the Conv (input scaling) feeds it: network.
    nodes = [h.make_node("Div", ["x", "k"], ["n"]), h.make_node("Conv", ["n", "W"], ["c"]),
             h.make_node("Sigmoid", ["c"], ["s"]), h.make_node("Mul", ["s", "k"], ["y"])]
    path = build(tmp_path, nodes, [vi("x", [1, 1, 4, 4])], [vi("y", None)],
                 [init("k", [], value=255.0), init("W", [2, 1, 1, 1])])
    p = profile_model(path)
    parts = {n.op_type: n.part for n in p.nodes}
    assert parts == {"Div": "network", "Conv": "network", "Sigmoid": "postprocess", "Mul": "postprocess"}
    assert p.postprocess_macs == 32 + 32 and p.network_macs == 16 + 32


# ----------------------------------------------------------------------------- control flow
def test_if_counts_the_costlier_branch(tmp_path):
    # then: Conv 4->4 1x1 on [1,4,3,3] = 36 x 4 = 144 MACs; else: Relu = 36. Counted: 144.
    then_g = h.make_graph([h.make_node("Conv", ["x", "W"], ["t"])], "then", [], [vi("t", [1, 4, 3, 3])])
    else_g = h.make_graph([h.make_node("Relu", ["x"], ["e"])], "else", [], [vi("e", [1, 4, 3, 3])])
    nodes = [h.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")]
    path = build(tmp_path, nodes, [vi("x", [1, 4, 3, 3]), vi("cond", [], T.BOOL)], [vi("y", None)],
                 [init("W", [4, 4, 1, 1])])
    p = profile_model(path)
    assert only(p, "Conv").macs == 144 and only(p, "Conv").executions == 1
    assert only(p, "Relu").executions == 0
    assert p.macs == 144 and p.conv_macs == 144
    assert "then_branch" in only(p, "If").note
    assert p.params == 16  # weights inside a subgraph count too


def test_loop_body_times_trip_count(tmp_path):
    # Loop M=3 times: body adds a [4,4] constant to the carried value: 16 MACs per iteration.
    body = h.make_graph(
        [h.make_node("Add", ["v_in", "inc"], ["v_out"]), h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("iter", [], T.INT64), vi("cond_in", [], T.BOOL), vi("v_in", [4, 4])],
        [vi("cond_out", [], T.BOOL), vi("v_out", [4, 4])])
    nodes = [h.make_node("Loop", ["M", "c0", "v0"], ["v"], body=body)]
    inits = [init("M", [], np.int64, 3), init("c0", [], np.bool_, True), init("inc", [4, 4])]
    path = build(tmp_path, nodes, [vi("v0", [4, 4])], [vi("v", None)], inits)
    p = profile_model(path)
    add = only(p, "Add")
    assert add.macs == 16 and add.executions == 3
    assert p.macs == 48


def test_loop_trip_count_from_scan_output(tmp_path):
    # No constant M: the number of iterations is the leading dim of the scan output
    # (here static inference knows it: the body emits [2] per iteration for M given as 5).
    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Sigmoid", ["x"], ["s"])],
        "body", [vi("iter", [], T.INT64), vi("cond_in", [], T.BOOL)],
        [vi("cond_out", [], T.BOOL), vi("s", [2])])
    nodes = [h.make_node("Loop", ["m", "c0"], ["scan"], body=body)]
    path = build(tmp_path, nodes, [vi("m", [], T.INT64), vi("x", [2])], [vi("scan", [5, 2])],
                 [init("c0", [], np.bool_, True)])
    p = profile_model(path)
    sig = only(p, "Sigmoid")
    assert sig.executions == 5 and sig.macs == 2 and p.macs == 10


# ----------------------------------------------------------------------------- unknown ops, unresolved shapes
def test_unknown_op_raises_unless_allowed(tmp_path):
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("FancyOp", ["r"], ["y"], domain="com.example", name="odd")]
    graph = h.make_graph(nodes, "u", [vi("x", [1, 4])], [vi("y", [1, 4])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    model.ir_version = 10
    path = tmp_path / "u.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOperatorError) as err:
        profile_model(path)
    assert "com.example::FancyOp" in str(err.value) and "'odd'" in str(err.value)
    assert "--allow-unknown" in str(err.value)
    p = profile_model(path, allow_unknown=True)
    assert p.unknown_ops == {"com.example::FancyOp": ["odd"]}
    assert only(p, "FancyOp").status == "unknown" and only(p, "FancyOp").macs is None
    assert p.to_dict()["complete"] is False and p.macs == 4


def test_bad_shapes_option(tmp_path):
    path = build(tmp_path, [h.make_node("Relu", ["x"], ["y"])], [vi("x", [1])], [vi("y", None)])
    with pytest.raises(ConfigError, match="--shapes"):
        profile_model(path, shapes="guess")


def _nonzero_model(tmp_path, contract):
    # images [1,3,8,8] -> pixels above 128 -> NonZero -> GatherND -> Sigmoid: the Sigmoid's size is
    # the number of bright values, unknowable statically.
    nodes = [h.make_node("Greater", ["images", "t"], ["mask"]), h.make_node("NonZero", ["mask"], ["nz"]),
             h.make_node("Transpose", ["nz"], ["idx"], perm=[1, 0]),
             h.make_node("GatherND", ["images", "idx"], ["vals"]), h.make_node("Sigmoid", ["vals"], ["y"])]
    return build(tmp_path, nodes, [vi("images", [1, 3, 8, 8])], [vi("y", None)],
                 [init("t", [], value=128.0)], name="nz", contract=contract)


def test_static_marks_unresolved_measured_resolves(tmp_path, coco_dir):
    from core.contract import ModelContract
    from core.images import load_rgb, prepare_for

    contract = ModelContract(name="nz-test", family="test", framework="onnx", input_height=8, input_width=8,
                             resize="stretch", label_space="coco80", score_threshold=0.1, iou_threshold=0.5,
                             max_detections=10, weights="random-init", source_params=0)
    path = _nonzero_model(tmp_path, contract)
    static = profile_model(path)
    sig = only(static, "Sigmoid")
    assert sig.status == "unresolved" and sig.macs is None
    assert sig.name in static.to_dict()["unresolved_nodes"]
    assert not isinstance(sig.outputs[0][1][0], int)  # marked, not guessed

    image = sorted((coco_dir / "val2017").glob("*.jpg"))[3]
    tensor, _ = prepare_for(load_rgb(image), contract)
    bright = int((tensor > 128).sum())  # independent count of what the graph selects
    assert 0 < bright < tensor.size
    measured = profile_model(path, shapes="measured", image=image)
    sig = only(measured, "Sigmoid")
    assert sig.status == "counted" and sig.macs == bright and sig.shape_source == "measured"
    assert measured.mode == "measured" and measured.image == str(image)
    assert measured.to_dict()["complete"] is True


def test_static_sees_through_float_shape_arithmetic(tmp_path):
    # torchvision-style resize: sizes = floor(shape[2:] * 1.5) computed in the graph, then a
    # Conv. ONNX inference alone cannot evaluate the float arithmetic; the analyzer evaluates it
    # exactly: x [1,2,10,12] -> [1,2,15,18] -> Conv 3x3 valid, 4 filters -> [1,4,13,16].
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Slice", ["s", "two", "four"], ["hw"]),
             h.make_node("Cast", ["hw"], ["hwf"], to=T.FLOAT), h.make_node("Mul", ["hwf", "k"], ["scaled"]),
             h.make_node("Floor", ["scaled"], ["fl"]), h.make_node("Cast", ["fl"], ["hwi"], to=T.INT64),
             h.make_node("Slice", ["s", "zero", "two"], ["nc"]), h.make_node("Concat", ["nc", "hwi"], ["sizes"], axis=0),
             h.make_node("Resize", ["x", "", "", "sizes"], ["r"], mode="nearest"),
             h.make_node("Conv", ["r", "W"], ["y"])]
    inits = [init("two", [1], np.int64, [2]), init("four", [1], np.int64, [4]), init("zero", [1], np.int64, [0]),
             init("k", [1], value=[1.5]), init("W", [4, 2, 3, 3])]
    path = build(tmp_path, nodes, [vi("x", [1, 2, 10, 12])], [vi("y", None)], inits)
    p = profile_model(path)
    conv = only(p, "Conv")
    assert conv.outputs[0][1] == (1, 4, 13, 16)
    assert conv.macs == 4 * 13 * 16 * 2 * 9
    assert p.to_dict()["complete"] is True


def test_measured_needs_contract(tmp_path):
    path = _nonzero_model(tmp_path, None)
    with pytest.raises(ConfigError, match="metadata"):
        profile_model(path, shapes="measured")
