"""Which differences between two runtimes' detection lists are rounding at a decision boundary.

Hand-built detections; IoUs worked out by hand: boxes (0, 0, 10, 10) and (5, 0, 15, 10)
overlap in 5 x 10 = 50 of a union of 150, IoU 1/3; (0, 0, 10, 10) and (0, 0, 10, 20)
overlap in 100 of 200, IoU exactly 0.5; (0, 0, 10, 20) and (0, 0, 10, 30) in 200 of 300, 2/3.
"""

import numpy as np

from exporters.matching import BOUNDARY_IOU_TOL, MatchRules, match_detections

ATOL = RTOL = 1e-3


def dets(rows):
    """rows of (score, label, x1, y1, x2, y2) -> contract outputs."""
    a = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return {"boxes": a[:, 2:].astype(np.float32), "scores": a[:, 0].astype(np.float32),
            "labels": a[:, 1].astype(np.int64)}


def match(ref, got, iou_threshold=0.5, max_detections=4, score_threshold=0.05):
    return match_detections(ref, got, MatchRules(iou_threshold=iou_threshold, score_threshold=score_threshold,
                                                 max_detections=max_detections, atol=ATOL, rtol=RTOL))


def rules(m):
    return sorted((u.side, u.index, u.rule) for u in m.unpaired)


def test_identical_lists_in_another_order_pair_completely():
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.5000001, 2, 20, 20, 30, 30), (0.5, 3, 40, 40, 50, 50)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.5000001, 3, 40, 40, 50, 50), (0.5, 2, 20, 20, 30, 30)])
    m = match(ref, got, max_detections=100)
    assert m.pairs == [(0, 0), (1, 2), (2, 1)] and m.unpaired == []
    assert m.figures()["matched"] == 3 and m.max_iou_deficit == 0.0


def test_a_detection_suppressed_at_the_nms_boundary_and_the_cap_fill_are_explained():
    # PyTorch kept detection 1 (IoU 0.5 with detection 0, at the threshold); onnxruntime
    # suppressed it and, capped at 4, admitted its 5th-best detection instead.
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 0, 0, 10, 20), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80), (0.5, 5, 90, 90, 99, 99)])
    m = match(ref, got)
    assert rules(m) == [("got", 3, "cap"), ("ref", 1, "nms boundary")]
    assert m.mismatches("img") == [] and m.boundary_tol == BOUNDARY_IOU_TOL
    f = m.figures()
    assert f["explained_nms_boundary"] == 1 and f["explained_cap"] == 1 and f["unexplained"] == 0


def test_the_same_difference_away_from_the_boundary_is_a_mismatch():
    # IoU 1/3 with detection 0: at an NMS threshold of 0.5 no rounding suppresses it.
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 5, 0, 15, 10), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80), (0.5, 5, 90, 90, 99, 99)])
    m = match(ref, got)
    assert rules(m) == [("got", 3, "cap"), ("ref", 1, None)]
    (message,) = m.mismatches("img")
    assert "img: detection 1 of the source model (label 1, score 0.8)" in message


def test_a_cap_fill_scoring_above_the_other_list_is_a_mismatch():
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 0, 0, 10, 20), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80)])
    got = dets([(0.95, 5, 90, 90, 99, 99), (0.9, 1, 0, 0, 10, 10), (0.7, 3, 50, 50, 60, 60), (0.6, 4, 70, 70, 80, 80)])
    m = match(ref, got)
    assert ("got", 0, None) in rules(m)


def test_the_last_detection_may_differ_only_at_the_cap():
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.5, 2, 20, 20, 30, 30)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.5, 3, 60, 60, 70, 70)])
    assert match(ref, got, max_detections=2).mismatches("img") == []
    assert len(match(ref, got, max_detections=100).mismatches("img")) == 2


def test_a_detection_at_the_score_threshold_may_be_missing():
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.0505, 2, 20, 20, 30, 30)])
    got = dets([(0.9, 1, 0, 0, 10, 10)])
    assert rules(match(ref, got, max_detections=100)) == [("ref", 1, "score threshold")]
    assert rules(match(ref, got, max_detections=100, score_threshold=0.01)) == [("ref", 1, None)]


def test_the_suppressing_detection_must_be_one_both_runtimes_kept():
    # Detection 1 sits at IoU 0.5 with detection 0, but ONNX does not have detection 0 either.
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 1, 0, 0, 10, 20)])
    got = dets([(0.95, 7, 30, 30, 40, 40)])
    m = match(ref, got, max_detections=100)
    assert [u.rule for u in m.unpaired] == [None, None, None]


