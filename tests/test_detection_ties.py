"""Which differences between two runtimes' detection lists are rounding at a decision boundary.

Hand-built detections; IoUs worked out by hand: boxes (0, 0, 10, 10) and (5, 0, 15, 10)
overlap in 5 x 10 = 50 of a union of 150, IoU 1/3; (0, 0, 10, 10) and (0, 0, 10, 20)
overlap in 100 of 200, IoU exactly 0.5.
"""

import numpy as np
import pytest

from exporters.detection_ties import BOUNDARY_IOU_TOL, align_near_ties, boundary_iou, drop_nms_boundary
from exporters.validation import Comparison


def dets(rows):
    """rows of (score, label, x1, y1, x2, y2) -> contract outputs."""
    a = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return {"boxes": a[:, 2:].astype(np.float32), "scores": a[:, 0].astype(np.float32),
            "labels": a[:, 1].astype(np.int64)}


def compare(ref, got, iou_threshold=0.5, max_detections=4):
    comparison = Comparison("hand-built")
    ref, got, figures = drop_nms_boundary(ref, got, iou_threshold, max_detections, comparison.atol, comparison.rtol)
    if len(ref["scores"]) == len(got["scores"]):
        ref, got, _ = align_near_ties(ref, got, max_detections, comparison.atol, comparison.rtol)
    comparison.detections("image", ref, got)
    return comparison.mismatches, figures


def test_boundary_iou_finds_a_higher_scored_box_of_the_same_label_at_the_threshold():
    d = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 0, 0, 10, 20), (0.7, 2, 0, 0, 10, 20), (0.6, 1, 5, 0, 15, 10)])
    assert boundary_iou(d, 1, 0.5) == pytest.approx(0.5)
    assert boundary_iou(d, 2, 0.5) is None            # another label: NMS never compared them
    assert boundary_iou(d, 3, 0.5) is None            # IoU 1/3 with detection 0
    assert boundary_iou(d, 3, 1 / 3) == pytest.approx(1 / 3)
    assert boundary_iou(d, 0, 0.5) is None            # nothing scores higher


def test_a_detection_suppressed_at_the_nms_boundary_and_the_cap_fill_are_explained():
    # PyTorch kept detection 1 (IoU 0.5 with detection 0, at the threshold); onnxruntime
    # suppressed it and, capped at 4, admitted its 5th-best detection instead.
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 0, 0, 10, 20), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80), (0.5, 5, 90, 90, 99, 99)])
    mismatches, figures = compare(ref, got)
    assert mismatches == []
    assert figures["nms_boundary_removed"] == 1 and figures["cap_fill_removed"] == 1
    assert figures["nms_boundary_max_iou_offset"] <= BOUNDARY_IOU_TOL


def test_the_same_difference_away_from_the_boundary_is_a_mismatch():
    # IoU 1/3 with detection 0: at an NMS threshold of 0.5 no rounding suppresses it.
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 5, 0, 15, 10), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80), (0.5, 5, 90, 90, 99, 99)])
    mismatches, figures = compare(ref, got)
    assert mismatches and figures["nms_boundary_removed"] == 0


def test_a_cap_fill_scoring_above_the_other_list_is_a_mismatch():
    # The extra ONNX detection outscores every remaining reference one: not what a cap admits.
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 0, 0, 10, 20), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80)])
    got = dets([(0.95, 5, 90, 90, 99, 99), (0.9, 1, 0, 0, 10, 10), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80)])
    mismatches, _ = compare(ref, got)
    assert any("detections" in m for m in mismatches)


def test_uncapped_outputs_may_differ_in_count_by_the_boundary_detection_only():
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.7, 3, 50, 50, 60, 60)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 0, 0, 10, 20), (0.7, 3, 50, 50, 60, 60)])
    mismatches, figures = compare(ref, got, max_detections=100)
    assert mismatches == [] and figures["nms_boundary_removed"] == 1 and figures["cap_fill_removed"] == 0
    # A wrong box in what remains is still caught.
    got["boxes"][2] += 1.0
    mismatches, _ = compare(ref, got, max_detections=100)
    assert any("boxes" in m for m in mismatches)


def test_near_tied_scores_may_swap_order_but_not_change_boxes():
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.5000001, 2, 20, 20, 30, 30), (0.5, 3, 40, 40, 50, 50)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.5000001, 3, 40, 40, 50, 50), (0.5, 2, 20, 20, 30, 30)])
    assert compare(ref, got, max_detections=100)[0] == []
    got["boxes"][1] += 1.0
    assert compare(ref, got, max_detections=100)[0]


def test_the_last_detection_may_differ_only_at_the_cap():
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.5, 2, 20, 20, 30, 30)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.5, 3, 60, 60, 70, 70)])
    assert compare(ref, got, max_detections=2)[0] == []
    assert compare(ref, got, max_detections=100)[0]


def test_the_suppressing_detection_must_be_one_both_runtimes_kept():
    # Detection 1 sits at IoU 0.5 with detection 0, but ONNX does not have detection 0 either.
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 0, 0, 10, 20)])
    got = dets([(0.95, 7, 30, 30, 40, 40)])
    mismatches, figures = compare(ref, got, max_detections=100)
    assert mismatches and figures["nms_boundary_removed"] == 0
