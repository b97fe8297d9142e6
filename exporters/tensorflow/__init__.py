"""TensorFlow: the Keras SSD exporter (``export``, parts ``ssd_keras``, ``ssd_priors``), the
SavedModel converter (``saved_model``), the tf2onnx helpers both share (``convert``) and the
native runner (``native``, TensorFlow's tf.function).

Nothing here imports TensorFlow at import time: ``convert.import_tensorflow`` does, when needed.
"""

from __future__ import annotations

from exporters.interface import Framework

FRAMEWORK = Framework(
    "tensorflow", export="exporters.tensorflow.export", native="exporters.tensorflow.native",
    runtime="TensorFlow tf.function",
    no_batch="the tf.function's signature is [1, 3, H, W] and its decoding keeps image 0 of "
             "combined_non_max_suppression's padded per-image results (nms_boxes[0, :valid[0]]), so the graph "
             "has no symbolic batch axis nor an image index per detection")
