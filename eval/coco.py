"""COCO accuracy of an exported detector: images -> onnxruntime -> COCO results -> COCOeval.

:func:`evaluate_model` runs any contract-following ONNX file (``core.contract``)
over a COCO dataset and scores it; :func:`score_results` scores an existing COCO
results file. Both return COCOeval's 12 statistics under the names the results
store uses (:data:`STAT_NAMES`), with ``map50`` (AP at IoU 0.5) and ``map``
(AP at IoU 0.50:0.95) as headline, all in 0..1 as COCOeval gives them.

Scoring backends: ``pycocotools`` (the reference implementation) and
``faster-coco-eval`` (a C++ reimplementation; it must agree with pycocotools).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from eval.dataset import CocoDataset, load_coco, read_annotations
from eval.pipeline import DetectionCache, Prepared, prefetched, prepare_image
from core.contract import (INPUT_NAME, LABEL_SPACES, OUTPUT_NAMES, PREFIX, RESIZE_MODES, ModelContract, check_io,
                              sha256_file)
from core.files import write_text_atomic
from core.errors import ConfigError, ContractError, DatasetError
from core.paths import results_dir

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster-coco-eval")
IOU_TYPES = ("bbox", "segm")


# --------------------------------------------------------------------------- scoring


def score_results(results_file, annotations, backend: str = "pycocotools", *, iou_type: str = "bbox",
                  image_ids: Iterable[int] | None = None, per_category: bool = False) -> dict[str, Any]:
    """COCOeval's statistics for a COCO results file against an annotation file.

    ``results_file`` is a path to a COCO results JSON (a list of ``{"image_id",
    "category_id", "bbox" | "segmentation", "score"}``) or that list itself;
    ``annotations`` a path to a COCO instances file, its parsed dict, or a
    :class:`CocoDataset`. ``image_ids`` restricts evaluation to those images (default:
    every image of the annotation file, as COCOeval does).

    Returns ``{"stats": {name: value for STAT_NAMES}, "map50", "map", "backend",
    "iou_type", "images", "detections"}`` plus ``"per_category": {category name:
    {"id", "AP", "AP50"}}`` when asked (``None`` for a category without ground truth).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if iou_type not in IOU_TYPES:
        raise ConfigError(f"--iou-type {iou_type!r}: use one of {', '.join(IOU_TYPES)}")
    gt_data = _annotation_data(annotations)
    results = _results_list(results_file)
    _check_results(results, gt_data, iou_type, str(results_file) if isinstance(results_file, (str, Path)) else "results")
    # COCOeval sets keys on the annotation and result dicts (ignore flags, area, id, RLE
    # segmentation) but never edits their values in place: copying each dict is enough for
    # a dataset to be scored again, by either backend, exactly as the first time.
    gt_data = {**gt_data, "annotations": [dict(a) for a in gt_data["annotations"]],
               "images": [dict(i) for i in gt_data["images"]], "categories": [dict(c) for c in gt_data["categories"]]}
    results = [dict(r) for r in results]
    selected = sorted({int(i) for i in image_ids}) if image_ids is not None else None
    sink = io.StringIO()  # both libraries print progress; library code never prints
    with contextlib.redirect_stdout(sink):
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            gt = COCO()
            gt.dataset = gt_data
            gt.createIndex()
            if results:
                dt = gt.loadRes(results)
            else:  # pycocotools' loadRes cannot take an empty list; no detections is a valid result
                dt = COCO()
                dt.dataset = {"images": list(gt_data["images"]), "categories": list(gt_data["categories"]),
                              "annotations": []}
                dt.createIndex()
            evaluator = COCOeval(gt, dt, iou_type)
        else:
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster

            gt = FasterCOCO(gt_data)
            dt = gt.loadRes(results)
            evaluator = COCOeval_faster(gt, dt, iou_type)
        if selected is not None:
            evaluator.params.imgIds = selected
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    out: dict[str, Any] = {
        "stats": stats, "map50": stats["AP50"], "map": stats["AP"], "backend": backend, "iou_type": iou_type,
        "images": len(evaluator.params.imgIds), "detections": len(results),
    }
    if per_category:
        out["per_category"] = _per_category(evaluator, gt_data)
    return out


