"""A TensorFlow SavedModel detector (e.g. from the TF2 Object Detection API) -> contract ONNX.

The SavedModel keeps its own pre- and post-processing; a small TOML description says how
its serving signature maps onto the contract, and a wrapper ``tf.function`` adapts it:

    name = "my-detector"            # detbench.name in the metadata
    family = "ssd"                  # optional, default "saved-model"
    signature = "serving_default"   # optional
    input_size = [320, 320]         # H, W: the fixed size of the export
    resize = "stretch"              # how callers bring images to input_size: stretch | letterbox
    label_space = "coco91"          # coco80 (0..79) | coco91 (COCO category ids)
    score_threshold = 0.0           # applied by the wrapper (on top of the model's own)
    iou_threshold = 0.6             # the model's own NMS threshold (recorded, not applied)
    max_detections = 100            # the wrapper keeps at most this many

    [input]
    name = "input_tensor"           # signature input key
    dtype = "uint8"                 # uint8 (rounded, clipped to 0..255) | float32
    layout = "NHWC"                 # NHWC | NCHW
    channel_order = "rgb"           # rgb | bgr
    scale = 1.0                     # float32 inputs: value = images * scale (e.g. 1/255)

    [outputs]
    boxes = "detection_boxes"       # [1, N, 4]
    box_format = "yxyx"             # yxyx | xyxy
    boxes_normalized = true         # 0..1 (true) or input pixels (false)
    scores = "detection_scores"     # [1, N], sorted best first
    classes = "detection_classes"   # [1, N] (float or int)
    label_offset = 0                # label = class + label_offset
    num_detections = "num_detections"  # optional [1]: only the first n rows are valid

The ONNX file takes the contract's ``images`` (float32 ``[1, 3, H, W]`` RGB 0..255) and
returns ``boxes`` (x1, y1, x2, y2 input pixels), ``scores``, ``labels`` (int64).
"""

from __future__ import annotations

import hashlib
import math
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

from exporters import ExportResult
from exporters.tensorflow.convert import compare_runs, convert_function, import_tensorflow, run_onnx, run_tf, versions
from exporters.validation import Comparison, cpu_session, validation_images
from core.contract import COCO_LABEL_SPACES, DEFAULT_OPSET, OUTPUT_NAMES, RESIZE_MODES, ModelContract, save_model
from core.errors import ConfigError, ExportError
from core.names import NAME_RULE, file_in, name_problem
from core.images import load_rgb, prepare

VALIDATION_IMAGES = 3
_TOP_KEYS = {"name", "family", "signature", "input_size", "resize", "label_space", "score_threshold",
             "iou_threshold", "max_detections", "input", "outputs"}
_INPUT_KEYS = {"name", "dtype", "layout", "channel_order", "scale"}
_OUTPUT_KEYS = {"boxes", "box_format", "boxes_normalized", "scores", "classes", "label_offset", "num_detections"}


