"""Darknet YOLO: cfg + weights to a validated ONNX file (``export``), its parts (``cfg``, ``weights``,
``graph``) and its native runner (``native``, OpenCV's Darknet importer).

The independent reference decoder used to check these exports stays in ``eval.reference_darknet``:
it shares no code with this package on purpose, and its command line scores with ``eval.coco``.
"""

from __future__ import annotations

from exporters.interface import Framework

FRAMEWORK = Framework("darknet", export="exporters.darknet.export", native="exporters.darknet.native",
                      runtime="OpenCV DNN (Darknet importer)")
