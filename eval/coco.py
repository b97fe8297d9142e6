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
import dataclasses
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from eval.dataset import CocoDataset, load_coco, read_annotations
from eval.labels import INVALID, UNMATCHED, label_mapping
from eval.image_feed import DetectionCache, Prepared, prefetched, prepare_image
from core.contract import (LABEL_SPACES, LABELS_KEY, OUTPUT_NAMES, labels_problem, PREFIX, RESIZE_MODES, ModelContract, load_checked,
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
    if path.is_dir():
        raise DatasetError(f"--results {path} is a directory: pass the COCO results JSON file inside it")
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
    """Every entry must be scorable as it is, or nothing is scored: COCOeval would otherwise
    silently ignore a foreign category and count a negative box as a miss. All problems are
    collected; the message lists the first few with their entry index, and the count."""
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    image_ids = {img["id"] for img in gt_data["images"]}
    category_ids = {cat["id"] for cat in gt_data["categories"]}
    problems: list[str] = []
    foreign = set()
    for i, det in enumerate(results):
        if not isinstance(det, dict):
            problems.append(f"entry {i} is a {type(det).__name__}, not an object {{image_id, category_id, score, "
                            f"{geometry}}}")
            continue
        missing = [k for k in ("image_id", "category_id", "score", geometry) if k not in det]
        if missing:
            problems.append(f"entry {i} lacks one of image_id, category_id, score, {geometry} "
                            f"(missing: {', '.join(missing)})")
            continue
        if det["image_id"] not in image_ids:
            foreign.add(det["image_id"] if isinstance(det["image_id"], (int, str, float)) else repr(det["image_id"]))
        if not _hashable(det["category_id"]) or det["category_id"] not in category_ids:
            problems.append(f"entry {i}: category_id {det['category_id']!r} is not a category of the annotations "
                            f"(they have {len(category_ids)}: {_ids(category_ids)})")
        if not _finite_number(det["score"]):
            problems.append(f"entry {i}: score {det['score']!r} is not a finite number")
        if iou_type == "bbox":
            problem = _bbox_problem(det["bbox"])
            if problem:
                problems.append(f"entry {i}: bbox {_short(det['bbox'])} {problem}")
        elif not isinstance(det["segmentation"], (dict, list)):
            problems.append(f"entry {i}: segmentation is a {type(det['segmentation']).__name__}, not an RLE object "
                            "or a list of polygons")
    if foreign:
        ordered = sorted(foreign, key=str)
        problems.append(f"{len(foreign)} image id(s) are not in the annotation file, e.g. {ordered[:5]} "
                        "(results and annotations must describe the same images)")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more problem(s)"] if len(problems) > 8 else [])
        raise DatasetError(f"{source} is not a COCO {iou_type} results file for these annotations "
                           f"({len(problems)} problem(s); nothing was scored):\n  - " + "\n  - ".join(shown)
                           + "\nFix or drop these entries and score again.")


def _hashable(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _bbox_problem(bbox) -> str | None:
    if not isinstance(bbox, list) or len(bbox) != 4:
        count = f"{len(bbox)} values" if isinstance(bbox, list) else f"a {type(bbox).__name__}"
        return f"is {count}, not a list of 4 numbers x, y, width, height"
    if not all(_finite_number(v) for v in bbox):
        return "holds a value that is not a finite number"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"has a negative {'width' if bbox[2] < 0 else 'height'} (COCO boxes are x, y, width, height)"
    return None


def _ids(ids: set) -> str:
    ordered = sorted(ids, key=str)
    return ", ".join(map(str, ordered[:10])) + (", ..." if len(ordered) > 10 else "")


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str, int, float)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate_model` evaluates and how; stored with the ``eval`` record.

    Data: ``coco_dir`` (or ``annotations`` + ``images``), ``limit``/``image_ids``; the model:
    ``provider`` (a backend name, see ``runtime.backends``), ``threads``, ``allow_fallback``,
    ``parity`` (compare a non-cpu backend with onnxruntime CPU on 3 COCO images first),
    ``overrides`` (metadata for files exported elsewhere); scoring: ``backend``
    (pycocotools or faster-coco-eval), ``per_category``; files: ``results_file``,
    ``cache_file``, ``resume``; the image loop: ``workers``, ``prefetch``;
    ``allow_calibration_overlap`` (INT8 models scored on their calibration images).
    """

    coco_dir: Path | None = None
    annotations: Path | None = None
    images: Path | None = None
    provider: str = "cpu"
    limit: int | None = None
    image_ids: tuple[int, ...] | None = None
    resume: bool = False
    overrides: dict[str, Any] | None = None
    backend: str = "pycocotools"
    per_category: bool = False
    results_file: Path | None = None
    cache_file: Path | None = None
    threads: int | None = None
    workers: int = 2
    prefetch: int = 4
    allow_fallback: bool = False
    allow_calibration_overlap: bool = False
    parity: bool = True

    def __post_init__(self):
        if self.image_ids is not None and not isinstance(self.image_ids, tuple):
            object.__setattr__(self, "image_ids", tuple(self.image_ids))
        from runtime.backends.base import check_thread_count

        check_thread_count("--threads", self.threads)
        check_thread_count("--workers", self.workers)
        if self.prefetch < 1:
            raise ConfigError(f"--prefetch {self.prefetch}: must be at least 1")


def evaluate_model(path, settings: EvalSettings | None = None, *, progress: ProgressCallback | None = None,
                   store: bool = True, **options) -> EvalResult:
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
    from core.calibration import check_calibration_overlap
    from runtime.backends import REFERENCE, BackendSettings, get_backend

    unknown = set(options) - {f.name for f in dataclasses.fields(EvalSettings)}
    if unknown:
        raise ConfigError(f"unknown evaluation option(s): {', '.join(sorted(unknown))}")
    settings = dataclasses.replace(settings or EvalSettings(), **options)
    coco_dir, annotations, images = settings.coco_dir, settings.annotations, settings.images
    provider, threads, allow_fallback = settings.provider, settings.threads, settings.allow_fallback
    limit, image_ids, resume, overrides = settings.limit, settings.image_ids, settings.resume, settings.overrides
    backend, per_category = settings.backend, settings.per_category
    results_file, cache_file, workers, prefetch = (settings.results_file, settings.cache_file, settings.workers,
                                                   settings.prefetch)
    allow_calibration_overlap = settings.allow_calibration_overlap
    started = time.perf_counter()
    path = Path(path)
    contract = model_contract(path, overrides)
    model_sha = sha256_file(path)
    dataset = load_coco(coco_dir, annotations, images)
    selection = dataset.select(limit, image_ids)
    # an INT8 model scored on its own calibration images would look better than it is
    check_calibration_overlap(contract, [img.id for img in selection], allow=allow_calibration_overlap)
    dataset.check_images_present(selection)
    mapping = label_mapping(dataset, contract.label_space, contract.labels)
    label_map = mapping.table

    chosen = get_backend(provider)
    runtime_settings = BackendSettings(threads=threads, allow_fallback=allow_fallback)
    chosen.require(runtime_settings)
    runner = chosen.open(path, runtime_settings)
    info = runner.info
    providers_ran = list(info.detail.get("providers_ran") or [f"{info.library} {info.device} ({info.precision})"])
    # what actually runs (differs from the request only with allow_fallback)
    provider_name = info.backend
    if info.fell_back and info.library == "onnxruntime":
        provider_name = get_backend(providers_ran[0]).name
    parity = None
    if settings.parity and provider_name != REFERENCE:
        parity = _parity_first(path, runner, runtime_settings)
    fingerprint, cache_path, results_path = eval_files(path, model_sha, provider_name, contract, dataset,
                                                       results_file, cache_file)
    if provider_name != REFERENCE:  # onnxruntime CPU's header stays as it was, so its caches still resume
        fingerprint["precision"] = info.precision

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
                out = runner.run(item.tensor)
                outputs = [out[name] for name in OUTPUT_NAMES]
                spent = time.perf_counter() - t0
                session_seconds += spent
                cache.add(item.image.id, to_coco_detections(outputs, item, label_map, contract), spent)
                report(item.image.file_name)
        finally:
            items.close()  # an interruption (raising callback, Ctrl-C) stops the decode workers now
        loop_seconds = time.perf_counter() - loop_start

    settings = {"limit": limit, "image_ids": sorted(int(i) for i in image_ids) if image_ids is not None else None,
                "resume": resume, "workers": workers, "prefetch": prefetch, "threads": threads,
                "overrides": dict(overrides or {}), "backend": backend, "session": info.detail.get("session"),
                "runtime": info.to_dict(), "precision": info.precision, "parity": parity,
                "label_mapping": mapping.to_dict()}
    runner.close()
    return finish_evaluation(FinishedLoop(
        path=path, contract=contract, model_sha=model_sha, provider_name=provider_name,
        providers_ran=providers_ran, dataset=dataset, selection=selection, done=cache.done,
        skipped=skipped, resumed=resumed, started=started, loop_seconds=loop_seconds,
        session_seconds=session_seconds, session_create_seconds=info.load_seconds, results_path=results_path,
        cache_path=cache_path, backend=backend, per_category=per_category, settings=settings), store=store)


def _parity_first(path: Path, runner, runtime_settings) -> dict[str, Any]:
    """Parity of ``runner`` with onnxruntime CPU on the busiest COCO images, before evaluating through it."""
    from runtime.backends import REFERENCE, get_backend
    from runtime.inputs import busiest_images
    from runtime.parity import check_parity

    with get_backend(REFERENCE).open(path, dataclasses.replace(runtime_settings, allow_fallback=False)) as reference:
        return check_parity(runner, reference, busiest_images(3)).to_dict()


def eval_files(path: Path, model_sha: str, provider_name: str, contract: ModelContract, dataset: CocoDataset,
               results_file: Path | None = None, cache_file: Path | None = None) -> tuple[dict[str, Any], Path, Path]:
    """What identifies an evaluation's detections (the cache header), and its default cache and results files.

    Shared by the local loop and the Ray pipeline (``eval.ray_eval``), so either can resume the other's cache.
    """
    fingerprint = {
        "model_sha256": model_sha, "annotations_sha256": dataset.sha256, "provider": provider_name,
        "input_size": [contract.input_height, contract.input_width], "resize": contract.resize,
        "label_space": contract.label_space, "pad_value": contract.pad_value,
    }
    stem = f"{path.stem}-{model_sha[:10]}-{provider_name}-{contract.resize}-{dataset.sha256[:10]}"
    out_dir = results_dir() / "eval"
    cache_path = Path(cache_file) if cache_file is not None else out_dir / f"{stem}.cache.jsonl"
    results_path = Path(results_file) if results_file is not None else out_dir / f"{stem}.results.json"
    return fingerprint, cache_path, results_path


@dataclass
class FinishedLoop:
    """What an evaluation loop (the local one or the Ray pipeline) hands to :func:`finish_evaluation`:
    the model and where it ran, the images and their detections, the loop's timings and files."""

    path: Path
    contract: ModelContract
    model_sha: str
    provider_name: str
    providers_ran: list[str]
    dataset: CocoDataset
    selection: list
    done: dict[int, list]
    skipped: list[dict[str, str]]
    resumed: int
    started: float
    loop_seconds: float
    session_seconds: float
    session_create_seconds: float
    results_path: Path
    cache_path: Path
    backend: str
    per_category: bool
    settings: dict[str, Any]


def finish_evaluation(loop: FinishedLoop, *, store: bool) -> EvalResult:
    """Write and score the detections ``loop.done`` holds for ``loop.selection`` (image id -> COCO results
    entries), and build the :class:`EvalResult` and, unless ``store=False``, its ``eval`` record.

    Shared by the local loop and the Ray pipeline (``eval.ray_eval``): one scorer, one record format.
    """
    from core import store as results_store

    path, contract, model_sha, provider_name = loop.path, loop.contract, loop.model_sha, loop.provider_name
    dataset, selection, done, skipped, resumed = loop.dataset, loop.selection, loop.done, loop.skipped, loop.resumed
    loop_seconds, session_seconds, settings = loop.loop_seconds, loop.session_seconds, loop.settings
    results_path, cache_path, backend, per_category = loop.results_path, loop.cache_path, loop.backend, loop.per_category

    selected_ids = {img.id for img in selection}
    done_ids = sorted(i for i in done if i in selected_ids)
    results = [det for i in done_ids for det in done[i]]
    if not done_ids:
        raise DatasetError(f"none of the {len(selection)} selected images could be evaluated; first problem: "
                           f"{skipped[0]['reason'] if skipped else 'unknown'}")
    write_json_atomic(results_path, results)
    score_start = time.perf_counter()
    scores = score_results(results, dataset, backend, image_ids=done_ids, per_category=per_category)
    score_seconds = time.perf_counter() - score_start
    wall = time.perf_counter() - loop.started

    result = EvalResult(
        model=contract.name, model_path=str(path), model_sha256=model_sha, provider=provider_name,
        providers_ran=list(loop.providers_ran), contract=contract.to_props(), scores=scores,
        images_selected=len(selection), images_evaluated=len(done_ids), images_resumed=resumed,
        images_skipped=skipped, detections=len(results), wall_seconds=wall, loop_seconds=loop_seconds,
        session_seconds=session_seconds, session_create_seconds=loop.session_create_seconds, score_seconds=score_seconds,
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
            "dataset": {"name": dataset.name,
                        "coco_categories": (settings.get("label_mapping") or {}).get("by", "numbering") == "numbering",
                        "annotations_file": str(dataset.annotations_path), "images_dir": str(dataset.images_dir),
                        "image_count": len(selection), "annotations_sha256": dataset.sha256},
            "results_file": str(results_path), "providers_ran": list(loop.providers_ran),
        }
        if per_category:
            data["per_category"] = scores["per_category"]
        if "label_mapping" in settings:
            data["label_mapping"] = settings["label_mapping"]
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
        bad = label_map[labels] == INVALID
    if bad.any():
        raise ContractError(f"model {contract.name!r} emitted label {int(labels[bad][0])} on {item.image.file_name}, "
                            f"which is not in its label space {contract.label_space!r}; if the metadata is wrong, "
                            "pass --label-space coco80|coco91")
    # classes the dataset has no category for cannot be scored: dropped (reported by the mapping)
    scored = label_map[labels] != UNMATCHED
    boxes, scores, labels = boxes[scored], scores[scored], labels[scored]
    mapped = item.placement.to_image(boxes)
    categories = label_map[labels]
    return [
        {"image_id": int(item.image.id), "category_id": int(cat),
         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)}
        for (x1, y1, x2, y2), score, cat in zip(mapped, scores, categories)
    ]


# What evaluation itself needs from the metadata, and the option that supplies each key.
EVAL_KEYS = {"input_height": "--input-size HxW", "input_width": "--input-size HxW",
             "resize": "--resize letterbox|stretch", "label_space": "--label-space coco80|coco91|names"}
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
    path = Path(path)
    model, _ = load_checked(path)  # the check every command shares (file, inputs/outputs)
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
            pad_value=float(ours.get("pad_value", ModelContract.pad_value)),
            extra={LABELS_KEY: ours[LABELS_KEY]} if LABELS_KEY in ours else {})
    except ValueError as exc:
        raise ContractError(f"{path}: malformed detbench metadata or option value ({exc})") from exc
    if contract.resize not in RESIZE_MODES:
        raise ContractError(f"{path}: resize {contract.resize!r} is not one of {RESIZE_MODES} (--resize)")
    if contract.label_space not in LABEL_SPACES:
        raise ContractError(f"{path}: label space {contract.label_space!r} is not one of {LABEL_SPACES} (--label-space)")
    if contract.label_space == "names" and labels_problem(ours.get(LABELS_KEY)):
        raise ContractError(f"{path}: label space 'names' needs the model's class names ({PREFIX}{LABELS_KEY}: "
                            f"{labels_problem(ours.get(LABELS_KEY))}); pass --labels FILE (one name per line)")
    if contract.input_height <= 0 or contract.input_width <= 0:
        raise ContractError(f"{path}: input size {contract.input_height}x{contract.input_width} is not positive (--input-size)")
    return contract


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON next to ``path`` and rename it into place (never a half-written file)."""
    return write_text_atomic(path, json.dumps(obj, separators=(",", ":")))