def _per_category(evaluator, gt_data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """AP and AP50 per category from COCOeval's precision array (area all, 100 detections)."""
    precision = np.asarray(evaluator.eval["precision"])  # [IoU thresholds, recall points, categories, areas, maxDets]
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt_data["categories"]}
    table = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p_all = precision[:, :, k, 0, -1]
        p_50 = precision[0, :, k, 0, -1]
        valid_all, valid_50 = p_all[p_all > -1], p_50[p_50 > -1]
        table[names.get(int(cat_id), str(cat_id))] = {
            "id": int(cat_id),
            "AP": float(valid_all.mean()) if valid_all.size else None,
            "AP50": float(valid_50.mean()) if valid_50.size else None,
        }
    return table


def _annotation_data(annotations) -> dict[str, Any]:
    if isinstance(annotations, CocoDataset):
        return annotations.data
    if isinstance(annotations, dict):
        return annotations
    return read_annotations(Path(annotations))


def _results_list(results_file) -> list[dict[str, Any]]:
    if isinstance(results_file, list):
        return results_file
    path = Path(results_file)
    if not path.is_file():
        raise DatasetError(f"results file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"results file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"results file {path} is not a COCO results file: the top level must be a list of "
                           "detections ({image_id, category_id, bbox, score}), found a " + type(data).__name__)
    return data


def _check_results(results: list, gt_data: dict[str, Any], iou_type: str, source: str) -> None:
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    image_ids = {img["id"] for img in gt_data["images"]}
    problems = []
    foreign = set()
    for i, det in enumerate(results):
        if not isinstance(det, dict) or any(k not in det for k in ("image_id", "category_id", "score", geometry)):
            problems.append(f"entry {i} lacks one of image_id, category_id, score, {geometry}")
        elif det["image_id"] not in image_ids:
            foreign.add(det["image_id"])
        elif iou_type == "bbox" and not (isinstance(det["bbox"], list) and len(det["bbox"]) == 4):
            problems.append(f"entry {i}: bbox is not [x, y, w, h]")
        if len(problems) >= 5:
            break
    if foreign:
        problems.append(f"{len(foreign)} image id(s) are not in the annotation file, e.g. {sorted(foreign)[:5]} "
                        "(results and annotations must describe the same images)")
    if problems:
        raise DatasetError(f"{source} is not a COCO {iou_type} results file for these annotations:\n  - "
                           + "\n  - ".join(problems))


# --------------------------------------------------------------------------- running a model


@dataclass(frozen=True)
class EvalProgress:
    """Reported after every image (and once before the first): what is done and how fast."""

    done: int            # images finished, including ones taken from the cache of an earlier run
    total: int           # images selected
    resumed: int         # images taken from the cache at the start
    skipped: int         # images that could not be evaluated so far
    image: str | None    # file name of the image just finished (None before the first)
    wall_seconds: float  # since the image loop started
    session_seconds: float


ProgressCallback = Callable[[EvalProgress], None]


@dataclass
class EvalResult:
    """One evaluation: scores, what was evaluated, where the files are, and the timings.

    ``wall_seconds`` covers the whole call (loading, session creation, the image loop,
    writing and scoring); ``loop_seconds`` the image loop alone (decode, resize, run,
    map back, cache); ``session_seconds`` the sum of time inside ``session.run`` in
    this call. ``overhead`` = ``wall_seconds / session_seconds`` and
    ``loop_overhead`` = ``loop_seconds / session_seconds``; both are ``None`` when this
    call ran no image (everything came from the cache).
    """

    model: str
    model_path: str
    model_sha256: str
    provider: str
    providers_ran: list[str]
    contract: dict[str, str]
    scores: dict[str, Any]
    images_selected: int
    images_evaluated: int
    images_resumed: int
    images_skipped: list[dict[str, str]]
    detections: int
    wall_seconds: float
    loop_seconds: float
    session_seconds: float
    session_create_seconds: float
    score_seconds: float
    results_file: str
    cache_file: str
    annotations_file: str
    annotations_sha256: str
    settings: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None

    @property
    def overhead(self) -> float | None:
        return self.wall_seconds / self.session_seconds if self.session_seconds > 0 else None

    @property
    def loop_overhead(self) -> float | None:
        return self.loop_seconds / self.session_seconds if self.session_seconds > 0 else None

    @property
    def images_per_second(self) -> float | None:
        ran = self.images_evaluated - self.images_resumed
        return ran / self.loop_seconds if self.loop_seconds > 0 and ran > 0 else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("record")
        out.update(overhead=self.overhead, loop_overhead=self.loop_overhead, images_per_second=self.images_per_second)
        return out


