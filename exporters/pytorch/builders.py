"""Building the PyTorch detectors of models.toml from torchvision's detection classes.

``build_model(spec)`` returns an eval-mode torchvision detector whose module structure is
that of torchvision's *pretrained* builders (FrozenBatchNorm2d in ResNet backbones, the
eps the official checkpoints need), whatever the weights: random-init and trained
models differ only in tensor values, so parameter counts match the published ones and a
torchvision state_dict loads with ``strict=True``.

Random init is deterministic and *well-conditioned*: torchvision's own initialisation
under ``torch.manual_seed(seed)``, then one forward pass over a real photograph (the first
COCO image of the data folder, prepared like the contract input) that

- sets every FrozenBatchNorm2d's statistics to the batch statistics of its input (a frozen
  BatchNorm with mean 0 / var 1 is an identity, and 33 un-normalised residual blocks of
  ResNet-101 blow activations up by ~2^16, which saturates every score and box);
- damps every ResNet bottleneck branch (its last BatchNorm's gain is ``RESIDUAL_BRANCH_GAIN``),
  as trained ResNets are: the identity path dominates, and float32 noise stays small enough
  that the proposals of PyTorch and onnxruntime agree;
- rescales each classification-logit layer so its logits span a set range (``LOGIT_MAX``)
  (torchvision initialises them so that all scores start near 1/num_classes or at the
  focal-loss prior 0.01: below the evaluation threshold, so a random-init graph would emit
  no detections, run no mask head and validate nothing).

Why a real photograph: statistics taken on a synthetic image left ResNet-101 FPN driven
8-85x harder by real photos than by the calibration image (measured on retinanet-800);
its logits then reached 30-85, float32 sigmoid rounds them to exactly 1.0, and the score
order that top-k and NMS depend on became a tie. Calibrated on a photo, other photos drive
the logits 1-4x the calibrated range.

Only values change; no module is added or removed. With ``--weights`` none of this runs:
the state_dict replaces every tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from exporters.registry import ModelSpec
from core.errors import ConfigError, DatasetError, WeightsError
from core.images import load_rgb, prepare
from core.paths import data_dir

# torchvision's detection classes count the background as class 0; COCO ids run 1..90.
NUM_CLASSES = 91
DEFAULT_SEED = 0
# Largest |logit - bias| of each classification layer on the calibration photo. Other photos
# reach up to ~4x that (measured); logits must stay well below ~16, where float32 sigmoid and
# softmax saturate to exactly 1.0 and the score order (NMS, top-k) becomes a tie.
LOGIT_MAX = 3.0
# Gain of the last FrozenBatchNorm2d of every ResNet bottleneck branch (torchvision's
# zero_init_residual idea, not taken to zero so no parameter is dead). At gain 1, 33 branches of
# unit variance pile onto the identity path and float32 rounding differences between PyTorch and
# onnxruntime grow to ~1e-5 relative in the FPN features; RPN scores are then close enough for
# that to reorder top-k and NMS: up to 6 of 100 mask-rcnn-800 detections differed per COCO image
# (5 images). At 0.2 none did.
RESIDUAL_BRANCH_GAIN = 0.2
# Floor for calibrated FrozenBatchNorm variances: a channel that is (almost) dead on the
# calibration image must not be amplified 1000-fold on a real one.
_VAR_FLOOR = 1e-2

_DETECTORS = ("FasterRCNN", "MaskRCNN", "RetinaNet")


def _need(spec: ModelSpec, key: str) -> Any:
    try:
        return spec.source[key]
    except KeyError:
        raise ConfigError(f"model {spec.name!r}: models.toml [source] lacks {key!r} "
                          f"(builder {spec.source.get('builder')!r})") from None


def _box_kwargs(spec: ModelSpec, detector: str) -> dict[str, Any]:
    """Post-processing arguments of a torchvision detector from the registry's thresholds."""
    if detector in ("FasterRCNN", "MaskRCNN"):
        kwargs = dict(box_score_thresh=spec.score_threshold, box_nms_thresh=spec.iou_threshold,
                      box_detections_per_img=spec.max_detections)
        for key in ("rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"):
            if key in spec.source:
                kwargs[key] = int(spec.source[key])
        return kwargs
    kwargs = dict(score_thresh=spec.score_threshold, nms_thresh=spec.iou_threshold,
                  detections_per_img=spec.max_detections)
    if "topk_candidates" in spec.source:
        kwargs["topk_candidates"] = int(spec.source["topk_candidates"])
    return kwargs


def _size_kwargs(input_size: tuple[int, int]) -> dict[str, Any]:
    # GeneralizedRCNNTransform scales by min(min_size / short side, max_size / long side):
    # exactly 1.0 for a tensor of the export size, so the in-graph resize is an identity.
    h, w = input_size
    return dict(min_size=min(h, w), max_size=max(h, w))


