"""Backends that run a converted artifact: the conversion cache, the network/post-processing
split, each converting backend against onnxruntime CPU, and a conversion failure kept per model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from core.contract import read_contract, save_model
from runtime.backends import BackendSettings, get_backend, list_backends
from runtime.backends.base import tiny_model_bytes
from runtime.backends.convert import RECORD, ConversionFailed, converted
from runtime.backends.split import split_model
from tests.test_bench import tiny_detector

CONVERTING = [b.name for b in list_backends() if b.capabilities.converts]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_detector(tmp_path_factory.mktemp("tiny-rt") / "tiny.onnx")


@pytest.fixture(scope="module")
def rows(tmp_path_factory, tiny) -> Path:
    """The tiny detector with its boxes and scores both read from one [1, 1024, 4] tensor of candidate
    rows (Reshape to [1, 4, 1024], Transpose), as a YOLO head arranges them: onnx2tf converts this
    whole graph faithfully, whereas the tiny detector's own layout (a Transpose to NHWC before the
    boxes' Reshape, a channel max for the scores) comes out of onnx2tf pairing scores with other
    candidates' boxes."""
    model = onnx.load(str(tiny))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 4, -1], np.int64), "shape_c"))
    swap = {"to_nhwc": helper.make_node("Reshape", ["feat", "shape_c"], ["feat_c"], name="boxes.channels"),
            "boxes.reshape": helper.make_node("Transpose", ["feat_c"], ["b01"], name="boxes.rows", perm=[0, 2, 1]),
            "scores.max": helper.make_node("ReduceMax", ["b01"], ["smax"], name="scores.max", axes=[2], keepdims=0)}
    nodes = [swap.get(n.name, n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "shape_b"))
    return save_model(model, tmp_path_factory.mktemp("rows") / "tiny-rows.onnx", read_contract(tiny))


def _images(n: int = 3) -> list[np.ndarray]:
    # bright, structured inputs: the tiny head's sigmoid scores pass its 0.55 threshold on some cells
    rng = np.random.default_rng(3)
    return [(rng.random((1, 3, 32, 32)) ** 0.3 * 255).astype(np.float32) for _ in range(n)]


def _whole(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))


# --------------------------------------------------------------------------- the cache

def test_conversion_cache_hit_miss_and_failure(tmp_path):
    calls = []

    def build(onnx_file: Path, out: Path):
        calls.append(onnx_file.read_bytes())
        (out / "artifact.bin").write_bytes(b"converted:" + onnx_file.read_bytes()[:8])
        return {"note": "test"}

    source = tiny_model_bytes()
    first = converted("fake", source, "fakeconv", "1.0", {"o": 1}, build, tmp_path)
    again = converted("fake", source, "fakeconv", "1.0", {"o": 1}, build, tmp_path)
    assert len(calls) == 1 and not first.cached and again.cached
    assert again.artifact == first.artifact and again.artifact_sha256 == first.artifact_sha256
    assert again.seconds == first.seconds and again.source_sha256 == first.source_sha256
    record = json.loads((Path(first.artifact) / RECORD).read_text())
    assert record["converter_version"] == "1.0" and record["artifact_sha256"] == first.artifact_sha256
    # another converter version or other options: a miss, in a folder of its own
    other = converted("fake", source, "fakeconv", "1.1", {"o": 1}, build, tmp_path)
    options = converted("fake", source, "fakeconv", "1.0", {"o": 2}, build, tmp_path)
    assert len(calls) == 3 and len({first.artifact, other.artifact, options.artifact}) == 3

    def failing(onnx_file: Path, out: Path):
        raise ConversionFailed("fakeconv cannot convert Foo")

    for _ in range(2):  # nothing is cached for a failure: the converter is asked again
        with pytest.raises(ConversionFailed, match="Foo"):
            converted("fake", source + b"", "fakeconv", "2.0", {}, failing, tmp_path)

    def buggy(onnx_file: Path, out: Path):  # onnx2torch on retinanet-800: a KeyError from inside the converter
        raise KeyError("model.backbone.fpn.inner_blocks.2.0.bias")

    with pytest.raises(ConversionFailed, match=r"fakeconv 3\.0 failed on this graph: KeyError: .*inner_blocks"):
        converted("fake", source, "fakeconv", "3.0", {}, buggy, tmp_path)
    assert not list((tmp_path / "fake").glob("*.partial"))


