"""onnxruntime, one backend per execution provider, and its sessions created in one place.

:func:`create_session` turns a short provider name (``cpu``, ``cuda``, ``tensorrt``,
``openvino``, ... or onnxruntime's own ``XxxExecutionProvider`` spelling) plus session
settings into an ``InferenceSession`` and a :class:`SessionInfo` that records what was
asked and what actually runs.

onnxruntime replaces a provider it cannot load by the CPU provider with only a log
line (onnxruntime-gpu without CUDA libraries does exactly that).  detbench never
accepts that silently: after creation the session's ``get_providers()`` must contain
the requested provider, otherwise :class:`ProviderUnavailableError` is raised naming
what was asked, what runs, what is installed and what to install — unless the caller
passes ``allow_fallback=True``, and then ``SessionInfo.providers_ran`` /
``SessionInfo.fell_back`` say what really ran.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.contract import INPUT_NAME
from core.errors import ConfigError, ContractError, ProviderUnavailableError
from runtime.backends.base import (EXECUTION_MODES, Backend, BackendSettings, Capabilities, Runner, RunnerInfo,
                                   tiny_model_bytes)

# short name -> onnxruntime provider name. Any other provider onnxruntime knows is
# accepted under its full name or its full name lower-cased without "ExecutionProvider".
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt-rtx": "NvTensorRTRTXExecutionProvider",
    "ort-openvino": "OpenVINOExecutionProvider",  # first: the name results are stored under
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "onednn": "DnnlExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}

# What to install when a provider cannot run (shown in ProviderUnavailableError).
_INSTALL_HINTS = {
    "CUDAExecutionProvider": (
        "an NVIDIA GPU with its driver, plus the CUDA and cuDNN libraries onnxruntime-gpu was built for "
        "(onnxruntime-gpu 1.31: CUDA 13.x — libcudart, libcublas, libcublasLt — and cuDNN 9.x, from the CUDA "
        "toolkit or NVIDIA's pip wheels) on LD_LIBRARY_PATH; see "
        "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements"),
    "TensorrtExecutionProvider": (
        "everything the CUDA provider needs plus the TensorRT libraries (e.g. `pip install tensorrt`) on "
        "LD_LIBRARY_PATH; see https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html"),
    "OpenVINOExecutionProvider": "`pip install onnxruntime-openvino` (in place of onnxruntime / onnxruntime-gpu)",
    "DnnlExecutionProvider": "an onnxruntime build with oneDNN (`--use_dnnl`); no PyPI wheel ships it",
    "DmlExecutionProvider": "`pip install onnxruntime-directml` on Windows",
    "ROCMExecutionProvider": "an AMD GPU with ROCm and an onnxruntime build with ROCm",
    "MIGraphXExecutionProvider": "an AMD GPU with ROCm/MIGraphX and `pip install onnxruntime-migraphx`",
    "CoreMLExecutionProvider": "macOS with the standard `onnxruntime` wheel",
    "QNNExecutionProvider": "`pip install onnxruntime-qnn` on a Qualcomm device",
}

# Providers whose inputs live on a CUDA device (IO binding applies).
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")


def resolve_provider(name: str) -> str:
    """onnxruntime's name for ``name`` (``cuda`` -> ``CUDAExecutionProvider``).

    Raises :class:`ConfigError` listing the accepted names when onnxruntime knows no such provider.
    """
    import onnxruntime as ort

    known = ort.get_all_providers()
    key = name.strip()
    if key in known:
        return key
    lowered = key.lower()
    if lowered in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[lowered]
    for full in known:
        if full.lower().removesuffix("executionprovider") == lowered:
            return full
    shorts = sorted(PROVIDER_ALIASES)
    raise ConfigError(f"--provider {name!r} is not an onnxruntime execution provider; use one of "
                      f"{', '.join(shorts)} or a full name ({', '.join(known)})")


def short_name(ort_name: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda`` (the name results are stored under)."""
    for short, full in PROVIDER_ALIASES.items():
        if full == ort_name:
            return short
    return ort_name.removesuffix("ExecutionProvider").lower()


