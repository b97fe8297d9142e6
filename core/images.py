"""Decoding images and bringing them to a model's input tensor, and mapping boxes back.

The exported-model contract leaves resizing to the caller, as the ONNX metadata says:
``letterbox`` is Darknet's ``letterbox_image`` (aspect kept, integer new size, centred,
padded with ``pad_value``), ``stretch`` scales both axes to the input size. Both use
bilinear interpolation (OpenCV ``INTER_LINEAR``) so that every caller — evaluation,
benchmarks, export validation and the OpenCV reference runs — feeds identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError, DatasetError


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array ``[H, W, 3]``.

    Raises :class:`DatasetError` naming the file when it is missing or does not decode.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise DatasetError(f"image does not decode (corrupt or not an image): {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class Placement:
    """Where the original image lies inside the input tensor: ``tensor = original * scale + offset``."""

    image_width: int
    image_height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[K, 4]`` (x1, y1, x2, y2) boxes from tensor pixels to original-image pixels, clipped."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = np.empty_like(boxes)
        out[:, 0::2] = (boxes[:, 0::2] - self.offset_x) / self.scale_x
        out[:, 1::2] = (boxes[:, 1::2] - self.offset_y) / self.scale_y
        out[:, 0::2] = out[:, 0::2].clip(0, self.image_width)
        out[:, 1::2] = out[:, 1::2].clip(0, self.image_height)
        return out


def letterbox_geometry(image_w: int, image_h: int, net_w: int, net_h: int) -> tuple[int, int, int, int]:
    """Darknet's letterbox arithmetic (integer, as in its C code): ``(new_w, new_h, dx, dy)``."""
    if net_w * image_h < net_h * image_w:  # net_w / image_w < net_h / image_h without float error
        new_w, new_h = net_w, (image_h * net_w) // image_w
    else:
        new_h, new_w = net_h, (image_w * net_h) // image_h
    return new_w, new_h, (net_w - new_w) // 2, (net_h - new_h) // 2


def prepare(image: np.ndarray, height: int, width: int, resize: str, pad_value: float = 127.5) -> tuple[np.ndarray, Placement]:
    """An RGB ``uint8`` image as the contract's float32 ``[1, 3, height, width]`` tensor (0..255)."""
    import cv2

    h0, w0 = image.shape[:2]
    if resize == "stretch":
        resized = image if (h0, w0) == (height, width) else cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        canvas = resized.astype(np.float32)
        placement = Placement(w0, h0, width / w0, height / h0, 0.0, 0.0)
    elif resize == "letterbox":
        new_w, new_h, dx, dy = letterbox_geometry(w0, h0, width, height)
        resized = image if (h0, w0) == (new_h, new_w) else cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        canvas = np.full((height, width, 3), pad_value, dtype=np.float32)
        canvas[dy:dy + new_h, dx:dx + new_w] = resized
        placement = Placement(w0, h0, new_w / w0, new_h / h0, float(dx), float(dy))
    else:
        raise ConfigError(f"unknown resize mode {resize!r}; use 'letterbox' or 'stretch'")
    tensor = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None])
    return tensor, placement


def prepare_for(image: np.ndarray, contract) -> tuple[np.ndarray, Placement]:
    """:func:`prepare` with the size, resize mode and padding a :class:`ModelContract` states."""
    return prepare(image, contract.input_height, contract.input_width, contract.resize, contract.pad_value)