# --------------------------------------------------------------------------- the split

def test_split_parts_on_onnxruntime_equal_the_whole_graph(tiny):
    split = split_model(tiny)
    assert split.cut == ["feat_raw"] and split.cut_shapes == {"feat_raw": [1, 4, 32, 32]}
    assert "NonMaxSuppression" in split.post_ops
    net = ort.InferenceSession(split.network, providers=["CPUExecutionProvider"])
    post = ort.InferenceSession(split.post, providers=["CPUExecutionProvider"])
    assert [i.name for i in post.get_inputs()] == ["feat_raw"]
    found = 0
    for x in _images():
        cut = dict(zip(split.cut, net.run(split.cut, {"images": x})))
        parts = dict(zip([o.name for o in post.get_outputs()], post.run(None, cut)))
        whole = _whole(tiny, x)
        for name in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(parts[name], whole[name])
        found += len(whole["scores"])
    assert found > 0  # the comparison covered real detections


def test_the_post_part_gets_the_dtypes_its_graph_declares():
    """A runtime hands back its own dtypes and ranks (MNN returns retinanet-800's scalar int64 constant
    as a float of shape [1]): the post part must get what its graph declares (the old runner cast
    everything but int64 to float32, kept the rank, and onnxruntime refused the run)."""
    from runtime.backends.base import RunnerInfo
    from runtime.backends.split import Split, SplitRunner

    post = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["k"], ["kf"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "kf"], ["y"])], "post",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("k", onnx.TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 17)])
    post.ir_version = 8
    split = Split(network=b"", post=post.SerializeToString(), cut=["x", "k"], cut_shapes={"x": [2], "k": []},
                  post_ops=["Mul"], network_nodes=0, post_nodes=2, input_shape=[1, 3, 2, 2])
    info = RunnerInfo(backend="fake", library="fake", version="0", device="cpu", precision="f32", threads=1,
                      load_seconds=0.0)

    def network(images):  # the scalar comes back as float, and with a unit axis (MNN on retinanet-800)
        return {"x": np.array([[1.5, 2.0]], np.float64), "k": np.array([3.0], np.float32)}

    runner = SplitRunner(Path("fake.onnx"), split, network, info, BackendSettings(threads=1))
    out = runner.run(np.zeros((1, 3, 2, 2), np.float32))
    np.testing.assert_array_equal(out["y"], np.array([4.5, 6.0], np.float32))

    def wrong(images):  # not the declared size: a per-model conversion failure naming what came back
        return {"x": np.zeros(3, np.float32), "k": np.array(3, np.int64)}

    with pytest.raises(ConversionFailed, match=r"x \[3\] float32"):
        SplitRunner(Path("fake.onnx"), split, wrong, info, BackendSettings(threads=1)).run(np.zeros((1, 3, 2, 2)))


