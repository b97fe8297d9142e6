"""What executes an exported detector: backends (onnxruntime providers, OpenVINO, the native
frameworks) behind one interface, and the timing and profiling built on top of them.
"""

import core  # noqa: F401  (fixes the TensorFlow/PyTorch native-library load order first)
