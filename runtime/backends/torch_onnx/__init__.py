"""``onnx2torch``: PyTorch running the network part rebuilt from the ONNX graph.

``onnx2torch`` turns the network part of the contract graph (:mod:`runtime.backends.split`)
into a ``torch.fx.GraphModule``; it is cached (``torch.save``) under the results folder
(:mod:`runtime.backends.convert`). It runs eagerly, or with ``--provider-option compile=1`` through
``torch.compile`` (Inductor; the compilation happens at open, so its seconds count as load time,
never as latency: 3-34 s unloaded, minutes on a loaded machine, hence an option, not the default). Post-processing runs on onnxruntime CPU: onnx2torch's NonMaxSuppression is a
per-class Python loop (about 46x the network's time on yolov3-416), which would measure Python,
not PyTorch. An operator onnx2torch has no converter for is a per-model conversion failure
naming that operator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.contract import INPUT_NAME
from core.errors import ConfigError
from runtime.backends.base import Backend, BackendSettings, Capabilities, RunnerInfo
from runtime.backends.convert import ConversionFailed, converted, probe_conversion


@dataclass(frozen=True)
class TorchSettings:
    """PyTorch's options: ``threads`` (torch.set_num_threads; None = PyTorch's default) and
    ``compile`` (torch.compile with Inductor, mode ``default``)."""

    threads: int | None = None
    compile: bool = False

    @classmethod
    def of(cls, settings: BackendSettings) -> "TorchSettings":
        flag = settings.provider_options.get("compile", "0").strip().lower()
        if flag not in ("0", "1", "true", "false"):
            raise ConfigError(f"--provider-option compile={flag!r}: use compile=1 (torch.compile) or compile=0 (eager)")
        unknown = set(settings.provider_options) - {"compile"}
        if unknown:
            raise ConfigError(f"--provider-option {', '.join(sorted(unknown))}: onnx2torch takes only compile=0|1")
        return cls(threads=settings.threads, compile=flag in ("1", "true"))


def _versions() -> str:
    import importlib.metadata

    return f"onnx2torch {importlib.metadata.version('onnx2torch')}, torch {importlib.metadata.version('torch')}"


def convert_onnx(onnx_file: Path, out: Path) -> dict:
    import onnx
    import torch
    from onnx2torch import convert

    try:
        module = convert(onnx.load(str(onnx_file)))
    except NotImplementedError as exc:  # onnx2torch: "Converter is not implemented (OperationDescription(...))"
        raise ConversionFailed(f"onnx2torch cannot convert {onnx_file.name}: {str(exc).splitlines()[0][:300]}") from exc
    torch.save(module, out / "module.pt")
    return {}


class TorchNetwork:
    def __init__(self, artifact: Path, outputs: list[str], settings: TorchSettings):
        import torch

        self.torch, self.outputs = torch, outputs
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        module = torch.load(str(artifact), weights_only=False).eval()  # written by convert_onnx above
        self.module = torch.compile(module) if settings.compile else module

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            values = self.module(self.torch.from_numpy(images))
        if not isinstance(values, (tuple, list)):
            values = (values,)
        return {name: v.numpy().copy() for name, v in zip(self.outputs, values)}


class TorchOnnxBackend(Backend):
    def __init__(self, name: str, description: str):
        super().__init__()
        self.name, self.description = name, description
        self.capabilities = Capabilities(postprocess=False, converts=True, passive_wait=False)

    def _probe(self) -> tuple[bool, str]:
        try:
            import onnx2torch  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            return False, f"onnx2torch is not installed ({exc}); `pip install 'detbench[runtimes]'` (onnx2torch==1.5.15)"
        return probe_conversion(self.name, "onnx2torch", _versions(), convert_onnx,
                                lambda folder, x: TorchNetwork(folder / "module.pt", ["y"], TorchSettings())(x)["y"],
                                "onnx2torch")

    def open(self, path: Path, settings: BackendSettings):
        from runtime.backends.split import SplitRunner, split_model

        own = TorchSettings.of(settings)
        split = split_model(Path(path))
        conv = converted(self.name, split.network, "onnx2torch", _versions(), {}, convert_onnx)
        start = time.perf_counter()
        network = TorchNetwork(Path(conv.artifact) / "module.pt", split.cut, own)
        if own.compile:  # torch.compile compiles at the first call: part of opening, not of the latency
            network(np.zeros(split.input_shape, np.float32))
        seconds = time.perf_counter() - start
        import torch

        info = RunnerInfo(backend=self.name, library="torch", version=torch.__version__, device="cpu",
                          precision="f32", threads=own.threads, load_seconds=seconds,
                          detail={"conversion": conv.to_dict(), "settings": own.__dict__,
                                  "part": "network part on PyTorch " + ("(torch.compile)" if own.compile else "(eager)")
                                          + ", post-processing on onnxruntime CPU"})
        return SplitRunner(path, split, network, info, settings)