def test_a_cut_shape_inference_cannot_give_is_measured(tiny, monkeypatch):
    """torchvision graphs (retinanet-800) compute sizes at run time that ONNX shape inference cannot
    fold, so their cut tensors come out untyped: the split measures them with one onnxruntime run
    instead of giving up (the old code raised NoSplit), and the parts still equal the whole graph."""
    from onnx import shape_inference

    typed = split_model(tiny)
    real = shape_inference.infer_shapes

    def forgetful(model, *args, **kwargs):  # inference that types no intermediate tensor at all
        out = real(model, *args, **kwargs)
        del out.graph.value_info[:]
        return out

    monkeypatch.setattr(shape_inference, "infer_shapes", forgetful)
    measured = split_model(tiny)
    assert measured.cut == typed.cut and measured.cut_shapes == typed.cut_shapes == {"feat_raw": [1, 4, 32, 32]}
    net = ort.InferenceSession(measured.network, providers=["CPUExecutionProvider"])
    post = ort.InferenceSession(measured.post, providers=["CPUExecutionProvider"])
    assert net.get_outputs()[0].shape == [1, 4, 32, 32] and net.get_outputs()[0].type == "tensor(float)"
    x = _images()[0]
    cut = dict(zip(measured.cut, net.run(measured.cut, {"images": x})))
    parts = dict(zip([o.name for o in post.get_outputs()], post.run(None, cut)))
    whole = _whole(tiny, x)
    for name in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(parts[name], whole[name])


# --------------------------------------------------------------------------- each converting backend

def _usable(name: str):
    ok, why = get_backend(name).probe()
    if not ok:
        pytest.skip(f"backend {name} does not run here: {why.splitlines()[0]}")


@pytest.mark.parametrize("name", CONVERTING)
def test_converting_backend_matches_onnxruntime_and_caches(name, tiny):
    _usable(name)
    backend = get_backend(name)
    assert not backend.capabilities.postprocess
    with backend.open(tiny, BackendSettings(threads=1)) as runner:
        conversion = runner.info.detail["conversion"]
        assert conversion["converter_version"] and len(conversion["artifact_sha256"]) == 64
        for x in _images():
            got, want = runner.run(x), _whole(tiny, x)
            assert len(got["scores"]) == len(want["scores"])
            np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
            np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4)
            np.testing.assert_array_equal(got["labels"], want["labels"])
        parts = runner.part_samples()
        if parts is None:  # the whole graph ran on the runtime (litert where it converts)
            assert runner.info.detail["part"].startswith("whole graph")
        else:
            assert len(parts["network"]) == len(parts["postprocess"]) == 3
            network = runner.network_parity(_images(1))
            assert network["outputs"] == ["feat_raw"] and network["max_rel"] < 1e-4
    with backend.open(tiny, BackendSettings(threads=1)) as again:  # the second open reuses the artifact
        assert again.info.detail["conversion"]["cached"]
        assert again.info.detail["conversion"]["artifact"] == conversion["artifact"]


@pytest.fixture(scope="module")
def unconvertible(tmp_path_factory, tiny) -> Path:
    """The tiny detector with a Shrink (onnx2torch has no converter for it) in its network part."""
    model = onnx.load(str(tiny))
    nodes = list(model.graph.node)
    conv = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    nodes[conv].input[0] = "x_shrunk"
    nodes.insert(conv, helper.make_node("Shrink", ["x01"], ["x_shrunk"], name="shrink", lambd=0.0, bias=0.0))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return save_model(model, tmp_path_factory.mktemp("bad") / "tiny-shrink.onnx", read_contract(tiny))


def test_conversion_failure_is_a_per_model_result(unconvertible):
    from runtime.bench import BenchSettings, bench_side_by_side

    _usable("onnx2torch")
    with pytest.raises(ConversionFailed, match="Shrink"):
        get_backend("onnx2torch").open(unconvertible, BackendSettings())
    results = bench_side_by_side(unconvertible, ["cpu", "onnx2torch"],
                                 BenchSettings(runs=3, rounds=1, warmup=1, peak=False, parity=False),
                                 BackendSettings(threads=1))
    assert [r.provider for r in results] == ["cpu"]  # onnxruntime CPU still measured
    assert "Shrink" in results[0].conversion_failures["onnx2torch"]
    assert "Shrink" in results[0].to_record()["conversion_failures"]["onnx2torch"]


