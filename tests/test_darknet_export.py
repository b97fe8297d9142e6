"""Darknet exports against OpenCV's independent Darknet importer (cv2.dnn.readNetFromDarknet).

- the official yolov3-tiny weights: raw heads within 1e-3 on dog.jpg and COCO val images,
  and the in-graph decoding + NMS gives the detections of an independent numpy decode
  (written here from Darknet's yolo_layer.c / region_layer.c) of OpenCV's raw heads
  followed by OpenCV's NMSBoxes per class;
- every Darknet registry entry exports random-init, runs at its registry size, matches
  OpenCV on a real image, and has the parameter count its cfg implies (and as published).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from exporters.registry import load_registry
from core.contract import read_contract
from core.images import load_rgb, prepare_for

DARKNET = [spec.name for spec in load_registry() if spec.framework == "darknet"]
TOL = 1e-3


# ----------------------------------------------------------------------------- independent helpers


def cfg_sections(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Sections of a Darknet cfg, read here independently of the exporter's parser."""
    sections = []
    for raw in path.read_text().splitlines():
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            sections.append((line[1:-1], {}))
        else:
            key, value = line.split("=", 1)
            sections[-1][1][key] = value
    return sections


def cfg_param_count(path: Path) -> int:
    """Learned parameters implied by a cfg: kernel + bias (+ BN scale); running statistics excluded."""
    sections = cfg_sections(path)
    channels = [int(sections[0][1].get("channels", 3))]  # channels[i + 1] = output channels of layer i
    total = 0
    for i, (kind, opt) in enumerate(sections[1:]):
        c = channels[-1]
        if kind == "convolutional":
            n, k = int(opt["filters"]), int(opt.get("size", 1))
            bn = int(opt.get("batch_normalize", 0))
            total += n * c * k * k + n + (n if bn else 0)
            c = n
        elif kind == "route":
            refs = [int(v) for v in opt["layers"].split(",")]
            c = sum(channels[(i + r if r < 0 else r) + 1] for r in refs)
        elif kind == "reorg":
            c = c * int(opt["stride"]) ** 2
        channels.append(c)
    return total


def heads_from_cfg(path: Path) -> list[dict]:
    """For each [yolo]/[region]: the conv layer feeding it, its anchors in input pixels (or cells), softmax."""
    sections = cfg_sections(path)
    heads = []
    for i, (kind, opt) in enumerate(sections[1:]):
        if kind not in ("yolo", "region"):
            continue
        values = [float(v) for v in opt["anchors"].split(",")]
        pairs = [(values[2 * j], values[2 * j + 1]) for j in range(len(values) // 2)]
        if kind == "yolo":
            pairs = [pairs[int(m)] for m in opt["mask"].split(",")]
        heads.append({"conv": i - 1, "kind": kind, "anchors": pairs, "classes": int(opt["classes"])})
    return heads


def onnx_with_heads(path: Path) -> tuple[ort.InferenceSession, list[str]]:
    """The exported file, with the tensors its decoding starts from added as outputs, and
    the candidates entering NMS as outputs ``nms_boxes`` [1, M, 4] and ``nms_scores`` [1, C, M]."""
    model = onnx.load(str(path))
    decode = [n for n in model.graph.node if n.name.startswith("decode_") and n.name.endswith(".split")]
    decode.sort(key=lambda n: int(n.name.split("_")[1].split(".")[0]))
    heads = [n.input[0] for n in decode]
    nms = [n for n in model.graph.node if n.op_type == "NonMaxSuppression"]
    assert len(nms) == 1
    for name in heads:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    for name, tensor in (("nms_boxes", nms[0].input[0]), ("nms_scores", nms[0].input[1])):
        model.graph.node.append(helper.make_node("Identity", [tensor], [name]))
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, heads


def opencv_heads(cfg: Path, weights: Path, heads: list[dict], tensor01: np.ndarray) -> list[np.ndarray]:
    import cv2

    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setInput(tensor01)
    return [np.asarray(o) for o in net.forward([f"conv_{h['conv']}" for h in heads])]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def darknet_candidates(raw_heads, heads, height, width):
    """Darknet's get_yolo_box / get_region_box and class probabilities (objectness x class), in
    input pixels: boxes [M, 4] (x1, y1, x2, y2) and probs [M, classes], M ordered (head, anchor, row, col)."""
    boxes, probs = [], []
    for raw, head in zip(raw_heads, heads):
        a, c = len(head["anchors"]), head["classes"]
        _, _, gh, gw = raw.shape
        p = raw.reshape(a, 5 + c, gh, gw).astype(np.float64)
        rows, cols = np.mgrid[0:gh, 0:gw]
        anchors = np.array(head["anchors"])
        if head["kind"] == "region":  # anchors in grid cells
            anchors = anchors * [width / gw, height / gh]
        x = (cols + sigmoid(p[:, 0])) / gw * width
        y = (rows + sigmoid(p[:, 1])) / gh * height
        w = np.exp(p[:, 2]) * anchors[:, 0, None, None]
        h = np.exp(p[:, 3]) * anchors[:, 1, None, None]
        obj = sigmoid(p[:, 4])
        if head["kind"] == "region":
            e = np.exp(p[:, 5:] - p[:, 5:].max(axis=1, keepdims=True))
            cls = e / e.sum(axis=1, keepdims=True)
        else:
            cls = sigmoid(p[:, 5:])
        boxes.append(np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], -1).reshape(-1, 4))
        probs.append((obj[:, None] * cls).transpose(0, 2, 3, 1).reshape(-1, c))
    return np.concatenate(boxes), np.concatenate(probs)


