"""The exported-model contract: save_model, read_contract, weights_tag.

A tiny hand-built graph (onnx.helper) stands in for a detector: its outputs are
worked out by hand from its input, so onnxruntime running the saved file proves the
file is loadable and intact, independently of any exporter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from core.contract import (DEFAULT_OPSET, IR_VERSION, PREFIX, RANDOM_INIT, ModelContract, read_contract,
                              save_model, weights_tag)
from core.errors import ContractError, ExportError

# Every key the contract requires, listed by hand from DESIGN.md's contract section.
REQUIRED_KEYS = ("name", "family", "framework", "input_height", "input_width", "resize", "label_space",
                 "score_threshold", "iou_threshold", "max_detections", "weights", "source_params")
BOX = [2.0, 3.0, 40.0, 50.0]


def contract(**changes) -> ModelContract:
    base = ModelContract(name="toy", family="toy", framework="pytorch", input_height=4, input_width=6,
                         resize="letterbox", label_space="coco91", score_threshold=0.05, iou_threshold=0.5,
                         max_detections=100, weights="sha256:" + "ab" * 32, source_params=1234,
                         pad_value=114.0, extra={"validation": "max abs diff 1e-5", "exporter": "hand"})
    return dataclasses.replace(base, **changes)


def toy_model(input_name="images", output_names=("boxes", "scores", "labels"), dangling=False) -> onnx.ModelProto:
    """scores = mean of the image; one fixed box; label 7 (opset 17: ReduceMean takes axes as an attribute)."""
    boxes, scores, labels = output_names
    nodes = [
        helper.make_node("ReduceMean", [input_name], [scores], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Constant", [], [boxes], value=helper.make_tensor("b", TensorProto.FLOAT, [1, 4], BOX)),
        helper.make_node("Constant", [], [labels], value=helper.make_tensor("l", TensorProto.INT64, [1], [7])),
    ]
    if dangling:  # a node reading a tensor nothing produces: the full checker must object
        nodes.append(helper.make_node("Identity", ["nowhere"], ["extra"]))
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, 4, 6])],
        [helper.make_tensor_value_info(boxes, TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info(scores, TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info(labels, TensorProto.INT64, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])


def test_save_model_writes_ir10_that_onnxruntime_runs(tmp_path):
    model = toy_model()
    assert model.ir_version > IR_VERSION  # onnx 1.23 would write a newer IR than onnxruntime 1.31 loads
    path = save_model(model, tmp_path / "out" / "toy.onnx", contract())

    assert path == tmp_path / "out" / "toy.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.onnx"]  # no temporary file left
    saved = onnx.load(str(path))
    assert saved.ir_version == 10
    assert [(o.domain, o.version) for o in saved.opset_import] == [("", 17)]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = np.arange(72, dtype=np.float32).reshape(1, 3, 4, 6)
    boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"images": image})
    assert boxes.tolist() == [BOX]
    assert scores.tolist() == [pytest.approx(35.5)]  # mean of 0..71
    assert labels.dtype == np.int64 and labels.tolist() == [7]


def test_metadata_round_trips_through_the_file(tmp_path):
    original = contract()
    path = save_model(toy_model(), tmp_path / "toy.onnx", original)
    assert read_contract(path) == original
    assert read_contract(onnx.load(str(path))) == original
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props[PREFIX + "input_height"] == "4" and props[PREFIX + "weights"] == "sha256:" + "ab" * 32
    assert props[PREFIX + "validation"] == "max abs diff 1e-5"
    loaded = read_contract(path)
    assert (loaded.input_size, loaded.random_init, loaded.pad_value) == ((4, 6), False, 114.0)


def test_save_model_replaces_old_detbench_metadata_and_keeps_foreign_keys(tmp_path):
    model = toy_model()
    helper.set_model_props(model, {"author": "someone", PREFIX + "name": "stale", PREFIX + "obsolete": "x"})
    path = save_model(model, tmp_path / "toy.onnx", contract(weights=RANDOM_INIT))
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["author"] == "someone"
    assert props[PREFIX + "name"] == "toy" and PREFIX + "obsolete" not in props
    assert read_contract(path).random_init


def test_wrong_io_names_are_rejected_listing_every_problem(tmp_path):
    model = toy_model(input_name="input", output_names=("dets", "scores", "classes"), dangling=True)
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError) as err:
        save_model(model, target, contract())
    message = str(err.value)
    assert "'toy'" in message
    assert "inputs are ['input']" in message and "['images']" in message
    assert "outputs are ['dets', 'scores', 'classes']" in message and "['boxes', 'scores', 'labels']" in message
    assert "onnx.checker (full check) failed" in message and "nowhere" in message
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_file_without_metadata_names_missing_keys_and_the_options(tmp_path):
    model = toy_model()
    model.ir_version = IR_VERSION
    path = tmp_path / "foreign.onnx"
    onnx.save_model(model, str(path))

    with pytest.raises(ContractError) as err:
        read_contract(path)
    message = str(err.value)
    assert str(path) in message
    for key in REQUIRED_KEYS:
        assert PREFIX + key in message
    for option in ("--input-size", "--resize", "--label-space", "python cli.py export"):
        assert option in message

    described = read_contract(path, overrides={
        "name": "foreign", "family": "unknown", "framework": "onnx", "input_height": 4, "input_width": 6,
        "resize": "stretch", "label_space": "coco80", "score_threshold": 0.01, "iou_threshold": 0.45,
        "max_detections": 100, "weights": RANDOM_INIT, "source_params": 0})
    assert (described.input_size, described.resize, described.label_space) == ((4, 6), "stretch", "coco80")
    assert described.pad_value == 127.5  # the default when the file does not say


def test_partially_described_file_lists_only_what_is_missing(tmp_path):
    model = toy_model()
    props = {k: v for k, v in contract().to_props().items() if not k.endswith(("resize", "label_space"))}
    helper.set_model_props(model, props)
    with pytest.raises(ContractError) as err:
        read_contract(model)
    message = str(err.value)
    assert PREFIX + "resize" in message and PREFIX + "label_space" in message
    assert PREFIX + "input_height" not in message


@pytest.mark.parametrize("key, value, expected", [
    ("input_height", "four", "malformed detbench metadata value"),
    ("resize", "crop", "resize 'crop' is not one of"),
    ("label_space", "voc", "label_space 'voc' is not one of"),
    ("weights", "md5:0123", "weights must be 'sha256:<hex>' or 'random-init'"),
    ("input_width", "0", "input size 4x0 is not positive"),
])
def test_malformed_metadata_is_a_contract_error(key, value, expected):
    model = toy_model()
    props = contract().to_props()
    props[PREFIX + key] = value
    helper.set_model_props(model, props)
    with pytest.raises(ContractError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_contract(model)


def test_read_contract_names_unreadable_files(tmp_path):
    with pytest.raises(ContractError, match="no ONNX file at .*absent.onnx"):
        read_contract(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ContractError, match="junk.onnx is not a readable ONNX file"):
        read_contract(junk)


def test_weights_tag(tmp_path):
    assert weights_tag(None) == RANDOM_INIT
    path = tmp_path / "abc.weights"
    path.write_bytes(b"abc")
    # FIPS 180-2, appendix B.1: SHA-256("abc").
    assert weights_tag(path) == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_every_command_shares_one_file_check(tmp_path):
    """read_contract refuses, with the reason, what is not a contract file (issue 12, rule 3)."""
    from core.contract import check_file

    with pytest.raises(ContractError, match="is a directory, not an ONNX file"):
        read_contract(tmp_path)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ContractError, match=r"is empty \(0 bytes\)"):
        check_file(empty)
    renamed = toy_model(input_name="input_0")
    helper.set_model_props(renamed, contract().to_props())  # complete metadata does not excuse the graph
    with pytest.raises(ContractError, match=r"inputs are \['input_0'\], the contract wants exactly \['images'\]"):
        read_contract(renamed)


def test_a_batch_file_must_say_which_image_each_detection_belongs_to(tmp_path):
    batched = contract(extra={"batch": "symbolic"})
    # fixed batch 1 and no batch_index: both problems named, nothing written
    with pytest.raises(ExportError) as err:
        save_model(toy_model(), tmp_path / "b.onnx", batched)
    assert "no output 'batch_index'" in str(err.value) and "fixed batch of 1" in str(err.value)
    assert not (tmp_path / "b.onnx").exists()
    model = toy_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.node.append(helper.make_node("Constant", [], ["batch_index"],
                                             value=helper.make_tensor("i", TensorProto.INT64, [1], [0])))
    model.graph.output.append(helper.make_tensor_value_info("batch_index", TensorProto.INT64, [1]))
    path = save_model(model, tmp_path / "b.onnx", batched)
    assert read_contract(path).batch_symbolic and not read_contract(save_model(
        toy_model(), tmp_path / "one.onnx", contract())).batch_symbolic
    with pytest.raises(ContractError, match="the only value is 'symbolic'"):
        contract(extra={"batch": "4"}).check()
