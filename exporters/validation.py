"""Comparing an ONNX export with its source model: collect every mismatch, raise once."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.errors import ValidationError


@dataclass
class Comparison:
    """Accumulates mismatches between reference (source framework) and ONNX outputs."""

    model: str
    atol: float = 1e-3
    rtol: float = 1e-3
    mismatches: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def arrays(self, where: str, name: str, reference, onnx_out) -> None:
        """Record a mismatch unless shapes agree and ``|a - b| <= atol + rtol * |a|`` everywhere."""
        ref = np.asarray(reference)
        got = np.asarray(onnx_out)
        key = f"{where}:{name}"
        if ref.shape != got.shape:
            self.mismatches.append(f"{key}: shape {tuple(got.shape)} in ONNX, {tuple(ref.shape)} in the source model")
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
        self.figures[key + ":max_abs_diff"] = float(diff.max())
        bad = diff > self.atol + self.rtol * np.abs(ref.astype(np.float64))
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
            self.mismatches.append(f"{where}: {n_got} detections in ONNX, {n_ref} in the source model")
            return
        for name in reference:
            self.arrays(where, name, reference[name], onnx_out[name])

    def raise_if_any(self, fix: str | None = None) -> None:
        if self.mismatches:
            raise ValidationError(self.model, self.mismatches, fix)
