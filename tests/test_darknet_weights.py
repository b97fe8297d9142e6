"""Darknet .weights: exact-length loading, typed errors, and deterministic random weights OpenCV can read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from exporters import export_model
from exporters.darknet.cfg import parse_cfg, plan_network
from exporters.darknet.weights import random_weights, read_weights, write_weights
from core.errors import WeightsError

TINY_WEIGHTS_BYTES = 35_434_956  # data/README.md


@pytest.fixture(scope="module")
def tiny_plan(darknet_dir):
    return plan_network(parse_cfg(darknet_dir / "yolov3-tiny.cfg"), (416, 416))


def test_official_tiny_weights_load_with_darknet_header(darknet_dir, tiny_plan):
    w = read_weights(darknet_dir / "yolov3-tiny.weights", tiny_plan)
    assert (w.major, w.minor, w.revision) == (0, 2, 0)
    # header 0.2 -> 20 bytes (int64 seen); the rest is exactly the cfg's floats
    assert (TINY_WEIGHTS_BYTES - 20) // 4 == tiny_plan.float_count
    assert len(w.convs) == 13
    first = w.convs[0]
    assert first.weights.shape == (16, 3, 3, 3) and first.rolling_variance.min() > 0


def _copy_with(tmp_path: Path, src: Path, cut: int = 0, extra: bytes = b"") -> Path:
    data = src.read_bytes()
    out = tmp_path / "bad.weights"
    out.write_bytes((data[:-cut] if cut else data) + extra)
    return out


@pytest.mark.parametrize("cut,extra,words", [
    (400, b"", ["expected 8858734 floats", "found 8858634", "truncated by 100"]),
    (0, np.zeros(3, "<f4").tobytes(), ["expected 8858734 floats", "found 8858737", "too long by 3"]),
    (2, b"", ["not a whole number of float32", "8858734 floats"]),
])
def test_truncated_or_oversized_weights_state_expected_and_found(tmp_path, darknet_dir, tiny_plan, cut, extra, words):
    bad = _copy_with(tmp_path, darknet_dir / "yolov3-tiny.weights", cut, extra)
    with pytest.raises(WeightsError) as err:
        read_weights(bad, tiny_plan)
    assert str(bad) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_weights_of_another_cfg_are_refused(darknet_dir):
    plan = plan_network(parse_cfg(darknet_dir / "yolov2-tiny.cfg"), (416, 416))
    with pytest.raises(WeightsError) as err:
        read_weights(darknet_dir / "yolov3-tiny.weights", plan)
    assert f"expected {plan.float_count} floats" in str(err.value) and "found 8858734" in str(err.value)
    assert "yolov2-tiny.cfg" in str(err.value)


def test_header_only_file_is_refused(tmp_path, tiny_plan):
    bad = tmp_path / "short.weights"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(WeightsError, match="too short"):
        read_weights(bad, tiny_plan)


def test_export_with_bad_weights_raises_and_writes_nothing(tmp_path, registry, darknet_dir):
    bad = _copy_with(tmp_path, darknet_dir / "yolov3-tiny.weights", cut=4000)
    out = tmp_path / "tiny.onnx"
    with pytest.raises(WeightsError, match="truncated by 1000"):
        export_model(registry.get("yolov3-tiny"), out, weights=bad)
    assert not out.exists()


def test_random_weights_are_deterministic_and_exactly_cfg_length(tmp_path, tiny_plan):
    a = write_weights(tmp_path / "a.weights", random_weights(tiny_plan, "yolov3-tiny"))
    b = write_weights(tmp_path / "b.weights", random_weights(tiny_plan, "yolov3-tiny"))
    c = write_weights(tmp_path / "c.weights", random_weights(tiny_plan, "another-name"))
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b) != digest(c)
    assert a.stat().st_size == 20 + 4 * tiny_plan.float_count == TINY_WEIGHTS_BYTES
    back = read_weights(a, tiny_plan)
    fresh = random_weights(tiny_plan, "yolov3-tiny")
    for x, y in zip(back.convs, fresh.convs):
        np.testing.assert_array_equal(x.weights, y.weights)
        np.testing.assert_array_equal(x.biases, y.biases)
        if y.scales is not None:
            np.testing.assert_array_equal(x.rolling_variance, y.rolling_variance)
            assert y.rolling_variance.min() >= 0.5  # well away from Darknet's 1e-6 epsilon


def test_random_weights_load_in_opencv(tmp_path, darknet_dir, tiny_plan):
    """OpenCV's importer reads the random file as it reads official weights (exact length, same order)."""
    import cv2

    path = write_weights(tmp_path / "r.weights", random_weights(tiny_plan, "yolov3-tiny"))
    net = cv2.dnn.readNetFromDarknet(str(darknet_dir / "yolov3-tiny.cfg"), str(path))
    blobs = net.getParam("conv_0", 0)  # the first convolution's kernel, as OpenCV loaded it
    np.testing.assert_array_equal(blobs.reshape(16, 3, 3, 3), random_weights(tiny_plan, "yolov3-tiny").convs[0].weights)


# --------------------------------------------------------------------------- issue 12, rule 7


def test_random_bytes_give_a_readable_message(tmp_path, tiny_plan):
    """The issue's case: random bytes one float longer than the cfg implies. The count and the
    implausible header are two sentences, each whole."""
    junk = tmp_path / "random.weights"
    junk.write_bytes(np.random.default_rng(0).bytes(16 + 4 * (tiny_plan.float_count + 1)))
    with pytest.raises(WeightsError) as err:
        read_weights(junk, tiny_plan)
    message = str(err.value)
    assert f"found {tiny_plan.float_count + 1} after the 16-byte Darknet" in message
    assert "(too long by 1 floats)." in message
    assert message.rstrip().endswith("is implausible: this is probably not a Darknet .weights file.")


def test_odd_length_random_bytes_also_say_not_darknet(tmp_path, tiny_plan):
    junk = tmp_path / "odd.weights"
    junk.write_bytes(np.random.default_rng(1).bytes(16 + 4 * 1000 + 3))
    with pytest.raises(WeightsError, match=r"not a whole number of float32 values.*probably not a Darknet"):
        read_weights(junk, tiny_plan)


@pytest.mark.parametrize("value, where, counts", [
    (np.nan, ("layer 0 [convolutional]", "biases"), "1 NaN, 0 Inf"),  # the first float of the body
    (np.inf, ("layer 22 [convolutional]", "weights"), "0 NaN, 1 Inf"),  # the last float of the body
])
def test_non_finite_weights_are_refused_naming_file_and_layer(tmp_path, darknet_dir, tiny_plan, value, where, counts):
    data = bytearray((darknet_dir / "yolov3-tiny.weights").read_bytes())
    offset = 20 if where[1] == "biases" else len(data) - 4  # header 0.2.0 is 20 bytes
    data[offset:offset + 4] = np.float32(value).tobytes()
    bad = tmp_path / "poisoned.weights"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as err:
        read_weights(bad, tiny_plan)
    message = str(err.value)
    assert str(bad) in message and where[0] in message and f"{where[1]}: {counts}" in message


def test_a_directory_is_not_reported_as_missing(tmp_path, tiny_plan):
    with pytest.raises(WeightsError, match="is a directory, not a weights file"):
        read_weights(tmp_path, tiny_plan)
