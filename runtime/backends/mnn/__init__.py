"""``mnn``: Alibaba's MNN runtime on the CPU, running the network part converted by MNN's own converter.

The network part of the contract graph (:mod:`runtime.backends.split`) is converted once by
``mnnconvert`` (shipped in the ``MNN`` wheel; run in a child process so that a converter crash
is a per-model failure, never the end of the run) and cached (:mod:`runtime.backends.convert`);
post-processing runs on onnxruntime CPU. Why the network part only: MNN's whole-graph runs were
not all sound (retinanet-800's whole graph dies with a floating-point exception at run time,
which takes the process with it), while the network part converts and runs for every
single-stage family. MNN computes in float32 (``precision: high``) with ``threads`` threads.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.contract import INPUT_NAME
from runtime.backends.base import (Backend, BackendSettings, Capabilities, RunnerInfo, native_output_captured)
from runtime.backends.convert import ConversionFailed, converted, first_reason, probe_conversion

# The converter's C entry point, called directly: the wheel's ``MNN.tools.mnnconvert`` wrapper imports
# a usage logger that runs ``pip install -U aliyun-log-python-sdk`` when that is missing (which
# downgrades protobuf below what onnx needs) and posts each conversion to a remote log service.
# detbench sends nothing anywhere and installs nothing at run time.
_CONVERT = "import sys\nimport _tools\n_tools.mnnconvert(['mnnconvert'] + sys.argv[1:])"


@dataclass(frozen=True)
class MnnSettings:
    """MNN's own options: ``threads`` (None = 2, MNN's need for an explicit count) and
    ``precision`` (``high`` = float32 arithmetic; ``low`` would allow fp16/bf16 where the CPU has it)."""

    threads: int | None = None
    precision: str = "high"

    @classmethod
    def of(cls, settings: BackendSettings) -> "MnnSettings":
        return cls(threads=settings.threads, precision=settings.provider_options.get("precision", "high"))


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("MNN")


def _mnn():
    with native_output_captured():
        import MNN
    return MNN


def convert_onnx(onnx_file: Path, out: Path) -> dict:
    """``mnnconvert`` in a child process; ConversionFailed with the converter's reason."""
    target = out / "model.mnn"
    proc = subprocess.run([sys.executable, "-c", _CONVERT, "-f", "ONNX", "--modelFile", str(onnx_file),
                           "--MNNModel", str(target), "--bizCode", "detbench"],
                          capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not target.is_file() or "Converted Success" not in log:
        raise ConversionFailed(f"mnnconvert {_version()} failed on {onnx_file.name} (exit {proc.returncode}): "
                               f"{first_reason(log, ('not support', 'Not Support', 'Error', 'error', 'Failed'))}")
    return {"log_tail": log.strip().splitlines()[-3:]}


class MnnNetwork:
    """The converted network part, as a callable: images -> cut tensors by name."""

    def __init__(self, artifact: Path, inputs: list[str], outputs: list[str], settings: MnnSettings):
        mnn = _mnn()
        self.mnn, self.outputs = mnn, outputs
        with native_output_captured():
            config = {"backend": "CPU", "numThread": settings.threads or 2, "precision": settings.precision}
            self.runtime = mnn.nn.create_runtime_manager((config,))
            self.module = mnn.nn.load_module_from_file(str(artifact), inputs, outputs, runtime_manager=self.runtime)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        expr = self.mnn.expr
        values = self.module.forward([expr.const(images, list(images.shape), expr.NCHW)])
        return {name: np.array(expr.convert(v, expr.NCHW).read(), copy=True) for name, v in zip(self.outputs, values)}


class MnnBackend(Backend):
    def __init__(self, name: str, description: str):
        super().__init__()
        self.name, self.description = name, description
        self.capabilities = Capabilities(postprocess=False, converts=True, passive_wait=False)

    def _probe(self) -> tuple[bool, str]:
        try:
            _mnn()
            version = _version()
        except ImportError as exc:
            return False, f"the MNN package is not installed ({exc}); `pip install 'detbench[runtimes]'` (MNN==3.6.1)"
        return probe_conversion(self.name, "mnnconvert", version, convert_onnx,
                                lambda folder, x: MnnNetwork(folder / "model.mnn", ["x"], ["y"], MnnSettings())(x)["y"],
                                f"MNN {version}")

    def open(self, path: Path, settings: BackendSettings):
        from runtime.backends.split import SplitRunner, split_model

        own = MnnSettings.of(settings)
        split = split_model(Path(path))
        conv = converted(self.name, split.network, "mnnconvert", _version(), {"precision": own.precision},
                         convert_onnx)
        start = time.perf_counter()
        network = MnnNetwork(Path(conv.artifact) / "model.mnn", [INPUT_NAME], split.cut, own)
        seconds = time.perf_counter() - start
        info = RunnerInfo(backend=self.name, library="MNN", version=_version(), device="cpu", precision="f32",
                          threads=own.threads or 2, load_seconds=seconds,
                          detail={"conversion": conv.to_dict(), "settings": own.__dict__,
                                  "part": "network part on MNN, post-processing on onnxruntime CPU"})
        return SplitRunner(path, split, network, info, settings)