def darknet_detections(raw_heads, heads, height, width, score_threshold, iou_threshold, max_detections):
    """Darknet's candidates + do_nms_sort (per-class greedy NMS, here OpenCV's NMSBoxes), best ``max_detections``."""
    import cv2

    boxes, probs = darknet_candidates(raw_heads, heads, height, width)
    found = []
    for k in range(probs.shape[1]):
        cand = np.flatnonzero(probs[:, k] > score_threshold)
        if not cand.size:
            continue
        xywh = [(float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])) for b in boxes[cand]]
        keep = cv2.dnn.NMSBoxes(xywh, probs[cand, k].astype(float).tolist(), score_threshold, iou_threshold)
        for j in np.asarray(keep).reshape(-1):
            found.append((float(probs[cand[j], k]), k, boxes[cand[j]]))
    found.sort(key=lambda d: -d[0])
    found = found[:max_detections]
    return {"scores": np.array([d[0] for d in found]), "labels": np.array([d[1] for d in found], np.int64),
            "boxes": np.array([d[2] for d in found]).reshape(-1, 4)}


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_same_detections(got: dict, ref: dict, label: str) -> None:
    """Same count; each reference detection has an ONNX twin (same class, IoU > 0.999, score within 1e-3)."""
    assert len(got["scores"]) == len(ref["scores"]), f"{label}: {len(got['scores'])} vs {len(ref['scores'])}"
    unused = set(range(len(got["scores"])))
    for score, cls, box in zip(ref["scores"], ref["labels"], ref["boxes"]):
        twins = [i for i in unused if got["labels"][i] == cls and abs(got["scores"][i] - score) <= TOL
                 and iou(got["boxes"][i], box) > 0.999]
        assert twins, f"{label}: no ONNX detection for class {cls} score {score:.4f} box {box}"
        unused.remove(twins[0])


def real_images(darknet_dir: Path, coco_dir: Path, n_coco: int = 3) -> list[Path]:
    return [darknet_dir / "dog.jpg"] + sorted((coco_dir / "val2017").glob("*.jpg"))[:n_coco]


# ----------------------------------------------------------------------------- trained yolov3-tiny


@pytest.fixture(scope="module")
def trained_tiny(exported, darknet_dir):
    return exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights")


