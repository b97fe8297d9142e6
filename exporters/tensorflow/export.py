"""TensorFlow/Keras SSD (VGG-16) -> ONNX through tf2onnx (framework "tensorflow" in models.toml).

The ``[source]`` table of an entry describes the network and its priors::

    builder = "ssd_vgg16"; variant = "300" | "512"
    channel_order = "bgr" | "rgb"; mean = [3 values, in channel_order, on 0..255]
    scales = [s_1 .. s_{m+1}]; aspect_ratios = [[2], [2, 3], ...]; steps = [8, 16, ...] (pixels)
    clip_priors = false; variances = [0.1, 0.2]

``label_space`` fixes the class count: coco80 -> 81 classes (class c -> label c - 1),
coco91 -> 91 classes (class c -> COCO category id c, torchvision's numbering).

The export is a ``tf.function`` at a fixed input size (network + decoding + per-class NMS)
converted by tf2onnx, validated against TensorFlow on real COCO images (final detections
and, before NMS, every decoded prior box and class score), then written by
``core.contract.save_model``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from exporters import ExportResult
from exporters.registry import ModelSpec
from exporters.tensorflow.ssd_keras import SSDConfig, build_ssd, calibrate_random_heads, decoded_priors, detect
from exporters.tensorflow.convert import (compare_runs, convert_function, import_tensorflow, keep_outputs, run_onnx, run_tf,
                                          versions)
from exporters.validation import Comparison, cpu_session, validation_images
from core.contract import DEFAULT_OPSET, OUTPUT_NAMES, ModelContract, save_model, weights_tag
from core.errors import ConfigError, RegistryError, WeightsError
from core.images import load_rgb, prepare

_SOURCE_KEYS = {"builder", "variant", "channel_order", "mean", "scales", "aspect_ratios", "steps", "clip_priors",
                "variances"}
_CLASSES = {"coco80": (81, 0), "coco91": (91, 1)}  # label space -> (classes incl. background, label of class 1)
DEBUG_OUTPUTS = ("prior_boxes", "prior_scores")
VALIDATION_IMAGES = 3
RANDOM_SEED = 0
PARAMS_CONVENTION = ("keras Model.count_params(): every weight of the Keras model, all trainable "
                     "(conv kernels and biases, the 512 conv4_3_norm scales; no BatchNorm)")


def config_from_spec(spec: ModelSpec, input_size: tuple[int, int] | None = None) -> SSDConfig:
    """The :class:`SSDConfig` a registry entry describes (``input_size`` overrides its size)."""
    src = dict(spec.source)
    unknown = set(src) - _SOURCE_KEYS
    missing = {"variant", "channel_order", "mean", "scales", "aspect_ratios"} - set(src)
    if unknown or missing or src.get("builder") != "ssd_vgg16":
        raise RegistryError(f"model {spec.name!r}: [source] needs builder = 'ssd_vgg16' and keys "
                            f"{sorted(_SOURCE_KEYS - {'builder'})} (missing {sorted(missing)}, unknown {sorted(unknown)})")
    num_classes, first_label = _CLASSES[spec.label_space]
    size = tuple(input_size or spec.input_size)
    steps = None
    if "steps" in src and size == tuple(spec.input_size):
        steps = tuple((float(s), float(s)) for s in src["steps"])
    try:
        return SSDConfig(
            variant=str(src["variant"]), input_size=size, num_classes=num_classes, first_label=first_label,
            channel_order=src["channel_order"], mean=tuple(float(m) for m in src["mean"]),
            scales=tuple(float(s) for s in src["scales"]),
            aspect_ratios=tuple(tuple(float(a) for a in r) for r in src["aspect_ratios"]),
            steps=steps, clip_priors=bool(src.get("clip_priors", False)),
            variances=tuple(float(v) for v in src.get("variances", (0.1, 0.2))),
            score_threshold=spec.score_threshold, iou_threshold=spec.iou_threshold,
            max_detections=spec.max_detections)
    except ConfigError as exc:
        raise RegistryError(f"model {spec.name!r}: {exc}") from exc


def load_keras_weights(model, path: Path, name: str) -> None:
    """Load a Keras weights file into ``model``; every weight must come from the file.

    ``*.weights.h5`` (Keras 3, by structure) or a legacy ``.h5``/``.hdf5`` (Keras 2, matched by
    layer name, so files converted from the Caffe SSD with its layer names load too).
    Raises :class:`WeightsError` naming the file and what did not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{name}: weights file not found: {path}")
    text = str(path)
    legacy = text.endswith((".h5", ".hdf5")) and not text.endswith(".weights.h5")
    if not (legacy or text.endswith(".weights.h5")):
        raise WeightsError(f"{name}: {path} is not a Keras weights file (expected *.weights.h5, or a legacy .h5/.hdf5); "
                           "pass --weights FILE.weights.h5 (keras Model.save_weights) or --random-init")
    # NaN sentinels: whatever the file does not set stays NaN (a value comparison misses zero biases)
    model.set_weights([np.full(w.shape, np.nan, dtype=np.float32) for w in model.get_weights()])
    try:
        model.load_weights(text, by_name=True) if legacy else model.load_weights(text)
    except Exception as exc:  # h5py/keras raise ValueError, OSError, KeyError...
        raise WeightsError(f"{name}: {path} does not fit the {model.name} network: {type(exc).__name__}: {exc}") from exc
    untouched = [w.path for w in model.weights if np.isnan(np.asarray(w)).any()]
    if untouched:
        raise WeightsError(f"{name}: {path} left {len(untouched)} weight(s) of {model.name} unset or NaN "
                           f"(e.g. {', '.join(untouched[:3])}); the file must hold every layer of this network")


