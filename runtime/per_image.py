"""Per-image cost of a detector: operations executed and latency, image by image.

The seed's second claim ("two-stage detectors spend compute per proposal; one-stage
compute is constant whatever the image") is a statement about the distribution of cost
over images. :func:`measure_images` gives that distribution: for each image the MACs the
graph executed on it (:class:`counting.image_counts.ImageCounter`, measured shapes) and the
latency of a plain session of ``backend`` on the same tensor (the counting session exposes
intermediates, so it is never the one timed). Latency per image is the median of
``repeats`` timed runs after one untimed run of that image.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core.contract import read_contract
from core.errors import ConfigError
from core.images import load_rgb, prepare_for


@dataclass
class PerImage:
    """Per-image figures of one model (``images``: one dict per image, in order measured)."""

    model: str
    backend: str
    images: list[dict] = field(default_factory=list)
    stopped_by_budget: bool = False
    seconds: float = 0.0

    def to_record(self) -> dict:
        return {"images": self.images, "n": len(self.images), "backend": self.backend,
                "stopped_by_budget": self.stopped_by_budget, "seconds": self.seconds,
                "note": "macs: MACs executed on the image (analyzer, measured shapes; 1 MAC = 2 FLOPs); "
                        "latency_ms: median of the timed runs of that image on the backend"}


def measure_images(path, images: list[Path], *, backend: str = "cpu", repeats: int = 1,
                   budget_seconds: float | None = None, min_images: int = 2,
                   progress: Callable[[int, int, str], None] | None = None, threads: int | None = None) -> PerImage:
    """MACs and latency of ``path`` on each of ``images`` (see the module docstring).

    ``budget_seconds`` stops after the image that crosses it, once ``min_images`` are done
    (the record says so); ``progress(done, total, image name)`` is called after each image.
    """
    from counting.image_counts import ImageCounter
    from runtime.backends import BackendSettings, get_backend

    if not images:
        raise ConfigError("per-image measurement needs at least one image")
    if repeats < 1:
        raise ConfigError(f"per-image repeats {repeats}: must be at least 1")
    path = Path(path)
    contract = read_contract(path)
    started = time.perf_counter()
    counter = ImageCounter(path)
    result = PerImage(model=contract.name, backend=backend)
    with get_backend(backend).open(path, BackendSettings(threads=threads)) as runner:
        for i, image in enumerate(images):
            tensor, _ = prepare_for(load_rgb(image), contract)
            runner.run(tensor)  # untimed: the first run of an input shape pays one-off allocation
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                runner.run(tensor)
                times.append((time.perf_counter() - t0) * 1e3)
            counted = counter.count(image)
            result.images.append({**counted.to_dict(), "latency_ms": statistics.median(times)})
            if progress:
                progress(i + 1, len(images), Path(image).name)
            if (budget_seconds is not None and i + 1 >= min_images and i + 1 < len(images)
                    and time.perf_counter() - started > budget_seconds):
                result.stopped_by_budget = True
                break
    result.seconds = time.perf_counter() - started
    return result
