"""Darknet layer semantics that ONNX has no single operator for, checked against literal
transcriptions of Darknet's C loops (maxpool_layer.c, blas.c reorg_cpu) written here in numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from exporters.darknet.cfg import parse_cfg, plan_network
from exporters.darknet.graph import build_model
from exporters.nms_graph import PostProcess
from exporters.darknet.weights import random_weights

SMALL_CFG = """
[net]
width=8
height=8
channels=3

[convolutional]
filters=16
size=1
stride=1
pad=1
activation=linear

[maxpool]
size=2
stride=1

[reorg]
stride=2

[convolutional]
filters=85
size=1
stride=1
pad=1
activation=linear

[region]
anchors = 1,1
classes=80
coords=4
num=1
softmax=1
"""


def darknet_maxpool(x: np.ndarray, size: int, stride: int, padding: int) -> np.ndarray:
    """forward_maxpool_layer: window starts at -padding/2 (C division), cells outside are skipped."""
    c, h, w = x.shape
    out_h, out_w = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    offset = -int(padding / 2)
    out = np.empty((c, out_h, out_w), x.dtype)
    for k in range(c):
        for i in range(out_h):
            for j in range(out_w):
                best = -np.inf
                for n in range(size):
                    for m in range(size):
                        ch, cw = offset + i * stride + n, offset + j * stride + m
                        if 0 <= ch < h and 0 <= cw < w:
                            best = max(best, x[k, ch, cw])
                out[k, i, j] = best
    return out


def darknet_reorg(x: np.ndarray, stride: int) -> np.ndarray:
    """forward_reorg_layer -> reorg_cpu(input, w, h, c, batch, stride, forward=0, output), batch 1."""
    c, h, w = x.shape
    flat_in = x.ravel()
    flat_out = np.empty_like(flat_in)
    out_c = c // (stride * stride)
    for k in range(c):
        for j in range(h):
            for i in range(w):
                in_index = i + w * (j + h * k)
                c2 = k % out_c
                offset = k // out_c
                w2 = i * stride + offset % stride
                h2 = j * stride + offset // stride
                out_index = w2 + w * stride * (h2 + h * stride * c2)
                flat_out[in_index] = flat_in[out_index]  # forward=0: out[in_index] = x[out_index]
    return flat_out.reshape(c * stride * stride, h // stride, w // stride)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.cfg"
    path.write_text(SMALL_CFG)
    plan = plan_network(parse_cfg(path))
    model = build_model(plan, random_weights(plan, "small"), PostProcess(0.005, 0.45, 100))
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    second_conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    taps = {"pool_in": pool.input[0], "pool_out": pool.output[0], "reorg_out": second_conv.input[0]}
    for tensor in taps.values():
        model.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(1).uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": image})))
    return {key: got[tensor][0] for key, tensor in taps.items()}


def test_size2_stride1_maxpool_pads_right_bottom_like_darknet(small):
    expected = darknet_maxpool(small["pool_in"], size=2, stride=1, padding=1)
    assert expected.shape == small["pool_out"].shape == (16, 8, 8)
    np.testing.assert_array_equal(small["pool_out"], expected)
    # symmetric (or left/top) padding would give a different result: the test can tell
    left_padded = np.pad(small["pool_in"], ((0, 0), (1, 0), (1, 0)), constant_values=-np.inf)
    left_pool = np.maximum.reduce([left_padded[:, a:a + 8, b:b + 8] for a in (0, 1) for b in (0, 1)])
    assert not np.array_equal(left_pool, expected)


def test_reorg_reproduces_darknet_element_order(small):
    expected = darknet_reorg(small["pool_out"], stride=2)
    assert expected.shape == small["reorg_out"].shape == (64, 4, 4)
    np.testing.assert_array_equal(small["reorg_out"], expected)


def test_reorg_is_not_space_to_depth(small):
    """ONNX SpaceToDepth (the tempting substitute) orders elements differently from Darknet's reorg."""
    node = helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)
    graph = helper.make_graph([node], "s2d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    s2d = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": small["pool_out"][None]})[0][0]
    assert not np.allclose(s2d, darknet_reorg(small["pool_out"], stride=2))