def test_mnn_conversion_loads_no_usage_logger(tmp_path, monkeypatch):
    # The MNN wheel's Python converter wrapper imports a logger that pip-installs its client at
    # import time and posts every conversion to a remote service: detbench must not go through it.
    pytest.importorskip("MNN", reason="MNN is not installed")
    from runtime.backends.mnn import convert_onnx

    trap = tmp_path / "trap"
    (trap / "aliyun").mkdir(parents=True)
    marker = tmp_path / "logger-imported"
    (trap / "aliyun" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('trap')\n")
    monkeypatch.setenv("PYTHONPATH", str(trap))
    monkeypatch.setenv("PATH", str(tmp_path / "no-pip"))  # an `os.system("pip install ...")` finds no pip
    model = tmp_path / "relu.onnx"
    model.write_bytes(tiny_model_bytes())
    out = tmp_path / "out"
    out.mkdir()
    convert_onnx(model, out)
    assert (out / "model.mnn").stat().st_size > 0
    assert not marker.exists(), "the conversion imported MNN's usage logger"


# --------------------------------------------------------------------------- ncnn

def test_ncnn_wrong_on_ssd300_is_reported_disagrees(exported):
    """pnnx turns SSD's channel flip (Gather [2, 1, 0] on the image) into a one-channel select, so
    ncnn's ssd300 network is silently wrong: the parity gate on real COCO images must say DISAGREES
    (found in the feasibility study of issue 22: values off by up to 163)."""
    from runtime.bench import BenchSettings, bench_side_by_side

    _usable("ncnn")
    pytest.importorskip("tensorflow")
    path = exported("ssd300").path
    results = bench_side_by_side(path, ["cpu", "ncnn"], BenchSettings(runs=2, rounds=1, warmup=1, peak=False),
                                 BackendSettings(threads=2))
    by = {r.provider: r for r in results}
    if "ncnn" not in by:  # a conversion failure is a per-model outcome, also never a latency
        assert "ncnn" in results[0].conversion_failures
        return
    assert by["ncnn"].parity_verdict == "disagree", by["ncnn"].to_record()["parity"]
    assert by["cpu"].parity_verdict == "reference"
    # alternating backends: OpenMP's idle threads asked to sleep, and the record says whether it took
    waiting = by["ncnn"].settings["openmp_waiting"]
    assert waiting["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"] and isinstance(waiting["applies"], bool)


def test_ncnn_conversion_keeps_float32_weights(tiny, tmp_path):
    """pnnx stores weights in fp16 unless told (fp16=0): the artifact's weights file must hold the
    float32 bytes of the network's convolution (worked out: its weight count x 4 bytes at least)."""
    import onnx as _onnx

    from runtime.backends.ncnn import convert_onnx

    _usable("ncnn")
    split = split_model(tiny)
    src = tmp_path / "net.onnx"
    src.write_bytes(split.network)
    out = tmp_path / "out"
    out.mkdir()
    convert_onnx(src, out, split.input_shape)
    weights = sum(int(np.prod(t.dims)) for t in _onnx.load(str(src)).graph.initializer if len(t.dims) == 4)
    assert weights > 0 and (out / "model.ncnn.bin").stat().st_size >= 4 * weights
    assert sorted(p.name for p in out.iterdir()) == ["model.ncnn.bin", "model.ncnn.param"]


# --------------------------------------------------------------------------- litert

def test_litert_without_its_venv_says_how_to_create_it(tmp_path, monkeypatch):
    from runtime.backends.litert import LiteRtBackend

    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    monkeypatch.setenv("DETBENCH_LITERT_VENV", str(tmp_path / "absent"))
    ok, why = LiteRtBackend("litert", "test").probe()
    assert not ok and "--setup litert" in why and str(tmp_path / "absent") in why
    (tmp_path / "absent" / "bin").mkdir(parents=True)  # an interrupted creation (no ready marker) is absent too
    (tmp_path / "absent" / "bin" / "python").write_text("")
    assert not LiteRtBackend("litert", "test").probe()[0]


def test_litert_whole_graph_keeps_only_real_detections(rows):
    tiny = rows
    # TFLite's NonMaxSuppression pads to max_output_boxes (100 here); the padding must not reach parity or mAP
    _usable("litert")
    counts = []
    with get_backend("litert").open(tiny, BackendSettings(threads=1)) as runner:
        assert runner.part_samples() is None and runner.info.detail["part"].startswith("whole graph")
        for x in _images():
            got, want = runner.run(x), _whole(tiny, x)
            assert got["scores"].shape == want["scores"].shape and got["boxes"].shape == want["boxes"].shape
            np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4)
            counts.append(len(want["scores"]))
        # no detection at all (sigmoid(0) = 0.5 is under the 0.55 threshold): empty outputs, not an error
        empty = runner.run(np.zeros((1, 3, 32, 32), np.float32))
        assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == empty["labels"].shape == (0,)
        assert len(_whole(tiny, np.zeros((1, 3, 32, 32), np.float32))["scores"]) == 0
    assert 0 < min(counts) and max(counts) < 100