def evaluate_model(path, *, coco_dir: Path | None = None, annotations: Path | None = None, images: Path | None = None,
                   provider: str = "cpu", limit: int | None = None, image_ids: Iterable[int] | None = None,
                   resume: bool = False, overrides: dict[str, str] | None = None, backend: str = "pycocotools",
                   per_category: bool = False, results_file: Path | None = None, cache_file: Path | None = None,
                   threads: int | None = None, workers: int = 2, prefetch: int = 4,
                   progress: ProgressCallback | None = None, store: bool = True,
                   allow_fallback: bool = False) -> EvalResult:
    """Run the ONNX detector at ``path`` over a COCO dataset and score it with COCOeval.

    Preprocessing (input size, letterbox/stretch, padding) and the label space come
    from the file's ``detbench.*`` metadata; ``overrides`` (keys ``input_height``,
    ``input_width``, ``resize``, ``label_space``, ...) supply or replace them for files
    exported elsewhere. Each finished image's detections are appended to a cache
    (``cache_file``, default under the results folder, keyed by model, provider,
    preprocessing and annotation file); ``resume=True`` keeps the images already in
    it and runs only the rest. An image that is missing, does not decode or has
    another size than annotated is skipped, named in ``images_skipped``, and left out
    of the scoring. The COCO results of all evaluated images are written atomically
    to ``results_file`` and scored with ``backend``; unless ``store=False`` an
    ``eval`` record is appended to the results store.

    Raises :class:`ContractError` (model not usable: metadata missing, wrong inputs,
    labels outside its label space), :class:`DatasetError` (annotations or images not
    usable), :class:`ConfigError` (bad option), :class:`ProviderUnavailableError`.
    """
    from core import store as results_store
    from runtime.sessions import create_session, short_name

    started = time.perf_counter()
    path = Path(path)
    contract = model_contract(path, overrides)
    model_sha = sha256_file(path)
    dataset = load_coco(coco_dir, annotations, images)
    selection = dataset.select(limit, image_ids)
    dataset.check_images_present(selection)
    label_map = dataset.label_map(contract.label_space)

    session, info = create_session(path, provider, threads=threads, allow_fallback=allow_fallback)
    # what actually runs (differs from the request only with allow_fallback)
    provider_name = short_name(info.provider)
    fingerprint = {
        "model_sha256": model_sha, "annotations_sha256": dataset.sha256, "provider": provider_name,
        "input_size": [contract.input_height, contract.input_width], "resize": contract.resize,
        "label_space": contract.label_space, "pad_value": contract.pad_value,
    }
    stem = f"{path.stem}-{model_sha[:10]}-{provider_name}-{contract.resize}-{dataset.sha256[:10]}"
    out_dir = results_dir() / "eval"
    cache_path = Path(cache_file) if cache_file is not None else out_dir / f"{stem}.cache.jsonl"
    results_path = Path(results_file) if results_file is not None else out_dir / f"{stem}.results.json"

    skipped: list[dict[str, str]] = []
    session_seconds = 0.0
    with DetectionCache(cache_path, fingerprint).open(resume) as cache:
        selected_ids = {img.id for img in selection}
        resumed = sum(1 for i in cache.done if i in selected_ids)
        todo = [img for img in selection if img.id not in cache.done]
        loop_start = time.perf_counter()

        finished = resumed  # images done, evaluated or skipped, for the progress report

        def report(image: str | None) -> None:
            if progress is not None:
                progress(EvalProgress(finished, len(selection), resumed, len(skipped), image,
                                      time.perf_counter() - loop_start, session_seconds))

        report(None)
        items = prefetched(todo, lambda img: prepare_image(img, contract), workers=workers, prefetch=prefetch)
        try:
            for item in items:
                finished += 1
                if item.error is not None:
                    skipped.append({"image_id": item.image.id, "file_name": item.image.file_name,
                                    "reason": item.error})
                    report(item.image.file_name)
                    continue
                t0 = time.perf_counter()
                outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: item.tensor})
                spent = time.perf_counter() - t0
                session_seconds += spent
                cache.add(item.image.id, to_coco_detections(outputs, item, label_map, contract), spent)
                report(item.image.file_name)
        finally:
            items.close()  # an interruption (raising callback, Ctrl-C) stops the decode workers now
        loop_seconds = time.perf_counter() - loop_start
        done_ids = sorted(i for i in cache.done if i in selected_ids)
        results = [det for i in done_ids for det in cache.done[i]]

    if not done_ids:
        raise DatasetError(f"none of the {len(selection)} selected images could be evaluated; first problem: "
                           f"{skipped[0]['reason'] if skipped else 'unknown'}")
    write_json_atomic(results_path, results)
    score_start = time.perf_counter()
    scores = score_results(results, dataset, backend, image_ids=done_ids, per_category=per_category)
    score_seconds = time.perf_counter() - score_start
    wall = time.perf_counter() - started

    settings = {"limit": limit, "image_ids": sorted(int(i) for i in image_ids) if image_ids is not None else None,
                "resume": resume, "workers": workers, "prefetch": prefetch, "threads": threads,
                "overrides": dict(overrides or {}), "backend": backend, "session": info.settings}
    result = EvalResult(
        model=contract.name, model_path=str(path), model_sha256=model_sha, provider=provider_name,
        providers_ran=list(info.providers_ran), contract=contract.to_props(), scores=scores,
        images_selected=len(selection), images_evaluated=len(done_ids), images_resumed=resumed,
        images_skipped=skipped, detections=len(results), wall_seconds=wall, loop_seconds=loop_seconds,
        session_seconds=session_seconds, session_create_seconds=info.seconds, score_seconds=score_seconds,
        results_file=str(results_path), cache_file=str(cache_path), annotations_file=str(dataset.annotations_path),
        annotations_sha256=dataset.sha256, settings=settings)
    if store:
        data = {
            "stats": scores["stats"], "map50": scores["map50"], "map": scores["map"],
            "images_evaluated": len(done_ids), "images_skipped": skipped, "images_resumed": resumed,
            "annotations_sha256": dataset.sha256, "wall_seconds": wall, "loop_seconds": loop_seconds,
            "session_seconds": session_seconds, "overhead": result.overhead, "loop_overhead": result.loop_overhead,
            "backend": backend, "resize": contract.resize, "label_space": contract.label_space,
            "input_size": [contract.input_height, contract.input_width], "detections": len(results),
            "dataset": {"annotations_file": str(dataset.annotations_path), "images_dir": str(dataset.images_dir),
                        "image_count": len(selection), "annotations_sha256": dataset.sha256},
            "results_file": str(results_path), "providers_ran": list(info.providers_ran),
        }
        if per_category:
            data["per_category"] = scores["per_category"]
        result.record = results_store.append("eval", data, model=contract.name, model_sha256=model_sha,
                                             provider=provider_name, settings=settings, contract=contract.to_props())
    return result


