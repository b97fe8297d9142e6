"""Darknet YOLO (YOLOv2, YOLOv3, tiny, SPP): a registered cfg (+ weights) to a validated ONNX file.

``export`` is dispatched by :func:`exporters.export_model` for every models.toml entry
with ``framework = "darknet"``. The pieces:

- :mod:`exporters.darknet.cfg` parses the cfg and resolves the layers at the input size,
- :mod:`exporters.darknet.weights` reads (or randomly initialises, deterministically) the weights,
- :mod:`exporters.darknet.graph` builds the ONNX graph with decoding and NMS.

Validation (an export is not done until it passed): the full onnx checker, and the raw
head tensors (the convolution outputs feeding each region/yolo layer) from onnxruntime
against OpenCV's independent Darknet importer (``cv2.dnn.readNetFromDarknet``) on a real
image, both fed the identical prepared tensor. Random-init exports hand OpenCV the same
random weights through a temporary .weights file.

Batch export (``batch=True``, ``python cli.py export NAME --batch``): the same network with a
symbolic batch axis, per-image NMS and a ``batch_index`` output (:mod:`exporters.darknet.graph`).
Before it is written, the batch-1 graph is validated as above, then the batch graph runs
``BATCH_VALIDATION_IMAGES`` different real images in one call and, image by image, its raw heads
are compared with OpenCV's on that image and its detections (those whose ``batch_index`` is the
image) with the batch-1 graph's on that image alone: same count, same labels in the same order,
boxes and scores within tolerance.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters import BATCH_SUFFIX, ExportResult
from exporters.darknet.cfg import Plan, parse_cfg, plan_network, structure_warnings
from exporters.darknet.graph import build_model, drop_head_outputs, head_output_name
from exporters.nms_graph import PostProcess
from exporters.darknet.weights import DarknetWeights, random_weights, read_weights, write_weights
from exporters.registry import ModelSpec
from exporters.validation import Comparison
from exporters.weights import RemoteFile, resolve_file, search_dirs
from core.contract import (BATCH_INDEX_OUTPUT, BATCH_KEY, BATCH_SYMBOLIC, DEFAULT_OPSET, ModelContract, save_model,
                           sha256_file, weights_tag)
from core.errors import ExportError, ModelDefinitionError
from core.paths import data_dir
from core.ort_session import cpu_session

EXPORTER_VERSION = "1"
VALIDATION_IMAGE = "dog.jpg"  # in $DETBENCH_DATA/darknet: Darknet's own sample image
ATOL = RTOL = 1e-3
BATCH_VALIDATION_IMAGES = 3


def export(spec: ModelSpec, out: Path, *, weights: Path | None, input_size: tuple[int, int] | None,
           progress: Callable[[str], None], batch: bool = False) -> ExportResult:
    """Export ``spec`` (random-init when ``weights`` is None) to ``out`` and validate it; ``batch``:
    the symbolic-batch file (module docstring), named ``NAME@batch`` in its contract.

    Raises ModelDefinitionError (cfg missing/malformed/unsupported), WeightsError (weights
    missing or not matching the cfg), ValidationError (ONNX differs from OpenCV's Darknet).
    """
    start = time.perf_counter()
    cfg_path = find_cfg(spec)
    size = tuple(input_size) if input_size else spec.input_size
    progress(f"parsing {cfg_path.name} at {size[0]}x{size[1]}")
    plan = plan_network(parse_cfg(cfg_path), size)
    _check_labels(spec, plan)
    warnings = tuple(structure_warnings(plan))
    if weights is not None:
        progress(f"reading {weights}")
        dw = read_weights(Path(weights), plan)
    else:
        progress("drawing deterministic random weights")
        dw = random_weights(plan, spec.name)
    post = PostProcess(spec.score_threshold, spec.iou_threshold, spec.max_detections)
    progress("building the ONNX graph")
    model = build_model(plan, dw, post, expose_heads=True, graph_name=spec.name)
    progress("validating against OpenCV's Darknet importer")
    validation = validate(spec, plan, dw, model, cfg_path, weights)
    if batch:
        progress("building the batch graph (symbolic N, per-image NMS)")
        batch_model = build_model(plan, dw, post, expose_heads=True, graph_name=spec.name, batch=True)
        progress(f"validating the batch graph image by image ({BATCH_VALIDATION_IMAGES} images in one call)")
        validation = {**validation, "batch": validate_batch(spec, plan, dw, model, batch_model, cfg_path, weights)}
        model = batch_model
    contract = ModelContract(
        name=f"{spec.name}{BATCH_SUFFIX}" if batch else spec.name, family=spec.family, framework=spec.framework,
        input_height=plan.height, input_width=plan.width, resize=spec.resize, label_space=spec.label_space,
        score_threshold=spec.score_threshold, iou_threshold=spec.iou_threshold,
        max_detections=spec.max_detections, weights=weights_tag(Path(weights) if weights is not None else None),
        source_params=plan.param_count,
        extra={
            "exporter": f"exporters.darknet.export {EXPORTER_VERSION}",
            "opset": str(DEFAULT_OPSET),
            "cfg_file": cfg_path.name,
            "cfg_sha256": sha256_file(cfg_path),
            "darknet_weights_version": dw.version,
            "darknet_seen": str(dw.seen),
            "validated_against": validation["reference"],
            "validation_image": Path(validation["image"]).name if validation["real_image"] else validation["image"],
            "validation_max_abs_diff": f"{validation['max_abs_diff']:.3g}",
            "params_convention": "conv kernels + conv biases + BatchNorm scale and bias (running mean/var excluded)",
            **({"structure_warnings": list(warnings)} if warnings else {}),
            **({BATCH_KEY: BATCH_SYMBOLIC,
                "batch_validation": json.dumps({k: v for k, v in validation["batch"].items() if k != "figures"})}
               if batch else {}),
        },
    )
    progress(f"writing {out}")
    save_model(drop_head_outputs(model), out, contract)
    return ExportResult(Path(out), contract, time.perf_counter() - start, validation, warnings)


def find_cfg(spec: ModelSpec) -> Path:
    """The registry's cfg file, located like weights (cache, then $DETBENCH_DATA/darknet), sha256-checked."""
    name = spec.source.get("cfg")
    if not name:
        raise ModelDefinitionError(f"model {spec.name!r}: models.toml gives no source.cfg for this Darknet model")
    expected = spec.source.get("cfg_sha256")
    # The same choice `fetch` makes: a damaged copy early in the search order never hides a good one.
    found = resolve_file(RemoteFile("cfg", spec.source.get("cfg_url", ""), name,
                                    expected.strip().lower() if expected else None, None))
    if found.path is None and found.rejected:
        copies = "; ".join(f"{path} {why}" for path, why in found.rejected)
        raise ModelDefinitionError(
            f"model {spec.name!r}: no copy of the Darknet cfg {name!r} matches the sha256 models.toml pins: {copies}; "
            f"this is a different cfg (re-fetch it with `python cli.py fetch {spec.name}`)")
    if found.path is None:
        where = ", ".join(str(d) for d in search_dirs())
        raise ModelDefinitionError(
            f"model {spec.name!r}: Darknet cfg {name!r} not found (looked in {where}); "
            f"run `python cli.py fetch {spec.name}` or set DETBENCH_DATA to the folder holding darknet/{name}")
    return found.path


def _check_labels(spec: ModelSpec, plan: Plan) -> None:
    for head in plan.heads:
        if spec.label_space != "coco80" or head.classes != 80:
            raise ModelDefinitionError(
                f"{plan.cfg.path}:{head.line}: [{head.kind}] has classes={head.classes}, but model {spec.name!r} "
                f"declares label_space {spec.label_space!r}; Darknet COCO models predict the 80 contiguous "
                "classes (label_space = \"coco80\", classes=80)")


# ----------------------------------------------------------------------------- validation


def validation_image() -> tuple[np.ndarray, str]:
    """A real image (Darknet's dog.jpg from the data folder) or, when absent, a labelled synthetic one."""
    from core.images import load_rgb

    path = data_dir() / "darknet" / VALIDATION_IMAGE
    if path.is_file():
        return load_rgb(path), str(path)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    base = np.stack([xx * 255 / 640, yy * 255 / 480, (xx + yy) * 255 / 1120], axis=-1)
    image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return image, f"synthetic gradient+noise 640x480 (no real image: {path} not found)"


def opencv_heads(cfg_path: Path, weights_path: Path, plan: Plan, tensor01: np.ndarray) -> dict[str, np.ndarray]:
    """Raw head tensors from OpenCV's Darknet importer for an already prepared [1, 3, H, W] 0..1 tensor."""
    cv2 = _opencv()
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):
        raise ExportError(f"OpenCV {cv2.__version__} has no Darknet importer (OpenCV 5 dropped it); install "
                          "opencv-python-headless<5 to validate Darknet exports")
    try:
        net = cv2.dnn.readNetFromDarknet(str(cfg_path), str(weights_path))
    except cv2.error as exc:
        raise ExportError(f"OpenCV could not load {cfg_path.name} with {weights_path}: {exc}") from exc
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    names = [f"conv_{head.inputs[0]}" for head in plan.heads]
    known = set(net.getLayerNames())
    missing = [n for n in names if n not in known]
    if missing:
        raise ExportError(f"OpenCV's network for {cfg_path.name} has no layer(s) {missing}; cannot compare heads")
    net.setInput(np.ascontiguousarray(tensor01, np.float32))
    outs = net.forward(names)
    return {head_output_name(head): np.asarray(o) for head, o in zip(plan.heads, outs)}