@dataclass(frozen=True)
class SessionInfo:
    """What a session was asked for and what it runs on.

    ``requested`` is the onnxruntime provider name asked for, ``providers_ran`` the
    session's ``get_providers()`` (in priority order), ``fell_back`` is True when the
    requested provider is not among them (only possible with ``allow_fallback``);
    ``seconds`` is the wall time of ``InferenceSession`` creation (graph optimisation,
    kernel creation, for TensorRT engine building unless cached); ``settings`` are the
    options as recorded with every result.
    """

    requested: str
    providers_ran: list[str]
    fell_back: bool
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    load_log: str = ""

    @property
    def provider(self) -> str:
        """The provider that runs the graph's nodes first (``providers_ran[0]``)."""
        return self.providers_ran[0]

    @property
    def on_cuda_device(self) -> bool:
        return self.provider in CUDA_PROVIDERS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def session_options(*, threads: int | None = None, inter_threads: int | None = None, optimization: str = "all",
                    execution_mode: str = "sequential", profile_prefix: str | None = None, passive: bool = False):
    """``onnxruntime.SessionOptions`` from detbench's settings (validated, ConfigError on bad values)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads}: must be at least 1")
        opts.intra_op_num_threads = threads
    if inter_threads is not None:
        if inter_threads < 1:
            raise ConfigError(f"--inter-threads {inter_threads}: must be at least 1")
        opts.inter_op_num_threads = inter_threads
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):
        levels["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
    if optimization not in levels:
        raise ConfigError(f"--optimization {optimization!r}: use one of {', '.join(levels)}")
    opts.graph_optimization_level = levels[optimization]
    if execution_mode not in EXECUTION_MODES:
        raise ConfigError(f"--execution-mode {execution_mode!r}: use one of {', '.join(EXECUTION_MODES)}")
    opts.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if execution_mode == "sequential"
                           else ort.ExecutionMode.ORT_PARALLEL)
    if passive:  # an idle session's threads would otherwise busy-wait on the cores another backend is timed on
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


@dataclass(frozen=True)
class OrtSettings:
    """What an onnxruntime session is opened with (see :func:`session_options` for the meanings)."""

    threads: int | None = None
    inter_threads: int | None = None
    optimization: str = "all"
    execution_mode: str = "sequential"
    provider_options: dict[str, Any] | None = None
    allow_fallback: bool = False
    trt_cache_dir: str | Path | None = None
    profile_prefix: str | None = None
    passive: bool = False

    @classmethod
    def of(cls, settings: BackendSettings, **changes) -> "OrtSettings":
        """The onnxruntime part of the backends' common settings."""
        return replace(cls(
            threads=settings.threads, inter_threads=settings.inter_threads, optimization=settings.optimization,
            execution_mode=settings.execution_mode, provider_options=settings.provider_options or None,
            allow_fallback=settings.allow_fallback, trt_cache_dir=settings.trt_cache_dir,
            passive=bool(settings.passive_wait)), **changes)