def read_description(path: Path) -> dict[str, Any]:
    """The description TOML, checked and with defaults filled in; :class:`ConfigError` names the bad key."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--describe {path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--describe {path}: not valid TOML ({exc})") from exc

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"--describe {path}: {msg} (see exporters/tensorflow/saved_model.py for the format)")

    for table, keys, where in ((doc, _TOP_KEYS, "top level"), (doc.get("input", {}), _INPUT_KEYS, "[input]"),
                               (doc.get("outputs", {}), _OUTPUT_KEYS, "[outputs]")):
        unknown = set(table) - keys
        if unknown:
            raise bad(f"unknown key(s) {sorted(unknown)} in {where}; valid: {sorted(keys)}")
    for key in ("name", "input_size", "resize", "label_space", "iou_threshold", "input", "outputs"):
        if key not in doc:
            raise bad(f"missing key {key!r}")
    size = doc["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise bad(f"input_size must be [height, width], got {size!r}")
    if name_problem(doc["name"]) is not None:  # the name becomes the file name <name>.onnx
        raise bad(f"name {doc['name']!r} {name_problem(doc['name'])}; {NAME_RULE}")
    for key, low, high in (("score_threshold", 0.0, 1.0), ("iou_threshold", 0.0, 1.0)):
        value = doc.get(key, 0.0)
        # ``not low <= v <= high`` also refuses NaN
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise bad(f"{key} must be a number in {low:g}..{high:g}, got {value!r}")
    scale = doc["input"].get("scale", 1.0) if isinstance(doc["input"], dict) else None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise bad(f"[input] scale must be a finite non-zero number, got {scale!r}")
    if doc["resize"] not in RESIZE_MODES:
        raise bad(f"resize {doc['resize']!r} is not one of {RESIZE_MODES}")
    if doc["label_space"] not in COCO_LABEL_SPACES:
        raise bad(f"label_space {doc['label_space']!r} is not one of {COCO_LABEL_SPACES}")
    inp = {"dtype": "uint8", "layout": "NHWC", "channel_order": "rgb", "scale": 1.0, **doc["input"]}
    out = {"box_format": "yxyx", "boxes_normalized": True, "label_offset": 0, "num_detections": None, **doc["outputs"]}
    for key in ("name",):
        if key not in inp:
            raise bad(f"[input] needs {key!r}")
    for key in ("boxes", "scores", "classes"):
        if key not in out:
            raise bad(f"[outputs] needs {key!r}")
    for key, allowed in (("dtype", ("uint8", "float32")), ("layout", ("NHWC", "NCHW")), ("channel_order", ("rgb", "bgr"))):
        if inp[key] not in allowed:
            raise bad(f"[input] {key} {inp[key]!r} is not one of {allowed}")
    if out["box_format"] not in ("yxyx", "xyxy"):
        raise bad(f"[outputs] box_format {out['box_format']!r} is not 'yxyx' or 'xyxy'")
    return {"name": doc["name"], "family": doc.get("family", "saved-model"),
            "signature": doc.get("signature", "serving_default"), "input_size": (size[0], size[1]),
            "resize": doc["resize"], "label_space": doc["label_space"],
            "score_threshold": float(doc.get("score_threshold", 0.0)), "iou_threshold": float(doc["iou_threshold"]),
            "max_detections": int(doc.get("max_detections", 100)), "input": inp, "outputs": out}


def load_signature(saved_model: Path, name: str):
    """``(loaded object, serving function name)`` of a SavedModel; keep the object alive while
    the function is used (it owns the variables)."""
    tf = import_tensorflow()
    saved_model = Path(saved_model)
    if not (saved_model / "saved_model.pb").is_file():
        raise ConfigError(f"--saved-model {saved_model}: no saved_model.pb there; give the SavedModel's folder")
    try:
        loaded = tf.saved_model.load(str(saved_model))
    except Exception as exc:  # TF raises several types for unreadable models
        raise ExportError(f"TensorFlow cannot load the SavedModel at {saved_model}: {type(exc).__name__}: {exc}") from exc
    if name not in loaded.signatures:
        raise ConfigError(f"--saved-model {saved_model} has no signature {name!r}; it has {sorted(loaded.signatures)} "
                          "(set `signature` in the --describe file)")
    return loaded, loaded.signatures[name]


def make_wrapper(signature, desc: dict[str, Any]):
    """The contract ``tf.function`` around ``signature`` (see the module docstring)."""
    tf = import_tensorflow()
    inp, out = desc["input"], desc["outputs"]
    height, width = desc["input_size"]
    _check_signature(signature, desc)

    def wrapper(images):
        x = tf.transpose(images, [0, 2, 3, 1]) if inp["layout"] == "NHWC" else images
        if inp["channel_order"] == "bgr":
            x = tf.reverse(x, axis=[-1 if inp["layout"] == "NHWC" else 1])
        if inp["dtype"] == "uint8":
            x = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
        else:
            x = x * float(inp["scale"])
        result = signature(**{inp["name"]: x})
        boxes, scores, classes = result[out["boxes"]][0], result[out["scores"]][0], result[out["classes"]][0]
        if out["num_detections"]:
            n = tf.cast(tf.reshape(result[out["num_detections"]], [-1])[0], tf.int32)
            boxes, scores, classes = boxes[:n], scores[:n], classes[:n]
        keep = scores >= desc["score_threshold"]
        boxes, scores, classes = (tf.boolean_mask(t, keep)[:desc["max_detections"]] for t in (boxes, scores, classes))
        boxes = tf.cast(boxes, tf.float32)
        if out["box_format"] == "yxyx":
            boxes = tf.gather(boxes, [1, 0, 3, 2], axis=1)
        if out["boxes_normalized"]:
            boxes = boxes * tf.constant([width, height, width, height], dtype=tf.float32)
        labels = tf.cast(tf.round(tf.cast(classes, tf.float32)), tf.int64) + int(out["label_offset"])
        return {"boxes": boxes, "scores": tf.cast(scores, tf.float32), "labels": labels}

    spec = [tf.TensorSpec([1, 3, height, width], tf.float32, name="images")]
    return tf.function(wrapper, input_signature=spec), spec


def _check_signature(signature, desc: dict[str, Any]) -> None:
    inputs = signature.structured_input_signature[1]
    name = desc["input"]["name"]
    if name not in inputs:
        raise ConfigError(f"the SavedModel's signature {desc['signature']!r} has inputs {sorted(inputs)}, "
                          f"not {name!r} (fix [input] name in the --describe file)")
    expected = "uint8" if desc["input"]["dtype"] == "uint8" else "float32"
    if inputs[name].dtype.name != expected:
        raise ConfigError(f"signature input {name!r} is {inputs[name].dtype.name}, the --describe file says {expected}")
    outputs = signature.structured_outputs
    for key in ("boxes", "scores", "classes", "num_detections"):
        wanted = desc["outputs"][key]
        if wanted and wanted not in outputs:
            raise ConfigError(f"the SavedModel's signature {desc['signature']!r} has outputs {sorted(outputs)}, "
                              f"not {wanted!r} (fix [outputs] {key} in the --describe file)")


def export_saved_model(saved_model: Path, description: Path, out: Path, *,
                       progress: Callable[[str], None] | None = None) -> ExportResult:
    """Convert, validate (TF vs onnxruntime on real COCO images) and save; ``out`` is a
    ``.onnx`` path or a folder (the file is then ``<name>.onnx``)."""
    progress = progress or (lambda _m: None)
    started = time.perf_counter()
    desc = read_description(description)
    target = Path(out) if Path(out).suffix == ".onnx" else file_in(Path(out), desc["name"], where=f"--describe {description}: name")
    progress(f"loading {saved_model}")
    loaded, signature = load_signature(saved_model, desc["signature"])
    function, spec = make_wrapper(signature, desc)
    progress("converting with tf2onnx")
    proto = convert_function(function, spec, OUTPUT_NAMES, opset=DEFAULT_OPSET, model=desc["name"])
    progress("validating against TensorFlow on COCO images")
    figures = _validate(function, proto, desc)
    params = sum(int(v.shape.num_elements()) for v in signature.variables)
    contract = ModelContract(
        name=desc["name"], family=desc["family"], framework="tensorflow", input_height=desc["input_size"][0],
        input_width=desc["input_size"][1], resize=desc["resize"], label_space=desc["label_space"],
        score_threshold=desc["score_threshold"], iou_threshold=desc["iou_threshold"],
        max_detections=desc["max_detections"], weights="sha256:" + saved_model_sha256(Path(saved_model)),
        source_params=params,
        extra={"source": "tensorflow SavedModel", "saved_model_signature": desc["signature"],
               "saved_model_input": desc["input"], "saved_model_outputs": desc["outputs"],
               "source_params_convention": "every variable captured by the serving signature",
               "iou_threshold_note": "the SavedModel's own NMS threshold, as the description states",
               "opset": str(DEFAULT_OPSET), **{f"{k}_version": v for k, v in versions().items()}})
    path = save_model(proto, target, contract)
    del loaded
    figures["file_bytes"] = path.stat().st_size
    return ExportResult(path=path, contract=contract, seconds=time.perf_counter() - started, validation=figures)


def _validate(function, proto, desc: dict[str, Any]) -> dict:
    comparison = Comparison(desc["name"])
    session = cpu_session(proto)
    height, width = desc["input_size"]
    counts = []
    for path in validation_images(VALIDATION_IMAGES):
        tensor, _ = prepare(load_rgb(path), height, width, desc["resize"])
        reference = run_tf(function, tensor)
        compare_runs(comparison, path.stem, reference, run_onnx(session, tensor, OUTPUT_NAMES))
        counts.append(len(reference["scores"]))
    comparison.nothing_detected(counts, f"score_threshold {desc['score_threshold']} or the [input] scale may leave "
                                        "the model nothing to detect")
    comparison.raise_if_any("The ONNX graph differs from the SavedModel it was converted from (a tf2onnx problem).")
    figures = dict(comparison.figures)
    figures["detections_per_image"] = counts
    return figures


def saved_model_sha256(folder: Path) -> str:
    """sha256 over every file of the SavedModel (relative path, then content), in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
