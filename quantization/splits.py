"""Three disjoint image sets: calibration, selection, evaluation.

Calibration sets the INT8 ranges; selection is where any choice made by looking at accuracy is
made (layers kept float, the configuration `tune` names); evaluation is scored only afterwards.
With the shared 144 COCO images the default is 16 / 32 / 96: calibration ranges barely move
past a few dozen images, so calibration stays small and evaluation keeps two thirds of the
images (the paired bootstrap interval on 96 images is what every reported drop carries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from core.errors import ConfigError, DatasetError

CALIBRATION = 16
SELECTION = 32


@dataclass(frozen=True)
class Split:
    calibration: tuple[int, ...]
    selection: tuple[int, ...]
    evaluation: tuple[int, ...]
    seed: int

    def describe(self) -> str:
        return (f"split seed {self.seed}: {len(self.calibration)} calibration, {len(self.selection)} selection, "
                f"{len(self.evaluation)} evaluation images (disjoint)")


def split_ids(image_ids: Iterable[int], seed: int = 0, calibration: int = CALIBRATION,
              selection: int = SELECTION) -> Split:
    """A seeded random partition of ``image_ids`` (each set sorted); the rest is evaluation."""
    ids = sorted({int(i) for i in image_ids})
    if calibration < 1 or selection < 1:
        raise ConfigError(f"calibration ({calibration}) and selection ({selection}) need at least one image each")
    if calibration + selection + 2 > len(ids):
        raise DatasetError(f"{len(ids)} images cannot give {calibration} calibration + {selection} selection images "
                           "and at least 2 evaluation images: use a larger COCO folder or smaller sets")
    order = np.random.default_rng(seed).permutation(len(ids))
    picked = [ids[i] for i in order]
    return Split(calibration=tuple(sorted(picked[:calibration])),
                 selection=tuple(sorted(picked[calibration:calibration + selection])),
                 evaluation=tuple(sorted(picked[calibration + selection:])), seed=seed)