def create_session(path, provider: str = "cpu", opened_with: OrtSettings | None = None):
    """An ``InferenceSession`` on ``provider`` and its :class:`SessionInfo`, opened with ``opened_with``.

    ``path`` is an ONNX file (or serialized model bytes). ``provider_options`` go to the
    requested provider; ``trt_cache_dir`` turns on TensorRT's engine cache in that folder
    (created if needed), so the engine is built once and reloaded afterwards. The CPU
    provider is always registered last, as onnxruntime needs it for nodes other providers
    do not take; the check is that the *requested* provider is in ``get_providers()``.

    Raises :class:`ProviderUnavailableError` when the requested provider is not available or
    onnxruntime dropped it (unless ``allow_fallback``), :class:`ConfigError` for bad settings.
    """
    import onnxruntime as ort

    s = opened_with if opened_with is not None else OrtSettings()
    threads, inter_threads, allow_fallback, trt_cache_dir = s.threads, s.inter_threads, s.allow_fallback, s.trt_cache_dir
    requested = resolve_provider(provider)
    opts = session_options(threads=threads, inter_threads=inter_threads, optimization=s.optimization,
                           execution_mode=s.execution_mode, profile_prefix=s.profile_prefix, passive=s.passive)
    options = dict(s.provider_options or {})
    if trt_cache_dir is not None:
        if requested not in ("TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider"):
            raise ConfigError(f"--trt-cache-dir applies to the TensorRT provider, not {short_name(requested)!r}")
        Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
        options.setdefault("trt_engine_cache_enable", "True")
        options.setdefault("trt_engine_cache_path", str(trt_cache_dir))
        options.setdefault("trt_timing_cache_enable", "True")
        options.setdefault("trt_timing_cache_path", str(trt_cache_dir))
    settings = {
        "provider": short_name(requested), "provider_ort": requested, "threads": threads,
        "inter_threads": inter_threads, "optimization": s.optimization, "execution_mode": s.execution_mode,
        "provider_options": {k: str(v) for k, v in options.items()}, "allow_fallback": allow_fallback,
        "trt_cache_dir": str(trt_cache_dir) if trt_cache_dir is not None else None, "passive_wait": s.passive,
    }
    available = ort.get_available_providers()
    if requested not in available and not allow_fallback:
        raise ProviderUnavailableError(_unavailable_message(requested, available, ran=None, log=""))

    providers: list[Any] = [(requested, options)] if requested in available else []
    if requested == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
        providers.append("CUDAExecutionProvider")  # TensorRT hands unsupported subgraphs to CUDA, as onnxruntime advises
    if requested != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    source = str(path) if isinstance(path, (str, Path)) else path
    with _captured_native_stderr(active=requested != "CPUExecutionProvider") as log:
        start = time.perf_counter()
        try:
            session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeError types
            if requested != "CPUExecutionProvider" and requested.removesuffix("ExecutionProvider") in str(exc):
                raise ProviderUnavailableError(
                    _unavailable_message(requested, available, ran=None, log=str(exc))) from exc
            raise ContractError(f"onnxruntime cannot load {source if isinstance(source, str) else 'the model'}: "
                                f"{exc}") from exc
        seconds = time.perf_counter() - start
    ran = session.get_providers()
    fell_back = requested not in ran
    if fell_back and not allow_fallback:
        raise ProviderUnavailableError(_unavailable_message(requested, available, ran=ran, log=log.text))
    info = SessionInfo(requested=requested, providers_ran=list(ran), fell_back=fell_back, seconds=seconds,
                       settings=settings, load_log=log.text.strip())
    return session, info


def _unavailable_message(requested: str, available: list[str], ran: list[str] | None, log: str) -> str:
    name = short_name(requested)
    if ran is None:
        what = f"execution provider {name!r} ({requested}) is not available in this onnxruntime"
    else:
        what = (f"execution provider {name!r} ({requested}) was asked for but onnxruntime could not load it "
                f"and would run on {', '.join(ran)} instead")
    reason = _first_reason(log)
    lines = [what + ".", f"onnxruntime lists as available: {', '.join(available)}"
             + (" (listed is not the same as usable: it may still fail to load)" if ran is not None else "")]
    if reason:
        lines.append(f"onnxruntime said: {reason}")
    lines.append(f"To run on it, install {_INSTALL_HINTS.get(requested, 'an onnxruntime build that includes ' + requested)}.")
    lines.append("To measure anyway on whatever provider runs, pass --allow-fallback (the result then records "
                 "the provider that actually ran).")
    return "\n".join(lines)