def test_a_cascade_behind_an_nms_boundary_is_explained():
    # ONNX suppressed B (IoU 0.5 with A, at the threshold) and so kept C (IoU 2/3 with B);
    # PyTorch kept B, which suppressed C. C is explained through B, never on its own.
    a, b, c = (0, 0, 10, 10), (0, 0, 10, 20), (0, 0, 10, 30)
    ref = dets([(0.9, 1, *a), (0.8, 1, *b)])
    got = dets([(0.9, 1, *a), (0.7, 1, *c)])
    m = match(ref, got, max_detections=100)
    assert rules(m) == [("got", 1, "nms cascade"), ("ref", 1, "nms boundary")]
    assert match(dets([(0.9, 1, *a)]), got, max_detections=100).unexplained  # C alone: unexplained


def test_a_systematic_rescale_fails_like_the_traced_599x849_resize():
    # Every box of a 600 x 850 image shrunk by 849/850 (what the traced resize did).
    rng = np.random.default_rng(0)
    x1, y1 = rng.uniform(0, 700, 30), rng.uniform(0, 450, 30)
    w, h = rng.uniform(40, 150, 30), rng.uniform(40, 150, 30)
    rows = [(0.9 - 0.01 * k, 1 + k % 5, x1[k], y1[k], x1[k] + w[k], y1[k] + h[k]) for k in range(30)]
    ref = dets(rows)
    got = {**ref, "boxes": (ref["boxes"] * np.float32(849 / 850)).astype(np.float32)}
    m = match(ref, got, max_detections=100)
    assert len(m.unexplained) >= 2 * 25, m.figures()


def test_float32_noise_on_every_box_still_pairs():
    rng = np.random.default_rng(1)
    x1, y1 = rng.uniform(0, 700, 30), rng.uniform(0, 450, 30)
    rows = [(0.9 - 0.01 * k, 1, x1[k], y1[k], x1[k] + 60, y1[k] + 60) for k in range(30)]
    ref = dets(rows)
    got = {**ref, "boxes": ref["boxes"] * np.float32(1 + 1e-6)}
    m = match(ref, got, max_detections=100)
    assert len(m.pairs) == 30 and m.max_iou_deficit < 1e-4


def test_a_swapped_label_away_from_the_cap_is_a_mismatch():
    ref = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 2, 20, 20, 30, 30), (0.7, 3, 40, 40, 50, 50)])
    got = dets([(0.9, 1, 0, 0, 10, 10), (0.8, 5, 20, 20, 30, 30), (0.7, 3, 40, 40, 50, 50)])
    assert len(match(ref, got, max_detections=100).mismatches("img")) == 2


def test_two_runtimes_keeping_either_of_two_tied_overlapping_detections_is_an_nms_tie():
    # B = (0, 0, 10, 20) and C = (0, 0, 10, 30) overlap at IoU 2/3 > 0.5 with equal scores:
    # PyTorch's NMS ranked B first, ONNX's C. Only with ties=True (the RPN's proposals).
    b, c = (0, 0, 10, 20), (0, 0, 10, 30)
    ref, got = dets([(0.9, 1, 50, 50, 60, 60), (0.7, 1, *b)]), dets([(0.9, 1, 50, 50, 60, 60), (0.7, 1, *c)])
    assert [u.rule for u in match(ref, got, max_detections=100).unpaired] == [None, None]
    m = match_detections(ref, got, MatchRules(iou_threshold=0.5, score_threshold=0.05, max_detections=100, atol=ATOL,
                                              rtol=RTOL, ties=True))
    assert rules(m) == [("got", 1, "nms tie"), ("ref", 1, "nms tie")] and m.figures()["explained_nms_tie"] == 2


