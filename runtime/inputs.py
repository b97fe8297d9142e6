"""The real images backends are timed and compared on, and the contract tensor made from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.contract import INPUT_NAME
from core.errors import ConfigError, DatasetError
from core.images import load_rgb, prepare_for


def busiest_images(n: int) -> list[Path]:
    """The ``n`` COCO val2017 images of the shared subset with the most annotated (non-crowd)
    objects, busiest first (ties by image id): deterministic, and busy enough that NMS has real work.

    Raises DatasetError naming the folder and the ``--image`` option when the subset is absent.
    """
    from core.paths import data_dir

    root = data_dir() / "coco-val2017-subset"
    images = root / "val2017"
    if not images.is_dir():
        raise DatasetError(f"no COCO images at {images}; pass --image PATH or set DETBENCH_DATA")
    annotations = root / "annotations" / "instances_val2017.json"
    found: list[Path] = []
    if annotations.is_file():
        with open(annotations, encoding="utf-8") as fh:
            doc = json.load(fh)
        counts: dict[int, int] = {}
        for ann in doc.get("annotations", []):
            if not ann.get("iscrowd", 0):
                counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
        files = {img["id"]: img["file_name"] for img in doc.get("images", [])}
        for image_id in sorted(counts, key=lambda i: (-counts[i], i)):
            candidate = images / files.get(image_id, "")
            if candidate.is_file():
                found.append(candidate)
            if len(found) == n:
                return found
    for jpg in sorted(images.glob("*.jpg")):
        if len(found) == n:
            break
        if jpg not in found:
            found.append(jpg)
    if not found:
        raise DatasetError(f"no .jpg images in {images}; pass --image PATH")
    return found


def default_image() -> Path:
    """The COCO val2017 image of the shared subset with the most annotated objects."""
    return busiest_images(1)[0]


def input_tensor(contract, image: Path, batch: int, input_shape: list[Any], source: str) -> np.ndarray:
    """The contract tensor of ``image`` (``batch`` copies along a symbolic batch axis)."""
    tensor, _ = prepare_for(load_rgb(image), contract)
    if batch < 1:
        raise ConfigError(f"--batch {batch}: must be at least 1")
    if batch > 1:
        dim0 = input_shape[0] if input_shape else 1
        if isinstance(dim0, int):
            raise ConfigError(
                f"{source}: input {INPUT_NAME!r} has a fixed batch of {dim0}; detbench's exports are batch-1 "
                f"(their outputs boxes [K, 4] carry no image index) unless exported with `python cli.py export NAME "
                f"--batch` (NAME@batch.onnx), so --batch {batch} cannot run here. Use --batch 1, or the batch file.")
        tensor = np.ascontiguousarray(np.repeat(tensor, batch, axis=0))
    return tensor


def model_input_shape(path: Path) -> list[Any]:
    """The ``images`` input's dimensions as the ONNX file declares them (ints, or names for symbolic ones)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for value in graph.input:
        if value.name == INPUT_NAME:
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in value.type.tensor_type.shape.dim]
    return []