def _opencv():
    try:
        import cv2
    except ImportError as exc:
        raise ExportError("validating a Darknet export needs OpenCV 4.x (pip install 'opencv-python-headless<5'): "
                          f"{exc}") from exc
    return cv2


def onnx_session(model_bytes: bytes):
    return cpu_session(model_bytes)


def validate(spec: ModelSpec, plan: Plan, dw: DarknetWeights, model, cfg_path: Path,
             weights: Path | None) -> dict[str, Any]:
    """Compare onnxruntime's raw heads with OpenCV's on the validation image; raise one ValidationError."""
    from core.images import prepare

    cv2 = _opencv()
    image, image_label = validation_image()
    tensor, _ = prepare(image, plan.height, plan.width, spec.resize)
    comparison = Comparison(spec.name, atol=ATOL, rtol=RTOL)
    with tempfile.TemporaryDirectory(prefix="detbench-darknet-") as tmp:
        weights_path = Path(weights) if weights is not None else write_weights(Path(tmp) / f"{spec.name}-random.weights", dw)
        reference = opencv_heads(cfg_path, weights_path, plan, tensor / np.float32(255.0))
    session = onnx_session(model.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"images": tensor})))
    where = Path(image_label).name if Path(image_label).is_file() else "synthetic"
    for head_name, ref in reference.items():
        comparison.arrays(where, head_name, ref, got[head_name])
    _check_detections(comparison, where, got, plan, spec)
    figures = dict(comparison.figures)
    comparison.raise_if_any(
        f"The ONNX graph of {cfg_path.name} does not reproduce OpenCV's Darknet network on {image_label}.")
    head_diffs = [v for k, v in figures.items() if k.endswith(":max_abs_diff") and ":head_" in k]
    return {
        "reference": f"opencv {cv2.__version__} cv2.dnn.readNetFromDarknet",
        "image": image_label,
        "real_image": Path(image_label).is_file(),
        "compared": "raw head tensors (conv outputs feeding region/yolo layers)",
        "atol": ATOL, "rtol": RTOL,
        "max_abs_diff": max(head_diffs) if head_diffs else 0.0,
        "figures": figures,
        "detections": int(len(got["scores"])),
        "random_init": weights is None,
    }


