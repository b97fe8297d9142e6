"""The interface every backend follows: settings in, a runner out, and what really ran.

A :class:`Backend` is a way to execute an exported detector (an onnxruntime execution
provider, the OpenVINO runtime, the model's source framework). ``open(path, settings)``
gives a :class:`Runner` that takes the contract's input (``images`` float32
[1, 3, H, W], RGB 0..255) and returns the contract's outputs by name (``boxes``,
``scores``, ``labels``, ...), and whose :class:`RunnerInfo` says what ran: library and
version, device, the precision actually used, threads, load time, and whether the
backend fell back to something else.

``probe()`` decides whether a backend runs here by really opening a one-node model
(listing a library is not the same as being able to load it); the answer is cached.
A backend that cannot run is refused with :class:`ProviderUnavailableError` and the
reason, never replaced by another device's numbers under its name.
"""

from __future__ import annotations

import abc
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import ConfigError, ProviderUnavailableError

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "layout", "all")
EXECUTION_MODES = ("sequential", "parallel")


# More threads than this per usable CPU only contend for the cores (and thousands take minutes
# to start before the first run): a typo, not an experiment.
THREADS_PER_CPU = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_thread_count(option: str, value: int | None) -> None:
    """A thread count from the user: at least 1, at most :data:`THREADS_PER_CPU` per usable CPU."""
    if value is None:
        return
    if value < 1:
        raise ConfigError(f"{option} {value}: must be at least 1")
    cap = THREADS_PER_CPU * usable_cpus()
    if value > cap:
        raise ConfigError(f"{option} {value}: this machine lets detbench use {usable_cpus()} CPU(s); more than "
                          f"{THREADS_PER_CPU} threads per CPU ({cap}) only contend for the cores, and thousands "
                          f"take minutes to start. Give at most {cap} (default: the library's own choice).")