def test_a_tie_needs_scores_equal_to_the_runtimes_rounding_and_an_overlap_beyond_the_threshold():
    b, c = (0, 0, 10, 20), (0, 0, 10, 30)
    kwargs = dict(iou_threshold=0.5, score_threshold=0.0, max_detections=1000, atol=ATOL, rtol=RTOL, ties=True)
    # One float32 step apart near 1 (5.96e-8; onnxruntime's and PyTorch's sigmoid of RPN logits
    # 10.607707 and 10.60596 differ by this, in opposite orders): a tie, with no pairs at all.
    m = match_detections(dets([(0.999975324, 0, *b)]), dets([(0.999975264, 0, *c)]), MatchRules(**kwargs))
    assert [u.rule for u in m.unpaired] == ["nms tie", "nms tie"] and m.tie_tol == 0.0
    # 1e-4 apart: within the pairing tolerance (atol 1e-3) but no rounding of a saturated score.
    m = match_detections(dets([(0.9999, 0, *b)]), dets([(0.9998, 0, *c)]), MatchRules(**kwargs))
    assert [u.rule for u in m.unpaired] == [None, None]
    # Equal scores but (0, 0, 10, 10) and (5, 0, 15, 10) overlap at IoU 1/3 < 0.5: no NMS met them.
    m = match_detections(dets([(0.8, 0, 0, 0, 10, 10)]), dets([(0.8, 0, 5, 0, 15, 10)]), MatchRules(**kwargs))
    assert [u.rule for u in m.unpaired] == [None, None]


def test_the_tie_tolerance_is_twice_the_largest_score_difference_of_the_pairs():
    b, c = (0, 0, 10, 20), (0, 0, 10, 30)
    kwargs = dict(iou_threshold=0.5, score_threshold=0.0, max_detections=1000, atol=ATOL, rtol=RTOL, ties=True)
    # The pair at (50, 50, 60, 60) differs by 2e-4 in score: ties up to 4e-4 apart are rounding.
    ref = dets([(0.6002, 0, 50, 50, 60, 60), (0.5003, 0, *b)])
    got = dets([(0.6000, 0, 50, 50, 60, 60), (0.5, 0, *c)])
    m = match_detections(ref, got, MatchRules(**kwargs))
    assert abs(m.tie_tol - 4e-4) < 1e-6 and [u.rule for u in m.unpaired] == ["nms tie", "nms tie"]
    ref = dets([(0.6002, 0, 50, 50, 60, 60), (0.5005, 0, *b)])
    assert [u.rule for u in match_detections(ref, got, MatchRules(**kwargs)).unpaired] == [None, None]


# Coordinates at the image's scale (image_size given). At 800 px: COORDINATE_RTOL * 800 = 0.008 px
# on an axis the box does not touch the border of; 62.5 times that, 0.5 px, on an axis where it
# was clipped (operands of a saturated decode reach exp(log(1000/16)) = 62.5 x the image).
IMAGE = (800, 800)


def match_at_800(ref, got, **kwargs):
    kwargs = {"iou_threshold": 0.5, "score_threshold": 0.05, "max_detections": 100, **kwargs}
    return match_detections(ref, got, MatchRules(atol=ATOL, rtol=RTOL, image_size=IMAGE, **kwargs))


def test_the_coordinate_budget_at_800_px_by_hand():
    from exporters.matching import coordinate_tolerance

    tol = coordinate_tolerance(np.array([[0.0, 100.0, 3.0, 300.0], [10.0, 20.0, 30.0, 800.0]]), ATOL, RTOL, IMAGE)
    # box 0: x clipped (x1 = 0): 0.001 + 0.001 * |x| + 0.5; y inside: 0.001 + 0.001 * |y| + 0.008.
    np.testing.assert_allclose(tol[0], [0.501, 0.109, 0.504, 0.309], atol=1e-12)
    # box 1: x inside, y clipped (y2 = 800).
    np.testing.assert_allclose(tol[1], [0.019, 0.521, 0.039, 1.301], atol=1e-12)
    assert coordinate_tolerance(np.array([[0.0, 100.0, 3.0, 300.0]]), ATOL, RTOL, None).tolist() == \
        [[0.001, 0.101, 0.004, 0.301]]


def test_a_degenerate_box_at_the_border_pairs_by_its_coordinates():
    # The RPN's proposals at the left border: 0.003 and 0.005 px wide (IoU 0.6, deficit 0.4),
    # the right edge 0.002 px apart, more than 0.001 + 0.001 * 0.003: unpaired at the old tolerance.
    ref = dets([(0.9, 1, 0.0, 100.0, 0.003, 300.0), (0.8, 2, 40, 40, 140, 140)])
    got = dets([(0.9, 1, 0.0, 100.0, 0.005, 300.0), (0.8, 2, 40, 40, 140, 140)])
    old = match(ref, got, max_detections=100)
    assert [(u.side, u.index) for u in old.unexplained] == [("ref", 0), ("got", 0)]
    m = match_at_800(ref, got)
    assert m.pairs == [(0, 0), (1, 1)] and m.unexplained == []
    # Its IoU deficit (0.4) is rounding of a width of nothing: counted apart, not widening the
    # NMS boundary tolerance.
    assert m.degenerate_pairs == 1 and m.max_iou_deficit == 0.0 and m.boundary_tol == BOUNDARY_IOU_TOL
    assert m.figures()["degenerate_pairs"] == 1
    # A detection 0.3 px thick at the bottom border, its clipped edge 0.1 px apart (IoU 2/3).
    ref = dets([(0.7, 3, 200.0, 799.7, 600.0, 800.0)])
    got = dets([(0.7, 3, 200.0, 799.8, 600.0, 800.0)])
    m = match_at_800(ref, got)
    assert m.pairs == [(0, 0)] and m.degenerate_pairs == 1


