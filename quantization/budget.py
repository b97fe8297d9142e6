"""INT8 within an accuracy budget: keep the most sensitive layers float until the selection
images' drop is within ``max_drop`` points.

The drop is the larger of the mAP@0.5 and mAP@[.5:.95] drops (in points, 0-100), float32
minus INT8, on the selection images; calibration, selection and evaluation images are
disjoint (:mod:`quantization.splits`) and the written file records the calibration and
selection ids, so that ``eval`` refuses both.

A layer's sensitivity is the detection-level disagreement with the float model when that
layer alone is kept float, measured against the all-INT8 file's disagreement on a few
selection images (no ground truth needed, so it is cheap): the layers whose float copy
removes the most disagreement go first. Each step keeps one more layer float and scores the
selection images again, until the budget holds.

NNCF's ``quantize_with_accuracy_control`` does the same search, but installing nncf here
would replace cloudpickle 2.1 (Ray's) by 3.x; onnxruntime's quantizer with
``nodes_to_exclude`` is used instead.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from core.contract import INPUT_NAME, OUTPUT_NAMES, read_contract
from core.errors import ConfigError, ExportError
from core.images import load_rgb, prepare_for
from eval.dataset import load_coco
from exporters.quantize import QuantizeSettings, default_output, quantizable_layers, quantize_model
from quantization.splits import CALIBRATION, SELECTION, Split, split_ids

METRIC = "max(mAP@0.5 drop, mAP@[.5:.95] drop), points, selection images"
ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class BudgetSettings:
    """``max_drop``: points the INT8 file may lose (see :data:`METRIC`); ``coco_dir``: the COCO
    folder split into calibration / selection / evaluation by ``seed``; ``quantize``: the
    recipe (its ``out`` is the file written); ``sensitivity_images``: selection images the
    per-layer sensitivity is measured on."""

    max_drop: float
    coco_dir: Path | None = None
    seed: int = 0
    calibration_images: int = CALIBRATION
    selection_images: int = SELECTION
    sensitivity_images: int = 6
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)


@dataclass
class BudgetResult:
    path: Path
    split: Split
    float_scores: dict
    int8_scores: dict
    drop: float
    all_int8_drop: float
    kept_float: list[str]
    sensitivity: list[tuple[str, float]]
    steps: list[dict]
    layers: int


def default_coco() -> Path:
    from core.paths import data_dir

    return data_dir() / "coco-val2017-subset"


def check_budget(max_drop: float) -> float:
    if max_drop is None or not math.isfinite(max_drop) or max_drop < 0:
        raise ConfigError(f"--max-drop {max_drop}: give a finite, non-negative number of mAP points (e.g. 0.5)")
    return float(max_drop)


def quantize_within_budget(path, settings: BudgetSettings, progress: ProgressFn | None = None) -> BudgetResult:
    """Quantize ``path`` so that the selection images lose at most ``settings.max_drop`` points."""
    say = progress or (lambda message: None)
    max_drop = check_budget(settings.max_drop)
    path = Path(path)
    contract = read_contract(path)
    if contract.random_init:
        raise ConfigError(f"{path} has no trained weights ({contract.weights}): its accuracy cannot be measured, "
                          "so no accuracy budget can be checked. Quantize without --max-drop (speed only).")
    coco_dir = Path(settings.coco_dir) if settings.coco_dir is not None else default_coco()
    dataset = load_coco(coco_dir)
    split = split_ids(dataset.images, settings.seed, settings.calibration_images, settings.selection_images)
    out = Path(settings.quantize.out) if settings.quantize.out is not None else default_output(path)

    with tempfile.TemporaryDirectory(prefix="detbench-budget-") as tmp:
        tmp = Path(tmp)
        base = replace(settings.quantize, calibration=coco_dir, image_ids=split.calibration,
                       selection_ids=split.selection, ranges_cache=tmp / "ranges.json")
        say(f"{split.describe()}; scoring float32 on the selection images")
        float_scores = _score(path, coco_dir, split.selection, tmp / "float")
        n_variant = iter(range(10 ** 6))

        def variant(exclude: tuple[str, ...]) -> Path:
            target = tmp / f"variant{next(n_variant)}.onnx"
            quantize_model(path, replace(base, exclude=exclude, out=target))
            return target

        say("quantizing every layer (calibration on the calibration images)")
        all_int8 = variant(())
        scores = _score(all_int8, coco_dir, split.selection, tmp / "all")
        drop = _drop(float_scores, scores)
        all_drop = drop
        steps = [{"kept_float": [], "drop": drop, "map50": scores["map50"], "map": scores["map"]}]
        kept: list[str] = []
        ranking: list[tuple[str, float]] = []
        if drop > max_drop:
            layers = [name for name, _ in quantizable_layers(path)]
            say(f"selection drop {drop:.2f} > {max_drop:.2f} point: measuring the sensitivity of {len(layers)} layers")
            images = [prepare_for(load_rgb(dataset.images[i].path), contract)[0]
                      for i in split.selection[:settings.sensitivity_images]]
            reference = _detections(path, images)
            baseline = _disagreement(reference, _detections(all_int8, images))
            for name in layers:
                error = _disagreement(reference, _detections(variant((name,)), images))
                ranking.append((name, baseline - error))
            ranking.sort(key=lambda item: -item[1])
            for name, _ in ranking[:-1]:  # keeping every layer float is no INT8 file
                kept.append(name)
                say(f"keeping {len(kept)} layer(s) float; scoring the selection images")
                scores = _score(variant(tuple(kept)), coco_dir, split.selection, tmp / f"step{len(kept)}")
                drop = _drop(float_scores, scores)
                steps.append({"kept_float": list(kept), "drop": drop, "map50": scores["map50"], "map": scores["map"]})
                if drop <= max_drop:
                    break
            if drop > max_drop:
                raise ExportError(f"{path}: no INT8 file found within --max-drop {max_drop} ({METRIC}): all INT8 "
                                  f"loses {all_drop:.2f}, the best tried ({len(kept)} layers float) "
                                  f"{min(s['drop'] for s in steps):.2f}; nothing was written")
        meta = (("accuracy_budget_metric", METRIC), ("accuracy_budget_max_drop", f"{max_drop}"),
                ("accuracy_budget_selection_drop", f"{drop:.4f}"),
                ("accuracy_budget_all_int8_drop", f"{all_drop:.4f}"), ("split_seed", str(split.seed)))
        result = quantize_model(path, replace(base, exclude=tuple(kept), out=out, metadata=meta))
    return BudgetResult(path=result.path, split=split, float_scores=float_scores, int8_scores=scores, drop=drop,
                        all_int8_drop=all_drop, kept_float=kept, sensitivity=ranking, steps=steps,
                        layers=len(ranking) or None)


def _score(path: Path, coco_dir, ids, stem: Path) -> dict:
    from eval.coco import evaluate_model

    result = evaluate_model(path, coco_dir=coco_dir, image_ids=tuple(ids), store=False, allow_calibration_overlap=True,
                            results_file=stem.with_suffix(".results.json"), cache_file=stem.with_suffix(".cache.jsonl"))
    return {"map50": 100.0 * result.scores["map50"], "map": 100.0 * result.scores["map"],
            "results_file": result.results_file}


def _drop(reference: dict, candidate: dict) -> float:
    return max(reference["map50"] - candidate["map50"], reference["map"] - candidate["map"])


def _detections(path: Path, tensors: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [tuple(session.run(list(OUTPUT_NAMES[:3]), {INPUT_NAME: t})) for t in tensors]


def _disagreement(reference, candidate, min_score: float = 0.1, iou: float = 0.5) -> float:
    """Mean over images of 1 - F1 of the candidate's detections against the reference's
    (same label, IoU >= ``iou``, both above ``min_score``): 0 when they agree."""
    errors = []
    for (rb, rs, rl), (cb, cs, cl) in zip(reference, candidate):
        rb, rl = rb[rs >= min_score], rl[rs >= min_score]
        cb, cl = cb[cs >= min_score], cl[cs >= min_score]
        if len(rb) == 0 and len(cb) == 0:
            errors.append(0.0)
            continue
        matched, used = 0, set()
        for box, label in zip(rb, rl):
            best, best_j = iou, None
            for j, (other, other_label) in enumerate(zip(cb, cl)):
                if j in used or other_label != label:
                    continue
                overlap = _iou(box, other)
                if overlap >= best:
                    best, best_j = overlap, j
            if best_j is not None:
                used.add(best_j)
                matched += 1
        errors.append(1.0 - 2.0 * matched / (len(rb) + len(cb)))
    return float(np.mean(errors)) if errors else 0.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
