"""The describe file of a foreign ONNX detector (``export --onnx FILE --describe FILE.toml``).

It says how the file's inputs and outputs map onto the exported-model contract; the
wrapper (:mod:`exporters.foreign.wrap`) adds a prologue and an epilogue around the untouched
graph accordingly. The TensorFlow SavedModel format (:mod:`exporters.tensorflow.saved_model`) is
its sibling; the keys shared by both mean the same. Examples for common layouts are in
``exporters/foreign/describe_examples/``.

    name = "my-detector"            # detbench.name and the file name: [A-Za-z0-9][A-Za-z0-9._@+-]* (core/names.py)
    family = "yolo"                 # optional, default "onnx"
    input_size = [416, 416]         # H, W of the contract input; a dynamic input size is fixed to it
    resize = "letterbox"            # how callers bring images to input_size: stretch | letterbox
    pad_value = 127.5               # optional: letterbox padding (0..255)
    label_space = "coco80"          # labels after mapping: coco80 (0..79) | coco91 (COCO category ids) |
                                    # names (0..N-1 into labels; the default when labels are given)
    labels = ["person", "car"]      # optional: the model's own class names (or labels_file = "x.names",
                                    # one per line, relative to this file); eval maps them to a dataset by name
    score_threshold = 0.001         # optional: detections scoring below are dropped (NMS: at or below)
    iou_threshold = 0.45            # NMS threshold: applied when nms = true, else recorded as the file's own
    max_detections = 100            # optional: the wrapper keeps at most this many, best first

    [input]                         # the image input; the contract feeds RGB 0..255 NCHW
    name = "input"                  # optional when the graph has one input
    layout = "NCHW"                 # NCHW | NHWC | CHW | HWC (CHW/HWC: no batch axis)
    channel_order = "rgb"           # rgb | bgr
    scale = 0.00392156862745098     # value = (pixel * scale - mean) / std, pixel in 0..255
    mean = [0.0, 0.0, 0.0]          # optional, per channel in the file's channel order
    std = [1.0, 1.0, 1.0]           # optional

    [extra_inputs]                  # every other graph input, fed a constant inside the wrapper
    image_shape = { value = "input_hw", dtype = "float32", shape = [1, 2] }
                                    # value: input_hw | input_wh | [numbers]; dtype: float32 | float16 |
                                    # int64 | int32; shape optional when the graph declares it

    [outputs]
    layout = "detections"           # detections | class_scores | packed | yolo_heads (see below)
    box_format = "xyxy"             # xyxy | yxyx | xywh (corner + size) | cxcywh (centre + size)
    box_space = "pixels"            # pixels | normalized (0..1 of the input)
    label_offset = 0                # label = class + label_offset ...
    label_map = [1, 2, 3]           # ... or label = label_map[class] (optional, not with label_offset)
    nms = false                     # NMS in the wrapper (class-aware ONNX NonMaxSuppression)

Output layouts (a leading batch axis of 1 is optional on every tensor):

- ``detections``: ``boxes`` [N, 4], ``scores`` [N], ``labels`` [N] class ids (int or
  float); optional ``num_detections`` [1] (only the first n rows are valid) and ``masks``
  [N, ...] (passed through with their detections). ``nms`` defaults to false (the file did
  it); with ``nms = true`` give ``num_classes``.
- ``class_scores``: ``boxes`` [N, 4] and ``scores`` [N, C] (``num_classes`` = C), optional
  ``objectness`` [N] or [N, 1]; ``score_activation`` none | sigmoid | softmax (sigmoid
  also applies to objectness); score = objectness x class score. ``nms`` must be true.
- ``packed``: one ``output`` tensor [N, 4 + C] (box, then C class scores), or
  [N, 5 + C] with ``objectness_column = true`` (box, objectness, classes);
  ``transposed = true`` for [4 + C, N]; ``num_classes``, ``score_activation`` as above.
- ``queries`` (DETR, RT-DETR, Deformable DETR): a fixed set of queries, no NMS: ``boxes``
  [Q, 4] and ``scores`` [Q, C'] (class logits or probabilities), or one ``output`` [Q, 4 + C']
  (Ultralytics RT-DETR: [1, 300, 4 + C], cxcywh normalised, scores already sigmoid);
  ``score_activation`` none | sigmoid | softmax; ``no_object_class = true``: the last of the
  C' = C + 1 columns is DETR's "no object" (dropped after the softmax); each query keeps its
  best class (``one_label_per_query = true``, default) or every (query, class) pair competes
  (false, as Deformable DETR); the best ``top_k`` (default ``max_detections``) scoring at
  least ``score_threshold`` are kept. ``nms`` is false.
- ``yolo_heads``: raw YOLO heads ``heads`` = [names], each [A·(5 + C), gh, gw] with
  ``anchors`` = [[[w, h] x A] per head] in input pixels: x = (col + σ(tx)) · W / gw,
  w = anchor_w · exp(tw), objectness σ(to), classes ``score_activation`` (default
  sigmoid, YOLOv3; softmax for YOLOv2 regions given anchors in pixels), boxes are xyxy
  input pixels (``box_format``/``box_space`` do not apply).

``box_space = "pixels"`` covers boxes in the pixels of the image the graph was given, which
is the contract input: also models that map boxes back to the "original image" they
resized themselves, and models told the original size through an extra input fed
``input_hw``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.contract import LABEL_SPACES, RESIZE_MODES
from core.errors import ConfigError
from core.names import NAME_RULE, name_problem

INPUT_LAYOUTS = ("NCHW", "NHWC", "CHW", "HWC")
OUTPUT_LAYOUTS = ("detections", "class_scores", "packed", "yolo_heads", "queries")
BOX_FORMATS = ("xyxy", "yxyx", "xywh", "cxcywh")
BOX_SPACES = ("pixels", "normalized")
ACTIVATIONS = ("none", "sigmoid", "softmax")
EXTRA_DTYPES = ("float32", "float16", "int64", "int32")
EXTRA_VALUES = ("input_hw", "input_wh")

_TOP_KEYS = {"name", "family", "input_size", "resize", "pad_value", "label_space", "score_threshold",
             "iou_threshold", "max_detections", "input", "extra_inputs", "outputs", "labels", "labels_file"}
_INPUT_KEYS = {"name", "layout", "channel_order", "scale", "mean", "std"}
_EXTRA_KEYS = {"value", "dtype", "shape"}
_COMMON_OUTPUT_KEYS = {"layout", "box_format", "box_space", "label_offset", "label_map", "nms", "num_classes"}
# Tensor names each layout needs / may have, and its other keys.
_LAYOUT_TENSORS = {
    "detections": (("boxes", "scores", "labels"), ("num_detections", "masks")),
    "class_scores": (("boxes", "scores"), ("objectness",)),
    "packed": (("output",), ()),
    "yolo_heads": ((), ()),
    "queries": ((), ("output", "boxes", "scores")),  # output, or boxes + scores (checked below)
}
_LAYOUT_KEYS = {
    "detections": set(),
    "class_scores": {"score_activation"},
    "packed": {"score_activation", "objectness_column", "transposed"},
    "yolo_heads": {"heads", "anchors", "score_activation"},
    "queries": {"score_activation", "no_object_class", "top_k", "one_label_per_query"},
}


@dataclass(frozen=True)
class Description:
    """A checked describe file; ``text`` is its content as read (recorded in the metadata)."""

    path: Path
    text: str
    name: str
    family: str
    input_size: tuple[int, int]
    resize: str
    pad_value: float
    label_space: str
    score_threshold: float
    iou_threshold: float
    max_detections: int
    input: dict[str, Any]
    extra_inputs: dict[str, dict[str, Any]]
    outputs: dict[str, Any]
    tensors: dict[str, str] = field(default_factory=dict)  # role -> graph output name (yolo heads: head0, ...)
    labels: tuple[str, ...] | None = None  # the model's own class names (label space "names")

    def bad(self, key: str, msg: str) -> ConfigError:
        return describe_error(self.path, key, msg)


def describe_error(path: Path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"--describe {path}: {key}: {msg} (format: exporters/foreign/describe.py)")


def read_description(path: Path) -> Description:
    """The describe TOML, checked on its own (no graph yet) and with defaults filled in.

    Raises :class:`ConfigError` naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--describe {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--describe {path}: cannot be read ({exc})") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--describe {path}: not valid TOML ({exc})") from exc

    def bad(key: str, msg: str) -> ConfigError:
        return describe_error(path, key, msg)

    def table(key: str) -> dict[str, Any]:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            raise bad(key, f"must be a table ([{key}]), got {type(value).__name__}")
        return value

    _unknown(doc, _TOP_KEYS, "", bad)
    labels = _labels(doc, path, bad)
    if labels is not None:
        doc.setdefault("label_space", "names")
    for key in ("name", "input_size", "resize", "label_space", "iou_threshold", "outputs"):
        if key not in doc:
            raise bad(key, "missing")
    if name_problem(doc["name"]) is not None:  # the name becomes the file name <name>.onnx
        raise bad("name", f"{doc['name']!r} {name_problem(doc['name'])}; {NAME_RULE}")
    size = doc["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
        raise bad("input_size", f"must be [height, width] in pixels, got {size!r}")
    _enum(doc["resize"], RESIZE_MODES, "resize", bad)
    _enum(doc["label_space"], LABEL_SPACES, "label_space", bad)
    if (doc["label_space"] == "names") != (labels is not None):
        raise bad("label_space", "'names' goes with the model's class names (labels or labels_file), and they with it")
    numbers = {}
    for key, default in (("score_threshold", 0.001), ("iou_threshold", None), ("max_detections", 100),
                         ("pad_value", 127.5)):
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(key, f"must be a finite number, got {value!r}")
        numbers[key] = value
    if not 0.0 <= numbers["score_threshold"] < 1.0:
        raise bad("score_threshold", f"must lie in 0..1 (below 1: no score exceeds it), got {numbers['score_threshold']}")
    if not 0.0 <= numbers["iou_threshold"] <= 1.0:
        raise bad("iou_threshold", f"must lie in 0..1, got {numbers['iou_threshold']}")
    if type(numbers["max_detections"]) is not int or numbers["max_detections"] <= 0:
        raise bad("max_detections", f"must be a positive integer, got {numbers['max_detections']!r}")

    inp = table("input")
    _unknown(inp, _INPUT_KEYS, "input.", bad)
    inp = {"name": None, "layout": "NCHW", "channel_order": "rgb", "scale": 1.0,
           "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], **inp}
    _enum(inp["layout"], INPUT_LAYOUTS, "input.layout", bad)
    _enum(inp["channel_order"], ("rgb", "bgr"), "input.channel_order", bad)
    if (isinstance(inp["scale"], bool) or not isinstance(inp["scale"], (int, float)) or inp["scale"] == 0
            or not math.isfinite(inp["scale"])):
        raise bad("input.scale", f"must be a finite non-zero number, got {inp['scale']!r}")
    for key in ("mean", "std"):
        v = inp[key]
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                               and math.isfinite(x) for x in v)):
            raise bad(f"input.{key}", f"must be three finite numbers (one per channel), got {v!r}")
    if any(x == 0 for x in inp["std"]):
        raise bad("input.std", f"holds a zero: {inp['std']!r}")
    if inp["name"] is not None and not isinstance(inp["name"], str):
        raise bad("input.name", f"must be a string, got {inp['name']!r}")

    extras = {}
    for name, spec in table("extra_inputs").items():
        where = f"extra_inputs.{name}"
        if not isinstance(spec, dict):
            raise bad(where, "must be a table such as { value = \"input_hw\", dtype = \"float32\" }")
        _unknown(spec, _EXTRA_KEYS, where + ".", bad)
        if "value" not in spec:
            raise bad(where + ".value", "missing")
        value = spec["value"]
        if isinstance(value, str):
            _enum(value, EXTRA_VALUES, where + ".value", bad)
        elif not (isinstance(value, list) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            and math.isfinite(x) for x in value)):
            raise bad(where + ".value", f"must be one of {EXTRA_VALUES} or a list of finite numbers, got {value!r}")
        spec = {"dtype": "float32", "shape": None, **spec}
        _enum(spec["dtype"], EXTRA_DTYPES, where + ".dtype", bad)
        shape = spec["shape"]
        if shape is not None and not (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)):
            raise bad(where + ".shape", f"must be a list of positive integers, got {shape!r}")
        extras[name] = spec

    out = table("outputs")
    if "layout" not in out:
        raise bad("outputs.layout", f"missing; one of {OUTPUT_LAYOUTS}")
    layout = out["layout"]
    _enum(layout, OUTPUT_LAYOUTS, "outputs.layout", bad)
    needed, optional = _LAYOUT_TENSORS[layout]
    _unknown(out, _COMMON_OUTPUT_KEYS | set(needed) | set(optional) | _LAYOUT_KEYS[layout], "outputs.", bad,
             f" for layout {layout!r}")
    tensors = {}
    for key in needed:
        if key not in out:
            raise bad(f"outputs.{key}", f"missing (layout {layout!r} needs {', '.join(needed)})")
    for key in (*needed, *optional):
        if key in out:
            if not isinstance(out[key], str) or not out[key]:
                raise bad(f"outputs.{key}", f"must be a graph output name, got {out[key]!r}")
            tensors[key] = out[key]
    out = {"box_format": "xyxy", "box_space": "pixels", "label_offset": 0, "label_map": None,
           "nms": layout not in ("detections", "queries"), "num_classes": None,
           "score_activation": "sigmoid" if layout == "yolo_heads" else "none",
           "objectness_column": False, "transposed": False, "no_object_class": False, "top_k": None,
           "one_label_per_query": True, **out}
    _enum(out["box_format"], BOX_FORMATS, "outputs.box_format", bad)
    _enum(out["box_space"], BOX_SPACES, "outputs.box_space", bad)
    _enum(out["score_activation"], ACTIVATIONS, "outputs.score_activation", bad)
    for key in ("nms", "objectness_column", "transposed", "no_object_class", "one_label_per_query"):
        if not isinstance(out[key], bool):
            raise bad(f"outputs.{key}", f"must be true or false, got {out[key]!r}")
    if type(out["label_offset"]) is not int:
        raise bad("outputs.label_offset", f"must be an integer, got {out['label_offset']!r}")
    if out["label_map"] is not None:
        table_ = out["label_map"]
        if not (isinstance(table_, list) and table_ and all(type(x) is int for x in table_)):
            raise bad("outputs.label_map", f"must be a list of integers, got {table_!r}")
        if out["label_offset"]:
            raise bad("outputs.label_map", "give label_map or label_offset, not both")
    classes = out["num_classes"]
    if classes is not None and (type(classes) is not int or classes <= 0):
        raise bad("outputs.num_classes", f"must be a positive integer, got {classes!r}")
    if layout == "queries":
        _check_queries(out, tensors, bad)
    elif layout != "detections" and not out["nms"]:
        raise bad("outputs.nms", f"layout {layout!r} holds candidates, not detections: NMS must run (nms = true)")
    if layout in ("packed", "yolo_heads") and classes is None:
        raise bad("outputs.num_classes", f"missing (layout {layout!r} needs it)")
    if layout == "detections" and out["nms"] and classes is None:
        raise bad("outputs.num_classes", "missing (NMS over class ids needs the number of classes)")
    if layout == "detections" and out["score_activation"] != "none":
        raise bad("outputs.score_activation", "only applies to class_scores, packed and yolo_heads")
    if "masks" in tensors and out["nms"]:
        raise bad("outputs.masks", "masks pass through detections the file already selected (nms = false)")
    if layout == "yolo_heads":
        heads, anchors = out.get("heads"), out.get("anchors")
        if not (isinstance(heads, list) and heads and all(isinstance(h, str) and h for h in heads)):
            raise bad("outputs.heads", f"must be a list of graph output names, got {heads!r}")
        if not (isinstance(anchors, list) and len(anchors) == len(heads)):
            raise bad("outputs.anchors", f"must give one anchor list per head ({len(heads)}), got {anchors!r}")
        for i, per_head in enumerate(anchors):
            if not (isinstance(per_head, list) and per_head and all(
                    isinstance(a, list) and len(a) == 2 and all(isinstance(x, (int, float)) and 0 < x < math.inf for x in a)
                    for a in per_head)):
                raise bad(f"outputs.anchors[{i}]", f"must be a list of [width, height] in input pixels, got {per_head!r}")
        for i, head in enumerate(heads):
            tensors[f"head{i}"] = head
    return Description(
        path=path, text=text, name=doc["name"], family=str(doc.get("family", "onnx")), input_size=(size[0], size[1]),
        resize=doc["resize"], pad_value=float(numbers["pad_value"]), label_space=doc["label_space"],
        score_threshold=float(numbers["score_threshold"]), iou_threshold=float(numbers["iou_threshold"]),
        max_detections=int(numbers["max_detections"]), input=inp, extra_inputs=extras, outputs=out, tensors=tensors,
        labels=labels)