def test_a_float32_rounding_difference_at_800_px_pairs():
    # Box clipped at x = 0, right edge 3 px: two float32 steps at 50 000 px (the operands of a
    # saturated decode at 800 px; np.spacing(np.float32(50000)) = 2**-8 = 0.0039) apart.
    step = float(np.spacing(np.float32(50000.0)))
    assert step == 2.0 ** -8
    ref = dets([(0.9, 1, 0.0, 10.0, 3.0, 12.0)])
    got = dets([(0.9, 1, 0.0, 10.0, 3.0 + 2 * step, 12.0)])
    # Old tolerance 0.001 + 0.001 * 3 = 0.004 < 0.0078; IoU 3 / 3.0078, deficit 0.0026 > 1e-3.
    assert len(match(ref, got, max_detections=100).unexplained) == 2
    m = match_at_800(ref, got)
    assert m.pairs == [(0, 0)] and m.unexplained == [] and m.degenerate_pairs == 0
    assert abs(m.max_iou_deficit - 2 * step / (3 + 2 * step)) < 1e-6


def test_a_systematic_shift_beyond_the_budget_still_fails_at_800_px():
    # 30 boxes, some clipped at the border, some degenerate; every coordinate shifted by 1 px:
    # beyond 0.001 + 0.001 * 800 + 0.008 on any axis the box does not touch the border of.
    rng = np.random.default_rng(2)
    x1, y1 = rng.uniform(0, 700, 30), rng.uniform(0, 600, 30)
    w, h = rng.uniform(40, 150, 30), rng.uniform(40, 150, 30)
    boxes = np.stack([x1, y1, np.minimum(x1 + w, 800), np.minimum(y1 + h, 800)], axis=1)
    boxes[:5, 0], boxes[:5, 2] = 0.0, 0.003  # degenerate at the left border
    boxes[5:10, 2] = 800.0  # clipped at the right border
    rows = [(0.9 - 0.01 * k, 1 + k % 5, *boxes[k]) for k in range(30)]
    ref = dets(rows)
    assert match_at_800(ref, ref).unexplained == []
    got = {**ref, "boxes": (ref["boxes"] + np.float32(1.0)).astype(np.float32)}
    m = match_at_800(ref, got)
    assert m.pairs == [] and len(m.unexplained) == 60, m.figures()
    # Within the budget: 0.005 px on every coordinate pairs everything.
    got = {**ref, "boxes": (ref["boxes"].astype(np.float64) + 0.005).astype(np.float32)}
    assert len(match_at_800(ref, got).pairs) == 30


def test_a_degenerate_box_inside_the_image_pairs_by_the_extent_it_has():
    # Measured (fasterrcnn_resnet50_fpn, saturated weights, 000000000802.jpg): an RPN proposal
    # 0.002 px thick in y, x1 0.015 px apart (beyond 0.001 + 0.001 * 1.04 + 0.008 = 0.0100).
    # y: both coordinates 0.001 apart (within); x: 1-D IoU 663.428 / 663.461 = 0.99995.
    ref = dets([(0.949459, 0, 1.042, 339.607, 664.503, 339.609)])
    got = dets([(0.949457, 0, 1.057, 339.608, 664.485, 339.610)])
    from exporters.matching import _iou

    assert float(_iou(ref["boxes"][0], got["boxes"])[0]) < 0.6  # the 2-D IoU of a 0.002 px sliver says nothing
    m = match_at_800(ref, got, max_detections=1000)
    assert m.pairs == [(0, 0)] and m.degenerate_pairs == 1
    # The same thin box 10 px long with x1 1 px off: 1-D IoU 0.9, not the same box.
    ref = dets([(0.9, 0, 100.0, 339.607, 110.0, 339.609)])
    got = dets([(0.9, 0, 101.0, 339.607, 110.0, 339.609)])
    assert match_at_800(ref, got, max_detections=1000).pairs == []


