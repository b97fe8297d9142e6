"""A COCO detection dataset on disk: the annotation file, its images folder, and label maps.

COCO's own layout is ``<dir>/annotations/instances_<split>.json`` plus ``<dir>/<split>/*.jpg``;
an annotation file and an images folder can also be given separately. Loading checks
that the JSON is a COCO instances file (``images``, ``annotations``, ``categories`` with
the fields COCOeval uses) and raises :class:`DatasetError` naming the file otherwise.

Label spaces (see ``core.contract``): ``coco80`` labels are indices 0..79 into COCO's
80 categories sorted by id (Darknet's ``coco.names`` order), mapped here to COCO's
91-id scheme; ``coco91`` labels already are COCO category ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from core.contract import LABEL_SPACES, sha256_file
from core.errors import ConfigError, DatasetError

DEFAULT_SPLIT = "val2017"

# COCO's 80 detection categories in their 91-id numbering, sorted (index = coco80 label).
COCO80_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)


@dataclass(frozen=True)
class CocoImage:
    """One entry of the annotation file's ``images`` list, with its file's location."""

    id: int
    file_name: str
    width: int
    height: int
    path: Path


@dataclass
class CocoDataset:
    """A loaded, checked COCO instances file and the folder holding its images.

    ``data`` is the parsed JSON (handed to pycocotools/faster-coco-eval unchanged);
    ``sha256`` is the annotation file's digest (recorded with every evaluation).
    """

    annotations_path: Path
    images_dir: Path
    data: dict[str, Any]
    sha256: str
    images: dict[int, CocoImage] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The dataset's name for reports: the folder holding ``annotations/``, else the annotation file's stem."""
        parent = self.annotations_path.parent
        return parent.parent.name if parent.name == "annotations" and parent.parent.name else self.annotations_path.stem

    @property
    def category_ids(self) -> list[int]:
        return sorted(int(c["id"]) for c in self.data["categories"])

    @property
    def category_names(self) -> dict[int, str]:
        return {int(c["id"]): str(c.get("name", c["id"])) for c in self.data["categories"]}

    def select(self, limit: int | None = None, image_ids: Iterable[int] | None = None) -> list[CocoImage]:
        """The images to evaluate, in ascending id order: ``image_ids`` if given, else all; then the first ``limit``."""
        if image_ids is not None:
            wanted = sorted({int(i) for i in image_ids})
            unknown = [i for i in wanted if i not in self.images]
            if unknown:
                shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
                raise DatasetError(f"--image-ids: {len(unknown)} id(s) are not in {self.annotations_path}: {shown}")
            chosen = [self.images[i] for i in wanted]
        else:
            chosen = [self.images[i] for i in sorted(self.images)]
        if limit is not None:
            if limit <= 0:
                raise ConfigError(f"--limit {limit}: must be a positive number of images")
            chosen = chosen[:limit]
        if not chosen:
            raise DatasetError(f"{self.annotations_path} lists no images to evaluate")
        return chosen

    def check_images_present(self, selection: list[CocoImage]) -> list[CocoImage]:
        """The selected images whose file is missing; raises when *none* is present.

        A few missing files are a damaged copy of the dataset (reported and skipped);
        none at all means the images folder is not the one these annotations describe.
        """
        if not self.images_dir.is_dir():
            raise DatasetError(f"images folder not found: {self.images_dir} (pass --images DIR, or --coco DIR "
                               f"holding annotations/ and {DEFAULT_SPLIT}/)")
        missing = [img for img in selection if not img.path.is_file()]
        if selection and len(missing) == len(selection):
            examples = ", ".join(img.file_name for img in selection[:3])
            raise DatasetError(
                f"images folder {self.images_dir} does not match {self.annotations_path}: none of the "
                f"{len(selection)} selected image files is there (e.g. {examples}). Pass the folder holding "
                "these files with --images DIR.")
        return missing

    def label_map(self, label_space: str) -> np.ndarray:
        """Array ``m`` with ``m[label]`` = COCO category id; a label outside it (or mapped to ``-1``) is invalid.

        Raises :class:`DatasetError` when the annotation file's categories cannot be
        COCO's (a ``coco80`` model needs category ids from COCO's 80).
        """
        if label_space not in LABEL_SPACES or label_space == "names":
            raise ConfigError(f"label space {label_space!r} is not one of {LABEL_SPACES} (see --label-space)")
        ids = self.category_ids
        if label_space == "coco80":
            foreign = sorted(set(ids) - set(COCO80_CATEGORY_IDS))
            if foreign:
                raise DatasetError(
                    f"{self.annotations_path}: category ids {foreign[:10]} are not among COCO's 80 detection "
                    "categories, so a coco80 model's labels cannot be mapped to them")
            return np.asarray(COCO80_CATEGORY_IDS, dtype=np.int64)
        # coco91 labels are category ids already; 0 is torchvision's background and never a category.
        table = np.arange(max(max(ids), 90) + 1, dtype=np.int64)
        table[0] = -1
        return table


