"""Darknet .weights files: reading, writing, and deterministic random weights.

File layout (Darknet's ``load_weights``): int32 ``major``, ``minor``, ``revision``, then
``seen`` (images trained on) as int64 when ``major * 10 + minor >= 2`` (and both < 1000),
else int32; then, for every ``[convolutional]`` layer in cfg order, float32 arrays:
biases (the BatchNorm beta when ``batch_normalize=1``), [BN scales, rolling mean,
rolling variance], kernel ``[filters, in_channels / groups, size, size]``.

A file whose float count differs from what the cfg implies is refused with both counts:
Darknet itself would load it silently shifted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.darknet.cfg import Plan, Shortcut
from core.errors import WeightsError
from core.files import atomic_file

HEADER_DTYPE = np.dtype("<i4")
FLOAT = np.dtype("<f4")
# What detbench writes for random weights: version 0.2.0 (int64 seen), seen = 0.
WRITE_VERSION = (0, 2, 0)
HEAD_GAIN = 0.3
RESIDUAL_GAIN = 0.25


@dataclass(frozen=True)
class ConvWeights:
    """One convolution's arrays as Darknet stores them (BN arrays are None without BN)."""

    biases: np.ndarray
    weights: np.ndarray  # [filters, in/groups, size, size]
    scales: np.ndarray | None = None
    rolling_mean: np.ndarray | None = None
    rolling_variance: np.ndarray | None = None


@dataclass(frozen=True)
class DarknetWeights:
    major: int
    minor: int
    revision: int
    seen: int
    convs: tuple[ConvWeights, ...]
    source: str  # the file read, or "random-init (seed ...)"

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}"


def header_bytes(major: int, minor: int) -> int:
    """12 bytes of version plus 8 (int64) or 4 (int32) bytes of ``seen``, as Darknet decides."""
    wide_seen = (major * 10 + minor) >= 2 and major < 1000 and minor < 1000
    return 12 + (8 if wide_seen else 4)