def export(spec: ModelSpec, out: Path, *, weights: Path | None, input_size: tuple[int, int] | None,
           progress: Callable[[str], None]) -> ExportResult:
    """Build, convert, validate and save ``spec``; see the module docstring."""
    started = time.perf_counter()
    tf = import_tensorflow()
    config = config_from_spec(spec, input_size)
    progress("building the Keras network")
    model = build_ssd(config, seed=RANDOM_SEED)
    if weights is None:
        calibrate_random_heads(model, config, seed=RANDOM_SEED)
    else:
        progress(f"loading {weights}")
        load_keras_weights(model, weights, spec.name)
    prior_spec, priors = decoded_priors(model, config)
    height, width = config.input_size
    signature = [tf.TensorSpec([1, 3, height, width], tf.float32, name="images")]
    function = tf.function(lambda images: detect(model, config, priors, images), input_signature=signature)
    built = time.perf_counter()

    progress("converting with tf2onnx")
    full = convert_function(function, signature, OUTPUT_NAMES + DEBUG_OUTPUTS, opset=DEFAULT_OPSET, model=spec.name)
    proto = keep_outputs(full, OUTPUT_NAMES)
    converted = time.perf_counter()

    progress("validating against TensorFlow on COCO images")
    figures = validate(function, full, proto, config, spec.name, resize=spec.resize)
    validated = time.perf_counter()

    contract = ModelContract(
        name=spec.name, family=spec.family, framework=spec.framework, input_height=height, input_width=width,
        resize=spec.resize, label_space=spec.label_space, score_threshold=spec.score_threshold,
        iou_threshold=spec.iou_threshold, max_detections=spec.max_detections, weights=weights_tag(weights),
        source_params=int(model.count_params()), extra=_metadata(config, prior_spec, weights is None))
    path = save_model(proto, out, contract)
    figures.update({"seconds_build": built - started, "seconds_convert": converted - built,
                    "seconds_validate": validated - converted, "priors": prior_spec.count(),
                    "file_bytes": path.stat().st_size})
    return ExportResult(path=path, contract=contract, seconds=time.perf_counter() - started, validation=figures)


def validate(function, full, proto, config: SSDConfig, name: str, *, resize: str,
             images: list[Path] | None = None) -> dict:
    """TF vs onnxruntime on real COCO images: the saved graph's detections (as matched sets)
    and the debug graph's decoded priors and class scores, all within 1e-3.

    Raises :class:`ValidationError` listing every mismatch.
    """
    comparison = Comparison(name)
    saved = cpu_session(proto)
    debug = cpu_session(full)
    height, width = config.input_size
    detections = []
    for path in images or validation_images(VALIDATION_IMAGES):
        tensor, _ = prepare(load_rgb(path), height, width, resize)
        reference = run_tf(function, tensor)
        final = run_onnx(saved, tensor, OUTPUT_NAMES)
        raw = run_onnx(debug, tensor, DEBUG_OUTPUTS)
        compare_runs(comparison, path.stem, {k: reference[k] for k in OUTPUT_NAMES}, final)
        for key in DEBUG_OUTPUTS:
            comparison.arrays(path.stem, key, reference[key], raw[key],
                              extent=max(height, width) if key == "prior_boxes" else 0.0)
        detections.append(len(reference["scores"]))
    comparison.raise_if_any("The ONNX graph differs from the TensorFlow function it was converted from; "
                            "see the mismatches above (a tf2onnx conversion problem, not a weights problem).")
    figures = dict(comparison.figures)
    for key in ("boxes", "scores", "prior_boxes", "prior_scores"):
        diffs = [v for k, v in comparison.figures.items() if k.endswith(f":{key}:max_abs_diff")]
        figures[f"max_abs_diff_{key}"] = max(diffs) if diffs else 0.0
    figures["images"] = len(detections)
    figures["detections_per_image"] = detections
    return figures


def _metadata(config: SSDConfig, priors, random_init: bool) -> dict[str, str]:
    order = "RGB -> BGR, " if config.channel_order == "bgr" else ""
    extra = {
        "preprocess": f"images (NCHW, RGB, 0..255) -> NHWC, {order}minus mean {list(config.mean)} "
                      f"({config.channel_order.upper()} order), no scaling",
        "channel_order": config.channel_order,
        "mean": json.dumps(list(config.mean)),
        "num_classes": str(config.num_classes),
        "priors": str(priors.count()),
        "prior_scales": json.dumps(list(config.scales)),
        "prior_aspect_ratios": json.dumps([list(r) for r in config.aspect_ratios]),
        "prior_steps": json.dumps([list(s) for s in priors.steps]),
        "prior_feature_maps": json.dumps([list(f) for f in priors.feature_sizes]),
        "prior_clip": str(config.clip_priors).lower(),
        "variances": json.dumps(list(config.variances)),
        "postprocess": "softmax; centre-size decoding with the variances, dw/dh clamped at log(1000/16); "
                       "boxes clipped to the image; per-class NMS; best max_detections over all classes",
        "source_params_convention": PARAMS_CONVENTION,
        "opset": str(DEFAULT_OPSET),
        **{f"{k}_version": v for k, v in versions().items()},
    }
    if random_init:
        extra["random_init_scheme"] = (f"seed {RANDOM_SEED}: He-normal kernels, N(0, 0.01) biases, L2Norm scales 20; heads "
                                       "redrawn so offsets have std 1 and logits std 2.5 on a seeded synthetic image")
    return extra
