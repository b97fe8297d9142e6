"""Registered models whose export is known not to validate yet, with the reason.

Tests parametrised over the registry wrap these names with a *strict* xfail that expects
a ValidationError: the day the export validates, the xfail turns into a failure and this
list must shrink. Nothing else is excused.
"""

import pytest

from runtime.errors import ValidationError

_TWO_STAGE_RANDOM_INIT = (
    "random-init weights give many near-equal proposal/detection scores; PyTorch and "
    "onnxruntime differ by ~1e-6 in convolutions, which reorders near-ties in top-k and NMS, "
    "so the final detections diverge (issue #3 stays open until validation is made robust to it)"
)

KNOWN_EXPORT_FAILURES = {
    "faster-rcnn-vgg16": _TWO_STAGE_RANDOM_INIT,
    "retinanet-800": _TWO_STAGE_RANDOM_INIT,
    "mask-rcnn-800": _TWO_STAGE_RANDOM_INIT,
}


def export_param(name: str):
    """``name`` as a pytest parameter, strictly expected to fail validation if it is listed above."""
    if name in KNOWN_EXPORT_FAILURES:
        return pytest.param(name, marks=pytest.mark.xfail(
            raises=ValidationError, strict=True, reason=KNOWN_EXPORT_FAILURES[name]))
    return name
