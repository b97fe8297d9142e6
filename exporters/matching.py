"""Matching the detection lists of two runtimes whose float32 rounding differs.

onnxruntime and the source framework compute the same graph with different rounding
(~1e-6 relative, more with weights whose activations are large). Outside decision
boundaries that only moves values within tolerance; at a boundary it flips a discrete
decision, and the detection lists then differ in a few detections. Detection lists are
sets (their order among near-tied scores is rounding too), so they are compared as sets:

1. every detection of the source model is paired with one of the export: same label, score
   within tolerance, box within tolerance axis by axis (on x and on y separately, the two
   coordinates within their tolerance, see below, or the two 1-D intervals at an IoU of at
   least ``1 - IOU_TOL``); pairs are formed nearest first;
2. every detection left unpaired, on either side, must be *explained* by a boundary that is
   visible in the outputs themselves, or the comparison fails:

   - ``cap``: the other list is full (``max_detections``) and this detection's score is not
     above that list's lowest score (within tolerance): the other runtime's cap cut it;
   - ``score threshold``: its score is within tolerance of the score threshold;
   - ``min size`` (only with ``min_size`` given): its width or height is within the coordinate
     tolerance of the minimum size below which the model removes boxes (torchvision: 1e-3 px
     for RPN proposals, 1e-2 px in the RoI heads), so the other runtime's rounding may have put
     it below and removed it;
   - ``nms boundary``: its IoU with a higher-scored detection of its label that both
     runtimes kept lies within the boundary tolerance of the NMS threshold;
   - ``nms cascade``: a higher-scored detection of its label that only the *other* runtime
     kept (itself explained) overlaps it beyond the NMS threshold: there it was suppressed;
   - ``nms tie`` (only with ``MatchRules.ties``): it and a detection of its label that only the
     other runtime kept overlap beyond the NMS threshold with scores equal to within the
     runtimes' own score rounding (twice the largest score difference of the pairs, at least
     4 float32 steps): each runtime's NMS kept the one its rounding ranked first. Scores that
     saturate make this common (RPN objectness near 1: onnxruntime's Sigmoid gives
     sigmoid(10.607707) = 0.999975204 < sigmoid(10.60596) = 0.999975264, one float32 step
     apart and reversed; PyTorch ranks them the other way). Off by default: on final
     detections a systematic shift that keeps scores would look the same.

Pairing axis by axis is the 2-D IoU rule made to work for boxes with no extent: a 2-D IoU of
at least ``1 - IOU_TOL`` implies both 1-D IoUs are (the union contains the x-union times the
y-overlap), but a box 0.002 px wide has a 2-D IoU anywhere from 0 to 1 under rounding of its
width while its coordinates agree within tolerance on that axis.

:func:`match_above_first_tie` is for uniform images, where positions score exactly alike: only
the detections scoring above the first tie of either list are compared (``tie cut``).

The caller may add ``proposal set`` (two-stage detectors, exporters/pytorch/export.py): the
runtimes' RPN proposals differ only at the RPN's own cuts, and PyTorch's second stage on the
export's proposals gives the export's detections.

Coordinates at the image's scale (``image_size`` given): a corner is decoded as a centre
minus a half-size, ``(dx * w + cx) - exp(dw) * w / 2``, whose operands reach
``exp(bbox_xform_clip) = 62.5`` times the reference box when the regression saturates; a box
that meets the image after that was clipped to it. Its float32 rounding therefore follows the
operands, not the corner's value (a corner at 0 px carries the rounding of 30 000 px operands):

- every coordinate is within ``atol + rtol * |x| + COORDINATE_RTOL * side`` (the image side of
  its axis), the budget the TensorFlow SSD validation uses for decoded boxes;
- on an axis where either box touches the image border (it was clipped there), the operands
  were up to ``SATURATED_SCALE`` times the side: that axis's budget is ``SATURATED_SCALE`` times
  larger (0.5 px at 800 px);
- a box thinner on an axis than that axis's tolerance is *degenerate* (seen: RPN proposals
  0.002-0.004 px wide at the border, detections 0.2-0.4 px thick): its IoU is whatever the
  rounding of its width makes it (0 to 1); axis by axis it pairs by the coordinates of its thin
  axis and the 1-D IoU or coordinates of the other; its IoU deficit is left out of
  ``max_iou_deficit`` (it would widen the NMS boundary tolerance; counted as ``degenerate_pairs``).

A systematic difference (a graph that resamples its input, a wrong layer, every box shifted
by more than the budget) moves every box and leaves most detections unpaired at scores
nowhere near a boundary: it still fails (a shift or rescale of 1/850 or more costs every 1-D
interval at least 1e-3 of IoU, and its coordinates more than their budget).

The box geometry every detection comparison shares lives here too, written once: :func:`iou`
(also ``runtime.parity`` and ``quantization.budget``) and :func:`nms`, the numpy greedy NMS
with onnxruntime's semantics that foreign-ONNX validation decodes with
(``exporters.foreign.decode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

# IoU deficit (1 - IoU) under which two boxes are the same box. A 1/850 rescale (the traced
# 599 x 849 resize) costs every box of 50 px or more at least 2e-3.
IOU_TOL = 1e-3
# |IoU - NMS threshold| below which an NMS decision is rounding, not model: box coordinates
# differ by ~1e-4 px between runtimes, which moves an IoU by ~1e-5 (seen: 0.4999946 at 0.5).
# Widened to twice the largest IoU deficit of the paired detections, as the outputs show it,
# up to BOUNDARY_IOU_MAX.
BOUNDARY_IOU_TOL = 1e-4
BOUNDARY_IOU_MAX = 1e-2

# Rounding of a coordinate relative to the image side when its operands are of the image's
# scale (exporters/validation.py, the SSD prior boxes): ~10 float32 operations and deltas that
# already differ by ~1e-6 relative, with a margin; 0.008 px at 800 px.
COORDINATE_RTOL = 1e-5
# Operands of a saturated decode relative to the image: exp(bbox_xform_clip) = exp(log(1000 / 16)).
SATURATED_SCALE = 1000.0 / 16

RULES = ("cap", "score threshold", "min size", "nms boundary", "nms cascade", "nms tie", "tie cut", "proposal set")
# A tie tolerance never below this many float32 steps at the score (rounding of one op).
TIE_ULPS = 4
SIDES = {"ref": "the source model", "got": "ONNX"}


def _close(a, b, atol: float, rtol: float):
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) <= atol + rtol * np.abs(np.asarray(a, np.float64))


def coordinate_tolerance(boxes: np.ndarray, atol: float, rtol: float,
                         image_size: tuple[int, int] | None) -> np.ndarray:
    """Per-coordinate tolerance ``[N, 4]`` of ``boxes`` (x1, y1, x2, y2; module docstring)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    tol = atol + rtol * np.abs(boxes)
    if image_size is None:
        return tol
    height, width = image_size
    for axis, side in ((0, float(width)), (1, float(height))):
        lo, hi = boxes[:, axis], boxes[:, axis + 2]
        clipped = (lo <= 0.0) | (hi >= side)
        budget = COORDINATE_RTOL * side * np.where(clipped, SATURATED_SCALE, 1.0)
        tol[:, axis] += budget
        tol[:, axis + 2] += budget
    return tol


