"""Sessions per execution provider: names, settings, and never a silent CPU fallback.

onnxruntime-gpu on this machine lists CUDA and TensorRT as available but cannot load
them (no CUDA libraries) and would run on CPU: asking for them must raise, and the CLI
must exit non-zero with a clear message. GPU paths are exercised where a usable device
is present (decided by creating a session and reading ``get_providers()``) and skipped
with a named reason elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError, ContractError, ProviderUnavailableError
from runtime.backends import provider_usable
from runtime.backends.base import tiny_model_bytes
from runtime.backends.onnxruntime import OrtSettings, create_session, resolve_provider, short_name

ROOT = Path(__file__).resolve().parent.parent
CUDA_OK, CUDA_WHY = provider_usable("cuda")
TRT_OK, TRT_WHY = provider_usable("tensorrt")
requires_cuda = pytest.mark.skipif(not CUDA_OK, reason=f"no usable CUDA device here ({CUDA_WHY})")
requires_trt = pytest.mark.skipif(not TRT_OK, reason=f"no usable TensorRT here ({TRT_WHY})")


def test_provider_names_map_to_onnxruntime_names():
    assert resolve_provider("cpu") == "CPUExecutionProvider"
    assert resolve_provider("CUDA") == "CUDAExecutionProvider"
    assert resolve_provider("tensorrt") == "TensorrtExecutionProvider"
    assert resolve_provider("openvino") == "OpenVINOExecutionProvider"
    assert resolve_provider("CPUExecutionProvider") == "CPUExecutionProvider"
    assert resolve_provider("azure") == "AzureExecutionProvider"  # any provider onnxruntime knows, by its short name
    assert short_name("TensorrtExecutionProvider") == "tensorrt"


def test_unknown_provider_name_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        resolve_provider("gpu")
    assert "'gpu'" in str(err.value) and "cuda" in str(err.value) and "CPUExecutionProvider" in str(err.value)


def test_cpu_session_records_settings_and_runs():
    session, info = create_session(tiny_model_bytes(), "cpu", OrtSettings(threads=1, optimization="basic"))
    assert info.providers_ran == ["CPUExecutionProvider"] and not info.fell_back
    assert info.settings["threads"] == 1 and info.settings["optimization"] == "basic"
    assert info.settings["provider"] == "cpu" and info.seconds > 0
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], dtype=np.float32)
    assert session.run(None, {"x": x})[0].tolist() == [[0.0, 2.0, 0.0, 4.0]]


@pytest.mark.parametrize("bad", [dict(threads=0), dict(inter_threads=0), dict(optimization="max"),
                                 dict(execution_mode="async"), dict(trt_cache_dir="/tmp/x")])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        create_session(tiny_model_bytes(), "cpu", OrtSettings(**bad))


def test_unreadable_model_is_a_contract_error(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ContractError, match="junk.onnx"):
        create_session(junk, "cpu")


@pytest.mark.parametrize("provider,usable", [("cuda", CUDA_OK), ("tensorrt", TRT_OK)])
def test_unusable_gpu_provider_raises_instead_of_running_on_cpu(provider, usable):
    if usable:
        pytest.skip(f"{provider} really runs on this machine; the unavailable path cannot be shown here")
    with pytest.raises(ProviderUnavailableError) as err:
        create_session(tiny_model_bytes(), provider)
    message = str(err.value)
    assert repr(provider) in message                      # what was asked
    assert "CPUExecutionProvider" in message              # what would have run / is available
    assert "install" in message and "--allow-fallback" in message  # how to fix it


def test_provider_missing_from_this_build_raises():
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build includes OpenVINO")
    with pytest.raises(ProviderUnavailableError, match="onnxruntime-openvino"):
        create_session(tiny_model_bytes(), "openvino")


def test_fallback_only_when_asked_and_recorded():
    if CUDA_OK:
        pytest.skip("CUDA runs here, so there is no fallback to record")
    _, info = create_session(tiny_model_bytes(), "cuda", OrtSettings(allow_fallback=True))
    assert info.fell_back and info.providers_ran == ["CPUExecutionProvider"]
    assert info.requested == "CUDAExecutionProvider" and info.provider == "CPUExecutionProvider"


@pytest.mark.parametrize("provider,usable", [("cuda", CUDA_OK), ("tensorrt", TRT_OK)])
def test_cli_bench_on_unusable_gpu_exits_nonzero_without_numbers(tmp_path, provider, usable):
    if usable:
        pytest.skip(f"{provider} really runs on this machine")
    model = tmp_path / "probe.onnx"
    model.write_bytes(tiny_model_bytes())
    proc = subprocess.run([sys.executable, "cli.py", "bench", str(model), "--provider", "cpu", "--provider", provider,
                           "--runs", "1", "--no-peak"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "DETBENCH_RESULTS": str(tmp_path / "results"),
                               "COLUMNS": "200"})
    assert proc.returncode == ProviderUnavailableError.exit_code, proc.stdout + proc.stderr
    assert f"execution provider {provider!r}" in proc.stderr and "install" in proc.stderr
    assert "latency" not in proc.stdout  # providers are checked before anything is measured
    assert not (tmp_path / "results" / "results.jsonl").exists()


@requires_cuda
def test_cuda_session_runs_on_cuda():
    _, info = create_session(tiny_model_bytes(), "cuda")
    assert info.provider == "CUDAExecutionProvider" and info.on_cuda_device


@requires_trt
def test_tensorrt_engine_cache_is_written(tmp_path):
    cache = tmp_path / "trt"
    session, info = create_session(tiny_model_bytes(), "tensorrt", OrtSettings(trt_cache_dir=cache))
    session.run(None, {"x": np.ones((1, 4), np.float32)})
    assert info.provider == "TensorrtExecutionProvider"
    assert info.settings["provider_options"]["trt_engine_cache_path"] == str(cache)
    assert any(cache.iterdir()), "TensorRT wrote no engine into the cache folder"
