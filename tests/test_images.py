"""Image decoding, letterbox/stretch geometry and the mapping of boxes back to the image.

Expected values are worked out by hand from Darknet's ``letterbox_image`` (integer
arithmetic in C: new_w = w, new_h = (im.h * w) / im.w when w / im.w < h / im.h,
else new_h = h, new_w = (im.w * h) / im.h; offsets (w - new_w) / 2, (h - new_h) / 2).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from core.contract import ModelContract
from core.errors import ConfigError, DatasetError
from core.images import Placement, letterbox_geometry, load_rgb, prepare, prepare_for


@pytest.mark.parametrize("image_wh, net_wh, expected", [
    # 640x480 into 416x416: 416/640 = 0.65 < 416/480, so new_w = 416, new_h = 480*416/640 = 312,
    # dx = 0, dy = (416 - 312) / 2 = 52.
    ((640, 480), (416, 416), (416, 312, 0, 52)),
    ((480, 640), (416, 416), (312, 416, 52, 0)),
    # 427*416/640 = 277.55 -> 277 (C integer division); dy = (416 - 277) / 2 = 69.5 -> 69.
    ((640, 427), (416, 416), (416, 277, 0, 69)),
    # 375*608/500 = 456; dy = (608 - 456) / 2 = 76.
    ((500, 375), (608, 608), (608, 456, 0, 76)),
    ((300, 300), (416, 416), (416, 416, 0, 0)),
    # Non-square net (W=850, H=600): 850/640 = 1.33 > 600/480 = 1.25, so new_h = 600,
    # new_w = 640*600/480 = 800, dx = (850 - 800) / 2 = 25.
    ((640, 480), (850, 600), (800, 600, 25, 0)),
])
def test_letterbox_geometry_by_hand(image_wh, net_wh, expected):
    assert letterbox_geometry(*image_wh, *net_wh) == expected


def uniform(width: int, height: int, rgb=(10, 20, 30)) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (height, width, 3)).copy()


def test_letterbox_places_the_image_between_padding_bands():
    tensor, placement = prepare(uniform(640, 480), 416, 416, "letterbox")
    assert tensor.shape == (1, 3, 416, 416) and tensor.dtype == np.float32
    # Rows 52..363 hold the image (RGB order, 0..255, no normalisation); 0..51 and 364..415 the padding.
    for channel, value in enumerate((10, 20, 30)):
        assert np.all(tensor[0, channel, 52:364, :] == value)
    assert np.all(tensor[0, :, :52, :] == 127.5) and np.all(tensor[0, :, 364:, :] == 127.5)
    assert (placement.image_width, placement.image_height, placement.offset_x, placement.offset_y) == (640, 480, 0, 52)
    assert placement.scale_x == pytest.approx(0.65) and placement.scale_y == pytest.approx(0.65)


def test_letterbox_box_maps_back_to_original_pixels():
    _, placement = prepare(uniform(640, 480), 416, 416, "letterbox")
    # x / 0.65 and (y - 52) / 0.65: (13, 78, 208, 208) -> (20, 40, 320, 240).
    mapped = placement.to_image(np.array([[13.0, 78.0, 208.0, 208.0]]))
    np.testing.assert_allclose(mapped, [[20.0, 40.0, 320.0, 240.0]], rtol=0, atol=1e-9)
    # Outside the image (in the padding) is clipped to the image: (420/0.65 = 646 -> 640, (400-52)/0.65 = 535 -> 480).
    clipped = placement.to_image(np.array([-10.0, 30.0, 420.0, 400.0]))
    np.testing.assert_allclose(clipped, [[0.0, 0.0, 640.0, 480.0]], rtol=0, atol=1e-9)


def test_letterbox_with_rounded_height_maps_the_image_edges_exactly():
    # 640x427: new size 416x277 at dy = 69, so the image spans tensor rows 69..346.
    _, placement = prepare(uniform(640, 427), 416, 416, "letterbox")
    assert placement.scale_y == pytest.approx(277 / 427) and placement.offset_y == 69
    mapped = placement.to_image(np.array([[0.0, 69.0, 416.0, 346.0]]))
    np.testing.assert_allclose(mapped, [[0.0, 0.0, 640.0, 427.0]], rtol=0, atol=1e-9)


def test_stretch_scales_each_axis_and_maps_back():
    tensor, placement = prepare(uniform(640, 480), 300, 300, "stretch")
    assert tensor.shape == (1, 3, 300, 300) and np.all(tensor[0, 2] == 30)
    # scale_x = 300/640 = 0.46875, scale_y = 300/480 = 0.625, no offsets.
    assert (placement.scale_x, placement.scale_y, placement.offset_x, placement.offset_y) == (0.46875, 0.625, 0, 0)
    mapped = placement.to_image(np.array([[46.875, 62.5, 150.0, 187.5]]))
    np.testing.assert_allclose(mapped, [[100.0, 100.0, 320.0, 300.0]], rtol=0, atol=1e-9)


def test_prepare_for_uses_the_contracts_size_resize_and_padding():
    contract = ModelContract(name="toy", family="toy", framework="pytorch", input_height=100, input_width=200,
                             resize="letterbox", label_space="coco91", score_threshold=0.05, iou_threshold=0.5,
                             max_detections=100, weights="random-init", source_params=0, pad_value=0.0)
    # 100x100 into W=200, H=100: new size 100x100 at dx = 50.
    tensor, placement = prepare_for(uniform(100, 100, (200, 200, 200)), contract)
    assert tensor.shape == (1, 3, 100, 200)
    assert np.all(tensor[0, :, :, :50] == 0.0) and np.all(tensor[0, :, :, 150:] == 0.0)
    assert np.all(tensor[0, :, :, 50:150] == 200)
    assert placement == Placement(100, 100, 1.0, 1.0, 50.0, 0.0)


def test_unknown_resize_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown resize mode 'crop'"):
        prepare(uniform(10, 10), 8, 8, "crop")


def png_bytes(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """A minimal RGB PNG encoded by hand (no imaging library involved)."""
    height, width = len(pixels), len(pixels[0])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in pixels)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_load_rgb_returns_rgb_order(tmp_path):
    pixels = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(1, 2, 3), (250, 128, 7), (255, 255, 255)]]
    path = tmp_path / "tiny.png"
    path.write_bytes(png_bytes(pixels))
    image = load_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
    assert image.tolist() == [[list(px) for px in row] for row in pixels]


def test_load_rgb_agrees_with_pillow_on_a_real_jpeg(darknet_dir):
    from PIL import Image

    path = darknet_dir / "dog.jpg"
    ours = load_rgb(path)
    with Image.open(path) as im:
        theirs = np.asarray(im.convert("RGB"))
    assert ours.shape == theirs.shape == (576, 768, 3)
    # Two JPEG decoders may differ by a level or two per pixel; a channel swap would differ by tens.
    assert np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).mean() < 1.5
    np.testing.assert_allclose(ours.reshape(-1, 3).mean(0), theirs.reshape(-1, 3).mean(0), atol=1.0)


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_image_is_a_dataset_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as err:
        load_rgb(path)
    assert str(path) in str(err.value) and "does not decode" in str(err.value)


def test_truncated_jpeg_is_a_dataset_error(tmp_path, darknet_dir):
    path = tmp_path / "dog-head.jpg"
    path.write_bytes((darknet_dir / "dog.jpg").read_bytes()[:2000])
    with pytest.raises(DatasetError, match="dog-head.jpg"):
        load_rgb(path)


def test_missing_image_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="image not found: .*nowhere.jpg"):
        load_rgb(tmp_path / "nowhere.jpg")
