"""models.toml as frozen specs.

Models are registered data: every configuration lives in models.toml and nowhere in
code, except inside the exporter that builds its family. Unknown names and keys are
errors that list the valid ones, so a typo never silently changes a measurement.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from core.contract import COCO_LABEL_SPACES, RESIZE_MODES
from core.errors import RegistryError
from core.names import check_name
from core.paths import models_toml
from exporters.frameworks import FRAMEWORKS as DECLARED_FRAMEWORKS

FRAMEWORKS = tuple(DECLARED_FRAMEWORKS)  # the frameworks that declare an exporter (exporters.frameworks)
_MODEL_KEYS = {
    "family", "framework", "paper", "description", "input_size", "resize", "label_space",
    "score_threshold", "iou_threshold", "max_detections", "source", "weights", "published", "run_sizes",
}
_REQUIRED = _MODEL_KEYS - {"paper", "description", "weights", "published", "run_sizes"}
_WEIGHTS_KEYS = {"file", "url", "sha256", "sha256_prefix", "format"}
_PUBLISHED_KEYS = {"value", "source", "convention", "unit"}
PUBLISHED_FIGURES = ("map50", "map", "params", "gflops", "gmacs")


@dataclass(frozen=True)
class Published:
    """A figure as its source states it (never measured here)."""

    value: float
    source: str
    convention: str = ""


@dataclass(frozen=True)
class WeightsSpec:
    """Where official weights come from. ``sha256`` is the full digest; ``sha256_prefix``
    is what a publisher embeds in file names when that is all it publishes."""

    format: str
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None

    @property
    def public(self) -> bool:
        return self.url is not None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    framework: str
    input_size: tuple[int, int]  # (H, W)
    resize: str
    label_space: str
    score_threshold: float
    iou_threshold: float
    max_detections: int
    source: Mapping[str, Any]
    weights: WeightsSpec
    published: Mapping[str, Published] = field(default_factory=dict)
    paper: bool = False
    description: str = ""
    # Further input sizes `run` measures by default (a fully convolutional network runs at any
    # size its strides divide): the registered size stays the row published figures apply to.
    run_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def height(self) -> int:
        return self.input_size[0]

    @property
    def width(self) -> int:
        return self.input_size[1]


def _fail(path: Path, name: str, msg: str) -> RegistryError:
    return RegistryError(f"{path}: model {name!r}: {msg}")


def _parse(name: str, raw: dict[str, Any], path: Path) -> ModelSpec:
    check_name(name, f"{path}: [models.{name}]", RegistryError)
    if not isinstance(raw, dict):
        raise _fail(path, name, f"must be a table ([models.NAME]), got {type(raw).__name__}")
    unknown = set(raw) - _MODEL_KEYS
    if unknown:
        raise _fail(path, name, f"unknown key(s) {sorted(unknown)}; valid keys: {sorted(_MODEL_KEYS)}")
    missing = _REQUIRED - set(raw)
    if missing:
        raise _fail(path, name, f"missing key(s) {sorted(missing)}")
    if raw["framework"] not in FRAMEWORKS:
        raise _fail(path, name, f"framework {raw['framework']!r} is not one of {FRAMEWORKS}")
    if raw["resize"] not in RESIZE_MODES:
        raise _fail(path, name, f"resize {raw['resize']!r} is not one of {RESIZE_MODES}")
    if raw["label_space"] not in COCO_LABEL_SPACES:
        raise _fail(path, name, f"label_space {raw['label_space']!r} is not one of {COCO_LABEL_SPACES}")
    size = raw["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise _fail(path, name, f"input_size must be [height, width] in pixels, got {size!r}")
    for key in ("score_threshold", "iou_threshold"):
        value = raw[key]
        # ``not 0 <= v <= 1`` also refuses NaN (every comparison with it is False); TOML has nan and inf
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise _fail(path, name, f"{key} must be a number in 0..1, got {value!r}")
    if type(raw["max_detections"]) is not int or raw["max_detections"] <= 0:
        raise _fail(path, name, f"max_detections must be a positive integer, got {raw['max_detections']!r}")
    weights = dict(raw.get("weights", {"format": "none"}))
    unknown = set(weights) - _WEIGHTS_KEYS
    if unknown:
        raise _fail(path, name, f"unknown weights key(s) {sorted(unknown)}; valid: {sorted(_WEIGHTS_KEYS)}")
    published = {}
    for figure, entry in raw.get("published", {}).items():
        if figure not in PUBLISHED_FIGURES:
            raise _fail(path, name, f"unknown published figure {figure!r}; valid: {list(PUBLISHED_FIGURES)}")
        unknown = set(entry) - _PUBLISHED_KEYS
        if unknown or "value" not in entry or "source" not in entry:
            raise _fail(path, name, f"published.{figure} needs value and source (keys: {sorted(_PUBLISHED_KEYS)})")
        published[figure] = Published(float(entry["value"]), entry["source"], entry.get("convention", ""))
    run_sizes = []
    for item in raw.get("run_sizes", []):
        pair = [item, item] if isinstance(item, int) else item
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair)):
            raise _fail(path, name, f"run_sizes entries are N or [height, width] in pixels, got {item!r}")
        if tuple(pair) != (size[0], size[1]) and tuple(pair) not in run_sizes:
            run_sizes.append(tuple(pair))
    return ModelSpec(
        name=name,
        family=raw["family"],
        framework=raw["framework"],
        input_size=(size[0], size[1]),
        resize=raw["resize"],
        label_space=raw["label_space"],
        score_threshold=float(raw["score_threshold"]),
        iou_threshold=float(raw["iou_threshold"]),
        max_detections=int(raw["max_detections"]),
        source=MappingProxyType(dict(raw["source"])),
        weights=WeightsSpec(**weights),
        published=MappingProxyType(published),
        paper=bool(raw.get("paper", False)),
        description=raw.get("description", ""),
        run_sizes=tuple(run_sizes),
    )


class Registry:
    """All registered models, in file order."""

    def __init__(self, specs: dict[str, ModelSpec], path: Path):
        self._specs = specs
        self.path = path

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def get(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise RegistryError(f"unknown model {name!r}; registered models: {', '.join(self._specs)}") from None

    def select(self, names: list[str] | None) -> list[ModelSpec]:
        """The named specs (all when ``names`` is empty), checking every name first."""
        if not names:
            return list(self)
        for n in names:
            check_name(n, "model name given", RegistryError)
        unknown = [n for n in names if n not in self._specs]
        if unknown:
            raise RegistryError(f"unknown model(s) {unknown}; registered models: {', '.join(self._specs)}")
        return [self._specs[n] for n in names]


def load_registry(path: Path | None = None) -> Registry:
    path = Path(path) if path else models_toml()
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise RegistryError(f"model registry not found: {path} (set DETBENCH_MODELS to another file)") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path} is not valid TOML: {exc}") from exc
    extra = set(doc) - {"models"}
    if extra:
        raise RegistryError(f"{path}: unknown top-level table(s) {sorted(extra)}; only [models.NAME] tables are allowed")
    models = doc.get("models", {})
    if not isinstance(models, dict):
        raise RegistryError(f"{path}: models must be tables [models.NAME], got {type(models).__name__}")
    # Names become file names: two that differ only in case would share one file on a
    # case-insensitive file system (and are one typo apart on any).
    seen: dict[str, str] = {}
    for name in models:
        other = seen.setdefault(str(name).lower(), name)
        if other != name:
            raise RegistryError(f"{path}: models {other!r} and {name!r} differ only in case; rename one "
                                "(their files would collide on a case-insensitive file system)")
    return Registry({name: _parse(name, raw, path) for name, raw in models.items()}, path)