def to_coco_detections(outputs, item: Prepared, label_map: np.ndarray, contract: ModelContract) -> list[dict[str, Any]]:
    """One image's ``(boxes, scores, labels)`` as COCO results entries in original-image pixels.

    Boxes go from tensor pixels back through the image's placement, clipped to the
    image, as ``[x, y, width, height]``; labels through ``label_map`` to category ids.
    """
    boxes, scores, labels = (np.asarray(o) for o in outputs[:3])
    # A graph with a batch axis of 1 on its outputs is accepted as well as the contract's [K, 4].
    boxes = boxes.reshape(-1, 4)
    scores = scores.reshape(-1)
    labels = labels.reshape(-1).astype(np.int64)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ContractError(f"model {contract.name!r}: outputs disagree in length on {item.image.file_name} "
                            f"(boxes {len(boxes)}, scores {len(scores)}, labels {len(labels)})")
    if len(labels) == 0:
        return []
    bad = (labels < 0) | (labels >= len(label_map))
    if not bad.any():
        bad = label_map[labels] < 0
    if bad.any():
        raise ContractError(f"model {contract.name!r} emitted label {int(labels[bad][0])} on {item.image.file_name}, "
                            f"which is not in its label space {contract.label_space!r}; if the metadata is wrong, "
                            "pass --label-space coco80|coco91")
    mapped = item.placement.to_image(boxes)
    categories = label_map[labels]
    return [
        {"image_id": int(item.image.id), "category_id": int(cat),
         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)}
        for (x1, y1, x2, y2), score, cat in zip(mapped, scores, categories)
    ]