def _thin_axes(a: np.ndarray, b: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """``[N, 2]``: whether box ``a`` or any of ``b`` is thinner than the tolerance on x, y."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    widths = np.minimum(a[:, 2:] - a[:, :2], b[:, 2:] - b[:, :2])
    return widths <= np.maximum(tol[:, :2], tol[:, 2:])


def _axes_agree(box: np.ndarray, boxes: np.ndarray, close: np.ndarray) -> np.ndarray:
    """``[N]`` bool: whether ``box`` and each of ``boxes`` are the same box axis by axis: on x and
    on y, both coordinates within tolerance (``close`` ``[N, 4]``) or the two 1-D intervals at an
    IoU (overlap over union) of at least ``1 - IOU_TOL``. A plain bool array: its elements are
    tested by truth, never by identity (``np.True_ is True`` is False)."""
    box, boxes = np.asarray(box, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
    close = np.asarray(close, bool).reshape(-1, 4)
    agree = np.ones(len(boxes), bool)
    for axis in (0, 1):
        lo, hi = box[axis], box[axis + 2]
        overlap = np.clip(np.minimum(hi, boxes[:, axis + 2]) - np.maximum(lo, boxes[:, axis]), 0.0, None)
        union = np.maximum(hi, boxes[:, axis + 2]) - np.minimum(lo, boxes[:, axis])
        iou = np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)
        agree &= (close[:, axis] & close[:, axis + 2]) | (iou >= 1.0 - IOU_TOL)
    return agree


def iou(a: np.ndarray, b: np.ndarray, *, order_corners: bool = False) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of (x1, y1, x2, y2) boxes, computed in the boxes' own float
    dtype (integers in float64); 0 where the union is not positive.

    ``order_corners``: each box's corners are ordered first, as onnxruntime's NonMaxSuppression
    does with ``center_point_box = 0``; otherwise a box with x2 < x1 (or y2 < y1) overlaps nothing.
    """
    a, b = np.asarray(a).reshape(-1, 4), np.asarray(b).reshape(-1, 4)
    dtype = np.result_type(a, b)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.float64
    a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    if order_corners:
        a = np.concatenate([np.minimum(a[:, :2], a[:, 2:]), np.maximum(a[:, :2], a[:, 2:])], axis=1)
        b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes``, in float64 (the matching rules' tolerances are float64)."""
    return iou(np.asarray(box, np.float64), np.asarray(boxes, np.float64))[0]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, score_threshold: float,
        max_detections: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy per-class NMS of ``boxes`` [M, 4] (xyxy) with ``scores`` [M, C]; at most
    ``max_detections`` per class, then the ``max_detections`` best over all classes.

    onnxruntime's NonMaxSuppression semantics: candidates score above ``score_threshold``; a
    box is suppressed by a kept box of its class whose IoU (corners ordered) exceeds
    ``iou_threshold``; equal scores keep the lower index first."""
    kept = []
    for c in range(scores.shape[1]):
        s = scores[:, c]
        candidates = np.nonzero(s > score_threshold)[0]
        candidates = candidates[np.argsort(-s[candidates], kind="stable")]
        chosen: list[int] = []
        for i in candidates:
            if len(chosen) == max_detections:
                break
            if not chosen or not np.any(_ordered_iou(boxes[i], boxes[chosen]) > iou_threshold):
                chosen.append(int(i))
        kept += [(float(s[i]), c, i) for i in chosen]
    kept.sort(key=lambda k: -k[0])  # stable: within a score, class then box order
    kept = kept[:max_detections]
    index = np.array([k[2] for k in kept], np.int64)
    return (boxes[index].reshape(-1, 4), np.array([k[0] for k in kept]),
            np.array([k[1] for k in kept], np.int64))


def _ordered_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    return iou(np.asarray(box, np.float64), np.asarray(others, np.float64), order_corners=True)[0]


@dataclass
class Unpaired:
    side: str  # "ref" or "got"
    index: int
    score: float
    label: int
    rule: str | None = None
    detail: str = ""
    nearest: str = ""  # for an unexplained one: the closest detection of its label on the other side


@dataclass
class Matching:
    """Pairs, the unpaired detections with their explanation (or none), and figures."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    unpaired: list[Unpaired] = field(default_factory=list)
    ref_count: int = 0
    got_count: int = 0
    max_iou_deficit: float = 0.0
    max_score_diff: float = 0.0
    max_box_diff: float = 0.0
    degenerate_pairs: int = 0  # pairs of boxes thinner than their coordinate tolerance (docstring)
    boundary_tol: float = BOUNDARY_IOU_TOL
    tie_tol: float | None = None  # None: the ``nms tie`` rule was not applied
    tie_cut: float | None = None  # match_above_first_tie: the score at or below which nothing was compared
    below_tie_cut: tuple[int, int] = (0, 0)  # detections (source, ONNX) not compared under the cut

    @property
    def unexplained(self) -> list[Unpaired]:
        return [u for u in self.unpaired if u.rule is None]

    def figures(self) -> dict[str, float | int]:
        figures: dict[str, float | int] = {
            "detections": self.ref_count, "onnx_detections": self.got_count, "matched": len(self.pairs),
            "max_iou_deficit": self.max_iou_deficit, "max_score_diff": self.max_score_diff,
            "max_box_diff": self.max_box_diff, "unexplained": len(self.unexplained),
        }
        if self.degenerate_pairs:
            figures["degenerate_pairs"] = self.degenerate_pairs
        if self.tie_cut is not None:
            figures["tie_cut"] = self.tie_cut
            figures["below_tie_cut"], figures["onnx_below_tie_cut"] = self.below_tie_cut
        for rule in RULES:
            count = sum(1 for u in self.unpaired if u.rule == rule)
            if count:
                figures[f"explained_{rule.replace(' ', '_')}"] = count
        return figures

    def mismatches(self, where: str) -> list[str]:
        return [f"{where}: detection {u.index} of {SIDES[u.side]} (label {u.label}, score {u.score:.6g}) has no "
                f"counterpart in {SIDES['got' if u.side == 'ref' else 'ref']} and sits at no decision boundary "
                f"(cap, score threshold, minimum size, NMS){u.nearest}" for u in self.unexplained]


def _pair(ref: dict, got: dict, atol: float, rtol: float,
          image_size: tuple[int, int] | None) -> list[tuple[int, int]]:
    """One-to-one pairs (same label, score and box within tolerance), nearest box first."""
    candidates = []
    for i in range(len(ref["scores"])):
        ok = (got["labels"] == ref["labels"][i]) & _close(ref["scores"][i], got["scores"], atol, rtol)
        if not ok.any():
            continue
        js = np.nonzero(ok)[0]
        coords = np.abs(got["boxes"][js].astype(np.float64) - ref["boxes"][i].astype(np.float64))
        # Either side's tolerance: a box clipped by one runtime only was clipped all the same.
        tol = np.maximum(coordinate_tolerance(np.repeat(ref["boxes"][i:i + 1], len(js), axis=0), atol, rtol,
                                              image_size),
                         coordinate_tolerance(got["boxes"][js], atol, rtol, image_size))
        agree = _axes_agree(ref["boxes"][i], got["boxes"][js], coords <= tol)
        for j, same, dist in zip(js, agree, coords.max(axis=1)):
            if same:
                candidates.append((float(dist), i, int(j)))
    candidates.sort()
    pairs, used_ref, used_got = [], set(), set()
    for _dist, i, j in candidates:
        if i not in used_ref and j not in used_got:
            pairs.append((i, j))
            used_ref.add(i)
            used_got.add(j)
    return sorted(pairs)


@dataclass(frozen=True)
class MatchRules:
    """What two detection lists are compared under: where the model's post-processing cuts
    (``iou_threshold``, ``score_threshold``, ``max_detections``; ``min_size``: it removes boxes
    narrower or lower than this many pixels before its NMS, rule ``min size``) and how close the
    runtimes' values must be (``atol + rtol * |x|``; ``image_size``, the input tensor's (height,
    width), adds the coordinate budget at the image's scale). ``ties``: the ``nms tie`` rule."""

    iou_threshold: float
    score_threshold: float
    max_detections: int
    atol: float
    rtol: float
    ties: bool = False
    image_size: tuple[int, int] | None = None
    min_size: float | None = None


def match_detections(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rules: MatchRules) -> Matching:
    """Pair ``ref`` (source model) with ``got`` (ONNX) and explain what stays unpaired (module docstring)."""
    iou_threshold, score_threshold, max_detections = rules.iou_threshold, rules.score_threshold, rules.max_detections
    atol, rtol, image_size, min_size = rules.atol, rules.rtol, rules.image_size, rules.min_size
    result = Matching(ref_count=len(ref["scores"]), got_count=len(got["scores"]))
    result.pairs = _pair(ref, got, atol, rtol, image_size)
    for i, j in result.pairs:
        a, b = ref["boxes"][i:i + 1], got["boxes"][j:j + 1]
        tol = np.maximum(coordinate_tolerance(a, atol, rtol, image_size), coordinate_tolerance(b, atol, rtol, image_size))
        if _thin_axes(a, b, tol).any():
            result.degenerate_pairs += 1
        else:
            result.max_iou_deficit = max(result.max_iou_deficit, float(1.0 - _iou(a[0], b)[0]))
        result.max_score_diff = max(result.max_score_diff, abs(float(ref["scores"][i]) - float(got["scores"][j])))
        result.max_box_diff = max(result.max_box_diff, float(np.abs(
            ref["boxes"][i].astype(np.float64) - got["boxes"][j].astype(np.float64)).max()))
    result.boundary_tol = min(max(BOUNDARY_IOU_TOL, 2 * result.max_iou_deficit), BOUNDARY_IOU_MAX)
    lists = {"ref": ref, "got": got}
    kept = {"ref": {i for i, _ in result.pairs}, "got": {j for _, j in result.pairs}}
    for side in ("ref", "got"):
        for k in range(len(lists[side]["scores"])):
            if k not in kept[side]:
                result.unpaired.append(Unpaired(side, k, float(lists[side]["scores"][k]), int(lists[side]["labels"][k])))
    for u in result.unpaired:
        _explain_at_a_cut(u, lists, score_threshold, max_detections, atol, rtol)
        if u.rule is None and min_size is not None:
            _explain_min_size(u, lists[u.side], min_size, atol, rtol, image_size)
        if u.rule is None:
            _explain_at_nms(u, lists[u.side], kept[u.side], iou_threshold, result.boundary_tol, atol, rtol)
    _cascade(result, lists, iou_threshold, atol, rtol)
    if rules.ties:
        result.tie_tol = _explain_ties(result, lists, iou_threshold)
        _cascade(result, lists, iou_threshold, atol, rtol)
    for u in result.unexplained:
        _describe_nearest(u, lists)
    return result


def _cascade(result: Matching, lists: dict, iou_threshold: float, atol: float, rtol: float) -> None:
    """A detection only one runtime kept suppresses its neighbours there only."""
    changed = True
    while changed:
        changed = False
        for u in result.unexplained:
            other = "got" if u.side == "ref" else "ref"
            explained = [w.index for w in result.unpaired if w.side == other and w.rule is not None]
            if _explain_cascade(u, lists[u.side], lists[other], explained, iou_threshold, result.boundary_tol,
                                atol, rtol):
                changed = True


def _explain_ties(result: Matching, lists: dict, iou_threshold: float) -> float:
    """Pair unexplained detections across runtimes that NMS ranked in opposite orders (``nms tie``).

    Returns the score tolerance used: twice the largest score difference of the pairs (the
    runtimes' rounding as the outputs show it), at least TIE_ULPS float32 steps at the score."""
    tol = 2 * result.max_score_diff
    used: set[int] = set()
    for u in result.unexplained:
        if u.side != "ref":
            continue
        box = lists["ref"]["boxes"][u.index]
        for v in result.unexplained:
            if v.side != "got" or v.index in used or v.label != u.label:
                continue
            step = TIE_ULPS * float(np.spacing(np.float32(max(abs(u.score), abs(v.score)))))
            iou = float(_iou(box, lists["got"]["boxes"][v.index:v.index + 1])[0])
            if abs(u.score - v.score) <= max(tol, step) and iou > iou_threshold - result.boundary_tol:
                used.add(v.index)
                for w, other in ((u, v), (v, u)):
                    w.rule = "nms tie"
                    w.detail = (f"IoU {iou:.4f} with detection {other.index} that only {SIDES[other.side]} kept, "
                                f"scores {u.score:.9g} and {v.score:.9g} (tie tolerance {max(tol, step):.2g})")
                break
    return tol


def _describe_nearest(u: Unpaired, lists: dict) -> None:
    dets, other = lists[u.side], lists["got" if u.side == "ref" else "ref"]
    box = dets["boxes"][u.index]
    same = np.nonzero(other["labels"] == u.label)[0]
    u.nearest = f"; box {np.round(box.astype(np.float64), 3).tolist()}"
    if same.size:
        ious = _iou(box, other["boxes"][same])
        k = int(same[int(np.argmax(ious))])
        u.nearest += (f"; nearest of its label there: box {np.round(other['boxes'][k].astype(np.float64), 3).tolist()}, "
                      f"IoU {float(ious.max()):.4f}, score {float(other['scores'][k]):.6g}")


def _explain_at_a_cut(u: Unpaired, lists: dict, score_threshold: float, max_detections: int,
                      atol: float, rtol: float) -> None:
    other = lists["got" if u.side == "ref" else "ref"]
    tol = atol + rtol * abs(u.score)
    if len(other["scores"]) >= max_detections and u.score <= float(other["scores"].min()) + tol:
        u.rule = "cap"
        u.detail = (f"score {u.score:.6g} not above the lowest ({float(other['scores'].min()):.6g}) of the "
                    f"{max_detections} detections {SIDES['got' if u.side == 'ref' else 'ref']} kept")
    elif abs(u.score - score_threshold) <= tol:
        u.rule = "score threshold"
        u.detail = f"score {u.score:.6g} at the score threshold {score_threshold:g}"


def _explain_min_size(u: Unpaired, dets: dict, min_size: float, atol: float, rtol: float,
                      image_size: tuple[int, int] | None) -> None:
    """``min size``: an extent within rounding of the size under which the model drops a box.

    The extent is a difference of two coordinates, so its tolerance is the sum of theirs."""
    box = np.asarray(dets["boxes"][u.index], np.float64)
    tol = coordinate_tolerance(box[None], atol, rtol, image_size)[0]
    for axis, what in ((0, "width"), (1, "height")):
        extent, margin = box[axis + 2] - box[axis], tol[axis] + tol[axis + 2]
        if extent - min_size <= margin:
            u.rule = "min size"
            u.detail = (f"{what} {extent:.4g} px within {margin:.2g} px of the minimum size {min_size:g} px: "
                        f"{SIDES['got' if u.side == 'ref' else 'ref']}'s rounding may have removed it")
            return


def _explain_at_nms(u: Unpaired, dets: dict, kept: set[int], iou_threshold: float, boundary_tol: float,
                    atol: float, rtol: float) -> None:
    partners = [k for k in kept if dets["labels"][k] == u.label
                and float(dets["scores"][k]) >= u.score - (atol + rtol * abs(u.score))]
    if not partners:
        return
    ious = _iou(dets["boxes"][u.index], dets["boxes"][partners])
    near = np.abs(ious - iou_threshold) <= boundary_tol
    if near.any():
        u.rule = "nms boundary"
        u.detail = (f"IoU {float(ious[near][0]):.6f} with kept detection {partners[int(np.argmax(near))]} "
                    f"(NMS threshold {iou_threshold:g}, boundary tolerance {boundary_tol:.2g})")


def _explain_cascade(u: Unpaired, dets: dict, other: dict, explained: list[int], iou_threshold: float,
                     boundary_tol: float, atol: float, rtol: float) -> bool:
    suppressors = [k for k in explained if other["labels"][k] == u.label
                   and float(other["scores"][k]) >= u.score - (atol + rtol * abs(u.score))]
    if not suppressors:
        return False
    ious = _iou(dets["boxes"][u.index], other["boxes"][suppressors])
    over = ious > iou_threshold - boundary_tol
    if not over.any():
        return False
    u.rule = "nms cascade"
    u.detail = (f"IoU {float(ious[over][0]):.4f} with detection {suppressors[int(np.argmax(over))]} that only "
                f"{SIDES['got' if u.side == 'ref' else 'ref']} kept (NMS threshold {iou_threshold:g})")
    return True


def closest_counterparts(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> np.ndarray:
    """Index into ``candidate`` pairing each reference detection with its closest counterpart
    (lists of equal length; the TensorFlow validation compares the paired values afterwards).

    NMS outputs are sets: two runtimes may list equal-score detections in different orders.
    Pairs are formed greedily by ascending cost (label disagreement first, then the largest
    box-coordinate difference, then the score difference), so the order no longer matters
    while any real difference still shows in the paired values.
    """
    n = len(reference["scores"])
    if n == 0 or len(candidate["scores"]) != n:
        return np.arange(len(candidate["scores"]))
    box = np.abs(reference["boxes"][:, None, :].astype(np.float64) - candidate["boxes"][None, :, :]).max(axis=2)
    score = np.abs(reference["scores"][:, None].astype(np.float64) - candidate["scores"][None, :])
    label = (reference["labels"][:, None] != candidate["labels"][None, :]).astype(np.float64)
    cost = label * 1e9 + box + score
    order = np.argsort(cost, axis=None, kind="stable")
    pick = np.full(n, -1)
    used = np.zeros(n, dtype=bool)
    for flat in order:
        r, c = divmod(int(flat), n)
        if pick[r] < 0 and not used[c]:
            pick[r], used[c] = c, True
    return pick


def first_tie(scores: np.ndarray, atol: float, rtol: float) -> float | None:
    """The highest score of ``scores`` that another one equals within the score tolerance
    (``atol + rtol * score``: scores the comparison cannot tell apart, which the two runtimes may
    rank in either order), None when no two are that close."""
    s = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
    if s.size < 2:
        return None
    tied = s[:-1] - s[1:] <= atol + rtol * np.abs(s[:-1])
    return float(s[int(np.argmax(tied))]) if tied.any() else None


def match_above_first_tie(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rules: MatchRules) -> Matching:
    """:func:`match_detections` on the detections scoring above the first tie, for a uniform image.

    On a translation-invariant input, anchors at different positions score exactly alike; which
    of the tied positions survive top-k and NMS (and therefore how many detections there are) is
    arbitrary in either runtime. What scores above the first tie was ranked before any tied
    detection, in both runtimes, so NMS decided it the same way: it is compared as usual. The
    cut is the higher of the two lists' first ties, and only when both lists hold a detection
    scoring within tolerance of it (NMS keeps at least one of a tied group, so a runtime
    without any score there did not meet that group: the tie cannot excuse what it lacks); an
    unpaired detection within the score tolerance of the cut is explained as ``tie cut``.
    Indices in the result are those of the full lists."""
    atol, rtol = rules.atol, rules.rtol
    cuts = [c for c in (first_tie(d["scores"], atol, rtol) for d in (ref, got)) if c is not None]
    cut = max(cuts, default=None)
    if cut is None or not all(np.any(np.abs(np.asarray(d["scores"], np.float64) - cut) <= atol + rtol * abs(cut))
                              for d in (ref, got)):
        return match_detections(ref, got, rules)
    keep = [np.nonzero(np.asarray(d["scores"], np.float64) > cut)[0] for d in (ref, got)]
    ref_above, got_above = ({k: v[idx] for k, v in d.items() if k in ("boxes", "scores", "labels")}
                            for d, idx in zip((ref, got), keep))
    result = match_detections(ref_above, got_above, replace(rules, score_threshold=cut))
    result.pairs = [(int(keep[0][i]), int(keep[1][j])) for i, j in result.pairs]
    for u in result.unpaired:
        u.index = int(keep[0 if u.side == "ref" else 1][u.index])
        if u.rule == "score threshold":
            u.rule = "tie cut"
            u.detail = f"score {u.score:.6g} within tolerance of the first tied score {cut:.6g}"
    result.ref_count, result.got_count = len(ref["scores"]), len(got["scores"])
    result.tie_cut = cut
    result.below_tie_cut = (len(ref["scores"]) - len(keep[0]), len(got["scores"]) - len(keep[1]))
    return result
