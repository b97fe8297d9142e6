"""PyTorch (torchvision detectors): the exporter (``export``), the model builders (``builders``)
and the native runner (``native``, PyTorch eager)."""

from __future__ import annotations

from exporters.interface import Framework

FRAMEWORK = Framework(
    "pytorch", export="exporters.pytorch.export", native="exporters.pytorch.native", runtime="PyTorch eager",
    supports_accept_mismatch=True,
    no_batch="the traced forward runs torchvision's transform, RPN/RoI heads and post-processing on images[0] "
             "(torchvision post-processes each image in a Python loop, which tracing unrolls at the traced batch "
             "of 1), so the graph has no symbolic batch axis with per-image NMS")