def test_trained_tiny_heads_and_detections_match_opencv(trained_tiny, darknet_dir, coco_dir):
    contract = read_contract(trained_tiny.path)
    assert contract.weights == "sha256:dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"
    cfg = darknet_dir / "yolov3-tiny.cfg"
    heads = heads_from_cfg(cfg)
    session, head_names = onnx_with_heads(trained_tiny.path)
    counts = {}
    for image_path in real_images(darknet_dir, coco_dir):
        tensor, _ = prepare_for(load_rgb(image_path), contract)
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": tensor})))
        reference = opencv_heads(cfg, darknet_dir / "yolov3-tiny.weights", heads, tensor / np.float32(255))
        for name, ref in zip(head_names, reference):
            assert outs[name].shape == ref.shape
            np.testing.assert_allclose(outs[name], ref, atol=TOL, rtol=TOL, err_msg=f"{image_path.name} {name}")
        boxes, probs = darknet_candidates(reference, heads, contract.input_height, contract.input_width)
        np.testing.assert_allclose(outs["nms_boxes"][0], boxes, atol=1e-2, rtol=TOL)
        np.testing.assert_allclose(outs["nms_scores"][0], probs.T, atol=1e-4, rtol=TOL)
        expected = darknet_detections(reference, heads, contract.input_height, contract.input_width,
                                      contract.score_threshold, contract.iou_threshold, contract.max_detections)
        assert_same_detections(outs, expected, image_path.name)
        counts[image_path.name] = len(expected["scores"])
    assert all(n > 0 for n in counts.values()), counts


def test_trained_tiny_finds_darknets_objects_on_dog(trained_tiny, darknet_dir):
    """Darknet's README result for dog.jpg: a dog, a bicycle and a car/truck are the confident detections."""
    contract = read_contract(trained_tiny.path)
    tensor, _ = prepare_for(load_rgb(darknet_dir / "dog.jpg"), contract)
    session = ort.InferenceSession(str(trained_tiny.path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"images": tensor})
    names = (darknet_dir / "coco.names").read_text().split("\n")
    confident = {names[int(label)] for label, score in zip(labels, scores) if score > 0.4}
    assert {"dog", "bicycle"} <= confident and confident & {"car", "truck"}, confident


def test_trained_tiny_metadata_is_self_describing(trained_tiny):
    contract = read_contract(trained_tiny.path)
    assert (contract.name, contract.framework, contract.input_size) == ("yolov3-tiny", "darknet", (416, 416))
    assert (contract.resize, contract.label_space, contract.max_detections) == ("letterbox", "coco80", 100)
    assert contract.extra["cfg_file"] == "yolov3-tiny.cfg" and contract.extra["darknet_weights_version"] == "0.2.0"
    assert contract.extra["validation_image"].endswith("dog.jpg")
    assert trained_tiny.validation["real_image"] and trained_tiny.validation["max_abs_diff"] < TOL


def test_blank_image_gives_empty_outputs_not_an_error(trained_tiny):
    session = ort.InferenceSession(str(trained_tiny.path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"images": np.zeros((1, 3, 416, 416), np.float32)})
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,) and labels.dtype == np.int64


# ----------------------------------------------------------------------------- every Darknet entry, random-init


