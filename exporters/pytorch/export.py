"""PyTorch (torchvision) detectors to validated, self-describing ONNX files.

``export(spec, out, ...)`` builds the model (``exporters.pytorch.builders``), wraps it so the
graph follows the exported-model contract, exports it with the TorchScript-based
``torch.onnx.export(..., dynamo=False)`` at a fixed input size, checks it (full onnx checker
via ``core.contract.save_model``) and compares onnxruntime with PyTorch on real COCO
images that were not used for tracing. The file appears at ``out`` only after both passed.

Graph contract (see runtime/contract.py):

- input ``images`` float32 ``[1, 3, H, W]``, RGB 0..255 (letterboxed by the caller); the
  graph divides by 255 and normalises with the model's mean/std and never resizes: the
  wrapper leaves torchvision's resize out (see :class:`ContractWrapper` for why), which is
  faithful because that resize is configured (min_size = short side, max_size = long side)
  to be an exact identity at the export size (:func:`check_resize_is_identity`, every
  export); a Resize node in the transform's scope of the exported graph is an error;
- outputs ``boxes`` [K, 4] (x1, y1, x2, y2, input-tensor pixels), ``scores`` [K],
  ``labels`` int64 [K] (COCO category ids, torchvision's 91-class numbering); Mask R-CNN
  adds ``masks`` [K, 1, 28, 28]: the mask head's per-detection probabilities inside each
  box (torchvision pastes them into a full-size [K, 1, H, W] image only in Python
  post-processing, which would make the graph output ~3 MB per detection).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from exporters import ExportResult
from exporters.registry import ModelSpec
from exporters.pytorch.builders import (DEFAULT_SEED, LOGIT_MAX, RESIDUAL_BRANCH_GAIN, build_model, calibration_photo,
                                      coco_images_dir, count_parameters, load_weights)
from exporters.matching import Matching, MatchRules, match_above_first_tie, match_detections
from exporters.validation import Comparison
from core.contract import DEFAULT_OPSET, ModelContract, save_model, weights_tag
from core.errors import DatasetError, ExportError
from core.images import load_rgb, prepare_for
from core.ort_session import cpu_session as ort_cpu_session

# Bumped whenever the exported graph or the random init changes, so `run` re-exports instead of
# reusing: 2 = no in-graph resize, random init calibrated on a COCO photo; 3 = validation as
# set matching, its outcome and figures in the metadata (detbench.validation*); 4 = box clipping
# and decoding traced without Reshape(-1) (graphs that run with an empty pyramid level or proposal set).
EXPORTER_VERSION = "4"
# torchvision registers roi_align / nms symbolics for opsets 11 and 16; 17 is the project default.
OPSET = DEFAULT_OPSET
PARAMS_CONVENTION = ("sum(p.numel() for p in model.parameters()), torchvision's num_params: "
                     "FrozenBatchNorm2d weight/bias/running statistics are buffers and are not counted")
GREY_LEVEL = 128
# Extra outputs of the graph validation runs (two-stage models): the RPN's proposals after its
# NMS and cap, and their objectness. Removed from the file that is written.
PROPOSAL_OUTPUTS = ("rpn_boxes", "rpn_scores")
# torchvision's RoI heads drop detections narrower or lower than this (px) before their NMS, a
# literal in RoIHeads.postprocess_detections (the RPN's own is ``rpn.min_size``, 1e-3).
ROI_MIN_SIZE = 1e-2


class ContractWrapper(nn.Module):
    """A torchvision detector as a contract graph: ``images [1,3,H,W] 0..255 -> boxes, scores, labels[, masks]``.

    The forward is torchvision's eval path without the transform's resize and final
    ``postprocess``: normalise, pad to the size divisor, backbone, then RPN + RoI heads
    (GeneralizedRCNN) or head + anchors + ``postprocess_detections`` (RetinaNet, SSD). At the
    export size torchvision's resize is an identity in eager mode (:func:`check_resize_is_identity`),
    but traced it computes its scale as ``min_size * (1 / short side)``, which float32 rounds
    to 0.99999994 for 600 or 850: the graph then resized a 600 x 850 input to 599 x 849 and
    no longer matched PyTorch. ``postprocess`` only rescales boxes by 1.0 and pastes masks into
    full images (which the contract does not want, see the module docstring).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
        from torchvision.models.detection.retinanet import RetinaNet
        from torchvision.models.detection.ssd import SSD

        if not isinstance(model, (GeneralizedRCNN, RetinaNet, SSD)):
            raise ExportError(f"no contract wrapper for {type(model).__name__}: expected a torchvision "
                              "GeneralizedRCNN (Faster/Mask R-CNN), RetinaNet or SSD")
        self.model = model
        self.two_stage = isinstance(model, GeneralizedRCNN)
        self.retinanet = isinstance(model, RetinaNet)
        self.with_masks = self.two_stage and getattr(model.roi_heads, "mask_predictor", None) is not None
        # Validation traces with the RPN's proposals as extra outputs (PROPOSAL_OUTPUTS) and
        # removes them from the file it writes; the other outputs' nodes are the same.
        self.expose_proposals = False

    @property
    def output_names(self) -> list[str]:
        names = ["boxes", "scores", "labels"] + (["masks"] if self.with_masks else [])
        return names + (list(PROPOSAL_OUTPUTS) if self.two_stage and self.expose_proposals else [])

    def _features(self, images: torch.Tensor):
        """The normalised, padded image list and the backbone's feature maps by name (a
        single-map backbone such as VGG's conv5_3 returns a tensor: named "0", as
        GeneralizedRCNN.forward names it)."""
        from torchvision.models.detection.image_list import ImageList

        m = self.model
        x = m.transform.normalize(images[0] / 255.0)
        image_list = ImageList(m.transform.batch_images([x], size_divisible=m.transform.size_divisible),
                               [(x.shape[-2], x.shape[-1])])
        features = m.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return image_list, features

    def forward(self, images: torch.Tensor):
        m = self.model
        image_list, features = self._features(images)
        if self.two_stage:
            proposals, proposal_scores = self._rpn_proposals(image_list, features)
            detections, _ = m.roi_heads(features, proposals, image_list.image_sizes)
            if self.expose_proposals:
                detections[0]["rpn_boxes"], detections[0]["rpn_scores"] = proposals[0], proposal_scores[0]
        elif self.retinanet:
            detections = self._retinanet_detections(image_list, list(features.values()))
        else:  # SSD.forward's eval branch
            features = list(features.values())
            anchors = m.anchor_generator(image_list, features)
            detections = m.postprocess_detections(m.head(features), anchors, image_list.image_sizes)
        d = detections[0]
        return tuple(d[name] for name in self.output_names)

    def _rpn_proposals(self, image_list, features):
        # RegionProposalNetwork.forward's eval branch, step for step (torchvision 0.29), which
        # drops the proposals' objectness scores that validation compares.
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn = self.model.rpn
        levels = list(features.values())
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(image_list, levels)
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)

    def heads_on(self, images: torch.Tensor, proposals: torch.Tensor) -> dict[str, torch.Tensor]:
        """The second stage of PyTorch on given proposals ``[N, 4]`` (e.g. onnxruntime's):
        backbone on ``images`` then RoI heads, as :meth:`forward` computes them."""
        with torch.no_grad():
            image_list, features = self._features(images)
            detections, _ = self.model.roi_heads(features, [proposals], image_list.image_sizes)
        return {n: detections[0][n] for n in ("boxes", "scores", "labels")}

    def _retinanet_detections(self, image_list, features: list[torch.Tensor]):
        # RetinaNet.forward's eval branch, step for step (torchvision 0.29).
        m = self.model
        head_outputs = m.head(features)
        anchors = m.anchor_generator(image_list, features)
        per_level = [f.size(2) * f.size(3) for f in features]
        anchors_per_location = head_outputs["cls_logits"].size(1) // sum(per_level)
        per_level = [n * anchors_per_location for n in per_level]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return m.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)


