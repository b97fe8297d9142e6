"""PyTorch (torchvision detectors): the exporter (``export``), the model builders (``builders``)
and the native runner (``native``, PyTorch eager)."""
