"""State dicts of torchvision detectors whose box regression runs into its clamp.

torchvision's own constructor (``weights=None``: its default init) under a seed, BatchNorm
running statistics taken from a COCO photo and then perturbed (as a user's checkpoint would
carry them), classification biases spread so that some scores pass the 0.05 threshold, and
every box-regression layer's weights multiplied by ``gain``: the decoded width/height deltas
then exceed ``bbox_xform_clip = log(1000 / 16)`` for many anchors and proposals, and the
centre deltas (never clamped) throw boxes far outside the image, where clipping leaves them
degenerate at its border. That is where PyTorch and onnxruntime differ most: corners are
computed from operands of up to ``62.5 x`` an anchor's size and then clipped.

Used by tests/test_torch_export.py and benchmarks/validate_saturated_torch.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Multiplies every box-regression weight: torchvision's init gives deltas of std ~0.1-0.2 on a
# photo (RPN, box head, RetinaNet); x40 (RPN, RetinaNet; the box head divides width/height
# codes by 5, hence x100) puts a sizeable share of width/height deltas at the clamp
# (``saturation`` measures it).
DEFAULT_GAIN = 40.0
BOX_HEAD_GAIN = 2.5  # on top of ``gain`` for the box head, whose codes are divided by (10, 10, 5, 5)
# Classification weights multiplied (objectness, the box head's class logits): at torchvision's
# init every score sits at 1/91 (< 0.05, no detection) and every objectness at ~0.5 (all tied).
SCORE_GAIN = 15.0
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
FUNCTIONS = {"fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"}


def regression_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers whose outputs are box deltas (RPN and box head, or RetinaNet's regression head)."""
    from torchvision.models.detection.retinanet import RetinaNet

    if isinstance(model, RetinaNet):
        return [model.head.regression_head.bbox_reg]
    return [model.rpn.head.bbox_pred, model.roi_heads.box_predictor.bbox_pred]


def build(name: str, photo: Path, *, seed: int = 5, gain: float = DEFAULT_GAIN) -> torch.nn.Module:
    """The eval-mode torchvision model ``name`` with the weights the module docstring describes."""
    import torchvision
    from core.images import load_rgb

    if name not in FUNCTIONS:
        raise ValueError(f"no saturated-regression recipe for {name!r}; one of {sorted(FUNCTIONS)}")
    torch.manual_seed(seed)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, num_classes=91).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(seed + 1)
    for m in norms:
        m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.momentum = 1.0
        m.train()
    x = torch.from_numpy(load_rgb(photo)).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        model.backbone(model.transform.normalize(x)[None])
        for m in norms:
            m.eval()
            m.running_mean.add_(torch.randn(m.num_features, generator=g) * 0.1 * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
        for layer in regression_layers(model):
            layer.weight.mul_(gain * (BOX_HEAD_GAIN if layer.weight.dim() == 2 else 1.0))
        if name != "retinanet_resnet50_fpn":
            model.rpn.head.cls_logits.weight.mul_(SCORE_GAIN)
            model.roi_heads.box_predictor.cls_score.weight.mul_(SCORE_GAIN)
        if name == "retinanet_resnet50_fpn":
            bias = model.head.classification_head.cls_logits.bias
            bias.copy_(torch.randn(bias.shape, generator=g) - 3.0)
    return model


def save(name: str, photo: Path, path: Path, **kwargs) -> Path:
    torch.save(build(name, photo, **kwargs).state_dict(), path)
    return path


def saturation(model: torch.nn.Module, photo: Path, size: tuple[int, int]) -> dict[str, float]:
    """Share of width/height deltas at or above ``bbox_xform_clip`` per regression layer, on
    ``photo`` letterboxed to ``size`` (the RPN over all anchors; the box head over the RPN's
    proposals; RetinaNet over all anchors)."""
    from core.images import load_rgb, prepare

    tensor, _ = prepare(load_rgb(photo), size[0], size[1], "letterbox")
    shares: dict[str, float] = {}
    hooks = []
    for layer in regression_layers(model):
        name = next(n for n, m in model.named_modules() if m is layer)
        # RPN/RetinaNet: [1, A*4, H, W] per level (conv); box head: [N, 91*4] (linear).
        weights = (1.0, 1.0, 1.0, 1.0) if "rpn" in name or "regression_head" in name else (10.0, 10.0, 5.0, 5.0)

        def hook(module, args, out, name=name, ww=weights[2]):
            codes = out.transpose(0, 1).reshape(-1, 4, *out.shape[2:]) if out.dim() == 4 else out.reshape(-1, 4)
            wh = codes[:, 2:] / ww
            counts = shares.setdefault(name, [0, 0])
            counts[0] += int((wh >= BBOX_XFORM_CLIP).sum())
            counts[1] += wh.numel()

        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model([torch.from_numpy(tensor[0]) / 255.0])
    finally:
        for h in hooks:
            h.remove()
    return {k: a / max(b, 1) for k, (a, b) in shares.items()}
