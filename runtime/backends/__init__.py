"""Backends: whatever executes an exported detector, behind one interface (:mod:`runtime.backends.base`).

The registry below is the one list of backend names; a new backend is one subpackage (one folder)
with a :class:`~runtime.backends.base.Backend` subclass declaring its
:class:`~runtime.backends.base.Capabilities`, and one registration line here. Code outside this
package asks a backend's capabilities, never tests its name. Names are
what ``--provider/-p`` accepts and what result records store under ``provider``.
"""

from __future__ import annotations

from core.errors import ConfigError
from runtime.backends.base import Backend, BackendSettings, Capabilities, Runner, RunnerInfo
from runtime.backends.litert import LiteRtBackend
from runtime.backends.mnn import MnnBackend
from runtime.backends.native import NativeBackend
from runtime.backends.ncnn import NcnnBackend
from runtime.backends.onnxruntime import OrtBackend
from runtime.backends.openvino import OpenVinoBackend
from runtime.backends.torch_onnx import TorchOnnxBackend

REFERENCE = "cpu"  # the backend every other one is compared with (parity, latency ratio)

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} registered twice")
    _REGISTRY[backend.name] = backend
    return backend


register(OrtBackend("cpu", "CPUExecutionProvider", "onnxruntime, CPU execution provider (MLAS kernels), float32"))
register(OrtBackend("cuda", "CUDAExecutionProvider", "onnxruntime, CUDA execution provider (NVIDIA GPU)", "cuda"))
register(OrtBackend("tensorrt", "TensorrtExecutionProvider", "onnxruntime, TensorRT execution provider (NVIDIA GPU)",
                    "cuda"))
register(OrtBackend("tensorrt-rtx", "NvTensorRTRTXExecutionProvider", "onnxruntime, TensorRT for RTX provider", "cuda"))
register(OrtBackend("ort-openvino", "OpenVINOExecutionProvider", "onnxruntime's OpenVINO execution provider "
                    "(the onnxruntime-openvino build)"))
register(OrtBackend("dnnl", "DnnlExecutionProvider", "onnxruntime, oneDNN execution provider"))
register(OrtBackend("migraphx", "MIGraphXExecutionProvider", "onnxruntime, MIGraphX provider (AMD GPU)", "gpu"))
register(OrtBackend("rocm", "ROCMExecutionProvider", "onnxruntime, ROCm provider (AMD GPU)", "gpu"))
register(OrtBackend("directml", "DmlExecutionProvider", "onnxruntime, DirectML provider (Windows)"))
register(OrtBackend("coreml", "CoreMLExecutionProvider", "onnxruntime, CoreML provider (macOS)"))
register(OrtBackend("xnnpack", "XnnpackExecutionProvider", "onnxruntime, XNNPACK provider"))
register(OrtBackend("qnn", "QNNExecutionProvider", "onnxruntime, QNN provider (Qualcomm)"))
register(OrtBackend("webgpu", "WebGpuExecutionProvider", "onnxruntime, WebGPU provider"))
register(OpenVinoBackend("openvino", "f32", "OpenVINO runtime reading the .onnx, CPU, float32 inference"))
register(OpenVinoBackend("openvino-bf16", "bf16", "OpenVINO runtime reading the .onnx, CPU, bfloat16 inference"))
register(MnnBackend("mnn", "MNN runtime (CPU, float32) on the network part converted by mnnconvert; "
                    "post-processing on onnxruntime CPU"))
register(NcnnBackend("ncnn", "ncnn runtime (CPU, float32) on the network part converted by pnnx; "
                      "post-processing on onnxruntime CPU"))
register(TorchOnnxBackend("onnx2torch", "PyTorch (CPU, float32) on the network part converted by onnx2torch, eager, "
                          "or torch.compile with --provider-option compile=1; post-processing on onnxruntime CPU"))
register(LiteRtBackend("litert", "LiteRT interpreter (CPU, XNNPACK, float32) on a .tflite converted by onnx2tf: the "
                        "whole graph where it converts, else the network part with post-processing on onnxruntime CPU"))
register(NativeBackend("native", "the model's source framework: OpenCV DNN (Darknet), PyTorch eager, TensorFlow"))

# other spellings accepted for a registered name
ALIASES = {"trt": "tensorrt", "onednn": "dnnl", "dml": "directml", "openvino-f32": "openvino"}


def list_backends() -> list[Backend]:
    """Every registered backend, in registration order."""
    return list(_REGISTRY.values())


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (an alias, or onnxruntime's ``XxxExecutionProvider``
    spelling of a registered provider, is accepted too); ConfigError listing every name otherwise."""
    key = name.strip()
    key = ALIASES.get(key.lower(), key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.lower() in _REGISTRY:
        return _REGISTRY[key.lower()]
    for backend in _REGISTRY.values():
        if isinstance(backend, OrtBackend) and backend.provider == key:
            return backend
    raise ConfigError(f"--provider {name!r} is not a known backend; use one of {', '.join(_REGISTRY)} "
                      f"(also accepted: {', '.join(sorted(ALIASES))}); `python cli.py backends` shows which run here")


def provider_usable(name: str) -> tuple[bool, str]:
    """Whether the backend ``name`` runs here: ``(True, "")`` or ``(False, first line of the reason)``."""
    ok, reason = get_backend(name).probe()
    return ok, (reason.splitlines()[0] if reason else "")


def capabilities(name: str) -> Capabilities:
    """What the backend ``name`` declares (device, precision, post-processing, conversion, ...)."""
    return get_backend(name).capabilities


__all__ = ["Backend", "BackendSettings", "Capabilities", "capabilities", "REFERENCE", "Runner", "RunnerInfo", "backend_names", "get_backend",
           "list_backends", "provider_usable", "register"]
