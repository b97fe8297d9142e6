"""Validation never passes what it cannot compare: NaN or Inf in an output or a difference
is a mismatch naming the output and the image, and a failed export leaves the file that
was at the output path as it was."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ValidationError
from exporters.validation import Comparison


def test_a_nan_score_is_a_mismatch_not_a_pass():
    # diff > tol is False for NaN: the bug this guards against passed this comparison.
    comparison = Comparison("m")
    ref = {"boxes": np.array([[1, 2, 30, 40]], np.float32), "scores": np.array([0.9], np.float32),
           "labels": np.array([3])}
    got = {"boxes": ref["boxes"].copy(), "scores": np.array([np.nan], np.float32), "labels": np.array([3])}
    comparison.detections("000139.jpg", ref, got)
    assert len(comparison.mismatches) == 1
    assert "000139.jpg:scores" in comparison.mismatches[0] and "1 NaN" in comparison.mismatches[0]
    assert "in ONNX" in comparison.mismatches[0]
    with pytest.raises(ValidationError):
        comparison.raise_if_any()


def test_the_same_nan_on_both_sides_still_fails_and_names_each_side():
    comparison = Comparison("m")
    both = np.array([[0.5, np.inf], [np.nan, -np.inf]], np.float32)
    comparison.arrays("img", "head_0", both, both.copy())
    assert len(comparison.mismatches) == 2
    assert all("img:head_0" in m for m in comparison.mismatches)
    assert any("in the source model" in m for m in comparison.mismatches)
    assert "1 NaN, 1 +Inf, 1 -Inf of 4 values (first at (0, 1))" in comparison.mismatches[0]


def test_finite_values_within_tolerance_still_pass():
    comparison = Comparison("m")
    comparison.arrays("img", "x", np.array([1.0, 2.0]), np.array([1.0005, 2.0]))
    assert comparison.mismatches == [] and comparison.figures["img:x:max_abs_diff"] == pytest.approx(5e-4)


def test_huge_darknet_weights_fail_validation_and_leave_the_good_file(registry, darknet_dir, tmp_path):
    """The issue's case: a .weights file with a valid header and a body of huge (finite)
    floats. Activations overflow float32 in both OpenCV and onnxruntime, so every head holds
    Inf/NaN; the export must fail naming them and not touch the file already at the path."""
    from exporters import export_model
    from dataclasses import replace

    from exporters.darknet.cfg import parse_cfg, plan_network
    from exporters.darknet.weights import random_weights, write_weights

    # Well-formed in every other respect (positive variances, finite values), so only the
    # overflow can fail it.
    plan = plan_network(parse_cfg(darknet_dir / "yolov3-tiny.cfg"), (416, 416))
    sane = random_weights(plan, "huge")
    huge = replace(sane, convs=tuple(replace(c, weights=c.weights * np.float32(1e30)) for c in sane.convs))
    assert all(np.isfinite(c.weights).all() for c in huge.convs)
    weights = write_weights(tmp_path / "huge.weights", huge)

    out = tmp_path / "yolov3-tiny.onnx"
    good = b"a good export made earlier"
    out.write_bytes(good)
    with pytest.raises(ValidationError) as err:
        export_model(registry.get("yolov3-tiny"), out, weights=weights)
    text = str(err.value)
    assert "dog.jpg:head_" in text and ("NaN" in text or "Inf" in text)
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.weights", "yolov3-tiny.onnx"]  # no leftovers


def test_box_coordinates_are_compared_at_the_image_scale():
    """A corner near 0 px computed from ~300 px operands: 2e-3 px of rounding passes at extent 300
    (1e-3 + 1e-3 * 0.1 + 1e-5 * 300 = 4.1e-3), fails without the extent (1.1e-3), and a 1e-2 px
    difference fails either way."""
    from exporters.validation import Comparison

    ref = np.array([[0.1, 150.0, 299.0, 10.0]], dtype=np.float32)
    for extent, diff, ok in ((300.0, 2e-3, True), (0.0, 2e-3, False), (300.0, 1e-2, False)):
        comparison = Comparison("m")
        got = ref.copy()
        got[0, 0] += diff
        comparison.arrays("img", "prior_boxes", ref, got, extent=extent)
        assert (comparison.mismatches == []) == ok, (extent, diff, comparison.mismatches)
