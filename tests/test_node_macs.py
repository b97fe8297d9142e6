"""Per-node MACs for per-layer attribution are counted one way, in `run` as in `bench --nodes`.

A Loop runs its body inside the Loop's own kernel: a profiler sees one node, `loop`, so every
execution of the body's MACs belongs to it. Worked by hand: MatMul [4, 8] x [8, 8] is 4*8*8 = 256
MACs, three trips make 768.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from counting import profile_model
from pipeline.run import _bench_macs
from runtime.bench import model_macs


def _loop_model(path, trips: int):
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "W"], ["x_out"], name="body_mm"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [4, 8])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        initializer=[numpy_helper.from_array(np.ones((8, 8), np.float32), "W"),
                     numpy_helper.from_array(np.array(trips, np.int64), "trip"),
                     numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_a_loop_body_s_macs_of_every_trip_go_to_the_loop_node(tmp_path):
    path = _loop_model(tmp_path / "loop.onnx", trips=3)
    per_node, total, _note = _bench_macs(profile_model(path, shapes="static", allow_unknown=True), "static")
    assert per_node["loop"] == 768
    assert total == 768
    assert "loop/body/body_mm" not in per_node  # no node of its own in any profiler


def test_run_and_bench_nodes_count_the_same(tmp_path):
    path = _loop_model(tmp_path / "loop.onnx", trips=5)
    from_run = _bench_macs(profile_model(path, shapes="static", allow_unknown=True), "static")
    from_bench = model_macs(path, image=tmp_path / "unused.jpg")  # static shapes resolve: no image read
    assert from_run[:2] == from_bench[:2]
    assert from_run[0]["loop"] == 5 * 256