def test_the_axis_test_gives_plain_bools_and_pairs_a_degenerate_border_box():
    # Regression: the per-box verdict of the degenerate path was a numpy bool tested with
    # ``is True`` (always False for np.True_), so a box pairable only through its 1-D IoU never
    # paired. Left border, 0.002 and 0.004 px wide (x within the clipped axis's 0.5 px); y off by
    # 0.2 px at y1 = 10 (beyond 0.001 + 0.001 * 10 + 0.008 = 0.019) but 1-D IoU 489.8 / 490 = 0.9996.
    ref = dets([(0.9, 1, 0.0, 10.0, 0.002, 500.0)])
    got = dets([(0.9, 1, 0.0, 10.2, 0.004, 500.0)])
    m = match_at_800(ref, got)
    assert m.pairs == [(0, 0)] and m.unexplained == [] and m.degenerate_pairs == 1
    from exporters.matching import _axes_agree

    agree = _axes_agree(ref["boxes"][0], got["boxes"], np.array([[True, False, True, True]]))
    assert agree.dtype == np.bool_ and agree.tolist() == [True]


def test_boxes_pair_axis_by_axis_where_the_2d_iou_falls_short():
    # A 30 x 400 px box: x1 0.02 px apart (within 0.001 + 0.001 * 100 + 0.008), y1 0.3 px apart
    # (beyond 0.019) but the y intervals at IoU 399.7 / 400 = 0.99925; the 2-D IoU is
    # 29.98 * 399.7 / (30 * 400) = 0.99858 < 0.999, which alone refused the pair.
    ref = dets([(0.9, 1, 100.0, 10.0, 130.0, 410.0)])
    got = dets([(0.9, 1, 100.02, 10.3, 130.0, 410.0)])
    from exporters.matching import _iou

    assert float(_iou(ref["boxes"][0], got["boxes"])[0]) < 0.999
    m = match_at_800(ref, got)
    assert m.pairs == [(0, 0)] and m.degenerate_pairs == 0
    assert abs(m.max_iou_deficit - (1 - 29.98 * 399.7 / 12000)) < 1e-5
    # y1 0.5 px apart: 1-D IoU 399.5 / 400 = 0.99875 < 0.999 and 0.5 > 0.019 px: not the same box.
    got = dets([(0.9, 1, 100.02, 10.5, 130.0, 410.0)])
    assert match_at_800(ref, got).pairs == []


def test_a_shift_of_every_box_along_one_axis_fails_axis_by_axis():
    # 20 boxes 50-150 px tall moved down by 0.2 px: within every x tolerance (x unchanged) but
    # y1 0.2 px off at y < 190 px (0.001 + 0.001 * y + 0.008 < 0.2) and each y interval at
    # IoU h / (h + 0.2) <= 0.996: every one of them fails.
    rng = np.random.default_rng(3)
    x1, y1 = rng.uniform(0, 600, 20), rng.uniform(0, 180, 20)
    h = rng.uniform(50, 150, 20)
    ref = dets([(0.9 - 0.01 * k, 1, x1[k], y1[k], x1[k] + 80, y1[k] + h[k]) for k in range(20)])
    got = {**ref, "boxes": (ref["boxes"].astype(np.float64) + [0, 0.2, 0, 0.2]).astype(np.float32)}
    m = match_at_800(ref, got)
    assert m.pairs == [] and len(m.unexplained) == 40


def test_a_box_at_the_minimum_size_may_exist_on_one_side_only():
    # torchvision's RoI heads drop boxes under 1e-2 px. A box 0.0105 px wide at x = 5 px: its
    # width's tolerance is twice 0.001 + 0.001 * 5 + 0.008 = 0.028 px, so the other runtime may
    # have computed it under 0.01 px and removed it.
    kept = (0.9, 1, 300.0, 300.0, 400.0, 400.0)
    ref = dets([kept, (0.6, 2, 5.0, 100.0, 5.0105, 200.0)])
    got = dets([kept])
    m = match_at_800(ref, got, min_size=1e-2)
    assert rules(m) == [("ref", 1, "min size")] and m.figures()["explained_min_size"] == 1
    assert "width 0.0105 px" in m.unpaired[0].detail
    # Without the model's minimum size, or 2 px wide (1.99 px above it): unexplained.
    assert rules(match_at_800(ref, got)) == [("ref", 1, None)]
    wide = dets([kept, (0.6, 2, 5.0, 100.0, 7.0, 200.0)])
    assert rules(match_at_800(wide, got, min_size=1e-2)) == [("ref", 1, None)]
    # 0.3 px thick at the bottom border (clipped: 0.5 px per coordinate at 800 px): explained.
    border = dets([kept, (0.6, 2, 100.0, 799.7, 300.0, 800.0)])
    assert rules(match_at_800(got, border, min_size=1e-3)) == [("got", 1, "min size")]


