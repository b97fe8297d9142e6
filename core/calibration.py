"""The image ids a quantized model records, and the refusal to score it on them.

``quantization.quantize`` writes into an INT8 file the COCO image ids it was calibrated on
(``detbench.calibration_image_ids``) and those an accuracy-driven choice was made on
(``detbench.selection_image_ids``); evaluation (``eval.coco``, ``eval.ray_eval``) reads them
to refuse a biased score. It lives in ``core`` because both sides need it and evaluation sits
below ``quantization`` in the layers: reading a contract's metadata needs nothing above core.
"""

from __future__ import annotations

import json
from typing import Iterable

from core.contract import PREFIX, ModelContract
from core.errors import ConfigError, ExportError

CALIBRATION_IDS_KEY = "calibration_image_ids"
SELECTION_IDS_KEY = "selection_image_ids"


def calibration_ids(contract: ModelContract) -> list[int]:
    """The COCO image ids a quantized model was calibrated on (empty for a float model)."""
    return _recorded_ids(contract, CALIBRATION_IDS_KEY)


def selection_ids(contract: ModelContract) -> list[int]:
    """The COCO image ids accuracy-driven choices (layers kept float) were made on (empty if none)."""
    return _recorded_ids(contract, SELECTION_IDS_KEY)


def _recorded_ids(contract: ModelContract, key: str) -> list[int]:
    raw = contract.extra.get(key)
    if not raw:
        return []
    try:
        return [int(i) for i in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise ExportError(f"model {contract.name!r}: malformed {PREFIX}{key} ({exc})") from exc


def calibration_overlap(contract: ModelContract, image_ids: Iterable[int]) -> list[int]:
    """The ids among ``image_ids`` the model was calibrated or tuned on (sorted; empty = disjoint)."""
    own = set(calibration_ids(contract)) | set(selection_ids(contract))
    return sorted(own & {int(i) for i in image_ids})


def check_calibration_overlap(contract: ModelContract, image_ids: Iterable[int], allow: bool = False) -> list[int]:
    """Raise :class:`ConfigError` when a model would be scored on the images it was calibrated on or
    whose accuracy chose its recipe (unless ``allow``); returns the overlap."""
    overlap = calibration_overlap(contract, image_ids)
    if overlap and not allow:
        wanted = {int(i) for i in image_ids}
        calibrated = sorted(set(calibration_ids(contract)) & wanted)
        selected = sorted(set(selection_ids(contract)) & wanted)
        parts = []
        if calibrated:
            parts.append(f"calibrated on {len(calibrated)} of the {len(wanted)} images selected for evaluation "
                         f"(ids {_shown(calibrated)})")
        if selected:
            parts.append(f"had its float layers chosen on {len(selected)} of the {len(wanted)} images selected for "
                         f"evaluation (selection ids {_shown(selected)})")
        raise ConfigError(
            f"model {contract.name!r} was {' and '.join(parts)}; its accuracy on them is biased. Select other "
            "images (--image-ids) or pass --allow-calibration-overlap to score it anyway.")
    return overlap


def _shown(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:8])) + (" ..." if len(ids) > 8 else "")
