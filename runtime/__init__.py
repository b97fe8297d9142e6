"""Runtime foundations: the exported-model contract, errors, images, sessions, results store.

Importing this package first also fixes the native-library load order that TensorFlow and
PyTorch need to coexist in one process (see ``runtime._load_order``).
"""

from runtime import _load_order  # noqa: F401