def uniform_lists():
    # A uniform image: one detection above everything (0.9), then positions scoring exactly
    # alike (0.7): PyTorch kept three of them, ONNX two others; then a lower one only ONNX has.
    top = (0.9, 1, 100.0, 100.0, 300.0, 300.0)
    ref = dets([top, (0.7, 1, 0, 0, 50, 50), (0.7, 1, 60, 0, 110, 50), (0.7, 1, 120, 0, 170, 50)])
    got = dets([top, (0.7, 1, 0, 200, 50, 250), (0.7, 1, 60, 200, 110, 250), (0.4, 1, 500, 500, 560, 560)])
    return ref, got


def test_a_uniform_image_is_compared_above_the_first_tie():
    from exporters.matching import first_tie, match_above_first_tie

    ref, got = uniform_lists()
    assert first_tie(ref["scores"], ATOL, RTOL) == np.float32(0.7)
    assert first_tie(dets([(0.9, 1, 0, 0, 1, 1), (0.5, 1, 0, 0, 1, 1)])["scores"], ATOL, RTOL) is None
    assert len(match_at_800(ref, got).unexplained) == 6  # compared in full: tied positions differ
    m = match_above_first_tie(ref, got, MatchRules(atol=ATOL, rtol=RTOL, iou_threshold=0.5, score_threshold=0.05,
                                                   max_detections=100, image_size=IMAGE, ties=True))
    assert m.pairs == [(0, 0)] and m.unexplained == [] and m.tie_cut == np.float32(0.7)
    f = m.figures()
    assert (f["detections"], f["onnx_detections"], f["below_tie_cut"], f["onnx_below_tie_cut"]) == (4, 4, 3, 3)
    # ONNX kept one of the tied positions only (no tie in its list): still cut at PyTorch's tie.
    m = match_above_first_tie(ref, {k: v[:2] for k, v in got.items()},
                              MatchRules(atol=ATOL, rtol=RTOL, iou_threshold=0.5, score_threshold=0.05,
                                         max_detections=100, image_size=IMAGE, ties=True))
    assert m.pairs == [(0, 0)] and m.unexplained == [] and m.below_tie_cut == (3, 1)
    # Above the tie a difference is still one: ONNX without the top detection.
    m = match_above_first_tie(ref, {k: v[1:] for k, v in got.items()},
                              MatchRules(atol=ATOL, rtol=RTOL, iou_threshold=0.5, score_threshold=0.05,
                                         max_detections=100, image_size=IMAGE, ties=True))
    assert [(u.side, u.index) for u in m.unexplained] == [("ref", 0)]


def test_a_tie_on_one_side_only_excuses_nothing():
    from exporters.matching import match_above_first_tie

    ref, got = uniform_lists()
    # ONNX: the top detection and one at 0.4, nothing near PyTorch's tie at 0.7.
    lone = {k: v[[0, 3]] for k, v in got.items()}
    m = match_above_first_tie(ref, lone, MatchRules(atol=ATOL, rtol=RTOL, iou_threshold=0.5, score_threshold=0.05,
                                                    max_detections=100, image_size=IMAGE))
    assert m.tie_cut is None
    assert sorted((u.side, u.index) for u in m.unexplained) == [("got", 1), ("ref", 1), ("ref", 2), ("ref", 3)]


def test_a_detection_just_above_the_cut_on_one_side_is_a_tie_cut():
    from exporters.matching import match_above_first_tie

    ref, got = uniform_lists()
    # ONNX scored one of the positions 0.7004 and the other 0.4 (its own first tie, with the
    # 0.4 already there): the cut is PyTorch's tie at 0.7, and 0.7004 sits above it, within
    # the score tolerance.
    got["scores"][1:3] = np.float32([0.7004, 0.4])
    m = match_above_first_tie(ref, got, MatchRules(atol=ATOL, rtol=RTOL, iou_threshold=0.5, score_threshold=0.05,
                                                   max_detections=100, image_size=IMAGE))
    assert rules(m) == [("got", 1, "tie cut")] and m.unexplained == []