def _build_resnet_fpn(spec: ModelSpec, input_size: tuple[int, int]) -> nn.Module:
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    detector = _need(spec, "detector")
    if detector not in _DETECTORS:
        raise ConfigError(f"model {spec.name!r}: source.detector {detector!r} is not one of {_DETECTORS}")
    extra = _need(spec, "extra_blocks")
    if extra == "maxpool":
        extra_blocks = LastLevelMaxPool()
    elif extra == "p6p7":
        # torchvision's v1 RetinaNet computes P6 from P5 (256 channels), not from C5.
        extra_blocks = LastLevelP6P7(256, 256)
    else:
        raise ConfigError(f"model {spec.name!r}: source.extra_blocks {extra!r} is not 'maxpool' or 'p6p7'")
    # weights=None: nothing is downloaded; FrozenBatchNorm2d as in the pretrained builders.
    backbone = resnet_fpn_backbone(
        backbone_name=_need(spec, "backbone"), weights=None, norm_layer=FrozenBatchNorm2d,
        trainable_layers=int(spec.source.get("trainable_layers", 3)),
        returned_layers=list(_need(spec, "returned_layers")), extra_blocks=extra_blocks,
    )
    cls = {"FasterRCNN": FasterRCNN, "MaskRCNN": MaskRCNN, "RetinaNet": RetinaNet}[detector]
    model = cls(backbone, num_classes=NUM_CLASSES, **_size_kwargs(input_size), **_box_kwargs(spec, detector))
    eps = spec.source.get("frozen_bn_eps")
    if eps is not None:
        # The COCO_V1 checkpoints were trained with eps 0 (torchvision's overwrite_eps).
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = float(eps)
    return model


def _build_faster_rcnn_vgg16(spec: ModelSpec, input_size: tuple[int, int]) -> nn.Module:
    """Ren et al.'s VGG-16 Faster R-CNN from torchvision parts (see models.toml for the choices)."""
    from torchvision.models import vgg16
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    # conv1_1 .. conv5_3 with their ReLUs: vgg16().features without the final max pool
    # (index 30, pool5), so stride 16 and 512 channels.
    features = vgg16(weights=None).features[:30]
    if not isinstance(features[-1], nn.ReLU) or features[-2].out_channels != 512:
        raise ConfigError("torchvision's vgg16().features no longer ends with conv5_3 + ReLU at index 29")
    features.out_channels = 512
    sizes = tuple(int(s) for s in _need(spec, "anchor_sizes"))
    ratios = tuple(float(r) for r in _need(spec, "aspect_ratios"))
    pool = int(_need(spec, "roi_output_size"))
    if _need(spec, "roi_pool") != "roi_align":
        raise ConfigError(f"model {spec.name!r}: source.roi_pool must be 'roi_align' (see models.toml)")
    hidden = int(_need(spec, "fc_size"))
    return FasterRCNN(
        features,
        num_classes=None,
        rpn_anchor_generator=AnchorGenerator(sizes=(sizes,), aspect_ratios=(ratios,)),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=pool,
                                        sampling_ratio=int(spec.source.get("roi_sampling_ratio", 2))),
        box_head=TwoMLPHead(512 * pool * pool, hidden),
        box_predictor=FastRCNNPredictor(hidden, NUM_CLASSES),
        **_size_kwargs(input_size),
        **_box_kwargs(spec, "FasterRCNN"),
    )


def _build_torchvision_function(spec: ModelSpec, input_size: tuple[int, int]) -> nn.Module:
    import torchvision.models.detection as detection

    name = _need(spec, "function")
    fn = getattr(detection, name, None)
    if fn is None:
        raise ConfigError(f"model {spec.name!r}: torchvision.models.detection has no builder {name!r}")
    # weights=None and weights_backbone=None: nothing is downloaded. Only used for models
    # without BatchNorm (SSD300-VGG16), whose random-init structure equals the pretrained one.
    model = fn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **_box_kwargs(spec, "SSD"))
    h, w = input_size
    model.transform.min_size = (min(h, w),)
    model.transform.max_size = max(h, w)
    if model.transform.fixed_size is not None:
        model.transform.fixed_size = (w, h)  # torchvision's fixed_size is (width, height)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(f"model {spec.name!r}: builder 'torchvision' is only for models without BatchNorm "
                          "(weights=None would give trainable BatchNorm2d, not the pretrained FrozenBatchNorm2d); "
                          "use builder 'resnet_fpn'")
    return model


BUILDERS: dict[str, Callable[[ModelSpec, tuple[int, int]], nn.Module]] = {
    "resnet_fpn": _build_resnet_fpn,
    "faster_rcnn_vgg16": _build_faster_rcnn_vgg16,
    "torchvision": _build_torchvision_function,
}


def count_parameters(model: nn.Module) -> int:
    """``sum(p.numel() for p in model.parameters())``: torchvision's num_params convention
    (FrozenBatchNorm2d statistics and affine terms are buffers, so they do not count)."""
    return sum(p.numel() for p in model.parameters())


def coco_images_dir() -> Path:
    """The real COCO val2017 images of the data folder (calibration, tracing and validation)."""
    folder = data_dir() / "coco-val2017-subset" / "val2017"
    if not folder.is_dir() or not any(folder.glob("*.jpg")):
        raise DatasetError(f"PyTorch export and random-init calibration need real COCO images in {folder}; "
                           "set DETBENCH_DATA to the folder holding coco-val2017-subset/")
    return folder


