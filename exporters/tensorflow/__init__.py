"""TensorFlow: the Keras SSD exporter (``export``, parts ``ssd_keras``, ``ssd_priors``), the
SavedModel converter (``saved_model``), the tf2onnx helpers both share (``convert``) and the
native runner (``native``, TensorFlow's tf.function).

Nothing here imports TensorFlow at import time: ``convert.import_tensorflow`` does, when needed.
"""
