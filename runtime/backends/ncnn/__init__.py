"""``ncnn``: Tencent's ncnn runtime on the CPU, running the network part converted by pnnx.

The network part of the contract graph (:mod:`runtime.backends.split`) is converted once by the
``pnnx`` executable shipped in the ``pnnx`` wheel (in a child process, so that a converter crash
is a per-model failure) and cached (:mod:`runtime.backends.convert`); post-processing runs on
onnxruntime CPU. Why the network part only: pnnx leaves NonMaxSuppression, TopK and GatherND
unconverted. ncnn is made to compute in float32 throughout (``fp16=0`` at conversion, every fp16
and bf16 storage/arithmetic option off at run time), so that its figures compare with
onnxruntime's float32 ones.

ncnn is known to be silently wrong on some graphs (pnnx turns the SSD/torchvision channel flip
``Gather[2,1,0]`` into a single-channel select): nothing here hides that — the parity gate before
timing compares its detections with onnxruntime CPU's and a disagreeing run is DISAGREES, never a
latency.

ncnn's OpenMP threads sleep at once between runs (``openmp_blocktime = 0``), so alternating with
other runtimes in one process is fair (``passive_wait``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.backends.base import (Backend, BackendSettings, Capabilities, RunnerInfo, native_output_captured)
from runtime.backends.convert import ConversionFailed, converted, first_reason, probe_conversion


@dataclass(frozen=True)
class NcnnSettings:
    """ncnn's own options: ``threads`` (None = 2: ncnn needs an explicit count) and
    ``blocktime`` (OpenMP spin time in ms after a run; 0 = sleep at once, fair alternation)."""

    threads: int | None = None
    blocktime: int = 0

    @classmethod
    def of(cls, settings: BackendSettings) -> "NcnnSettings":
        try:
            blocktime = int(settings.provider_options.get("blocktime", 0))
        except (TypeError, ValueError) as exc:
            raise ConversionFailed(f"--provider-option blocktime must be an integer of milliseconds: {exc}") from exc
        return cls(threads=settings.threads, blocktime=blocktime)


def _versions() -> str:
    return f"ncnn {importlib.metadata.version('ncnn')}, pnnx {importlib.metadata.version('pnnx')}"


def _pnnx_executable() -> Path:
    # located without importing the package: its __init__ imports torch-based export helpers
    spec = importlib.util.find_spec("pnnx")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionFailed("the pnnx package is not installed; `pip install -e .` installs both (ncnn==1.0.20261020, pnnx==20261020)")
    exe = Path(list(spec.submodule_search_locations)[0]) / "pnnx"
    if not exe.is_file():
        raise ConversionFailed(f"the pnnx package has no converter executable at {exe}")
    return exe


def convert_onnx(onnx_file: Path, out: Path, input_shape: list[int]) -> dict:
    """pnnx in a child process (ncnn param/bin with float32 weights); ConversionFailed with its reason."""
    shape = "[" + ",".join(str(int(d)) for d in input_shape) + "]"
    names = {"pnnxparam": "model.pnnx.param", "pnnxbin": "model.pnnx.bin", "pnnxpy": "model_pnnx.py",
             "pnnxonnx": "model.pnnx.onnx", "ncnnparam": "model.ncnn.param", "ncnnbin": "model.ncnn.bin",
             "ncnnpy": "model_ncnn.py"}
    args = [str(_pnnx_executable()), str(onnx_file), f"inputshape={shape}", "fp16=0", "device=cpu"]
    args += [f"{key}={out / name}" for key, name in names.items()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, cwd=out)
    log = proc.stdout + proc.stderr
    param, weights = out / names["ncnnparam"], out / names["ncnnbin"]
    if proc.returncode != 0 or not param.is_file() or not weights.is_file():
        raise ConversionFailed(f"pnnx ({_versions()}) failed on {onnx_file.name} (exit {proc.returncode}): "
                               f"{first_reason(log)}")
    # only the ncnn files are kept: the pnnx intermediates are large and never read again
    for key, name in names.items():
        if not key.startswith("ncnn") or key == "ncnnpy":
            (out / name).unlink(missing_ok=True)
    for leftover in ("debug.bin", "debug.param", "debug2.bin", "debug2.param", onnx_file.stem + ".pnnxsim.onnx"):
        (out / leftover).unlink(missing_ok=True)
    unsupported = sorted({ln.split()[0] for ln in param.read_text().splitlines()[2:]
                          if ln.split() and ln.split()[0].startswith("pnnx.")})
    if unsupported:
        raise ConversionFailed(f"pnnx ({_versions()}) left operators ncnn cannot run in {onnx_file.name}: "
                               f"{', '.join(unsupported)}")
    return {"log_tail": log.strip().splitlines()[-3:]}


def _io_names(param: Path) -> tuple[list[str], list[str]]:
    """pnnx names the graph's inputs in0, in1, ... and its outputs out0, out1, ... in graph order."""
    blobs = set()
    for line in param.read_text().splitlines()[2:]:
        parts = line.split()
        if len(parts) > 4:
            n_in, n_out = int(parts[2]), int(parts[3])
            blobs.update(parts[4:4 + n_in + n_out])

    def ordered(prefix):
        found = sorted((b for b in blobs if b.startswith(prefix) and b[len(prefix):].isdigit()),
                       key=lambda b: int(b[len(prefix):]))
        return found

    return ordered("in"), ordered("out")


