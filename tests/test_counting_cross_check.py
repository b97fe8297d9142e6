"""The onnx-tool cross-check is bounded: it sees only the network part of a graph, runs in a
child process stopped after a time limit, and always says what it checked or why not.

The graph here is the shape of the slow case (ssd300: the number of detections a TopK keeps
is computed from the scores, so onnx-tool's shape inference had to evaluate the whole
network in numpy): Conv -> scores -> K = count(scores > 0.5) -> TopK(K).
"""

from __future__ import annotations

import os

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h

from counting import profile_model
from counting.analyzer import _bounded, network_submodel
from test_counting_ops import build, init, vi


def _data_dependent_topk(tmp_path):
    nodes = [
        h.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),           # [1, 4, 8, 8]
        h.make_node("Reshape", ["c", "flat"], ["s"]),                            # [1, 256]
        h.make_node("Greater", ["s", "half"], ["above"]),
        h.make_node("Cast", ["above"], ["above_i"], to=T.INT64),
        h.make_node("ReduceSum", ["above_i", "axes"], ["k"], keepdims=1),         # K from the data
        h.make_node("TopK", ["s", "k"], ["v", "i"], axis=-1),
    ]
    inits = [init("W", [4, 3, 3, 3]), init("B", [4]), init("flat", [2], np.int64, [1, -1]),
             init("half", [], np.float32, 0.5), init("axes", [1], np.int64, [1])]
    return build(tmp_path, nodes, [vi("x", [1, 3, 8, 8])], [vi("v", None), vi("i", None)], inits, name="dd")


def test_only_the_network_part_is_handed_over_and_checked(tmp_path):
    import onnx

    path = _data_dependent_topk(tmp_path)
    sub, keys = network_submodel(onnx.load(str(path)))
    assert [n.op_type for n in sub.graph.node] == ["Conv"]  # no TopK, nothing downstream of the data
    p = profile_model(path, cross_check=True)
    check = p.onnx_tool
    assert check["status"] == "ok", check
    assert check["scope"].startswith("network part: 1 top-level node")
    # Conv 3->4 3x3 on 8x8 padded: 4 * 64 outputs x 27 taps = 6912 MACs (ours, without bias);
    # onnx-tool adds one bias addition per output: 256.
    assert check["ours"]["conv_macs"] == 4 * 64 * 27 == 6912
    assert check["conv_macs"] == 6912 + 256


def test_a_cross_check_over_its_time_limit_is_skipped_with_the_reason(tmp_path):
    p = profile_model(_data_dependent_topk(tmp_path), cross_check=True, cross_check_seconds=0)
    check = p.onnx_tool
    assert check["status"] == "skipped" and check["stage"] == "time limit"
    assert "did not finish within 0 s" in check["reason"]
    assert p.macs > 0  # our own figures stand


def _dies():
    os._exit(3)  # what a segfault in onnx-tool's numpy code looks like to the parent


def _raises():
    raise AssertionError("onnx-tool's own assertion")


def test_a_crashing_or_raising_cross_check_is_reported_not_raised():
    died = _bounded(_dies, (), 30)
    assert died["status"] == "failed" and died["stage"] == "crashed" and "exit code 3" in died["error"]
    raised = _bounded(_raises, (), 30)
    assert raised["status"] == "failed" and "AssertionError: onnx-tool's own assertion" in raised["error"]
