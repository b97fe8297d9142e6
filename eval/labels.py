"""From a model's labels to a dataset's category ids: by COCO numbering, or by class name.

A COCO model (label space ``coco80``/``coco91``) on COCO's own categories (every category
of the annotation file has COCO's id and, when named, COCO's name for it) is mapped by
numbering, exactly as ``CocoDataset.label_map`` always did. Any other pairing is mapped by
name: the model's class names (its own ``labels`` for label space ``names``; COCO's names
for a COCO model) are matched to the annotation file's category names ignoring case and
separators (``"Traffic-Light"`` = ``"traffic light"`` = ``"traffic_light"``). Model classes
that match no category are dropped from the detections (the dataset cannot score them),
categories that match no class score zero recall; both are reported. Nothing matching at
all is a :class:`DatasetError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.errors import DatasetError

# COCO's 80 detection categories, in the order of their ids (index = coco80 label).
COCO80_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# Table values other than a category id: a label the model must never emit, and a class of
# the model the dataset has no category for (its detections are dropped, not scored).
INVALID = -1
UNMATCHED = -2


def normalize(name: str) -> str:
    """The form names are compared in: lower case, without spaces, ``_``, ``-``, ``.`` or ``/``."""
    return re.sub(r"[\s_\-./]+", "", str(name)).lower()


@dataclass
class LabelMapping:
    """``table[label]`` = category id, :data:`INVALID` or :data:`UNMATCHED`; how it was made and what matched nothing."""

    table: np.ndarray
    by: str                                   # "numbering" (COCO on COCO) or "name"
    matched: list[tuple[str, str]] = field(default_factory=list)   # (model class, dataset category)
    model_unmatched: list[str] = field(default_factory=list)
    dataset_unmatched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "matched": len(self.matched), "model_unmatched": list(self.model_unmatched),
                "dataset_unmatched": list(self.dataset_unmatched)}


def model_class_names(label_space: str, labels: list[str] | None) -> dict[int, str]:
    """label -> class name for a label space (COCO's names for coco80/coco91)."""
    from eval.dataset import COCO80_CATEGORY_IDS

    if label_space == "names":
        return dict(enumerate(labels or []))
    if label_space == "coco80":
        return dict(enumerate(COCO80_NAMES))
    return dict(zip(COCO80_CATEGORY_IDS, COCO80_NAMES))


def is_coco_numbering(categories: list[dict]) -> bool:
    """Whether an annotation file's categories are COCO's own: COCO ids, with COCO's names where named."""
    from eval.dataset import COCO80_CATEGORY_IDS

    coco = dict(zip(COCO80_CATEGORY_IDS, COCO80_NAMES))
    for cat in categories:
        name = cat.get("name")
        if name is not None and (cat["id"] not in coco or normalize(name) != normalize(coco[cat["id"]])):
            return False
    return True


def label_mapping(dataset, label_space: str, labels: list[str] | None = None) -> LabelMapping:
    """How the labels of a model in ``label_space`` (with class names ``labels``) become ``dataset``'s category ids."""
    categories = dataset.data["categories"]
    if label_space != "names" and is_coco_numbering(categories):
        return _by_numbering(dataset, label_space)
    try:
        return _by_name(dataset, label_space, labels)
    except DatasetError:
        # COCO's ids under other names (e.g. placeholders): mapped by numbering, as always
        if label_space != "names" and set(dataset.category_ids) <= _coco_ids():
            return _by_numbering(dataset, label_space)
        raise


def _coco_ids() -> set[int]:
    from eval.dataset import COCO80_CATEGORY_IDS

    return set(COCO80_CATEGORY_IDS)


def _by_numbering(dataset, label_space: str) -> LabelMapping:
    table = dataset.label_map(label_space).copy()
    # a COCO class the annotation file does not list (a subset of COCO) is dropped, not refused
    table[(table >= 0) & ~np.isin(table, dataset.category_ids)] = UNMATCHED
    return LabelMapping(table, "numbering")


def _by_name(dataset, label_space: str, labels: list[str] | None) -> LabelMapping:
    categories = dataset.data["categories"]
    classes = model_class_names(label_space, labels)
    by_name: dict[str, list[dict]] = {}
    for cat in categories:
        by_name.setdefault(normalize(cat.get("name", "")), []).append(cat)
    size = max(classes) + 1 if classes else 0
    table = np.full(size, INVALID, dtype=np.int64)
    mapping = LabelMapping(table, "name")
    used = set()
    for label, name in sorted(classes.items()):
        hits = by_name.get(normalize(name), [])
        if hits:
            table[label] = int(hits[0]["id"])
            used.add(int(hits[0]["id"]))
            mapping.matched.append((name, str(hits[0].get("name"))))
        else:
            table[label] = UNMATCHED
            mapping.model_unmatched.append(name)
    mapping.dataset_unmatched = [str(c.get("name", c["id"])) for c in categories if int(c["id"]) not in used]
    if not mapping.matched:
        raise DatasetError(
            f"{dataset.annotations_path}: none of the model's {len(classes)} classes matches a category of the "
            f"dataset by name (compared ignoring case and separators). Model classes: {_few(mapping.model_unmatched)}; "
            f"dataset categories: {_few(mapping.dataset_unmatched)}. Give the model its class names "
            "(describe file: labels = [...] or labels_file) or evaluate it on a dataset of its classes.")
    return mapping


def _few(names: list[str], count: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:count])
    return shown + (f", ... ({len(names)} in all)" if len(names) > count else "")