def calibration_photo() -> Path:
    """The photo random-init calibration runs on: the first COCO image of the data folder."""
    return sorted(coco_images_dir().glob("*.jpg"))[0]


def calibration_image(spec: ModelSpec, input_size: tuple[int, int]) -> torch.Tensor:
    """:func:`calibration_photo` as ``[3, H, W]`` in 0..1, resized (``spec.resize``) to
    ``input_size`` exactly as the contract input would be."""
    tensor, _ = prepare(load_rgb(calibration_photo()), input_size[0], input_size[1], spec.resize)
    return torch.from_numpy(tensor[0]) / 255.0


def _score_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are classification logits (objectness included)."""
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        layers = [model.rpn.head.cls_logits, model.roi_heads.box_predictor.cls_score]
        if getattr(model.roi_heads, "mask_predictor", None) is not None:
            layers.append(model.roi_heads.mask_predictor.mask_fcn_logits)  # per-pixel mask logits
        return layers
    if isinstance(model, RetinaNet):
        return [model.head.classification_head.cls_logits]
    if isinstance(model, SSD):
        return list(model.head.classification_head.module_list)
    raise ConfigError(f"no random-init calibration rule for {type(model).__name__}")


def _calibrate(model: nn.Module, image: torch.Tensor) -> None:
    """One forward pass that conditions a random-init model (see the module docstring)."""
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.resnet import Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    def set_statistics(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).clamp_min(_VAR_FLOOR))

    def spread_logits(module, args, output):
        # A head applied to several pyramid levels is rescaled once, on its first call.
        if getattr(module, "_detbench_calibrated", False) or output.numel() == 0:
            return None  # e.g. a mask head without detections on the calibration image
        module._detbench_calibrated = True
        bias = module.bias.view(-1, *([1] * (output.dim() - 2))) if module.bias is not None else 0.0
        centred = output - bias
        factor = LOGIT_MAX / centred.abs().max().clamp_min(1e-12)
        module.weight.mul_(factor)
        return centred * factor + bias

    for m in model.modules():
        last_norm = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else None
        if isinstance(last_norm, FrozenBatchNorm2d):
            last_norm.weight.fill_(RESIDUAL_BRANCH_GAIN)
    hooks = [m.register_forward_pre_hook(set_statistics) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    layers = _score_layers(model)
    hooks += [m.register_forward_hook(spread_logits) for m in layers]
    try:
        with torch.no_grad():
            model([image])
    finally:
        for hook in hooks:
            hook.remove()
        for m in layers:
            m.__dict__.pop("_detbench_calibrated", None)
    if isinstance(model, RetinaNet):
        # RetinaNet's sigmoid head has an output for class 0, the background, which trained
        # weights never fire (no COCO category 0). Zero weights leave it at torchvision's prior
        # bias, score 0.01: below any evaluation threshold, so labels stay COCO ids.
        head = model.head.classification_head
        with torch.no_grad():
            head.cls_logits.weight[::head.num_classes] = 0.0


def build_model(spec: ModelSpec, input_size: tuple[int, int] | None = None, *, seed: int = DEFAULT_SEED,
                calibrate: bool = True) -> nn.Module:
    """The eval-mode torchvision detector ``spec.source`` describes, random-init from ``seed``.

    ``calibrate`` conditions the random init (module docstring); skip it when a state_dict
    will replace every tensor anyway.
    """
    builder = spec.source.get("builder")
    if builder not in BUILDERS:
        raise ConfigError(f"model {spec.name!r}: source.builder {builder!r} is not one of {sorted(BUILDERS)}")
    size = tuple(input_size or spec.input_size)
    torch.manual_seed(seed)
    model = BUILDERS[builder](spec, size).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if calibrate:
        _calibrate(model, calibration_image(spec, size))
    return model


def load_weights(model: nn.Module, path: Path, model_name: str) -> None:
    """Load a torchvision state_dict file (``torch.load(weights_only=True)``) strictly.

    Raises :class:`WeightsError` naming the file and listing every missing, unexpected or
    misshapen key, so a checkpoint of another architecture is never half-loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model {model_name!r}: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only refusals all land here
        raise WeightsError(f"model {model_name!r}: {path} is not a loadable torch state_dict "
                           f"(torch.load(weights_only=True) failed: {exc})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"model {model_name!r}: {path} holds a {type(state).__name__}, not a state_dict "
                           "(a mapping of parameter names to tensors); save model.state_dict()")
    state = OrderedDict(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    misshapen = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected)}")
        if misshapen:
            parts.append(f"{len(misshapen)} key(s) with another shape: {', '.join(misshapen)}")
        raise WeightsError(f"model {model_name!r}: {path} does not fit this architecture; "
                           + "; ".join(parts)
                           + ". Pass the state_dict of this registry entry (models.toml [source]) or omit --weights.")
    model.load_state_dict(state, strict=False)  # FrozenBatchNorm2d drops num_batches_tracked itself
