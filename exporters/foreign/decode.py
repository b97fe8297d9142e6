"""An independent numpy reading of a described foreign detector's outputs.

The wrapper (:mod:`exporters.foreign.wrap`) builds its prologue and epilogue as ONNX nodes;
validation runs the *original* file in onnxruntime on inputs prepared here, decodes its
outputs here and compares with the wrapped file. Nothing here is shared with the graph
builder: the decode follows the describe format's definition (:mod:`exporters.foreign.describe`)
in float64, and the NMS (:func:`exporters.matching.nms`) is a plain greedy loop with onnxruntime's NonMaxSuppression
semantics (candidates must score above the threshold; a box is suppressed by a kept box of
its class when their IoU exceeds the threshold; ties in score keep the lower index first).
"""

from __future__ import annotations

import numpy as np

from exporters.foreign.describe import Description, describe_error
from exporters.matching import nms

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def model_inputs(desc: Description, images: np.ndarray, image_input: str,
                 extra_shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """The original file's feed for one contract tensor ``images`` [1, 3, H, W] (RGB 0..255)."""
    inp = desc.input
    x = images.astype(np.float64)[0]  # [3, H, W]
    if inp["channel_order"] == "bgr":
        x = x[::-1]
    mean = np.asarray(inp["mean"], np.float64)[:, None, None]
    std = np.asarray(inp["std"], np.float64)[:, None, None]
    x = (x * inp["scale"] - mean) / std
    if inp["layout"] in ("NHWC", "HWC"):
        x = x.transpose(1, 2, 0)
    if inp["layout"] in ("NCHW", "NHWC"):
        x = x[None]
    feed = {image_input: np.ascontiguousarray(x.astype(np.float32))}
    for name, spec in desc.extra_inputs.items():
        feed[name] = extra_value(desc, spec, extra_shapes[name])
    return feed


def extra_value(desc: Description, spec: dict, shape: list[int]) -> np.ndarray:
    height, width = desc.input_size
    value = spec["value"]
    values = [height, width] if value == "input_hw" else [width, height] if value == "input_wh" else value
    return np.asarray(values, np.float64).astype(_NUMPY_DTYPES[spec["dtype"]]).reshape(shape)


def decode(desc: Description, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The contract's detections (``boxes`` xyxy input pixels, ``scores``, ``labels`` int64,
    ``masks`` when described) from the original file's named outputs."""
    out, layout = desc.outputs, desc.outputs["layout"]
    t = desc.tensors
    masks = None
    if layout == "queries":
        return _queries(desc, outputs)
    if layout == "yolo_heads":
        boxes, scores = _yolo(desc, [outputs[t[f"head{i}"]] for i in range(len(out["heads"]))])
    elif layout == "packed":
        boxes, scores = _packed(desc, outputs[t["output"]])
    elif layout == "class_scores":
        boxes = _to_xyxy(desc, outputs[t["boxes"]])
        scores = _activate(np.asarray(outputs[t["scores"]], np.float64), out["score_activation"])
        scores = scores.reshape(len(boxes), -1)
        if "objectness" in t:
            obj = np.asarray(outputs[t["objectness"]], np.float64).reshape(-1)
            if out["score_activation"] == "sigmoid":
                obj = _sigmoid(obj)
            scores = scores * obj[:, None]
    else:
        boxes = _to_xyxy(desc, outputs[t["boxes"]])
        scores = np.asarray(outputs[t["scores"]], np.float64).reshape(-1)
        classes = np.rint(np.asarray(outputs[t["labels"]], np.float64).reshape(-1)).astype(np.int64)
        masks = None if "masks" not in t else np.asarray(outputs[t["masks"]])
        if "num_detections" in t:
            n = int(np.asarray(outputs[t["num_detections"]]).reshape(-1)[0])
            boxes, scores, classes = boxes[:n], scores[:n], classes[:n]
            masks = None if masks is None else masks[:n]
        if out["nms"]:
            matrix = np.zeros((len(scores), out["num_classes"]))
            matrix[np.arange(len(scores)), classes] = scores
            boxes, scores = boxes, matrix
        else:
            keep = scores >= desc.score_threshold
            order = np.argsort(-scores[keep], kind="stable")[:desc.max_detections]
            result = {"boxes": boxes[keep][order], "scores": scores[keep][order],
                      "labels": map_labels(desc, classes[keep][order])}
            if masks is not None:
                result["masks"] = masks[keep][order]
            return result
    boxes_kept, scores_kept, classes_kept = nms(boxes, scores, desc.iou_threshold, desc.score_threshold,
                                                desc.max_detections)
    return {"boxes": boxes_kept, "scores": scores_kept, "labels": map_labels(desc, classes_kept)}


def cap(desc: Description) -> int:
    """How many detections are kept at most: ``top_k`` for queries (never above ``max_detections``)."""
    top_k = desc.outputs.get("top_k")
    return min(desc.max_detections, top_k) if top_k else desc.max_detections


def query_width(desc: Description) -> int:
    """Score columns per query: the classes, plus DETR's no-object column."""
    return desc.outputs["num_classes"] + int(desc.outputs["no_object_class"])


def _queries(desc: Description, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, t = desc.outputs, desc.tensors
    classes, width = out["num_classes"], query_width(desc)
    if "output" in t:
        x = np.asarray(outputs[t["output"]], np.float64).reshape(-1, 4 + width)
        raw_boxes, logits = x[:, :4], x[:, 4:]
    else:
        raw_boxes = np.asarray(outputs[t["boxes"]], np.float64).reshape(-1, 4)
        logits = np.asarray(outputs[t["scores"]], np.float64).reshape(len(raw_boxes), width)
    boxes = _to_xyxy(desc, raw_boxes)
    probs = _activate(logits, out["score_activation"])[:, :classes]
    if out["one_label_per_query"]:
        query = np.arange(len(probs))
        cls = probs.argmax(axis=1)
        scores = probs[query, cls]
    else:
        flat = probs.reshape(-1)
        query, cls, scores = np.arange(flat.size) // classes, np.arange(flat.size) % classes, flat
    keep = np.nonzero(scores >= desc.score_threshold)[0]
    order = keep[np.argsort(-scores[keep], kind="stable")][:cap(desc)]
    return {"boxes": boxes[query[order]], "scores": scores[order], "labels": map_labels(desc, cls[order])}


def map_labels(desc: Description, classes: np.ndarray) -> np.ndarray:
    table = desc.outputs["label_map"]
    if table is not None:
        classes = np.asarray(classes, np.int64)
        # numpy would wrap a negative class id round to the table's end and fail on a large one
        if classes.size and (classes.min() < 0 or classes.max() >= len(table)):
            raise describe_error(desc.path, "outputs.label_map", f"has {len(table)} entries (classes 0..{len(table) - 1}), "
                                 f"but the file gave class id {int(classes.max() if classes.max() >= len(table) else classes.min())}; "
                                 "give one label per class the file can output")
        return np.asarray(table, np.int64)[classes]
    return classes.astype(np.int64) + desc.outputs["label_offset"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _activate(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "sigmoid":
        return _sigmoid(x)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return x


def _to_xyxy(desc: Description, raw: np.ndarray) -> np.ndarray:
    b = np.asarray(raw, np.float64).reshape(-1, 4)
    fmt = desc.outputs["box_format"]
    if fmt == "yxyx":
        b = b[:, [1, 0, 3, 2]]
    elif fmt == "xywh":
        b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    elif fmt == "cxcywh":
        b = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)
    if desc.outputs["box_space"] == "normalized":
        height, width = desc.input_size
        b = b * np.array([width, height, width, height], np.float64)
    return b


def _packed(desc: Description, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = desc.outputs
    width = 4 + int(out["objectness_column"]) + out["num_classes"]
    x = np.asarray(raw, np.float64)
    x = x.reshape(width, -1).T if out["transposed"] else x.reshape(-1, width)
    boxes = _to_xyxy(desc, x[:, :4])
    scores = _activate(x[:, width - out["num_classes"]:], out["score_activation"])
    if out["objectness_column"]:
        obj = x[:, 4]
        scores = scores * (_sigmoid(obj) if out["score_activation"] == "sigmoid" else obj)[:, None]
    return boxes, scores


def _yolo(desc: Description, heads: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    out = desc.outputs
    height, width = desc.input_size
    classes = out["num_classes"]
    all_boxes, all_scores = [], []
    for raw, anchors in zip(heads, out["anchors"]):
        raw = np.asarray(raw, np.float64)
        gh, gw = raw.shape[-2:]
        a = len(anchors)
        x = raw.reshape(a, 5 + classes, gh, gw)
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        for k, (aw, ah) in enumerate(anchors):
            p = x[k]
            cx = (cols + _sigmoid(p[0])) * (width / gw)
            cy = (rows + _sigmoid(p[1])) * (height / gh)
            w = aw * np.exp(p[2])
            h = ah * np.exp(p[3])
            box = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1).reshape(-1, 4)
            cls = p[5:].reshape(classes, -1).T  # [cells, C], cell = row * gw + col
            cls = _activate(cls, out["score_activation"])
            all_boxes.append(box)
            all_scores.append(cls * _sigmoid(p[4]).reshape(-1, 1))
    return np.concatenate(all_boxes), np.concatenate(all_scores)
