"""The one table of source frameworks: each declares itself (its modules, its capabilities) in its
subpackage's ``__init__`` (:class:`exporters.interface.Framework`); a new framework is a
subpackage and a line here. The registry checks models.toml's ``framework`` against it and the
dispatcher (``exporters.export_model``, ``exporters.native_module``) reads it.
"""

from __future__ import annotations

from exporters.darknet import FRAMEWORK as DARKNET
from exporters.interface import Framework
from exporters.pytorch import FRAMEWORK as PYTORCH
from exporters.tensorflow import FRAMEWORK as TENSORFLOW

FRAMEWORKS: dict[str, Framework] = {f.name: f for f in (DARKNET, PYTORCH, TENSORFLOW)}