def check_resize_is_identity(model: nn.Module, image: torch.Tensor) -> None:
    """Raise ExportError unless the model's transform leaves an export-size image unresized.

    ``image`` is ``[3, H, W]`` in 0..1. The transformed tensor (before batch padding) must
    equal plain normalisation bit for bit, and report the same image size.
    """
    t = model.transform
    with torch.no_grad():
        image_list, _ = t([image])
        h, w = image.shape[-2:]
        expected = t.normalize(image)
    got_size = tuple(image_list.image_sizes[0])
    same = got_size == (h, w) and torch.equal(image_list.tensors[0, :, :h, :w], expected)
    if not same:
        raise ExportError(f"torchvision's transform resizes a {h}x{w} tensor to {got_size}: the in-graph resize "
                          f"is not an identity at the export size (min_size={t.min_size}, max_size={t.max_size}, "
                          f"fixed_size={t.fixed_size})")


def pick_images(folder: Path) -> tuple[Path, list[Path]]:
    """The tracing image and the validation images (never the tracing one).

    Sorted order, deterministic: the first image traces; validation uses the first image
    whose true size differs from it, then the first one of the other orientation.
    """
    files = sorted(folder.glob("*.jpg"))
    trace = files[0]
    sizes = {}

    def size(path):
        if path not in sizes:
            sizes[path] = load_rgb(path).shape[:2]
        return sizes[path]

    first = next((f for f in files[1:] if size(f) != size(trace)), None)
    if first is None:
        raise DatasetError(f"{folder}: need an image whose size differs from {trace.name} for export validation")
    portrait = size(first)[0] > size(first)[1]
    second = next((f for f in files[1:] if f != first and (size(f)[0] > size(f)[1]) != portrait), None)
    return trace, [first] + ([second] if second is not None else [])