@pytest.mark.parametrize("name", DARKNET)
def test_random_init_export_runs_matches_opencv_and_counts_params(name, exported, registry, coco_dir, tmp_path):
    from exporters.darknet.cfg import parse_cfg, plan_network
    from exporters.darknet.weights import random_weights, write_weights
    from exporters.weights import locate_file

    spec = registry.get(name)
    result = exported(name)
    contract = read_contract(result.path)
    assert contract.random_init and result.validation["random_init"] and result.validation["real_image"]
    h, w = spec.input_size
    model = onnx.load(str(result.path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, h, w]

    # parameters: the cfg's arithmetic (worked out here), the graph's initializers, the metadata
    cfg = locate_file(spec.source["cfg"])
    expected = cfg_param_count(cfg)
    inits = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    in_graph = sum(inits[x] for n in model.graph.node if n.op_type == "Conv" for x in n.input[1:])
    in_graph += sum(inits[x] for n in model.graph.node if n.op_type == "BatchNormalization" for x in n.input[1:3])
    assert in_graph == expected == contract.source_params
    if "params" in spec.published:
        assert abs(expected - spec.published["params"].value) <= 1e-3 * spec.published["params"].value

    # runs at registry size and matches OpenCV running the very same random network on a COCO image
    image = sorted((coco_dir / "val2017").glob("*.jpg"))[0]
    tensor, _ = prepare_for(load_rgb(image), contract)
    session, head_names = onnx_with_heads(result.path)
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": tensor})))
    assert outs["boxes"].shape[1:] == (4,) and 0 < len(outs["scores"]) <= spec.max_detections
    weights = write_weights(tmp_path / "random.weights", random_weights(plan_network(parse_cfg(cfg), (h, w)), name))
    reference = opencv_heads(cfg, weights, heads_from_cfg(cfg), tensor / np.float32(255))
    assert len(reference) == len(head_names)
    for head, ref in zip(head_names, reference):
        assert np.abs(ref).max() < 50, "random weights must keep activations O(1)"
        np.testing.assert_allclose(outs[head], ref, atol=TOL, rtol=TOL, err_msg=f"{name} {head}")
    # the in-graph decoding (region: softmax, anchors in cells; yolo: sigmoid, anchors in pixels) before NMS
    boxes, probs = darknet_candidates(reference, heads_from_cfg(cfg), h, w)
    np.testing.assert_allclose(outs["nms_boxes"][0], boxes, atol=1e-2, rtol=TOL, err_msg=f"{name} boxes")
    np.testing.assert_allclose(outs["nms_scores"][0], probs.T, atol=1e-4, rtol=TOL, err_msg=f"{name} scores")


def test_published_param_counts_are_reproduced(darknet_dir):
    """The issue's figures: yolov3 61.92 M, yolov3-tiny 8.85 M, yolov2 50.95 M (within 0.1 %), from the cfgs alone,
    and yolov3-tiny's count agrees with the official weights file: its floats minus 2 running statistics per BN channel."""
    for cfg, published in (("yolov3.cfg", 61.92e6), ("yolov3-tiny.cfg", 8.85e6), ("yolov2.cfg", 50.95e6)):
        assert abs(cfg_param_count(darknet_dir / cfg) - published) <= 1e-3 * published, cfg
    bn_channels = sum(int(o["filters"]) for kind, o in cfg_sections(darknet_dir / "yolov3-tiny.cfg")
                      if kind == "convolutional" and o.get("batch_normalize") == "1")
    floats = ((darknet_dir / "yolov3-tiny.weights").stat().st_size - 20) // 4
    assert cfg_param_count(darknet_dir / "yolov3-tiny.cfg") == floats - 2 * bn_channels


# ----------------------------------------------------------------------------- validation is not a formality


def test_a_wrong_graph_fails_validation_with_every_mismatch(monkeypatch, registry, darknet_dir, tmp_path):
    import exporters.darknet.graph as graph
    from core.errors import ValidationError

    monkeypatch.setattr(graph, "LEAKY_SLOPE", 0.2)  # Darknet's leaky slope is 0.1
    out = tmp_path / "wrong.onnx"
    with pytest.raises(ValidationError) as err:
        from exporters import export_model

        export_model(registry.get("yolov3-tiny"), out, weights=darknet_dir / "yolov3-tiny.weights")
    assert len(err.value.mismatches) == 2  # both heads reported, not just the first
    assert all("dog.jpg:head_" in m for m in err.value.mismatches)
    assert not out.exists()


def test_without_a_real_image_the_export_says_so(monkeypatch, registry, darknet_dir, tmp_path):
    from exporters import export_model

    cache, empty = tmp_path / "cache", tmp_path / "no-data"
    cache.mkdir()
    empty.mkdir()
    (cache / "yolov3-tiny.cfg").write_bytes((darknet_dir / "yolov3-tiny.cfg").read_bytes())
    monkeypatch.setenv("DETBENCH_CACHE", str(cache))
    monkeypatch.setenv("DETBENCH_DATA", str(empty))
    result = export_model(registry.get("yolov3-tiny"), tmp_path / "tiny.onnx")
    assert result.validation["real_image"] is False and "no real image" in result.validation["image"]
    assert "no real image" in read_contract(result.path).extra["validation_image"]
