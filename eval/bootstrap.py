"""Paired bootstrap interval over images for an accuracy change (model B against model A).

mAP is not a mean over images, so its uncertainty cannot come from a per-image standard
error. The images are resampled with replacement (the same resample for both models: the
pairing removes the images' own difficulty from the spread) and COCOeval's accumulation is
re-run on each resample. COCOeval's per-image matching (``evaluate``) does not depend on
which other images are in the set, so it runs once per model; only ``accumulate`` (which
pools detections over images before the precision/recall curve) runs per resample.

A change whose interval holds 0 is within the noise of these images: :class:`Change` says so.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from core.errors import ConfigError

METRICS = ("map50", "map")
METRIC_LABELS = {"map50": "mAP@0.5", "map": "mAP@[.5:.95]"}
RESAMPLES = 200
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Change:
    """``b - a`` of one metric, in mAP points (0-100), with its paired bootstrap interval."""

    metric: str
    a: float
    b: float
    delta: float
    low: float
    high: float
    images: int
    resamples: int
    confidence: float = CONFIDENCE

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high

    def describe(self) -> str:
        verdict = "within the noise" if self.within_noise else ("a loss" if self.delta < 0 else "a gain")
        return (f"{METRIC_LABELS.get(self.metric, self.metric)} {self.delta:+.2f} point "
                f"[{self.low:+.2f}, {self.high:+.2f}] ({self.confidence:.0%} paired bootstrap over {self.images} "
                f"images, {self.resamples} resamples): {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "within_noise": self.within_noise}


class _PerImage:
    """COCOeval's per-image matching of one results list, ready to be accumulated over any image multiset."""

    def __init__(self, results: list[dict[str, Any]], gt_data: dict[str, Any], image_ids: list[int]):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        gt_data = {**gt_data, "annotations": [dict(a) for a in gt_data["annotations"]],
                   "images": [dict(i) for i in gt_data["images"]],
                   "categories": [dict(c) for c in gt_data["categories"]]}
        wanted = set(image_ids)
        results = [dict(r) for r in results if int(r["image_id"]) in wanted]
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = gt_data
            gt.createIndex()
            if results:
                dt = gt.loadRes(results)
            else:
                dt = COCO()
                dt.dataset = {"images": list(gt_data["images"]), "categories": list(gt_data["categories"]),
                              "annotations": []}
                dt.createIndex()
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = list(image_ids)
            # only the two headline figures are resampled: area "all", 100 detections per image
            ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
            ev.evaluate()
        self.recall_thresholds = np.asarray(ev.params.recThrs)
        n = len(image_ids)
        self.per_category = [self._category(ev.evalImgs[k * n:(k + 1) * n], len(ev.params.iouThrs))
                             for k in range(len(ev.params.catIds))]

    @staticmethod
    def _category(entries: list, thresholds: int):
        """One category's detections over all images, best score first: (image position, tp, fp, gt per image)."""
        if all(e is None for e in entries):
            return None  # neither ground truth nor detections: COCOeval leaves it out (-1)
        gt_per_image = np.array([0 if e is None else int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                                 for e in entries], dtype=np.float64)
        present = [(i, e) for i, e in enumerate(entries) if e is not None]
        scores = np.concatenate([np.asarray(e["dtScores"], dtype=np.float64) for _, e in present])
        image = np.concatenate([np.full(len(e["dtScores"]), i, dtype=np.int64) for i, e in present])
        matches = np.concatenate([np.asarray(e["dtMatches"]).reshape(thresholds, -1) for _, e in present], axis=1)
        ignored = np.concatenate([np.asarray(e["dtIgnore"]).reshape(thresholds, -1) for _, e in present], axis=1)
        order = np.argsort(-scores, kind="mergesort")  # COCOeval's order, ties kept in image order
        matches, ignored = matches[:, order] != 0, ignored[:, order] != 0
        return image[order], (matches & ~ignored).astype(np.float64), (~matches & ~ignored).astype(np.float64), \
            gt_per_image

    def scores(self, counts: np.ndarray) -> tuple[float, float]:
        """(mAP@0.5, mAP@[.5:.95]) in points on the images counted ``counts[i]`` times each.

        COCOeval's accumulation (pycocotools ``accumulate``, area all, 100 detections), with an
        image drawn c times entering as its detections weighted c: the same precision at every
        recall threshold as c copies (a run of copies of one detection moves recall in one step
        where COCOeval takes c steps of rising precision, and the precision envelope keeps the
        last). With every count 1 it is COCOeval's figure exactly (tested against pycocotools).
        """
        thresholds = self.recall_thresholds
        ap = []
        for cat in self.per_category:
            if cat is None:
                continue
            scores_img, tp, fp, gt_per_image = cat
            positives = float(counts @ gt_per_image)
            if positives == 0:
                continue
            weight = counts[scores_img].astype(np.float64)
            tps = np.cumsum(tp * weight, axis=1)
            fps = np.cumsum(fp * weight, axis=1)
            precision = np.zeros((tp.shape[0], thresholds.size))
            if tp.shape[1]:
                recall = tps / positives
                prec = tps / np.maximum(tps + fps, np.spacing(1))
                prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]  # the envelope, from the right
                # searchsorted(side="left") of every threshold in every (monotone) recall row at once
                idx = (recall[:, :, None] < thresholds[None, None, :]).sum(axis=1)
                ok = idx < recall.shape[1]
                rows = np.broadcast_to(np.arange(tp.shape[0])[:, None], idx.shape)
                precision[ok] = prec[rows[ok], idx[ok]]
            ap.append(precision.mean(axis=1))
        if not ap:
            return 0.0, 0.0
        table = np.array(ap)  # [category, IoU threshold]
        return 100.0 * float(table[:, 0].mean()), 100.0 * float(table.mean())


