"""``native``: the model in the framework it comes from, found through the exporters' framework table.

The ONNX file's contract names its source framework; ``exporters.FRAMEWORKS`` names, per
framework, the module that rebuilds the model the file was exported from and validated
against (OpenCV's Darknet importer, PyTorch eager, TensorFlow) with the same weights. The
same prepared input tensor goes in and the contract's outputs come out, so the native run is
timed, and parity-checked against onnxruntime CPU, like any other backend.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from core.contract import read_contract
from runtime.backends.base import Backend, BackendSettings, Capabilities, Runner, RunnerInfo


class NativeRunner(Runner):
    def __init__(self, backend: str, path: Path, model, seconds: float):
        super().__init__()
        self.path, self.model = Path(path), model
        self.info = RunnerInfo(backend=backend, library=model.library, version=model.version, device="cpu",
                               precision="f32", threads=model.threads, load_seconds=seconds,
                               detail={"framework": model.framework, "runtime": model.runtime, "what": model.what,
                                       "min_score": model.min_score})

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.run(images)


class NativeBackend(Backend):
    """The source framework of whichever model is opened."""

    def __init__(self, name: str, description: str):
        super().__init__()
        self.name, self.description = name, description
        self.capabilities = Capabilities(native=True, passive_wait=False)

    def _probe(self) -> tuple[bool, str]:
        # which framework runs depends on the model opened; each one says what it lacks when opened
        return True, ""

    def open(self, path: Path, settings: BackendSettings) -> NativeRunner:
        from exporters import native_module

        path = Path(path)
        contract = read_contract(path)
        module = native_module(contract.framework, str(path))
        start = time.perf_counter()
        model = module.open_native(path, contract, threads=settings.threads,
                                   weights=Path(settings.native_weights) if settings.native_weights else None)
        return NativeRunner(self.name, path, model, time.perf_counter() - start)
