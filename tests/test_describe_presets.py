"""Every describe preset in exporters/foreign/describe_examples/ wraps a file of the layout it describes.

The files are built here, small and with random weights (a single strided convolution whose
output is arranged as the exporter in question arranges its tensors): Ultralytics YOLOv5,
YOLOv8 and YOLO11 ([1, 5 + C, N] / [1, 4 + C, N] candidates), Ultralytics RT-DETR ([1, 300,
4 + C] queries), DETR (softmax logits with a no-object class) and a YOLOv8 end2end export
with EfficientNMS-like outputs (num_dets first rows valid). Each wrapped file's detections are
checked against a decoding of the original file's outputs written out in this test (numpy,
greedy NMS as ONNX NonMaxSuppression defines it), not the wrapper's own decoder. The
torchvision preset is exercised by tests/test_onnx_wrap.py, the TF OD API SavedModel preset
by tests/test_tf_ssd.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.images import load_rgb, prepare

EXAMPLES = Path(__file__).resolve().parent.parent / "exporters" / "foreign" / "describe_examples"
COCO80_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
              33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
              60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)


def _model(input_name: str, size: int, stride: int, channels: int, nodes: list, outputs: list, inits: list,
           seed: int, bias=None):
    """input [1, 3, size, size] -> Conv (kernel = stride) -> "feat" [1, channels, cells] -> ``nodes``."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.03, (channels, 3, stride, stride)).astype(np.float32)
    bias = np.zeros(channels, np.float32) if bias is None else np.asarray(bias, np.float32)
    cells = (size // stride) ** 2
    graph = helper.make_graph(
        [helper.make_node("Conv", [input_name, "w", "b"], ["conv"], strides=[stride, stride]),
         helper.make_node("Reshape", ["conv", "feat_shape"], ["feat"]), *nodes],
        "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, size, size])], outputs,
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
         numpy_helper.from_array(np.array([1, channels, cells], np.int64), "feat_shape"),
         *[numpy_helper.from_array(np.asarray(v), k) for k, v in inits]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _scaled_sigmoid(channels: int, box_scale: list[float]):
    """feat -> sigmoid, box rows scaled (boxes then scores), as [1, channels, cells]."""
    scale = np.ones((1, channels, 1), np.float32)
    scale[0, :len(box_scale), 0] = box_scale
    nodes = [helper.make_node("Sigmoid", ["feat"], ["prob"]), helper.make_node("Mul", ["prob", "scale"], ["scaled"])]
    return nodes, [("scale", scale)]


def build(kind: str):
    """(ONNX model, preset file) of one exporter's layout."""
    out = helper.make_tensor_value_info
    if kind in ("ultralytics_yolov8", "ultralytics_yolo11"):
        nodes, inits = _scaled_sigmoid(84, [640, 640, 200, 200])
        nodes.append(helper.make_node("Identity", ["scaled"], ["output0"]))
        bias = np.r_[np.zeros(4), np.full(80, -9.0)]
        return _model("images", 640, 64, 84, nodes, [out("output0", TensorProto.FLOAT, [1, 84, 100])], inits,
                      seed=8 if kind.endswith("v8") else 11, bias=bias)
    if kind == "ultralytics_yolov5":
        nodes, inits = _scaled_sigmoid(85, [640, 640, 200, 200])
        nodes.append(helper.make_node("Transpose", ["scaled"], ["output0"], perm=[0, 2, 1]))
        bias = np.r_[np.zeros(4), -4.0, np.full(80, -6.0)]
        return _model("images", 640, 64, 85, nodes, [out("output0", TensorProto.FLOAT, [1, 100, 85])], inits,
                      seed=5, bias=bias)
    if kind == "ultralytics_rtdetr":
        nodes, inits = _scaled_sigmoid(84, [1, 1, 0.3, 0.3])
        nodes += [helper.make_node("Transpose", ["scaled"], ["rows"], perm=[0, 2, 1]),
                  helper.make_node("Slice", ["rows", "q0", "q300", "q_axis"], ["output0"])]
        inits += [("q0", np.array([0], np.int64)), ("q300", np.array([300], np.int64)), ("q_axis", np.array([1], np.int64))]
        bias = np.r_[np.zeros(4), np.full(80, -2.0)]
        return _model("images", 640, 32, 84, nodes, [out("output0", TensorProto.FLOAT, [1, 300, 84])], inits,
                      seed=3, bias=bias)
    if kind == "detr_softmax":
        # columns 0..90 are COCO ids (0 and the ten unused ids are never a trained DETR's best), 91 is "no object"
        bias = np.r_[np.zeros(4), np.full(92, -30.0)]
        bias[4 + np.asarray(COCO80_IDS)] = 0.0
        bias[4 + 91] = 0.5
        nodes = [helper.make_node("Transpose", ["feat"], ["rows"], perm=[0, 2, 1]),
                 helper.make_node("Slice", ["rows", "c0", "c4", "c_axis"], ["raw_boxes"]),
                 helper.make_node("Sigmoid", ["raw_boxes"], ["unit_boxes"]),
                 helper.make_node("Mul", ["unit_boxes", "box_scale"], ["pred_boxes"]),
                 helper.make_node("Slice", ["rows", "c4", "c96", "c_axis"], ["logits_raw"]),
                 helper.make_node("Mul", ["logits_raw", "ten"], ["logits"])]
        inits = [("c0", np.array([0], np.int64)), ("c4", np.array([4], np.int64)), ("c96", np.array([96], np.int64)),
                 ("c_axis", np.array([2], np.int64)), ("box_scale", np.array([1, 1, 0.3, 0.3], np.float32)),
                 ("ten", np.array(10.0, np.float32))]
        return _model("pixel_values", 800, 80, 96, nodes, [out("logits", TensorProto.FLOAT, [1, 100, 92]),
                                                          out("pred_boxes", TensorProto.FLOAT, [1, 100, 4])],
                      inits, seed=50, bias=bias)
    if kind == "yolov8_efficient_nms":
        nodes, inits = _scaled_sigmoid(84, [500, 500, 140, 140])
        nodes += [helper.make_node("Transpose", ["scaled"], ["rows"], perm=[0, 2, 1]),
                  helper.make_node("Slice", ["rows", "c0", "c2", "c_axis"], ["x1y1"]),
                  helper.make_node("Slice", ["rows", "c2", "c4", "c_axis"], ["wh"]),
                  helper.make_node("Add", ["x1y1", "wh"], ["x2y2"]),
                  helper.make_node("Concat", ["x1y1", "x2y2"], ["det_boxes"], axis=2),
                  helper.make_node("Slice", ["rows", "c4", "c84", "c_axis"], ["classes"]),
                  helper.make_node("ReduceMax", ["classes"], ["det_scores"], axes=[2], keepdims=0),
                  helper.make_node("ArgMax", ["classes"], ["best"], axis=2, keepdims=0),
                  helper.make_node("Cast", ["best"], ["det_classes"], to=TensorProto.INT32),
                  helper.make_node("Greater", ["det_scores", "half"], ["valid"]),
                  helper.make_node("Cast", ["valid"], ["valid_int"], to=TensorProto.INT32),
                  helper.make_node("ReduceSum", ["valid_int", "axis1"], ["num_dets"], keepdims=1)]
        inits += [("c0", np.array([0], np.int64)), ("c2", np.array([2], np.int64)), ("c4", np.array([4], np.int64)),
                  ("c84", np.array([84], np.int64)), ("c_axis", np.array([2], np.int64)),
                  ("half", np.array(0.5, np.float32)), ("axis1", np.array([1], np.int64))]
        return _model("images", 640, 64, 84, nodes,
                      [out("num_dets", TensorProto.INT32, [1, 1]), out("det_boxes", TensorProto.FLOAT, [1, 100, 4]),
                       out("det_scores", TensorProto.FLOAT, [1, 100]), out("det_classes", TensorProto.INT32, [1, 100])],
                      inits, seed=88)
    raise KeyError(kind)


# ----------------------------------------------------------------------------- independent decoding


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def _nms(boxes, scores, iou_threshold, score_threshold, cap):
    """Greedy class-aware NMS: per class, candidates scoring above the threshold, best first,
    dropped when their IoU with a kept box of the class exceeds the threshold; best ``cap`` overall."""
    found = []
    for c in range(scores.shape[1]):
        idx = [i for i in np.argsort(-scores[:, c], kind="stable") if scores[i, c] > score_threshold]
        kept = []
        for i in idx:
            if len(kept) < cap and (not kept or _iou(boxes[i], boxes[kept]).max() <= iou_threshold):
                kept.append(i)
        found += [(scores[i, c], c, i) for i in kept]
    found.sort(key=lambda f: -f[0])
    found = found[:cap]
    return (np.array([boxes[i] for _, _, i in found]).reshape(-1, 4), np.array([s for s, _, _ in found]),
            np.array([c for _, c, _ in found], np.int64))


def _cxcywh(b):
    return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def expected(kind: str, raw: dict, preset: dict) -> dict:
    """What the wrapped file must return, from the original file's outputs ``raw``."""
    thr, iou, cap = preset["score_threshold"], preset["iou_threshold"], preset["max_detections"]
    if kind in ("ultralytics_yolov8", "ultralytics_yolo11", "ultralytics_yolov5"):
        rows = raw["output0"][0].astype(np.float64)
        if kind != "ultralytics_yolov5":
            rows = rows.T  # [N, 4 + C]
            scores = rows[:, 4:]
        else:
            scores = rows[:, 5:] * rows[:, 4:5]
        boxes, s, c = _nms(_cxcywh(rows[:, :4]), scores, iou, thr, cap)
        return {"boxes": boxes, "scores": s, "labels": c}
    if kind in ("ultralytics_rtdetr", "rtdetr_pairs", "detr_softmax"):
        if kind == "detr_softmax":
            logits = raw["logits"][0].astype(np.float64)
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs = (e / e.sum(1, keepdims=True))[:, :91]
            boxes = _cxcywh(raw["pred_boxes"][0].astype(np.float64)) * 800
        else:
            rows = raw["output0"][0].astype(np.float64)
            probs, boxes = rows[:, 4:], _cxcywh(rows[:, :4]) * 640
        top = min(preset["outputs"].get("top_k", cap), cap)
        if kind == "rtdetr_pairs":  # every (query, class) pair competes
            pairs = [(probs[q, c], q, c) for q in range(len(probs)) for c in range(probs.shape[1])]
        else:
            pairs = [(probs[q].max(), q, int(probs[q].argmax())) for q in range(len(probs))]
        pairs = sorted((p for p in pairs if p[0] >= thr), key=lambda p: -p[0])[:top]
        return {"boxes": np.array([boxes[q] for _, q, _ in pairs]).reshape(-1, 4),
                "scores": np.array([p[0] for p in pairs]), "labels": np.array([c for _, _, c in pairs], np.int64)}
    if kind == "yolov8_efficient_nms":
        n = int(raw["num_dets"].reshape(-1)[0])
        scores = raw["det_scores"][0, :n].astype(np.float64)
        order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= thr][:cap]
        return {"boxes": raw["det_boxes"][0, :n][order].astype(np.float64), "scores": scores[order],
                "labels": raw["det_classes"][0, :n][order].astype(np.int64)}
    raise KeyError(kind)


PRESETS = sorted(p.stem for p in EXAMPLES.glob("*.toml"))
ELSEWHERE = {"torchvision_detections": "tests/test_onnx_wrap.py", "tf_od_api_saved_model": "tests/test_tf_ssd.py",
             "image_shape_nhwc_bgr": "tests/test_onnx_wrap.py", "packed_cxcywh_sigmoid": "tests/test_onnx_wrap.py",
             "yolo_raw_heads": "tests/test_onnx_wrap.py"}
KINDS = [p for p in PRESETS if p not in ELSEWHERE] + ["rtdetr_pairs"]


def test_every_preset_is_exercised():
    here = {k for k in KINDS if (EXAMPLES / f"{k}.toml").exists()}
    assert here | set(ELSEWHERE) == set(PRESETS)
    for preset, test_file in ELSEWHERE.items():  # the preset's file name is in the test that uses it
        assert f"{preset}.toml" in (Path(__file__).resolve().parent.parent / test_file).read_text(), preset


def _preset_text(kind: str) -> str:
    if kind == "rtdetr_pairs":  # Deformable-DETR style: sigmoid scores, every (query, class) pair competes
        text = (EXAMPLES / "ultralytics_rtdetr.toml").read_text()
        return text.replace("one_label_per_query = true", "one_label_per_query = false").replace(
            'name = "rtdetr-l"', 'name = "rtdetr-pairs"').replace("top_k = 300", "top_k = 150")
    return (EXAMPLES / f"{kind}.toml").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_preset_wraps_its_layout(kind, tmp_path, coco_dir):
    import tomllib

    import onnxruntime as ort

    from core.contract import read_contract
    from exporters.matching import MatchRules, match_detections
    from exporters.foreign.wrap import wrap_onnx

    source = tmp_path / f"{kind}.onnx"
    onnx.save(build("ultralytics_rtdetr" if kind == "rtdetr_pairs" else kind), source)
    describe = tmp_path / f"{kind}.toml"
    describe.write_text(_preset_text(kind))
    preset = tomllib.loads(describe.read_text())
    result = wrap_onnx(source, describe, tmp_path / "out")
    contract = read_contract(result.path)
    assert contract.name == preset["name"] and contract.label_space == preset["label_space"]
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    wrapped = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    inp = preset["input"]
    counts = []
    for path in sorted((coco_dir / "val2017").glob("*.jpg"))[-2:]:
        tensor, _ = prepare(load_rgb(path), *preset["input_size"], preset["resize"], preset.get("pad_value", 127.5))
        x = tensor * inp["scale"]
        if "mean" in inp:
            x = (x - np.asarray(inp["mean"], np.float32).reshape(1, 3, 1, 1)) / np.asarray(inp["std"], np.float32).reshape(1, 3, 1, 1)
        names = [o.name for o in original.get_outputs()]
        raw = dict(zip(names, original.run(names, {inp["name"]: x.astype(np.float32)})))
        ref = expected(kind, raw, preset)
        if preset["label_space"] == "coco80":
            assert ref["labels"].size == 0 or ref["labels"].max() < 80
        got = dict(zip(("boxes", "scores", "labels"), wrapped.run(["boxes", "scores", "labels"], {"images": tensor})))
        nms = preset["outputs"].get("nms", preset["outputs"]["layout"] in ("packed",))
        cap = min(preset["outputs"].get("top_k", preset["max_detections"]), preset["max_detections"])
        matching = match_detections(ref, got, MatchRules(iou_threshold=preset["iou_threshold"] if nms else 2.0,
                                                         score_threshold=preset["score_threshold"], max_detections=cap,
                                                         atol=1e-3, rtol=1e-3))
        assert not matching.mismatches(path.stem), matching.mismatches(path.stem)
        assert len(matching.pairs) >= 0.95 * len(ref["scores"])
        counts.append(len(ref["scores"]))
    assert min(counts) >= 5, counts  # real detections were compared
