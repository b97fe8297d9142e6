"""Comparing an ONNX export with its source model: collect every mismatch, raise once.

A comparison never passes what it cannot compare: a NaN or an infinity in either output
(or in a difference) is a mismatch naming the output, the image and the first index where
it appeared. ``diff > tolerance`` is False for NaN, so every test here is written as
"not within tolerance" rather than "beyond tolerance".

Shared by the exporters that validate through onnxruntime: :func:`cpu_session` (the file as it
will be saved, on the CPU provider) and :func:`validation_images` (the same real COCO images on
every run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.contract import IR_VERSION
from core.errors import DatasetError, ProviderUnavailableError, ValidationError
from core.paths import data_dir
from core.ort_session import cpu_session as ort_cpu_session

# Rounding of coordinates computed from operands of an image's scale, relative to that scale:
# float32 carries 6e-8, box decoding chains ~10 operations and an exp of logits that already
# differ by ~1e-6 relative between runtimes; 1e-5 keeps a margin and is still 1e-3 px at 100 px.
COORDINATE_RTOL = 1e-5


def non_finite_summary(values: np.ndarray) -> str | None:
    """"3 NaN, 1 +Inf (first at (0, 2))" for an array holding non-finite values, else None."""
    values = np.asarray(values)
    if values.dtype.kind not in "fc" or values.size == 0:
        return None
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    counts = [(int(np.count_nonzero(np.isnan(values))), "NaN"),
              (int(np.count_nonzero(np.isposinf(values))), "+Inf"),
              (int(np.count_nonzero(np.isneginf(values))), "-Inf")]
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), values.shape))
    return ", ".join(f"{n} {what}" for n, what in counts if n) + f" of {values.size} values (first at {first})"


@dataclass
class Comparison:
    """Accumulates mismatches between reference (source framework) and ONNX outputs."""

    model: str
    atol: float = 1e-3
    rtol: float = 1e-3
    mismatches: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def finite(self, where: str, name: str, values, side: str) -> bool:
        """Record a mismatch (and return False) when ``values`` hold NaN or Inf; ``side`` names
        the runtime that produced them ("ONNX", "the source model")."""
        summary = non_finite_summary(values)
        if summary is None:
            return True
        self.mismatches.append(f"{where}:{name}: {summary} in {side}; a non-finite output cannot be compared "
                               "(weights that overflow float32, or a broken graph)")
        self.figures[f"{where}:{name}:non_finite_{'onnx' if side == 'ONNX' else 'source'}"] = \
            int(np.count_nonzero(~np.isfinite(np.asarray(values))))
        return False

    def arrays(self, where: str, name: str, reference, onnx_out, extent: float = 0.0) -> None:
        """Record a mismatch unless shapes agree, every value is finite and
        ``|a - b| <= atol + rtol * |a| + COORDINATE_RTOL * extent`` everywhere.

        ``extent`` is the image size for box coordinates: a corner is computed as a centre
        minus a half-size, both of the image's scale, so its float32 rounding scales with the
        image, not with the corner's value (a corner near 0 px carries the rounding of ~300 px
        operands); 0 for everything else."""
        ref = np.asarray(reference)
        got = np.asarray(onnx_out)
        key = f"{where}:{name}"
        if ref.shape != got.shape:
            self.mismatches.append(f"{key}: shape {tuple(got.shape)} in ONNX, {tuple(ref.shape)} in the source model")
            return
        finite = self.finite(where, name, ref, "the source model")
        finite = self.finite(where, name, got, "ONNX") and finite
        if not finite:
            return
        if ref.size == 0:
            self.figures[key + ":max_abs_diff"] = 0.0
            return
        if ref.dtype.kind in "iub" or got.dtype.kind in "iub":
            differ = int(np.count_nonzero(ref != got))
            self.figures[key + ":differing"] = differ
            if differ:
                self.mismatches.append(f"{key}: {differ} of {ref.size} values differ")
            return
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        if not self.finite(where, name + " difference", diff, "the difference"):
            return
        self.figures[key + ":max_abs_diff"] = float(diff.max())
        bad = ~(diff <= self.atol + self.rtol * np.abs(ref.astype(np.float64)) + COORDINATE_RTOL * extent)
        if bad.any():
            idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
            self.mismatches.append(
                f"{key}: {int(bad.sum())} of {ref.size} values outside atol={self.atol} rtol={self.rtol}; "
                f"max |diff| {float(diff.max()):.3g} at {tuple(int(i) for i in idx)}"
            )

    def detections(self, where: str, reference: dict, onnx_out: dict) -> None:
        """Detections must agree in count; boxes/scores within tolerance; labels identical."""
        n_ref, n_got = len(reference["scores"]), len(onnx_out["scores"])
        self.figures[f"{where}:detections"] = n_ref
        if n_ref != n_got:
            for name in reference:
                self.finite(where, name, reference[name], "the source model")
            for name in onnx_out:
                self.finite(where, name, onnx_out[name], "ONNX")
            self.mismatches.append(f"{where}: {n_got} detections in ONNX, {n_ref} in the source model")
            return
        for name in reference:
            self.arrays(where, name, reference[name], onnx_out[name])

    def nothing_detected(self, counts: list[int], why: str) -> None:
        """A mismatch when the reference detected nothing on any image (``counts`` per image; a
        count the other side disagrees with is already a mismatch, and then this adds nothing): two empty outputs agree on
        nothing, so the export would be "validated" without a single detection compared."""
        if counts and not any(counts) and not self.mismatches:
            self.mismatches.append(f"no detection on any of the {len(counts)} validation image(s) on either side: "
                                   f"nothing was compared, so the file cannot be shown to reproduce its source ({why})")

    def raise_if_any(self, fix: str | None = None) -> None:
        if self.mismatches:
            raise ValidationError(self.model, self.mismatches, fix)


def cpu_session(proto):
    """An onnxruntime CPU session on ``proto`` as it will be saved (IR version pinned)."""
    saved_ir, proto.ir_version = proto.ir_version, IR_VERSION
    try:
        data = proto.SerializeToString()
    finally:
        proto.ir_version = saved_ir
    session = ort_cpu_session(data)
    del data
    if session.get_providers()[:1] != ["CPUExecutionProvider"]:
        raise ProviderUnavailableError(f"onnxruntime did not create a CPU session (got {session.get_providers()})")
    return session


def validation_images(count: int, folder: Path | None = None) -> list[Path]:
    """``count`` real COCO val2017 images (the lowest file names, so every run uses the same ones)."""
    folder = Path(folder) if folder else data_dir() / "coco-val2017-subset" / "val2017"
    images = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if len(images) < count:
        raise DatasetError(f"export validation needs {count} COCO images in {folder}, found {len(images)}; "
                           "set DETBENCH_DATA to the folder holding coco-val2017-subset/")
    return images[:count]
