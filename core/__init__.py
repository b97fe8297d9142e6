"""The ground floor: the exported-model contract, errors, paths, images, the results store
and the atomic file writer. Nothing here imports any other detbench package.

Importing this package first also fixes the native-library load order that TensorFlow and
PyTorch need to coexist in one process (see ``core._load_order``).
"""

from core import _load_order  # noqa: F401