def _contract(spec: ModelSpec, size: tuple[int, int], weights: Path | None, model: nn.Module,
              wrapper: ContractWrapper) -> ModelContract:
    import onnx
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = sum(b.numel() for m in model.modules() if isinstance(m, FrozenBatchNorm2d) for b in m.buffers())
    extra: dict[str, Any] = {
        "opset": str(OPSET),
        "exporter": f"detbench.exporters.pytorch.export {EXPORTER_VERSION} (torch.onnx.export, dynamo=False)",
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "onnx_version": onnx.__version__,
        "params_convention": PARAMS_CONVENTION,
        "frozen_batchnorm_buffer_values": str(frozen),
        "architecture": json.dumps(dict(spec.source), sort_keys=True),
        "detector_class": type(model).__name__,
        "normalisation": json.dumps({"divide": 255.0, "mean": list(model.transform.image_mean),
                                     "std": list(model.transform.image_std)}),
        "outputs": json.dumps(wrapper.output_names),
    }
    if weights is None:
        extra["init"] = (f"random-init: torchvision's initialisation under torch.manual_seed({DEFAULT_SEED}), then "
                         f"FrozenBatchNorm2d statistics from one pass over the COCO photo {calibration_photo().name}, ResNet "
                         f"bottleneck branches damped (last BatchNorm gain {RESIDUAL_BRANCH_GAIN}) and "
                         f"classification logits rescaled to |logit - bias| <= {LOGIT_MAX} on it (exporters/pytorch/builders.py)")
    else:
        extra["init"] = f"state_dict {Path(weights).name}"
    if wrapper.with_masks:
        extra["masks"] = ("[K, 1, 28, 28] float32 mask probabilities inside each detection's box "
                          "(torchvision's mask head output, not pasted into the image)")
    if wrapper.two_stage:
        rpn = model.rpn
        extra["rpn_proposals"] = json.dumps({"pre_nms_top_n": rpn._pre_nms_top_n["testing"],
                                             "post_nms_top_n": rpn._post_nms_top_n["testing"],
                                             "nms_thresh": rpn.nms_thresh})
    return ModelContract(
        name=spec.name, family=spec.family, framework=spec.framework,
        input_height=size[0], input_width=size[1], resize=spec.resize, label_space=spec.label_space,
        score_threshold=spec.score_threshold, iou_threshold=spec.iou_threshold,
        max_detections=spec.max_detections, weights=weights_tag(weights),
        source_params=count_parameters(model), extra=extra,
    )


def _clip_boxes_by_column(boxes: torch.Tensor, size) -> torch.Tensor:
    """torchvision's ``clip_boxes_to_image`` (its tracing branch: max with 0, min with the side),
    one coordinate column at a time and stacked on the last axis: the same values, without
    the ``reshape(boxes.shape)`` that torchvision traces."""
    height, width = size
    zero = torch.tensor(0, dtype=boxes.dtype, device=boxes.device)
    limits = [torch.tensor(v, dtype=boxes.dtype, device=boxes.device) for v in (width, height)]
    columns = [torch.min(torch.max(boxes[..., i], zero), limits[i % 2]) for i in range(4)]
    return torch.stack(columns, dim=boxes.dim() - 1)