def _labels(doc: dict, path: Path, bad) -> tuple[str, ...] | None:
    """The class names of ``labels = [...]`` or ``labels_file`` (relative to the describe file)."""
    if "labels" in doc and "labels_file" in doc:
        raise bad("labels_file", "give labels or labels_file, not both")
    if "labels_file" in doc:
        if not isinstance(doc["labels_file"], str) or not doc["labels_file"]:
            raise bad("labels_file", f"must be a file name, got {doc['labels_file']!r}")
        names_path = path.parent / doc["labels_file"]
        try:
            names = [n.strip() for n in names_path.read_text(encoding="utf-8").splitlines() if n.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise bad("labels_file", f"{names_path} cannot be read ({exc})") from None
        if not names:
            raise bad("labels_file", f"{names_path} holds no class names (one per line)")
        return tuple(names)
    if "labels" not in doc:
        return None
    names = doc["labels"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)):
        raise bad("labels", f"must be a non-empty list of class names, got {names!r}")
    return tuple(n.strip() for n in names)


def _check_queries(out: dict, tensors: dict, bad) -> None:
    """DETR-style queries: ``output`` [Q, 4 + C (+1)] or ``boxes`` [Q, 4] + ``scores`` [Q, C (+1)], kept by top-k."""
    if ("output" in tensors) == ("boxes" in tensors or "scores" in tensors):
        raise bad("outputs.output", "layout 'queries' takes one packed tensor (output) or boxes and scores, not both")
    if "output" not in tensors and not ("boxes" in tensors and "scores" in tensors):
        raise bad("outputs.scores" if "boxes" in tensors else "outputs.boxes", "missing (queries need boxes and scores)")
    if out["nms"]:
        raise bad("outputs.nms", "queries are kept by top-k, without NMS (nms = false)")
    if out["no_object_class"] and out["score_activation"] != "softmax":
        raise bad("outputs.no_object_class", "a no-object class goes with score_activation = \"softmax\"")
    top_k = out["top_k"]
    if top_k is not None and (type(top_k) is not int or top_k <= 0):
        raise bad("outputs.top_k", f"must be a positive integer, got {top_k!r}")


def _unknown(table: dict, keys: set[str], where: str, bad, suffix: str = "") -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise bad(where + unknown[0], f"unknown key{suffix}; valid: {sorted(keys)}")


def _enum(value, allowed: tuple[str, ...], key: str, bad) -> None:
    if value not in allowed:
        raise bad(key, f"{value!r} is not one of {allowed}")
