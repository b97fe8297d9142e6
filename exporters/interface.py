"""The written exporter interface: what a source framework provides and declares.

A framework is one subpackage of ``exporters`` whose ``__init__`` declares a :class:`Framework`
(``FRAMEWORK = Framework(...)``) and imports nothing heavy, so that ``list`` and the dispatcher
can read every framework's capabilities without importing PyTorch or TensorFlow. The declaration
names two modules, imported only when used:

- ``export``: follows :class:`ExportModule`: ``export(spec, out, *, weights, input_size, progress)``
  plus one keyword per capability the framework declares (``batch=True`` when it supports a
  symbolic batch, ``accept_mismatch=True`` when it has an accepted-failure mode);
- ``native``: follows :class:`NativeModule`: ``open_native(path, contract, *, threads, weights)``,
  the same model run in the framework itself (the native backend).

The dispatcher (:func:`exporters.export_model`) passes a capability keyword only to a framework
that declares it, and refuses the option with the framework's reason otherwise; it never looks
at a function's signature. A new framework is one subpackage plus one line in
``exporters.frameworks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from core.contract import ModelContract

if TYPE_CHECKING:
    from exporters.native_model import NativeModel
    from exporters.registry import ModelSpec

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """What an export produced: the file, its contract, and the validation figures.

    ``warnings`` are things about the source model that did not stop the export but that
    the user must hear about (e.g. a Darknet layer whose output feeds nothing).
    """

    path: Path
    contract: ModelContract
    seconds: float
    validation: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Framework:
    """One source framework as it declares itself: ``export`` and ``native`` name its modules
    (:class:`ExportModule`, :class:`NativeModule`); ``runtime`` says what its native runtime is."""

    name: str
    export: str
    native: str
    runtime: str
    # its export takes ``accept_mismatch=True``: writes a file whose validation failed, marked
    # ``detbench.validation = failed-accepted``
    supports_accept_mismatch: bool = False
    # why ``export --batch`` cannot build this framework's models (None: it can: its export takes
    # ``batch=True`` and writes a ``detbench.batch = symbolic`` file)
    no_batch: str | None = None

    @property
    def supports_batch(self) -> bool:
        return self.no_batch is None


class ExportModule(Protocol):
    """A framework's ``export`` module. ``capabilities`` holds only the keywords its
    :class:`Framework` declares (``batch``, ``accept_mismatch``), each passed as True."""

    def export(self, spec: ModelSpec, out: Path, *, weights: Path | None, input_size: tuple[int, int] | None,
               progress: Progress, **capabilities: bool) -> ExportResult: ...


class NativeModule(Protocol):
    """A framework's ``native`` module: the model of an exported ``path`` rebuilt in the framework."""

    def open_native(self, path: Path, contract: ModelContract, *, threads: int | None = None,
                    weights: Path | None = None) -> NativeModel: ...