# What evaluation itself needs from the metadata, and the option that supplies each key.
EVAL_KEYS = {"input_height": "--input-size HxW", "input_width": "--input-size HxW",
             "resize": "--resize letterbox|stretch", "label_space": "--label-space coco80|coco91"}
# Provenance keys a file exported elsewhere may lack; evaluation records them as unknown.
_UNKNOWN_PROVENANCE = {"family": "unknown", "framework": "unknown", "score_threshold": "nan",
                       "iou_threshold": "nan", "max_detections": "-1", "weights": "unknown", "source_params": "-1"}


def model_contract(path: Path, overrides: dict[str, Any] | None = None) -> ModelContract:
    """The contract evaluation uses for the ONNX file at ``path``.

    ``overrides`` (``input_height``, ``input_width``, ``resize``, ``label_space``,
    ``pad_value``) replace or supply metadata. A file whose metadata is complete gets
    the full contract check; a file exported elsewhere needs only the keys in
    :data:`EVAL_KEYS` (from its metadata or ``overrides``) and is recorded with its
    provenance keys as ``unknown``. Raises :class:`ContractError` naming the missing
    keys and the options that supply them, or what is wrong with the graph's inputs/outputs.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ContractError(f"no ONNX file at {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a file that is not ONNX
        raise ContractError(f"{path} is not a readable ONNX file: {exc}") from exc
    problems = check_io(model, str(path))
    if problems:
        raise ContractError("; ".join(problems) + ". detbench evaluates exported detectors (python cli.py export).")
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in (overrides or {}).items():
        if value is not None:
            props[PREFIX + key] = str(value)
    ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
    missing = [k for k in EVAL_KEYS if k not in ours]
    if missing:
        options = sorted({EVAL_KEYS[k] for k in missing})
        raise ContractError(
            f"{path} lacks the detbench metadata evaluation needs: {', '.join(PREFIX + k for k in missing)}. "
            f"Pass {' '.join(options)} to describe it, or re-export it with `python cli.py export`.")
    if all(k in ours for k in ModelContract.REQUIRED):
        return ModelContract.from_props(props, str(path))
    for key, value in _UNKNOWN_PROVENANCE.items():
        ours.setdefault(key, value)
    ours.setdefault("name", path.stem)
    try:
        contract = ModelContract(
            name=ours["name"], family=ours["family"], framework=ours["framework"],
            input_height=int(ours["input_height"]), input_width=int(ours["input_width"]), resize=ours["resize"],
            label_space=ours["label_space"], score_threshold=float(ours["score_threshold"]),
            iou_threshold=float(ours["iou_threshold"]), max_detections=int(ours["max_detections"]),
            weights=ours["weights"], source_params=int(ours["source_params"]),
            pad_value=float(ours.get("pad_value", ModelContract.pad_value)))
    except ValueError as exc:
        raise ContractError(f"{path}: malformed detbench metadata or option value ({exc})") from exc
    if contract.resize not in RESIZE_MODES:
        raise ContractError(f"{path}: resize {contract.resize!r} is not one of {RESIZE_MODES} (--resize)")
    if contract.label_space not in LABEL_SPACES:
        raise ContractError(f"{path}: label space {contract.label_space!r} is not one of {LABEL_SPACES} (--label-space)")
    if contract.input_height <= 0 or contract.input_width <= 0:
        raise ContractError(f"{path}: input size {contract.input_height}x{contract.input_width} is not positive (--input-size)")
    return contract


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON next to ``path`` and rename it into place (never a half-written file)."""
    return write_text_atomic(path, json.dumps(obj, separators=(",", ":")))