def resolve_paths(coco_dir: Path | None = None, annotations: Path | None = None, images: Path | None = None,
                  split: str = DEFAULT_SPLIT) -> tuple[Path, Path]:
    """``(annotation file, images folder)`` from ``--coco DIR`` and/or explicit ``--annotations``/``--images``.

    ``--coco DIR`` takes COCO's layout (``annotations/instances_<split>.json`` + ``<split>/``)
    and the other common one: the single ``annotations/*.json`` (or the single
    ``instances_*.json`` among several) with the images in ``images/``, ``<split>/`` or the
    folder named after the file (``instances_train.json`` -> ``train/``).
    """
    if coco_dir is None and (annotations is None or images is None):
        raise ConfigError("say where the dataset is: --coco DIR (COCO layout: annotations/instances_val2017.json "
                          "and val2017/, or annotations/*.json and images/), or both --annotations FILE and --images DIR")
    if coco_dir is not None:
        coco_dir = Path(coco_dir)
        if not coco_dir.is_dir():
            raise DatasetError(f"--coco {coco_dir}: no such folder")
    ann = Path(annotations) if annotations is not None else _find_annotations(Path(coco_dir), split)
    img = Path(images) if images is not None else _find_images(Path(coco_dir), ann, split)
    return ann, img


def _find_annotations(coco_dir: Path, split: str) -> Path:
    standard = coco_dir / "annotations" / f"instances_{split}.json"
    if standard.is_file():
        return standard
    found = sorted((coco_dir / "annotations").glob("*.json")) if (coco_dir / "annotations").is_dir() else []
    instances = [p for p in found if p.name.startswith("instances_")]
    if len(found) == 1:
        return found[0]
    if len(instances) == 1:
        return instances[0]
    if found:
        raise DatasetError(f"--coco {coco_dir}: annotations/ holds {len(found)} JSON files "
                           f"({', '.join(p.name for p in found[:6])}); say which with --annotations FILE")
    return standard  # reported as not found, naming the layout expected


def _find_images(coco_dir: Path, ann: Path, split: str) -> Path:
    stem = ann.stem[len("instances_"):] if ann.stem.startswith("instances_") else ann.stem
    for candidate in (coco_dir / split, coco_dir / stem, coco_dir / "images"):
        if candidate.is_dir():
            return candidate
    return coco_dir / split


def load_coco(coco_dir: Path | None = None, annotations: Path | None = None, images: Path | None = None,
              split: str = DEFAULT_SPLIT) -> CocoDataset:
    """Load and check a COCO instances file; see :func:`resolve_paths` for the arguments."""
    ann_path, images_dir = resolve_paths(coco_dir, annotations, images, split)
    data = read_annotations(ann_path)
    dataset = CocoDataset(ann_path, images_dir, data, sha256_file(ann_path))
    for entry in data["images"]:
        image = CocoImage(int(entry["id"]), str(entry["file_name"]), int(entry["width"]), int(entry["height"]),
                          images_dir / str(entry["file_name"]))
        dataset.images[image.id] = image
    return dataset


