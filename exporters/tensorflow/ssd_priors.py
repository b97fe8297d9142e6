"""SSD default boxes (priors), as Liu et al. define them and their Caffe reference generates them.

For feature map ``k`` (``f_h x f_w`` cells, one cell every ``step_y`` x ``step_x`` input
pixels) every cell centre ``((j + 0.5) * step_x / W, (i + 0.5) * step_y / H)`` carries, in
this order:

1. a square box of scale ``s_k``;
2. a square box of scale ``sqrt(s_k * s_{k+1})``;
3. for each aspect ratio ``a`` of the layer: ``(s_k * sqrt(a), s_k / sqrt(a))`` then its
   transpose ``(s_k / sqrt(a), s_k * sqrt(a))``.

Scales are fractions of the image side (width for ``w``, height for ``h``), so
``len(scales) == len(feature maps) + 1``. The boxes of a layer are ordered cell by cell,
row-major (``y`` then ``x``), and inside a cell as above: prior index
``offset_k + (i * f_w + j) * A_k + a``. This is the order in which an NHWC head output
``[1, f_h, f_w, A_k * C]`` reshaped to ``[1, f_h * f_w * A_k, C]`` lists its predictions,
and the order of Caffe's PriorBox layer and torchvision's DefaultBoxGenerator.

``clip_wh`` clamps widths/heights to ``[0, 1]`` (torchvision's ``clip=True``); the Caffe
SSD models do not clip (``clip: false``), which only changes priors wider than the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError


@dataclass(frozen=True)
class PriorSpec:
    """Everything that determines the default boxes of one SSD at one input size."""

    image_size: tuple[int, int]  # (H, W) of the input tensor
    feature_sizes: tuple[tuple[int, int], ...]  # (f_h, f_w) of each source layer
    steps: tuple[tuple[float, float], ...]  # (step_y, step_x): input pixels per cell of each source layer
    scales: tuple[float, ...]  # s_1 .. s_{m+1}, fractions of the image side
    aspect_ratios: tuple[tuple[float, ...], ...]  # extra ratios (besides 1) of each source layer
    clip_wh: bool = False

    def __post_init__(self):
        m = len(self.feature_sizes)
        if not (len(self.steps) == len(self.aspect_ratios) == m and len(self.scales) == m + 1):
            raise ConfigError(
                f"SSD priors: {m} feature maps need {m} steps, {m} aspect-ratio lists and {m + 1} scales; "
                f"got {len(self.steps)} steps, {len(self.aspect_ratios)} aspect-ratio lists, {len(self.scales)} scales "
                "(check `steps`, `aspect_ratios`, `scales` in the model's [source] table in models.toml)"
            )

    def boxes_per_location(self) -> tuple[int, ...]:
        return tuple(2 + 2 * len(ratios) for ratios in self.aspect_ratios)

    def count(self) -> int:
        return sum(h * w * a for (h, w), a in zip(self.feature_sizes, self.boxes_per_location()))


def layer_shapes(spec: PriorSpec) -> list[tuple[float, float]]:
    """The ``(w, h)`` pairs of one cell of each layer, in the order the boxes are emitted."""
    shapes = []
    for k, ratios in enumerate(spec.aspect_ratios):
        s_k, s_next = spec.scales[k], spec.scales[k + 1]
        pairs = [(s_k, s_k), (math.sqrt(s_k * s_next),) * 2]
        for a in ratios:
            r = math.sqrt(a)
            pairs += [(s_k * r, s_k / r), (s_k / r, s_k * r)]
        shapes.append(pairs)
    return shapes


def default_boxes(spec: PriorSpec) -> np.ndarray:
    """All priors as float32 ``[P, 4]`` rows ``(cx, cy, w, h)``, normalised to the image (0..1)."""
    height, width = spec.image_size
    rows = []
    for (f_h, f_w), (step_y, step_x), pairs in zip(spec.feature_sizes, spec.steps, layer_shapes(spec)):
        wh = np.asarray(pairs, dtype=np.float64)
        if spec.clip_wh:
            wh = wh.clip(0.0, 1.0)
        cy, cx = np.meshgrid((np.arange(f_h) + 0.5) * step_y / height, (np.arange(f_w) + 0.5) * step_x / width,
                             indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], axis=1)  # row-major cells
        cells = np.repeat(centres, len(pairs), axis=0)
        sizes = np.tile(wh, (f_h * f_w, 1))
        rows.append(np.concatenate([cells, sizes], axis=1))
    return np.concatenate(rows, axis=0).astype(np.float32)