def batch_validation_images(count: int) -> list[tuple[np.ndarray, str]]:
    """``count`` different real images: COCO val2017 images of the shared subset spread over it by
    file name (deterministic), else Darknet's sample images; never fewer than ``count`` distinct ones."""
    from core.images import load_rgb

    folders = [data_dir() / "coco-val2017-subset" / "val2017", data_dir() / "darknet"]
    for folder in folders:
        files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        if len(files) >= count:
            step = len(files) // count
            return [(load_rgb(f), str(f)) for f in files[::step][:count]]
    raise ExportError(f"a batch export is validated on {count} different real images and none of "
                      f"{', '.join(str(f) for f in folders)} holds {count}; set DETBENCH_DATA to the data folder")


def validate_batch(spec: ModelSpec, plan: Plan, dw: DarknetWeights, single, batched, cfg_path: Path,
                   weights: Path | None) -> dict[str, Any]:
    """The batch graph on several images in one call against, image by image, OpenCV's heads and the
    (already validated) batch-1 graph's detections; raise one ValidationError listing every mismatch."""
    from core.images import prepare

    images = batch_validation_images(BATCH_VALIDATION_IMAGES)
    tensors = [prepare(image, plan.height, plan.width, spec.resize)[0] for image, _ in images]
    comparison = Comparison(f"{spec.name}{BATCH_SUFFIX}", atol=ATOL, rtol=RTOL)
    with tempfile.TemporaryDirectory(prefix="detbench-darknet-") as tmp:
        weights_path = Path(weights) if weights is not None else write_weights(Path(tmp) / f"{spec.name}-random.weights", dw)
        references = [opencv_heads(cfg_path, weights_path, plan, t / np.float32(255.0)) for t in tensors]
    session = onnx_session(batched.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"images": np.concatenate(tensors, axis=0)})))
    single_session = onnx_session(single.SerializeToString())
    single_names = [o.name for o in single_session.get_outputs()]
    index = got[BATCH_INDEX_OUTPUT]
    if index.dtype != np.int64 or index.shape != got["scores"].shape or np.any(np.diff(index) < 0):
        comparison.mismatches.append(f"{BATCH_INDEX_OUTPUT}: {index.dtype} {index.shape}, not int64 [K] grouped by "
                                     "image in ascending order")
    if index.size and (index.min() < 0 or index.max() >= len(images)):
        comparison.mismatches.append(f"{BATCH_INDEX_OUTPUT}: values outside 0..{len(images) - 1}")
    counts = []
    for i, (tensor, (_, label)) in enumerate(zip(tensors, images)):
        where = f"image {i} ({Path(label).name})"
        for head_name, ref in references[i].items():
            comparison.arrays(where, head_name, ref, got[head_name][i:i + 1])
        alone = dict(zip(single_names, single_session.run(None, {"images": tensor})))
        mine = index == i
        ours = {k: got[k][mine] for k in ("boxes", "scores", "labels")}
        _check_detections(comparison, where, ours, plan, spec)
        comparison.detections(where + " vs batch 1", {k: alone[k] for k in ("boxes", "scores", "labels")}, ours)
        counts.append(int(len(alone["scores"])))
    comparison.nothing_detected(counts, "the batch-1 graph detected nothing on these images")
    figures = dict(comparison.figures)
    comparison.raise_if_any(f"The batch graph of {cfg_path.name} does not reproduce, image by image, OpenCV's heads "
                            "and the batch-1 graph's detections.")
    return {
        "images": [Path(label).name for _, label in images],
        "compared": ("per image: raw heads vs OpenCV's Darknet importer; detections (batch_index = image) vs the "
                     "batch-1 graph on that image alone"),
        "detections_per_image": counts,
        "max_head_diff": max((v for k, v in figures.items() if k.endswith(":max_abs_diff") and ":head_" in k),
                             default=0.0),
        "max_detection_diff": max((v for k, v in figures.items() if k.endswith(":max_abs_diff") and "vs batch 1" in k),
                                  default=0.0),
        "figures": figures,
    }


def _check_detections(comparison: Comparison, where: str, got: dict, plan: Plan, spec: ModelSpec) -> None:
    """The contract outputs are well-formed: shapes, count, thresholds, order, label range."""
    boxes, scores, labels = got["boxes"], got["scores"], got["labels"]
    k = len(scores)
    problems = []
    if boxes.shape != (k, 4) or labels.shape != (k,) or labels.dtype != np.int64:
        problems.append(f"output shapes boxes {boxes.shape}, scores {scores.shape}, labels {labels.shape} {labels.dtype}")
    if k > spec.max_detections:
        problems.append(f"{k} detections, more than max_detections={spec.max_detections}")
    if k and (scores.min() < spec.score_threshold or np.any(np.diff(scores) > 0)):
        problems.append("scores below the threshold or not sorted by descending score")
    classes = plan.heads[0].classes
    if k and (labels.min() < 0 or labels.max() >= classes):
        problems.append(f"labels outside 0..{classes - 1}")
    if k and not np.all(np.isfinite(boxes)):
        problems.append("non-finite boxes")
    comparison.mismatches.extend(f"{where}:detections: {p}" for p in problems)
