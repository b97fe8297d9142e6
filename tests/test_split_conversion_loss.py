"""A converter that accepts a graph but loses tensors (MNN on a QDQ INT8 file printed shape errors and
returned no cut tensors) is a failed conversion of that file, not a crash: the split runner names the
missing tensors and a side-by-side opening drops that backend with the reason, keeping the others."""

from __future__ import annotations

import pytest

from runtime.backends import BackendSettings, get_backend
from runtime.backends.base import RunnerInfo
from runtime.backends.convert import ConversionFailed
from runtime.backends.split import SplitRunner, split_model


@pytest.fixture(scope="module")
def tiny_trained(exported, darknet_dir):
    return exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights")


def _lossy_runner(path):
    split = split_model(path)
    info = RunnerInfo(backend="lossy", library="lossy", version="0", device="cpu", precision="f32", threads=1,
                      load_seconds=0.0)
    return SplitRunner(path, split, lambda images: {}, info, BackendSettings(threads=1)), split


def test_split_runner_names_the_tensors_a_conversion_lost(tiny_trained):
    runner, split = _lossy_runner(tiny_trained.path)
    lost = [n for n in runner.post_inputs if n != "images"]
    assert lost  # the post-processing part does read cut tensors
    with pytest.raises(ConversionFailed, match=lost[0]):
        runner.run(__import__("numpy").zeros(split.input_shape, dtype="float32"))
    runner.close()


def test_side_by_side_opening_drops_a_backend_whose_first_run_shows_a_lost_conversion(tiny_trained, monkeypatch):
    import runtime.bench as bench

    real = bench.get_backend

    class Lossy:
        name = "lossy"

        def open(self, path, settings):
            return _lossy_runner(path)[0]

    monkeypatch.setattr(bench, "get_backend", lambda name: Lossy() if name == "lossy" else real(name))
    model = bench.OpenModel(tiny_trained.path, ["cpu", "lossy"], bench.BenchSettings(warmup=1, parity=False,
                                                                                      peak=False),
                            BackendSettings(threads=1))
    try:
        assert model.names == ["cpu"]
        assert "does not produce" in model.failures["lossy"]
        assert set(model.calls) == {"cpu"}
    finally:
        model.close()
    assert get_backend("cpu").name == "cpu"


def test_tune_finds_the_backend_that_refuses_a_file(tiny_trained, monkeypatch):
    """`tune` on an INT8 file: a backend that refuses it (the native framework knows no INT8 model) is
    named with its reason; one that runs it is not."""
    import runtime.backends as backends
    from core.errors import RegistryError
    from quantization.tune import _refusing

    real = backends.get_backend

    class Refuses:
        name = "refuses"

        def open(self, path, settings):
            raise RegistryError("unknown model 'yolov3-tiny@int8'")

    monkeypatch.setattr(backends, "get_backend", lambda name: Refuses() if name == "refuses" else real(name))
    refused = _refusing(tiny_trained.path, ["cpu", "refuses"], BackendSettings(threads=1))
    assert refused == {"refuses": "unknown model 'yolov3-tiny@int8'"}


def test_tune_labels_the_int8_file_int8():
    """onnxruntime reports f32 for a QDQ file; tune's table must still say which row is the INT8 file."""
    from quantization.tune import _precision

    assert _precision("int8", "f32") == "int8"
    assert _precision("f32", "bf16") == "bf16"