def _first_reason(log: str) -> str:
    """The most telling line of onnxruntime's native log (the library that failed to load)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for needle in ("cannot open shared object", "Failed to load library", "Require", "Please install", "EP Error"):
        for line in lines:
            if needle in line:
                # strip onnxruntime's timestamp / source-location prefix and ANSI colour codes
                text = line.split("FAIL : ", 1)[-1] if "FAIL : " in line else line
                return text.replace("\x1b[m", "").replace("\x1b[0;93m", "").replace("\x1b[1;31m", "").strip()
    return ""


@dataclass
class _Log:
    text: str = ""


@contextlib.contextmanager
def _captured_native_stderr(active: bool):
    """Capture what onnxruntime's C++ logger writes to fd 2 while a provider loads.

    onnxruntime reports a provider library that fails to load only on the process's
    stderr; capturing it lets the error name the missing library instead of the
    terminal showing an unexplained red log line.
    """
    log = _Log()
    if not active:
        yield log
        return
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to capture
        yield log
        return
    import io

    printed = io.StringIO()  # onnxruntime's Python layer print()s its "EP Error ... Falling back" notice
    with tempfile.TemporaryFile(mode="w+b") as tmp, contextlib.redirect_stdout(printed):
        os.dup2(tmp.fileno(), 2)
        try:
            yield log
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            log.text = tmp.read().decode("utf-8", "replace") + printed.getvalue()




# --------------------------------------------------------------------------- the backend

class OrtRunner(Runner):
    """An ``InferenceSession`` behind the :class:`Runner` interface."""

    def __init__(self, backend: str, path: Path, session, info: SessionInfo, settings: BackendSettings):
        super().__init__()
        import onnxruntime as ort

        self.path, self.session, self.session_info, self.settings = Path(path), session, info, settings
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_shape = session.get_inputs()[0].shape
        options = settings.provider_options
        precision = "fp16" if str(options.get("trt_fp16_enable", "")).lower() in ("1", "true") else "f32"
        if info.provider == "OpenVINOExecutionProvider":
            precision = options.get("precision", "f32").lower().replace("fp32", "f32")
        self.info = RunnerInfo(
            backend=backend, library="onnxruntime", version=ort.__version__,
            device="cuda" if info.on_cuda_device else "cpu", precision=precision, threads=settings.threads,
            load_seconds=info.seconds, fell_back=info.fell_back,
            detail={"providers_ran": list(info.providers_ran), "requested": info.requested, "session": info.settings,
                    **({"load_log": info.load_log} if info.load_log else {})})

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {INPUT_NAME: images})
        return {name: np.asarray(value) for name, value in zip(self.output_names, outputs)}

    def bind(self, images: np.ndarray):
        if not (self.session_info.on_cuda_device and not self.settings.include_copies):
            return super().bind(images)
        import onnxruntime as ort

        # inputs and outputs stay on the device so that the timed call excludes host copies
        device_id = int(self.settings.provider_options.get("device_id", 0))
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(images, "cuda", device_id))
        for name in self.output_names:
            binding.bind_output(name, "cuda", device_id)
        scores_at = self.output_names.index("scores") if "scores" in self.output_names else None

        def call() -> None:
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            if scores_at is not None:
                self._last = {"scores": np.empty(binding.get_outputs()[scores_at].shape()[0])}

        return call

    def layer_profile(self, images: np.ndarray, node_macs: dict[str, int], *, runs: int, warmup: int):
        """onnxruntime's per-kernel profile from a separate profiled session, joined with the MACs
        as :mod:`runtime.nodes` describes (profiling overhead never reaches the latency figures)."""
        import onnx

        from runtime.nodes import attribute, kernel_times, load_trace

        s = self.settings
        with tempfile.TemporaryDirectory(prefix="detbench-profile-") as tmp:
            session, _ = create_session(self.path, self.session_info.requested,
                                        OrtSettings.of(s, passive=False, profile_prefix=os.path.join(tmp, "ort")))
            for _ in range(warmup + max(1, runs)):
                session.run(self.output_names, {INPUT_NAME: images})
            trace = load_trace(session.end_profiling())
            del session
        kernels, n = kernel_times(trace, skip_runs=warmup)
        graph = onnx.load(str(self.path), load_external_data=False).graph
        return attribute(graph, kernels, node_macs, n)

    def close(self) -> None:
        self.session = None


class OrtBackend(Backend):
    """onnxruntime with one execution provider (the CPU provider is always registered last,
    for the nodes another provider does not take)."""

    can_fall_back = True

    def __init__(self, name: str, provider: str, description: str, device: str = "cpu"):
        super().__init__()
        self.name, self.provider, self.description = name, provider, description
        self.capabilities = Capabilities(device=device, layer_profiler=True, passive_wait=True)

    def _probe(self) -> tuple[bool, str]:
        import onnxruntime as ort

        if self.provider not in ort.get_all_providers():
            return False, (f"execution provider {self.name!r} ({self.provider}) is not known to onnxruntime "
                           f"{ort.__version__} at all. To run on it, install "
                           f"{_INSTALL_HINTS.get(self.provider, 'an onnxruntime build that includes ' + self.provider)}.")
        try:
            create_session(tiny_model_bytes(), self.provider)
        except (ProviderUnavailableError, ConfigError) as exc:
            return False, str(exc)
        return True, ""

    def open(self, path: Path, settings: BackendSettings) -> OrtRunner:
        session, info = create_session(path, self.provider, OrtSettings.of(settings))
        return OrtRunner(self.name, path, session, info, settings)
