"""Comparing detection lists from two runtimes whose float32 rounding differs.

onnxruntime and the source framework compute the same graph with different rounding
(~1e-6 relative). Outside decision boundaries that only moves values within tolerance; at
a boundary it flips a discrete decision. Two such boundaries are visible in the outputs
themselves, so a flip there is *shown* to be one, not assumed:

- score order: detections whose scores tie within tolerance may come out in either order
  (:func:`align_near_ties`);
- the final NMS: a detection whose IoU with a higher-scored detection of its label lies
  within ``BOUNDARY_IOU_TOL`` of the NMS threshold may be kept by one runtime and
  suppressed by the other (:func:`drop_nms_boundary`); with the output capped at
  ``max_detections``, the runtime that suppressed it admits one more detection at the cut.

Everything else must match one to one.
"""

from __future__ import annotations

import numpy as np

# |IoU - threshold| below which the final NMS decision is rounding, not model: box coordinates
# differ by ~1e-4 px between runtimes, which moves an IoU by ~1e-5 (seen: 0.4999946 at 0.5).
BOUNDARY_IOU_TOL = 1e-4


def _close(a: float, b: float, atol: float, rtol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(a)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box with each of ``boxes``, in float64."""
    box, boxes = box.astype(np.float64), boxes.astype(np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def boundary_iou(dets: dict[str, np.ndarray], i: int, iou_threshold: float,
                 partners: np.ndarray | None = None) -> float | None:
    """The IoU, within ``BOUNDARY_IOU_TOL`` of ``iou_threshold``, between detection ``i`` and a
    higher-scored detection of the same label in ``dets`` (among ``partners``, a boolean mask,
    when given); None when there is none."""
    others = (dets["labels"] == dets["labels"][i]) & (dets["scores"] >= dets["scores"][i])
    if partners is not None:
        others &= partners
    others[i] = False
    if not others.any():
        return None
    ious = _iou(dets["boxes"][i], dets["boxes"][others])
    near = np.abs(ious - iou_threshold) <= BOUNDARY_IOU_TOL
    return float(ious[near][0]) if near.any() else None


def _pairs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float, rtol: float) -> dict[int, int]:
    """Greedy one-to-one pairing: same label, score and box within tolerance, nearest box first."""
    pairs: dict[int, int] = {}
    used = np.zeros(len(got["scores"]), bool)
    for i in range(len(ref["scores"])):
        ok = ~used & (got["labels"] == ref["labels"][i])
        ok &= np.abs(got["scores"] - ref["scores"][i]) <= atol + rtol * abs(float(ref["scores"][i]))
        ok &= np.all(np.abs(got["boxes"] - ref["boxes"][i]) <= atol + rtol * np.abs(ref["boxes"][i]), axis=1)
        if ok.any():
            candidates = np.nonzero(ok)[0]
            j = int(candidates[np.argmin(np.abs(got["boxes"][candidates] - ref["boxes"][i]).max(axis=1))])
            pairs[i] = j
            used[j] = True
    return pairs


def _keep(dets: dict[str, np.ndarray], drop: list[int]) -> dict[str, np.ndarray]:
    mask = np.ones(len(dets["scores"]), bool)
    mask[drop] = False
    return {k: v[mask] for k, v in dets.items()}


def drop_nms_boundary(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], iou_threshold: float,
                      max_detections: int, atol: float, rtol: float
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Remove the detections that one runtime kept and the other suppressed at the NMS boundary.

    A reference detection without an ONNX partner is removed only if :func:`boundary_iou`
    finds it on the boundary against a higher-scored *reference* detection that both
    runtimes kept (and vice versa). Then, if an
    output is capped at ``max_detections`` and now holds more detections than the other, its
    unpaired lowest-scored detections at the cut (scores not above the other's lowest) are
    removed too: they are the ones the other runtime's cap left out. Returns both lists and
    figures: how many were removed and how far the boundary IoUs were from the threshold.
    """
    figures: dict[str, float] = {"nms_boundary_removed": 0, "cap_fill_removed": 0}
    pairs = _pairs(ref, got, atol, rtol)
    paired_got = set(pairs.values())
    # The suppressing detection must be one both runtimes kept (paired).
    ref_paired = np.isin(np.arange(len(ref["scores"])), list(pairs))
    got_paired = np.isin(np.arange(len(got["scores"])), list(paired_got))
    lost = {i: boundary_iou(ref, i, iou_threshold, ref_paired) for i in range(len(ref["scores"])) if i not in pairs}
    gained = {j: boundary_iou(got, j, iou_threshold, got_paired) for j in range(len(got["scores"]))
              if j not in paired_got}
    lost = {i: v for i, v in lost.items() if v is not None}
    gained = {j: v for j, v in gained.items() if v is not None}
    if not lost and not gained:
        return ref, got, figures
    figures["nms_boundary_removed"] = len(lost) + len(gained)
    figures["nms_boundary_max_iou_offset"] = max(abs(v - iou_threshold) for v in [*lost.values(), *gained.values()])
    capped_ref, capped_got = len(ref["scores"]) == max_detections, len(got["scores"]) == max_detections
    # Original indices of what remains, to tell paired detections from unpaired ones at the cut.
    ref_left = [i for i in range(len(ref["scores"])) if i not in lost]
    got_left = [j for j in range(len(got["scores"])) if j not in gained]
    ref, got = _keep(ref, list(lost)), _keep(got, list(gained))
    extra = len(got_left) - len(ref_left)
    if extra > 0 and capped_got:
        tail = range(len(got_left) - extra, len(got_left))
        floor = float(ref["scores"].min()) if ref_left else np.inf
        if all(got_left[t] not in paired_got and got["scores"][t] <= floor + atol for t in tail):
            got = _keep(got, list(tail))
            figures["cap_fill_removed"] = extra
    elif extra < 0 and capped_ref:
        tail = range(len(ref_left) + extra, len(ref_left))
        floor = float(got["scores"].min()) if got_left else np.inf
        if all(ref_left[t] not in pairs and ref["scores"][t] <= floor + atol for t in tail):
            ref = _keep(ref, list(tail))
            figures["cap_fill_removed"] = -extra
    return ref, got, figures


def align_near_ties(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], max_detections: int, atol: float,
                    rtol: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
    """Reorder ONNX detections so that detections whose scores tie within tolerance line up.

    Both outputs are sorted by score; two detections whose scores differ by less than the
    numerical noise between onnxruntime and PyTorch (~1e-6) may legitimately come out in
    either order. Each reference detection is paired with the unused ONNX detection of equal
    label, score within tolerance and nearest box; anything unpaired keeps its position (and
    fails the comparison). One exception, also a tie: the last detection of each output may
    differ when both outputs are capped at ``max_detections`` and their scores tie within tolerance.
    Returns the (possibly trimmed) reference, the reordered ONNX outputs and counts.
    """
    n = len(ref["scores"])
    stats = {"near_tie_reorders": 0, "cut_ties": 0}
    if n == 0 or n != len(got["scores"]):
        return ref, got, stats
    pairs = _pairs(ref, got, atol, rtol)
    order = [pairs.get(i) for i in range(n)]
    paired = set(pairs.values())
    free = iter(j for j in range(n) if j not in paired)
    order = [j if j is not None else next(free) for j in order]
    stats["near_tie_reorders"] = sum(1 for i, j in enumerate(order) if i != j)
    aligned = {k: v[order] for k, v in got.items()}
    unmatched = [i for i in range(n) if not np.allclose(ref["boxes"][i], aligned["boxes"][i], atol=atol, rtol=rtol)
                 or ref["labels"][i] != aligned["labels"][i]]
    if n == max_detections and unmatched == [n - 1] and _close(ref["scores"][-1], aligned["scores"][-1], atol, rtol):
        stats["cut_ties"] = 1
        ref = {k: v[:-1] for k, v in ref.items()}
        aligned = {k: v[:-1] for k, v in aligned.items()}
    return ref, aligned, stats