def read_annotations(path: Path) -> dict[str, Any]:
    """Parse ``path`` and check it is a COCO instances file (raises :class:`DatasetError` naming what is wrong)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path} (pass --annotations FILE, or --coco DIR holding "
                           f"annotations/instances_{DEFAULT_SPLIT}.json)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    problems = coco_problems(data)
    if problems:
        raise DatasetError(f"{path} is not a COCO instances annotation file:\n  - " + "\n  - ".join(problems))
    return data


def coco_problems(data: Any, limit: int = 8) -> list[str]:
    """What keeps ``data`` from being a COCO instances file (empty list = fine), each naming its entry.

    Checked: the three lists; images with an integer id (unique), a file name (unique) and
    positive integer width/height; categories with an integer id and a name (both unique,
    names compared as the name mapping compares them); annotations with a unique id, an
    image and a category that exist, a bbox of 4 finite numbers with non-negative size,
    an ``iscrowd`` of 0 or 1 and a numeric ``area``.
    """
    if not isinstance(data, dict):
        return [f"top level is a {type(data).__name__}, COCO wants an object with images, annotations, categories"]
    problems = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append(f"no {key!r} list")
    if problems:
        return problems
    from eval.labels import normalize

    image_ids, file_names = set(), set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or any(k not in img for k in ("id", "file_name", "width", "height")):
            problems.append(f"images[{i}] lacks one of id, file_name, width, height")
        elif not _is_int(img["id"]):
            problems.append(f"images[{i}]: id {img['id']!r} is not an integer")
        elif img["id"] in image_ids:
            problems.append(f"images[{i}]: duplicate image id {img['id']}")
        elif not isinstance(img["file_name"], str) or not img["file_name"]:
            problems.append(f"images[{i}] (id {img['id']}): file_name {img['file_name']!r} is not a file name")
        elif img["file_name"] in file_names:
            problems.append(f"images[{i}] (id {img['id']}): file_name {img['file_name']!r} is listed twice")
        elif not all(_is_int(img[k]) and img[k] > 0 for k in ("width", "height")):
            problems.append(f"images[{i}] (id {img['id']}, {img['file_name']}): width/height "
                            f"{img['width']!r} x {img['height']!r} are not positive integers")
        else:
            image_ids.add(img["id"])
            file_names.add(img["file_name"])
        if len(problems) >= limit:
            return problems
    category_ids, names = set(), {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            problems.append(f"categories[{i}] has no id")
        elif not _is_int(cat["id"]):
            problems.append(f"categories[{i}]: id {cat['id']!r} is not an integer")
        elif cat["id"] in category_ids:
            problems.append(f"categories[{i}]: duplicate category id {cat['id']}")
        else:
            category_ids.add(cat["id"])
            if "name" in cat:
                key = normalize(cat["name"]) if isinstance(cat["name"], str) else ""
                if not key:
                    problems.append(f"categories[{i}] (id {cat['id']}): name {cat['name']!r} is empty or not a string")
                elif key in names:
                    problems.append(f"categories[{i}] (id {cat['id']}): name {cat['name']!r} is the name of category "
                                    f"id {names[key]} too (names are compared ignoring case and separators)")
                else:
                    names[key] = cat["id"]
    if len(problems) >= limit:
        return problems
    annotation_ids = set()
    for i, ann in enumerate(data["annotations"]):
        problem = _annotation_problem(ann, image_ids, category_ids, annotation_ids)
        if problem:
            where = f"annotations[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
            problems.append(f"{where} {problem}")
        if len(problems) >= limit:
            break
    return problems


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _annotation_problem(ann, image_ids: set, category_ids: set, annotation_ids: set) -> str | None:
    if not isinstance(ann, dict) or any(k not in ann for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")):
        return "lacks one of id, image_id, category_id, bbox, area, iscrowd"
    if ann["id"] in annotation_ids:
        return f"duplicates annotation id {ann['id']}"
    if _hashable(ann["id"]):
        annotation_ids.add(ann["id"])
    if not _hashable(ann["image_id"]) or ann["image_id"] not in image_ids:
        return f"refers to image id {ann['image_id']!r}, which is not in images"
    if not _hashable(ann["category_id"]) or ann["category_id"] not in category_ids:
        return f"has category id {ann['category_id']!r}, which is not in categories"
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4):
        return f"bbox {bbox!r} is not [x, y, w, h]" + (f" ({len(bbox)} values)" if isinstance(bbox, list) else "")
    if not all(_finite(v) for v in bbox):
        return f"bbox {bbox!r} holds a value that is not a finite number"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox {bbox!r} has a negative width or height"
    if ann["iscrowd"] not in (0, 1) or isinstance(ann["iscrowd"], bool):
        return f"iscrowd {ann['iscrowd']!r} is not 0 or 1"
    if not _finite(ann["area"]) or ann["area"] < 0:
        return f"area {ann['area']!r} is not a non-negative number"
    return None


def _hashable(value) -> bool:
    return isinstance(value, (int, str, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