def paired_change(results_a: list[dict[str, Any]], results_b: list[dict[str, Any]], annotations,
                  image_ids: Iterable[int], resamples: int = RESAMPLES, seed: int = 0,
                  confidence: float = CONFIDENCE) -> dict[str, Change]:
    """``{metric: Change}`` of B against A (COCO results lists) on ``image_ids`` of ``annotations``
    (a COCO instances dict or a :class:`eval.dataset.CocoDataset`), for mAP@0.5 and mAP@[.5:.95]."""
    from eval.dataset import CocoDataset

    ids = sorted({int(i) for i in image_ids})
    if len(ids) < 2:
        raise ConfigError(f"a bootstrap interval needs at least 2 images, got {len(ids)}")
    if resamples < 10:
        raise ConfigError(f"resamples {resamples}: at least 10 are needed for an interval")
    if not 0.5 <= confidence < 1.0:
        raise ConfigError(f"confidence {confidence}: use a value in [0.5, 1)")
    gt = annotations.data if isinstance(annotations, CocoDataset) else annotations
    a, b = _PerImage(results_a, gt, ids), _PerImage(results_b, gt, ids)
    identity = np.ones(len(ids))
    base_a, base_b = a.scores(identity), b.scores(identity)
    rng = np.random.default_rng(seed)
    deltas = np.empty((resamples, 2))
    for r in range(resamples):
        counts = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids)).astype(np.float64)
        sa, sb = a.scores(counts), b.scores(counts)
        deltas[r] = (sb[0] - sa[0], sb[1] - sa[1])
    tail = (1.0 - confidence) / 2.0
    out = {}
    for j, metric in enumerate(METRICS):
        low, high = np.quantile(deltas[:, j], [tail, 1.0 - tail])
        out[metric] = Change(metric=metric, a=base_a[j], b=base_b[j], delta=base_b[j] - base_a[j],
                             low=float(low), high=float(high), images=len(ids), resamples=resamples,
                             confidence=confidence)
    return out