@dataclass(frozen=True)
class BackendSettings:
    """How to open a model, whatever the backend; ``to_dict()`` is what result records store.

    ``threads``/``inter_threads``: intra/inter-op threads (None = the library's default);
    ``optimization``/``execution_mode``: onnxruntime's graph optimisation level and executor;
    ``provider_options``: KEY=VALUE passed to the backend (onnxruntime provider options,
    OpenVINO compile properties); ``allow_fallback``: run even when the library replaced
    the requested device (the runner's info says what ran); ``trt_cache_dir``: TensorRT
    engine cache; ``include_copies``: on a CUDA device, time host<->device copies too;
    ``native_weights``: the weights file the native framework needs for a trained export;
    ``passive_wait``: idle threads sleep rather than spin (see the README's fair alternation).
    """

    threads: int | None = None
    inter_threads: int | None = None
    optimization: str = "all"
    execution_mode: str = "sequential"
    provider_options: dict[str, str] = field(default_factory=dict)
    allow_fallback: bool = False
    trt_cache_dir: str | None = None
    include_copies: bool = False
    native_weights: str | None = None
    # idle threads sleep instead of spinning between runs (onnxruntime: session.intra_op/inter_op
    # allow_spinning=0); None = only while several backends alternate in one process (bench)
    passive_wait: bool | None = None

    def __post_init__(self):
        for option, value in (("--threads", self.threads), ("--inter-threads", self.inter_threads)):
            check_thread_count(option, value)
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ConfigError(f"--optimization {self.optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
        if self.execution_mode not in EXECUTION_MODES:
            raise ConfigError(f"--execution-mode {self.execution_mode!r}: use one of {', '.join(EXECUTION_MODES)}")
        # paths are stored as strings so that the record is plain JSON
        for name in ("trt_cache_dir", "native_weights"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
        object.__setattr__(self, "provider_options", {str(k): str(v) for k, v in (self.provider_options or {}).items()})

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares about itself, so that code outside ``runtime/backends/`` asks
    these questions instead of testing a backend's name.

    ``device``: where it computes (``cpu``, ``cuda``, ``gpu``: anything but ``cpu`` takes a
    device of its own, e.g. one GPU per Ray actor); ``precision``: what it computes in
    (``f32``, ``bf16``, ``fp16``): a reduced-precision hint that does not apply to an int8
    graph; ``postprocess``: whether it runs the detection post-processing ops (NMS, TopK, ...)
    itself, otherwise the network part runs on it and the rest on onnxruntime CPU (see
    :mod:`runtime.backends.split`); ``converts``: it runs an artifact converted from the .onnx,
    cached under ``<results>/converted/<backend>/`` (see :mod:`runtime.backends.convert`);
    ``layer_profiler``: it has a per-layer profiler (``bench --nodes``); ``native``: it runs
    the model in its source framework (the ``--native`` comparison); ``passive_wait``: its
    idle threads sleep between runs instead of spinning (fair alternation, see the README).
    """

    device: str = "cpu"
    precision: str = "f32"
    postprocess: bool = True
    converts: bool = False
    layer_profiler: bool = False
    native: bool = False
    passive_wait: bool = True

    @property
    def on_accelerator(self) -> bool:
        return self.device != "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunnerInfo:
    """What really ran: ``backend`` (registered name), ``library`` and ``version``,
    ``device`` (``cpu``, ``cuda``, ...), ``precision`` the library reports it computes in
    (``f32``, ``bf16``), ``threads`` (None = the library's default), ``load_seconds``
    (session creation / model compilation wall time), ``fell_back`` (True only with
    ``allow_fallback``: the library ran something other than what was asked) and
    backend-specific ``detail`` (onnxruntime's providers, OpenVINO's properties, ...)."""

    backend: str
    library: str
    version: str
    device: str
    precision: str
    threads: int | None
    load_seconds: float
    fell_back: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runner(abc.ABC):
    """An opened model. ``run`` is for correctness (outputs by name), ``bind`` for timing."""

    info: RunnerInfo
    path: Path

    def __init__(self) -> None:
        self._last: dict[str, np.ndarray] | None = None

    @abc.abstractmethod
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The contract's outputs for ``images``, by name, as numpy arrays (labels int64)."""

    def bind(self, images: np.ndarray) -> Callable[[], None]:
        """The call a benchmark times, with ``images`` already bound (its last output is kept
        for :meth:`detections`). Backends with device memory override this to bind on the device."""

        def call() -> None:
            self._last = self.run(images)

        return call

    def detections(self) -> int:
        """Detections in the last timed output (-1 before any run)."""
        if self._last is None or "scores" not in self._last:
            return -1
        return int(np.asarray(self._last["scores"]).reshape(-1).shape[0])

    def layer_profile(self, images: np.ndarray, node_macs: dict[str, int], *, runs: int, warmup: int):
        """Per-layer times joined with the analyzer's MACs (a :class:`runtime.nodes.NodeTimes`),
        or None when this backend has no per-layer profiler."""
        return None

    def part_samples(self) -> dict[str, list[float]] | None:
        """Milliseconds of each part of every call so far (``network``, ``postprocess``) when the
        backend runs the graph in parts (:mod:`runtime.backends.split`), else None."""
        return None

    def network_parity(self, tensors: list[np.ndarray]) -> dict[str, Any] | None:
        """Differences of the network part's outputs from onnxruntime CPU's, when run in parts."""
        return None

    def close(self) -> None:
        """Release the model (sessions and compiled models go with their last reference)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Backend(abc.ABC):
    """A named way to execute an exported detector (see the module docstring)."""

    name: str
    description: str
    capabilities: Capabilities = Capabilities()
    # whether allow_fallback lets this backend run on something else (onnxruntime's CPU provider)
    can_fall_back: bool = False

    def __init__(self) -> None:
        self._probed: tuple[bool, str] | None = None

    @abc.abstractmethod
    def _probe(self) -> tuple[bool, str]:
        """Open a tiny model: ``(True, "")`` or ``(False, full reason with what to install)``."""

    def probe(self) -> tuple[bool, str]:
        """Whether this backend runs here, decided once per process by really opening a tiny model."""
        if self._probed is None:
            self._probed = self._probe()
        return self._probed

    def setup(self, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Prepare what this backend needs beyond the installed packages (a converter's environment of
        its own), reporting steps through ``progress``; what was made. Most backends need nothing."""
        raise ConfigError(f"backend {self.name!r} has nothing to set up: `pip install -e .` installs what it needs")

    def require(self, settings: BackendSettings | None = None) -> None:
        """Raise :class:`ProviderUnavailableError` with the reason when this backend cannot run here."""
        ok, reason = self.probe()
        if not ok and not (self.can_fall_back and settings is not None and settings.allow_fallback):
            raise ProviderUnavailableError(reason)

    @abc.abstractmethod
    def open(self, path: Path, settings: BackendSettings) -> Runner:
        """Open the ONNX file at ``path`` (a contract model) with ``settings``."""

    def open_streams(self, path: Path, settings: BackendSettings, streams: int,
                     threads_per_stream: int | None) -> list[Runner]:
        """``streams`` runners of ``path`` that may run at the same time, each on its own thread, with
        ``threads_per_stream`` intra-op threads each (None: the library's default). By default one
        independent model per stream (onnxruntime: one session each); a backend with its own notion
        of streams overrides this (OpenVINO: one compiled model, one infer request per stream)."""
        if streams < 1:
            raise ConfigError(f"streams {streams}: must be at least 1")
        from dataclasses import replace

        per = replace(settings, threads=threads_per_stream) if threads_per_stream else settings
        return [self.open(path, per) for _ in range(streams)]

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


def tiny_model_bytes() -> bytes:
    """A serialized one-node (Relu) ONNX graph, for probing backends."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="probe")], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _Captured:
    text: str = ""


import contextlib  # noqa: E402  (kept beside its only user)


@contextlib.contextmanager
def native_output_captured():
    """Capture what native libraries write straight to file descriptors 1 and 2 (MNN prints its
    CPU features and precision on load): library code never prints, and the text is kept for errors."""
    import os
    import sys
    import tempfile

    captured = _Captured()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError):  # no real descriptors (embedded interpreters): nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except ValueError:
                    pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            captured.text = tmp.read().decode("utf-8", "replace")
