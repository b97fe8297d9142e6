"""COCO evaluation of exported detectors through onnxruntime.

- ``eval.dataset``: loading and checking a COCO annotation file and its images folder,
  and the map from a model's label space to COCO category ids;
- ``eval.image_feed``: background decoding/resizing with bounded prefetch, and the
  resumable per-image detection cache;
- ``eval.coco``: ``evaluate_model`` (model + dataset -> detections -> COCOeval) and
  ``score_results`` (a COCO results file -> the 12 COCOeval statistics);
- ``eval.reference_darknet``: an independent reference run of a Darknet cfg+weights
  through OpenCV's Darknet importer with Darknet's own decoding (used to check the
  Darknet exports' accuracy).

Import as ``import eval.coco``; the package name shadows the builtin only as a module path.
"""
