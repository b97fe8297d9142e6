"""What the Offline and Server scenarios share: the configurations tried, the opened streams,
and the result record."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.contract import read_contract, sha256_file
from runtime.backends import REFERENCE, BackendSettings, get_backend
from runtime.inputs import default_image, input_tensor, model_input_shape
from runtime.scenarios.settings import ScenarioSettings


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, order=True)
class Config:
    """One configuration of the knobs: concurrent streams, intra-op threads per stream (None: the
    library's default), images per call."""

    streams: int
    threads_per_stream: int | None
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return {"streams": self.streams, "threads_per_stream": self.threads_per_stream, "batch": self.batch}

    def __str__(self) -> str:
        threads = "default" if self.threads_per_stream is None else self.threads_per_stream
        return f"{self.streams} stream(s) x {threads} thread(s), batch {self.batch}"


def batch_axis(path: Path, contract=None) -> tuple[bool, str]:
    """Whether the graph takes more than one image per call, and why: its contract says
    ``detbench.batch = symbolic`` (``export NAME --batch``: symbolic first dimension, per-image NMS,
    ``batch_index`` output); a symbolic first dimension alone is not enough, since outputs without an
    image index cannot be told apart per image."""
    contract = contract if contract is not None else read_contract(path)
    dim0 = (model_input_shape(path) or [1])[0]
    if contract.batch_symbolic:
        return True, f"symbolic batch axis {dim0!r} (detbench.batch = symbolic: per-image NMS, batch_index output)"
    return False, (f"batch {dim0}: not a batch export (its boxes [K, 4] carry no image index), so concurrency "
                   "comes from streams only; `python cli.py export NAME --batch` writes one where the exporter can "
                   "(`python cli.py list`, column B)")


def candidate_configs(settings: ScenarioSettings, batchable: bool, cores: int) -> list[Config]:
    """The configurations to try: streams 1, 2, 4, ... up to the cores, each with the cores split
    evenly between streams (or the fixed --streams / --threads-per-stream), times the batch sizes
    the graph accepts."""
    if settings.streams is not None:
        streams = [settings.streams]
    else:
        streams = sorted({s for s in (1, 2, 4, 8, 16, 32) if s <= cores} | {cores})
    batches = settings.batches if batchable else (1,)
    out = []
    for s in streams:
        tps = settings.threads_per_stream or max(1, cores // s)
        for b in batches:
            out.append(Config(s, tps, b))
    return out


@dataclass
class Opened:
    """A configuration's streams, opened, with the input bound."""

    config: Config
    runners: list[Any]
    calls: list[Callable[[], None]]

    def close(self) -> None:
        for r in self.runners:
            r.close()


@dataclass
class Model:
    """The file under test and the input every stream runs on."""

    path: Path
    contract: Any
    image: Path
    batchable: bool
    batch_note: str
    sha256: str

    @classmethod
    def load(cls, path, image: str | None) -> "Model":
        path = Path(path)
        contract = read_contract(path)
        batchable, note = batch_axis(path, contract)
        return cls(path, contract, Path(image) if image else default_image(), batchable, note, sha256_file(path))

    def open(self, backend: str, backend_settings: BackendSettings, config: Config) -> Opened:
        runners = get_backend(backend).open_streams(self.path, backend_settings, config.streams,
                                                    config.threads_per_stream)
        tensor = input_tensor(self.contract, self.image, config.batch, model_input_shape(self.path), str(self.path))
        calls = [r.bind(tensor) for r in runners]
        for call in calls:  # first inference of each stream: cold start, never timed
            call()
        return Opened(config, runners, calls)


def parity_of(model: Model, backend: str, runner, backend_settings: BackendSettings, count: int) -> dict | None:
    """The stream's parity with onnxruntime CPU on ``count`` COCO images (None for onnxruntime CPU itself)."""
    if backend == REFERENCE and not runner.info.fell_back:
        return None
    from runtime.bench import _parities

    return _parities(model.path, model.contract, {backend: runner}, backend_settings, count).get(backend)


def parity_verdict(backend: str, parity: dict | None) -> str:
    """``reference`` for onnxruntime CPU, else the parity check's verdict, or ``unchecked`` without one."""
    if backend == REFERENCE:
        return "reference"
    return parity.get("verdict", "unchecked") if parity else "unchecked"


@dataclass
class ScenarioResult:
    """One model on one backend in one scenario: ``figures`` is the record's data (scenario-specific)."""

    scenario: str
    model: str
    path: str
    model_sha256: str
    contract: dict[str, str]
    provider: str
    backend: dict[str, Any]
    settings: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "backend": self.backend, "precision": self.backend.get("precision", "f32"),
                "random_init": self.contract.get("detbench.weights") == "random-init", **self.figures}


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 100 * q))