def test_litert_whole_graph_that_computes_other_boxes_gives_way_to_the_network_part(tiny):
    # onnx2tf converts the tiny detector's whole graph into one that runs and pairs scores with other
    # boxes: the check at open (busiest COCO image against onnxruntime CPU) must catch it
    _usable("litert")
    with get_backend("litert").open(tiny, BackendSettings(threads=1)) as runner:
        assert runner.part_samples() is not None
        assert "disagrees with onnxruntime CPU" in runner.info.detail["whole_graph_failure"]


def test_litert_network_part_is_put_back_in_onnx_layout(tiny):
    _usable("litert")
    with get_backend("litert").open(tiny, BackendSettings(threads=1, provider_options={"part": "network"})) as runner:
        assert runner.info.detail["layouts"] == {"feat_raw": "channel-last"}  # onnx2tf's NHWC, transposed back
        for x in _images():
            got, want = runner.run(x), _whole(tiny, x)
            np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
            np.testing.assert_array_equal(got["labels"], want["labels"])
        network = runner.network_parity(_images(1))
        assert network["outputs"] == ["feat_raw"] and network["max_rel"] < 1e-4


def test_litert_conversion_failure_is_a_per_model_result(tiny, tmp_path):
    from runtime.bench import BenchSettings, bench_side_by_side

    _usable("litert")
    model = onnx.load(str(tiny))  # a CastLike in the network part: onnx2tf has no converter for it
    nodes = list(model.graph.node)
    conv = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    nodes[conv].input[0] = "x_like"
    nodes.insert(conv, helper.make_node("CastLike", ["x01", "x01"], ["x_like"], name="castlike"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    bad = save_model(model, tmp_path / "tiny-castlike.onnx", read_contract(tiny))
    results = bench_side_by_side(bad, ["cpu", "litert"], BenchSettings(runs=3, rounds=1, warmup=1, peak=False,
                                                                       parity=False), BackendSettings(threads=1))
    assert [r.provider for r in results] == ["cpu"]
    reason = results[0].conversion_failures["litert"]
    assert "CastLike" in reason and "whole graph" in reason, reason


def test_backends_setup_creates_litert_venv_once_and_refuses_others():
    from typer.testing import CliRunner

    import cli
    from runtime.backends.litert import READY, converter_python

    out = CliRunner().invoke(cli.app, ["backends", "--setup", "cpu"], env={"COLUMNS": "200"})
    assert out.exit_code != 0 and "nothing to set up" in out.output
    if converter_python() is None:
        pytest.skip("litert's converter venv is absent here (creating it takes minutes and 2.6 GB)")
    record = (converter_python().parent.parent / READY).read_text()
    out = CliRunner().invoke(cli.app, ["backends", "--setup", "litert"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "onnx2tf 1.29.24" in out.output and (converter_python().parent.parent / READY).read_text() == record