def read_weights(path: Path, plan: Plan) -> DarknetWeights:
    """Load ``path`` for ``plan``; the float count must match the cfg exactly and every value be finite."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a directory, not a weights file: pass the .weights file inside it with "
                           "--weights PATH")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (pass --weights PATH, or fetch the official file)")
    size = path.stat().st_size
    if size < 16:
        raise WeightsError(f"{path}: {size} bytes is too short for a Darknet weights header (at least 16 bytes)")
    with open(path, "rb") as fh:
        major, minor, revision = (int(v) for v in np.frombuffer(fh.read(12), HEADER_DTYPE))
        hdr = header_bytes(major, minor)
        version = f"{major}.{minor}.{revision}"
        # Darknet has only ever written versions 0.x.y and 1.x.y; anything else is not its header.
        implausible = (f" Its header version {version} is implausible: this is probably not a Darknet .weights file."
                       if not (0 <= major < 1000 and 0 <= minor < 1000 and 0 <= revision < 1000) else "")
        seen = int(np.frombuffer(fh.read(hdr - 12), "<i8" if hdr == 20 else "<i4")[0])
        body = size - hdr
        expected = plan.float_count
        if body % 4:
            raise WeightsError(
                f"{path}: {body} bytes after the {hdr}-byte header (Darknet {version}) is not a whole "
                f"number of float32 values; {plan.cfg.path.name} at this size expects {expected} floats "
                f"({expected * 4 + hdr} bytes). The file is truncated or corrupt.{implausible}")
        found = body // 4
        if found != expected:
            what = "truncated" if found < expected else "too long"
            raise WeightsError(
                f"{path}: expected {expected} floats for {plan.cfg.path.name} ({len(plan.convs)} convolutional layers), "
                f"found {found} after the {hdr}-byte Darknet {version} header ({what} by "
                f"{abs(found - expected)} floats). These weights do not belong to this cfg (or the file is "
                f"damaged).{implausible}")
        data = np.frombuffer(fh.read(), FLOAT)
    convs = _split(data, plan)
    _check_finite(path, plan, convs)
    return DarknetWeights(major, minor, revision, seen, tuple(convs), str(path))


def _check_finite(path: Path, plan: Plan, convs: list[ConvWeights]) -> None:
    """NaN or Inf in a weights body poisons every output downstream: name each layer and array holding one."""
    problems = []
    for conv, arrays in zip(plan.convs, convs):
        for label in ("biases", "scales", "rolling_mean", "rolling_variance", "weights"):
            array = getattr(arrays, label)
            if array is None:
                continue
            bad = ~np.isfinite(array)
            if bad.any():
                problems.append(f"layer {conv.index} [convolutional] (line {conv.line}) {label}: "
                                f"{int(np.isnan(array).sum())} NaN, {int(np.isinf(array).sum())} Inf "
                                f"of {array.size} values")
    if problems:
        shown = problems[:5] + ([f"... and {len(problems) - 5} more array(s)"] if len(problems) > 5 else [])
        raise WeightsError(f"{path}: non-finite values in the weights for {plan.cfg.path.name}:\n  - "
                           + "\n  - ".join(shown) + "\nThe file is damaged or was written from a diverged "
                           "training run; use the official weights (python cli.py fetch NAME) or --random-init.")


def _split(data: np.ndarray, plan: Plan) -> list[ConvWeights]:
    convs, offset = [], 0

    def take(n: int) -> np.ndarray:
        nonlocal offset
        chunk = data[offset:offset + n]
        offset += n
        return chunk

    for conv in plan.convs:
        n = conv.filters
        biases = take(n)
        scales = mean = var = None
        if conv.batch_normalize:
            scales, mean, var = take(n), take(n), take(n)
        kernel = take(conv.weight_count).reshape(n, conv.in_channels // conv.groups, conv.size, conv.size)
        convs.append(ConvWeights(biases, kernel, scales, mean, var))
    assert offset == data.size  # read_weights checked the count
    return convs


def seed_for(name: str) -> int:
    """A stable 64-bit seed from a model name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def random_weights(plan: Plan, seed_name: str) -> DarknetWeights:
    """Deterministic, well-conditioned random weights for ``plan``.

    Each convolution + BN + leaky roughly preserves the second moment of its input:
    kernels are He-scaled (std sqrt(2 / fan_in)) and divided by the RMS of the BN gains
    ``scale / sqrt(var)`` drawn for the layer; BN statistics are distinct, non-trivial
    values (scales 0.5..1.5, variances 0.5..2, small means and betas) so that a swapped
    array would show. A convolution whose output is a residual branch (the layer just
    before a ``[shortcut]``) gets its gains scaled by 0.25 so 23 residual blocks add
    little variance. Head convolutions (no BN, linear) get std 0.3 * sqrt(1 / fan_in): the
    trunk's output RMS is a few units, so the logits stay O(1) and neither sigmoid nor
    exp saturates.
    """
    rng = np.random.default_rng(seed_for(seed_name))
    feeds_shortcut = {layer.index - 1 for layer in plan.layers if isinstance(layer, Shortcut)}
    convs = []
    for conv in plan.convs:
        n = conv.filters
        fan_in = (conv.in_channels // conv.groups) * conv.size * conv.size
        shape = (n, conv.in_channels // conv.groups, conv.size, conv.size)
        if conv.batch_normalize:
            scales = rng.uniform(0.5, 1.5, n)
            var = rng.uniform(0.5, 2.0, n)
            mean = rng.normal(0.0, 0.05, n)
            beta = rng.normal(0.0, 0.05, n)
            gain_rms = float(np.sqrt(np.mean(scales ** 2 / var)))
            if conv.index in feeds_shortcut:
                scales = scales * RESIDUAL_GAIN
            std = np.sqrt(2.0 / fan_in) / gain_rms
            kernel = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
            convs.append(ConvWeights(beta.astype(FLOAT), kernel, scales.astype(FLOAT), mean.astype(FLOAT),
                                     var.astype(FLOAT)))
        else:
            biases = rng.normal(0.0, 0.1, n).astype(FLOAT)
            kernel = rng.standard_normal(shape, dtype=np.float32) * np.float32(HEAD_GAIN * np.sqrt(1.0 / fan_in))
            convs.append(ConvWeights(biases, kernel))
    return DarknetWeights(*WRITE_VERSION, 0, tuple(convs), f"random-init (seed from {seed_name!r})")


def write_weights(path: Path, weights: DarknetWeights) -> Path:
    """Write ``weights`` as a Darknet .weights file (atomically), readable by Darknet and OpenCV."""
    path = Path(path)
    hdr = header_bytes(weights.major, weights.minor)
    with atomic_file(path, "wb") as fh:
        fh.write(np.array([weights.major, weights.minor, weights.revision], HEADER_DTYPE).tobytes())
        fh.write(np.array([weights.seen], "<i8" if hdr == 20 else "<i4").tobytes())
        for conv in weights.convs:
            arrays = [conv.biases]
            if conv.scales is not None:
                arrays += [conv.scales, conv.rolling_mean, conv.rolling_variance]
            arrays.append(conv.weights)
            for array in arrays:
                fh.write(np.ascontiguousarray(array, FLOAT).tobytes())
    return path