class NcnnNetwork:
    """The converted network part, as a callable: images -> cut tensors by name, in ONNX's shapes."""

    def __init__(self, folder: Path, outputs: list[str], shapes: dict[str, list[int]], settings: NcnnSettings):
        with native_output_captured():
            import ncnn
        self.ncnn, self.outputs, self.shapes = ncnn, outputs, shapes
        net = ncnn.Net()
        opt = net.opt
        opt.num_threads = settings.threads or 2
        opt.openmp_blocktime = settings.blocktime
        # float32 arithmetic and storage throughout: ncnn otherwise picks fp16/bf16 where the CPU has them
        for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                     "use_int8_inference", "use_vulkan_compute"):
            if hasattr(opt, flag):
                setattr(opt, flag, False)
        param, weights = folder / "model.ncnn.param", folder / "model.ncnn.bin"
        if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
            raise ConversionFailed(f"ncnn could not load {param} / {weights}")
        self.net = net
        self.inputs, self.blob_outputs = _io_names(param)
        if len(self.inputs) != 1 or len(self.blob_outputs) != len(outputs):
            raise ConversionFailed(f"{param}: ncnn's graph has inputs {self.inputs} and outputs {self.blob_outputs}; "
                                   f"expected one image input and {len(outputs)} outputs ({', '.join(outputs)})")

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if images.shape[0] != 1:
            raise ConversionFailed(f"ncnn runs one image at a time (batch {images.shape[0]} given)")
        # an ncnn-owned copy (as ncnn::Mat::from_pixels makes in a C++ deployment): a Mat that wraps
        # the array's memory segfaults when light mode runs the first layer in place and recycles it
        pixels = np.ascontiguousarray(images[0], dtype=np.float32)
        mat_in = self.ncnn.Mat(pixels).clone()
        ex = self.net.create_extractor()
        ex.input(self.inputs[0], mat_in)
        result = {}
        for name, blob in zip(self.outputs, self.blob_outputs):
            status, mat = ex.extract(blob)
            if status != 0:
                raise ConversionFailed(f"ncnn could not compute {blob} ({name}): status {status}")
            value = np.array(mat, copy=True)
            shape = self.shapes[name]
            if value.size != int(np.prod(shape)):
                raise ConversionFailed(f"ncnn's {blob} has {value.size} values where ONNX's {name} has shape {shape}")
            result[name] = value.reshape(shape)
        del ex, mat_in, pixels
        return result


class NcnnBackend(Backend):
    def __init__(self, name: str, description: str):
        super().__init__()
        self.name, self.description = name, description
        self.capabilities = Capabilities(postprocess=False, converts=True, passive_wait=True)

    def _probe(self) -> tuple[bool, str]:
        try:
            with native_output_captured():
                import ncnn  # noqa: F401
            versions = _versions()
            _pnnx_executable()
        except (ImportError, importlib.metadata.PackageNotFoundError, ConversionFailed) as exc:
            return False, f"ncnn or pnnx is not installed ({exc}); `pip install -e .` installs both (ncnn==1.0.20261020, pnnx==20261020)"
        return probe_conversion(self.name, "pnnx", versions, lambda src, out: convert_onnx(src, out, [1, 4]),
                                lambda folder, x: NcnnNetwork(folder, ["y"], {"y": [1, 4]}, NcnnSettings())(x)["y"],
                                versions)

    def open(self, path: Path, settings: BackendSettings):
        from runtime.backends.split import SplitRunner, split_model

        own = NcnnSettings.of(settings)
        split = split_model(Path(path))
        conv = converted(self.name, split.network, "pnnx", _versions(), {"fp16": 0, "input": split.input_shape},
                         lambda src, out: convert_onnx(src, out, split.input_shape))
        start = time.perf_counter()
        network = NcnnNetwork(Path(conv.artifact), split.cut, split.cut_shapes, own)
        seconds = time.perf_counter() - start
        info = RunnerInfo(backend=self.name, library="ncnn", version=_versions(), device="cpu", precision="f32",
                          threads=own.threads or 2, load_seconds=seconds,
                          detail={"conversion": conv.to_dict(), "settings": own.__dict__,
                                  "part": "network part on ncnn, post-processing on onnxruntime CPU"})
        return SplitRunner(path, split, network, info, settings)