def _decode_with_fixed_shape(coder, rel_codes: torch.Tensor, boxes) -> torch.Tensor:
    """``BoxCoder.decode`` for 2-D codes ``[N, 4 * C]`` (every caller of the exported models):
    ``decode_single`` then ``[N, C, 4]``, with C a constant of the graph instead of -1."""
    concat = torch.cat(list(boxes), dim=0)
    pred = coder.decode_single(rel_codes, concat)
    # int() makes the tracer record C as a constant (the input size is fixed, C is the head's).
    return pred.reshape(pred.shape[0], int(pred.shape[1]) // 4, 4)


@contextlib.contextmanager
def empty_safe_tracing():
    """While ``torch.onnx.export`` traces: torchvision's box clipping and box decoding replaced
    by equal-valued versions whose graphs run on empty tensors.

    Traced, ``clip_boxes_to_image`` ends in ``Reshape(stack, Concat(Shape(boxes)[0],
    Shape(boxes)[1]))``. Once the file carries inferred shapes (``onnx.shape_inference``, which
    the quantizer runs) onnxruntime's ReshapeFusion rewrites that target to the constant
    ``[0, -1]`` (``[0, 0, -1]`` in the RoI heads), and onnxruntime refuses -1 on a tensor with
    no elements: RetinaNet failed on every image with a pyramid level without a candidate above
    the score threshold (``/Reshape_10``: ``{0,2,2}`` to ``{0,-1}``). ``BoxCoder.decode``
    traces ``reshape(N, -1)`` and ``reshape(N, -1, 4)``, which fail the same way, without any
    optimiser, on an empty proposal set (Faster/Mask R-CNN RoI heads). Eager PyTorch (the
    reference validation compares with, and :class:`ContractWrapper` outside export) is not
    touched."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import boxes as box_ops

    clip, decode = box_ops.clip_boxes_to_image, BoxCoder.decode

    def patched_decode(self, rel_codes, boxes):
        if rel_codes.dim() != 2:
            return decode(self, rel_codes, boxes)
        return _decode_with_fixed_shape(self, rel_codes, boxes)

    box_ops.clip_boxes_to_image, BoxCoder.decode = _clip_boxes_by_column, patched_decode
    try:
        yield
    finally:
        box_ops.clip_boxes_to_image, BoxCoder.decode = clip, decode


def _to_onnx(wrapper: ContractWrapper, example: torch.Tensor, name: str):
    import onnx

    buffer = io.BytesIO()
    dynamic = {out: {0: "detections"} for out in wrapper.output_names}
    try:
        with warnings.catch_warnings(), torch.no_grad(), empty_safe_tracing():
            # Tracer warnings about Python values in torchvision's code are expected and
            # harmless at a fixed input size; the validation below is what proves the graph.
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["images"], output_names=wrapper.output_names,
                              dynamic_axes=dynamic, do_constant_folding=True)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {name!r} (opset {OPSET}, dynamo=False): {exc}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    # FPN upsampling is a Resize too; only one in torchvision's transform scope resamples the input.
    resizes = [node.name for node in proto.graph.node if node.op_type == "Resize" and "/transform/" in node.name]
    if resizes:
        raise ExportError(f"the ONNX graph of {name!r} resizes its input (Resize nodes {resizes}); the contract "
                          "graph takes images at the export size and must not resample them")
    return proto


def run_reference(wrapper: ContractWrapper, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch's outputs for one contract input ``[1, 3, H, W]`` (0..255)."""
    with torch.no_grad():
        outs = wrapper(torch.from_numpy(tensor))
    return {n: o.numpy() for n, o in zip(wrapper.output_names, outs)}


def run_onnx(session, tensor: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": tensor})))


def cpu_session(path: Path):
    session = ort_cpu_session(path)
    if session.get_providers()[0] != "CPUExecutionProvider":
        raise ExportError(f"onnxruntime did not run {path} on the CPU provider: {session.get_providers()}")
    return session


def compare(comparison: Comparison, where: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
            contract: ModelContract, second_stage: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
            rpn: dict[str, float] | None = None) -> Matching | None:
    """Detections compared as sets (:func:`exporters.matching.match_detections`): every
    detection paired with one of the other runtime (same label, score and box within
    tolerance) or explained by a boundary visible in the outputs; masks of paired detections
    compared as COCO uses them. NaN/Inf anywhere is a mismatch. Returns the matching (None
    when the outputs could not be compared at all).

    Two-stage models (``got`` holds PROPOSAL_OUTPUTS, ``rpn`` the RPN's NMS threshold, score
    threshold and cap, ``second_stage`` PyTorch's RoI heads on given proposals): the proposals
    are matched too (figures ``proposals:*``), and detections left unexplained are explained as
    ``proposal set`` when both halves agree on their own: every proposal of either runtime is
    paired or explained by a cut of the RPN (its cap, NMS boundary, cascade or tie), and
    PyTorch's second stage run on the export's proposals matches the export's detections with
    nothing unexplained (figures ``on_onnx_proposals:*``). A backbone or head that computes
    something else fails the second half; the proposal sets alone never explain anything."""
    for name, array in got.items():
        if name == "labels" and array.dtype != np.int64:
            comparison.mismatches.append(f"{where}: labels are {array.dtype} in ONNX, the contract wants int64")
    finite = all([comparison.finite(where, name, array, "the source model") for name, array in ref.items()]
                 + [comparison.finite(where, name, array, "ONNX") for name, array in got.items()])
    if not finite:
        return None
    matching = match_detections(ref, got, _detection_rules(comparison, contract))
    if rpn is not None and all(k in ref and k in got for k in PROPOSAL_OUTPUTS):
        _explain_by_proposals(comparison, where, ref, got, contract, matching, TwoStage(rpn, second_stage))
    _record(comparison, where, ref, got, matching)
    return matching


def _record(comparison: Comparison, where: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
            matching: Matching) -> None:
    """The matching's figures and mismatches, and the masks of its pairs compared."""
    for key, value in matching.figures().items():
        comparison.figures[f"{where}:{key}"] = value
    comparison.mismatches.extend(matching.mismatches(where))
    if "masks" in ref and "masks" in got and matching.pairs:
        rows, cols = (list(x) for x in zip(*matching.pairs))
        compare_masks(comparison, where, ref["masks"][rows], got["masks"][cols])


def _detection_rules(comparison: Comparison, contract: ModelContract, *, ties: bool = False) -> MatchRules:
    """The final detections' rules: the contract's cuts, the comparison's tolerances."""
    return MatchRules(iou_threshold=contract.iou_threshold, score_threshold=contract.score_threshold,
                      max_detections=contract.max_detections, atol=comparison.atol, rtol=comparison.rtol, ties=ties,
                      image_size=_image_size(contract), min_size=_detection_min_size(contract))


def _detection_min_size(contract: ModelContract) -> float | None:
    """ROI_MIN_SIZE for a two-stage model (its metadata describes its RPN), else None: RetinaNet
    and SSD remove no small box."""
    return ROI_MIN_SIZE if "rpn_proposals" in getattr(contract, "extra", {}) else None


def _image_size(contract: ModelContract) -> tuple[int, int] | None:
    """The input tensor's (height, width): coordinates are compared at its scale
    (exporters/matching.py); None for a contract-like object without a size."""
    height, width = getattr(contract, "input_height", None), getattr(contract, "input_width", None)
    return (int(height), int(width)) if height and width else None


def _as_proposals(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # One label for all: the RPN's NMS is per pyramid level, which the outputs do not say, so
    # a proposal may be "explained" by one of another level (the looser reading).
    return {"boxes": out["rpn_boxes"], "scores": out["rpn_scores"], "labels": np.zeros(len(out["rpn_scores"]), np.int64)}


@dataclasses.dataclass(frozen=True)
class TwoStage:
    """A two-stage model's halves as validation sees them: ``rpn``, its RPN's NMS threshold,
    score threshold, cap and (optional) minimum size; ``second_stage``, PyTorch's RoI heads on
    given proposals (None: not available, nothing is explained by proposals)."""

    rpn: dict[str, float]
    second_stage: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None


def _explain_by_proposals(comparison: Comparison, where: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
                          contract: ModelContract, matching: Matching, model: TwoStage, *,
                          uniform: bool = False) -> None:
    """Proposals matched (figures ``proposals:*``); detections left unexplained in ``matching``
    explained as ``proposal set`` when no proposal is unexplained and PyTorch's second stage on
    ONNX's proposals matches ONNX's detections (figures ``on_onnx_proposals:*``). ``uniform``
    (a uniform image): proposals and detections are compared above their first tie
    (:func:`match_above_first_tie`), and the second stage runs on ONNX's proposals even when
    nothing needs explaining (the detections compared above the first tie may be few), its
    unexplained detections being mismatches."""
    matcher = match_above_first_tie if uniform else match_detections
    check_heads, second_stage, rpn = uniform, model.second_stage, model.rpn
    proposals = matcher(_as_proposals(ref), _as_proposals(got), MatchRules(
        iou_threshold=rpn["nms_thresh"], score_threshold=rpn["score_thresh"], max_detections=int(rpn["post_nms_top_n"]),
        atol=comparison.atol, rtol=comparison.rtol, ties=True, image_size=_image_size(contract),
        min_size=rpn.get("min_size")))
    for key, value in proposals.figures().items():
        comparison.figures[f"{where}:proposals:{key}"] = value
    if second_stage is None or not (matching.unexplained or check_heads):
        return
    if matching.unexplained and proposals.unexplained:
        comparison.mismatches.extend(m.replace(f"{where}:", f"{where}:proposals:", 1)
                                     for m in proposals.mismatches(where))
        return
    on_onnx = matcher(second_stage(got["rpn_boxes"]), got, _detection_rules(comparison, contract))
    for key, value in on_onnx.figures().items():
        comparison.figures[f"{where}:on_onnx_proposals:{key}"] = value
    if on_onnx.unexplained:
        comparison.mismatches.extend(m.replace(f"{where}:", f"{where}:on_onnx_proposals:", 1)
                                     for m in on_onnx.mismatches(where))
        return
    for u in matching.unexplained:
        u.rule = "proposal set"
        u.detail = (f"{len(proposals.unpaired)} RPN proposals of the two runtimes unpaired, each at an RPN cut; "
                    "PyTorch's second stage on ONNX's proposals matches ONNX")


# Masks are compared as COCO uses them, binarised at 0.5: a mask probability is a sigmoid of
# a logit sampled (RoIAlign) at box-dependent points, so box differences of ~1e-5 relative
# move steep edges by a fraction of a pixel and single probabilities by far more than 1e-3.
MASK_THRESHOLD = 0.5
MASK_MAX_FLIPPED = 0.005


def compare_masks(comparison: Comparison, where: str, ref: np.ndarray, got: np.ndarray) -> None:
    """At most 0.5% of mask pixels may fall on the other side of 0.5; max/mean |diff| are recorded."""
    if ref.shape != got.shape:
        comparison.mismatches.append(f"{where}:masks: shape {got.shape} in ONNX, {ref.shape} in the source model")
        return
    if ref.size == 0:
        return
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    flipped = float(np.mean((ref > MASK_THRESHOLD) != (got > MASK_THRESHOLD)))
    comparison.figures[f"{where}:masks:max_abs_diff"] = float(diff.max())
    comparison.figures[f"{where}:masks:mean_abs_diff"] = float(diff.mean())
    comparison.figures[f"{where}:masks:flipped_fraction"] = flipped
    if flipped > MASK_MAX_FLIPPED:
        comparison.mismatches.append(f"{where}:masks: {flipped:.2%} of mask pixels change sides of {MASK_THRESHOLD} "
                                     f"(allowed {MASK_MAX_FLIPPED:.1%}); max |diff| {diff.max():.3g}")


def check_degenerate(comparison: Comparison, where: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
                     contract: ModelContract, second_stage: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
                     rpn: dict[str, float] | None = None) -> Matching | None:
    """A uniform image: the graph must run and give well-formed outputs, and what is decided
    before any tie must agree. On a translation-invariant input, anchors at different positions
    score exactly alike, and which of the tied positions survives top-k and NMS (so how many
    detections there are) is arbitrary in either runtime: detections scoring above the first
    tie of both lists are compared as sets (:func:`match_above_first_tie`), the rest only for
    form. Two-stage models (``rpn``, ``second_stage`` as for :func:`compare`): the proposals
    are compared above their first tie as well, and PyTorch's second stage always runs on
    ONNX's proposals, whose detections must match ONNX's (above their first tie); detections
    of the two runtimes left unexplained are ``proposal set`` only when both halves hold."""
    k = len(got["scores"])
    comparison.figures[f"{where}:detections"] = len(ref["scores"])
    comparison.figures[f"{where}:onnx_detections"] = k
    shapes = {name: tuple(array.shape) for name, array in got.items()}
    if shapes["boxes"] != (k, 4) or shapes["labels"] != (k,) or k > contract.max_detections:
        comparison.mismatches.append(f"{where}: malformed outputs {shapes} (max {contract.max_detections} detections)")
        return None
    if got["labels"].dtype != np.int64:
        comparison.mismatches.append(f"{where}: labels are {got['labels'].dtype} in ONNX, the contract wants int64")
    finite = all([comparison.finite(where, name, array, "the source model") for name, array in ref.items()]
                 + [comparison.finite(where, name, array, "ONNX") for name, array in got.items()])
    if not finite:
        return None
    matching = match_above_first_tie(ref, got, _detection_rules(comparison, contract, ties=True))
    if rpn is not None and all(key in ref and key in got for key in PROPOSAL_OUTPUTS):
        _explain_by_proposals(comparison, where, ref, got, contract, matching, TwoStage(rpn, second_stage),
                              uniform=True)
    _record(comparison, where, ref, got, matching)
    return matching


def second_stage_on(wrapper: ContractWrapper, tensor: np.ndarray) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """``proposals [N, 4] -> detections``: PyTorch's RoI heads on ``tensor`` (a contract input)."""
    def run(boxes: np.ndarray) -> dict[str, np.ndarray]:
        out = wrapper.heads_on(torch.from_numpy(tensor), torch.from_numpy(np.ascontiguousarray(boxes)))
        return {name: value.numpy() for name, value in out.items()}
    return run


def _rpn_settings(wrapper: ContractWrapper) -> dict[str, float] | None:
    if not (wrapper.two_stage and wrapper.expose_proposals):
        return None
    rpn = wrapper.model.rpn
    return {"nms_thresh": rpn.nms_thresh, "score_thresh": rpn.score_thresh,
            "post_nms_top_n": rpn._post_nms_top_n["testing"], "min_size": rpn.min_size}


def _drop_outputs(proto, names) -> None:
    """Remove graph outputs ``names`` and the nodes that only they needed."""
    keep = [o for o in proto.graph.output if o.name not in names]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    needed = {o.name for o in keep}
    live = []
    for node in reversed(proto.graph.node):
        if any(out in needed for out in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs (If/Loop) read outer names too
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in graph.node for i in n.input if i)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(live))
    used = {i for n in proto.graph.node for i in n.input}
    kept_init = [t for t in proto.graph.initializer if t.name in used or t.name in {o.name for o in keep}]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept_init)


def matching_summary(figures: dict[str, Any], images: list[str]) -> dict[str, Any]:
    """Per image: detections of each runtime, how many were paired, the largest IoU deficit
    and score difference of a pair, and the unpaired ones by the rule that explains them."""
    keys = ("detections", "onnx_detections", "matched", "max_iou_deficit", "max_score_diff", "unexplained",
            "degenerate_pairs", "tie_cut", "below_tie_cut", "onnx_below_tie_cut")
    summary = {}
    for image in images:
        row = {k: figures[f"{image}:{k}"] for k in keys if f"{image}:{k}" in figures}
        explained = {k.split(":explained_", 1)[1]: v for k, v in figures.items()
                     if k.startswith(f"{image}:explained_")}
        if explained:
            row["explained"] = explained
        for stage in ("proposals", "on_onnx_proposals"):
            part = {k.split(f":{stage}:", 1)[1]: v for k, v in figures.items() if k.startswith(f"{image}:{stage}:")}
            if part:
                row[stage] = part
        summary[image] = row
    return summary


def validate(wrapper: ContractWrapper, path: Path, contract: ModelContract, images: list[Path],
             progress: Callable[[str], None], *, accept_mismatch: bool = False) -> dict[str, Any]:
    """onnxruntime vs PyTorch on ``images`` and on a uniform grey image; raises ValidationError
    unless ``accept_mismatch`` (then ``status`` is "failed-accepted" and ``mismatches`` lists
    them). Non-finite outputs are never accepted: such a file computes nothing."""
    session = cpu_session(path)
    comparison = Comparison(contract.name)
    real_detections = 0
    inputs = [(p.name, load_rgb(p)) for p in images]
    inputs.append((f"uniform grey {GREY_LEVEL}", np.full((480, 640, 3), GREY_LEVEL, np.uint8)))
    for where, rgb in inputs:
        progress(f"validating on {where}")
        tensor, _ = prepare_for(rgb, contract)
        ref = run_reference(wrapper, tensor)
        got = run_onnx(session, tensor)
        second_stage = second_stage_on(wrapper, tensor)
        if where.startswith("uniform"):
            check_degenerate(comparison, where, ref, got, contract, second_stage=second_stage,
                             rpn=_rpn_settings(wrapper))
        else:
            compare(comparison, where, ref, got, contract, rpn=_rpn_settings(wrapper), second_stage=second_stage)
            real_detections += len(ref["scores"])
    if real_detections == 0:
        comparison.mismatches.append(
            f"PyTorch produced no detections on {[p.name for p in images]} at score threshold "
            f"{contract.score_threshold}: the comparison would have checked nothing")
    figures: dict[str, Any] = dict(comparison.figures)
    figures["images"] = [p.name for p in images]
    figures["atol"], figures["rtol"] = comparison.atol, comparison.rtol
    figures["matching"] = matching_summary(figures, figures["images"])
    non_finite = any(":non_finite_" in key for key in comparison.figures)
    if comparison.mismatches and accept_mismatch and not non_finite and real_detections:
        figures["status"] = "failed-accepted"
        figures["mismatches"] = list(comparison.mismatches)
        return figures
    comparison.raise_if_any(fix=(
        "Detections of PyTorch that onnxruntime lacks (or the reverse) away from any cap, threshold or NMS "
        "boundary mean the graph computes something else. If you have checked the listed detections and "
        "accept them, `python cli.py export NAME --weights FILE --accept-mismatch` writes the file marked "
        "detbench.validation = failed-accepted with these mismatches in its metadata."
        if not non_finite else
        "Non-finite outputs: the weights overflow float32 (or are damaged); no option accepts this."))
    figures["status"] = "passed"
    return figures


def _validation_metadata(figures: dict[str, Any]) -> dict[str, str]:
    extra = {"validation": figures["status"], "validated_against": "PyTorch eager (torch.no_grad)",
             "validation_images": json.dumps(figures["images"]),
             "validation_matching": json.dumps(figures["matching"], sort_keys=True)}
    if figures["status"] == "failed-accepted":
        extra["validation_mismatches"] = json.dumps(figures["mismatches"][:50])
    return extra


def export(spec: ModelSpec, out: Path, *, weights: Path | None, input_size: tuple[int, int] | None,
           progress: Callable[[str], None], accept_mismatch: bool = False) -> ExportResult:
    """Export ``spec`` to ``out`` and validate it (see the module docstring for the graph contract).

    ``accept_mismatch`` writes the file even if validation found mismatches (never non-finite
    outputs), marked ``detbench.validation = failed-accepted`` with the mismatches listed."""
    start = time.perf_counter()
    size = tuple(input_size or spec.input_size)
    folder = coco_images_dir()
    trace_image, validation_images = pick_images(folder)

    progress("building the torchvision model" + (" (random init, calibrating)" if weights is None else ""))
    model = build_model(spec, size, calibrate=weights is None)
    if weights is not None:
        load_weights(model, weights, spec.name)
    wrapper = ContractWrapper(model).eval()
    contract = _contract(spec, size, weights, model, wrapper)

    trace_tensor, _ = prepare_for(load_rgb(trace_image), contract)
    check_resize_is_identity(model, torch.from_numpy(trace_tensor[0]) / 255.0)

    progress(f"exporting to ONNX (opset {OPSET}, traced on {trace_image.name})")
    wrapper.expose_proposals = wrapper.two_stage
    proto = _to_onnx(wrapper, torch.from_numpy(trace_tensor), spec.name)
    proto.doc_string = f"detbench {spec.name}: torchvision {type(model).__name__} exported by exporters/pytorch/export.py"

    out = Path(out)
    # Validated from a file beside the target; the target itself is only ever replaced by the
    # atomic writer once validation has passed (or its failure was accepted).
    pending = out.with_name(out.name + f".{os.getpid()}.validating")
    try:
        progress("checking (onnx full check)")
        save_model(proto, pending, contract)
        figures = validate(wrapper, pending, contract, validation_images, progress, accept_mismatch=accept_mismatch)
        figures["trace_image"] = trace_image.name
    finally:
        if pending.exists():
            pending.unlink()
    _drop_outputs(proto, PROPOSAL_OUTPUTS)
    wrapper.expose_proposals = False
    contract = dataclasses.replace(contract, extra={**contract.extra, **_validation_metadata(figures)})
    progress(f"writing {out}")
    save_model(proto, out, contract)
    return ExportResult(path=out, contract=contract, seconds=time.perf_counter() - start, validation=figures)
