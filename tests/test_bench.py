"""`bench`: latency statistics, the results store, --native and --nodes, on real exports.

Timing values are never asserted (the machine is shared); what is asserted is what
can be checked exactly: run counts, statistics against numpy on the recorded samples,
store records, the native ratio's definition, MAC conservation between the analyzer and
the per-node join, and the fused-node mapping on a graph whose MACs are worked out here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from core import store
from runtime.bench import Latency, bench_model, bench_models, default_image, time_runs
from core.contract import ModelContract, save_model
from core.errors import ConfigError
from runtime.nodes import attribute, kernel_times


# --------------------------------------------------------------------------- a tiny contract model

def tiny_detector(path: Path, *, symbolic_batch: bool = False, framework: str = "test") -> Path:
    """images [1|N, 3, 32, 32] -> Conv 3->4 (3x3) -> Sigmoid -> boxes/scores -> NonMaxSuppression -> contract outputs.

    ``symbolic_batch``: a batch file as the contract has it (detbench.batch = symbolic): NMS per image,
    a detection's candidate is image x 1024 + box, and the output ``batch_index``."""
    rng = np.random.default_rng(7)
    batch = "N" if symbolic_batch else 1
    n = 0 if symbolic_batch else 1  # Reshape's 0 keeps the batch: NMS sees one entry per image
    inits = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.05, "w"),
             nh.from_array(np.array([255.0], np.float32), "k255"), nh.from_array(np.array([32.0], np.float32), "k32"),
             nh.from_array(np.array([n, -1, 4], np.int64), "shape_b"), nh.from_array(np.array([n, 1, -1], np.int64), "shape_s"),
             nh.from_array(np.array([-1, 4], np.int64), "flat_b"), nh.from_array(np.array([-1], np.int64), "flat_s"),
             nh.from_array(np.array([100], np.int64), "max_out"), nh.from_array(np.array([0.5], np.float32), "iou"),
             nh.from_array(np.array([0.55], np.float32), "thr"), nh.from_array(np.array([1], np.int64), "col1"),
             nh.from_array(np.array([2], np.int64), "col2"), nh.from_array(np.array([0], np.int64), "col0"),
             nh.from_array(np.array(32 * 32, np.int64), "per_image")]
    nodes = [
        helper.make_node("Div", ["images", "k255"], ["x01"], name="normalise"),
        helper.make_node("Conv", ["x01", "w"], ["feat_raw"], name="head.conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["feat_raw"], ["feat"], name="head.act"),
        helper.make_node("Transpose", ["feat"], ["feat_t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["feat_t", "shape_b"], ["b01"], name="boxes.reshape"),
        helper.make_node("Mul", ["b01", "k32"], ["cand_boxes"], name="boxes.scale"),
        helper.make_node("ReduceMax", ["feat"], ["smax"], name="scores.max", axes=[1], keepdims=0),
        helper.make_node("Reshape", ["smax", "shape_s"], ["cand_scores"], name="scores.reshape"),
        helper.make_node("NonMaxSuppression", ["cand_boxes", "cand_scores", "max_out", "iou", "thr"], ["sel"], name="nms"),
        helper.make_node("Gather", ["sel", "col2"], ["idx2"], name="sel.box", axis=1),
        helper.make_node("Reshape", ["idx2", "flat_s"], ["box_idx"], name="sel.flat"),
        helper.make_node("Gather", ["sel", "col0"], ["img2"], name="sel.image", axis=1),
        helper.make_node("Reshape", ["img2", "flat_s"], ["batch_index"], name="out.batch_index"),
        helper.make_node("Mul", ["batch_index", "per_image"], ["img_offset"], name="sel.offset"),
        helper.make_node("Add", ["img_offset", "box_idx"], ["idx"], name="sel.candidate"),
        helper.make_node("Reshape", ["cand_boxes", "flat_b"], ["all_boxes"], name="boxes.flat"),
        helper.make_node("Reshape", ["cand_scores", "flat_s"], ["all_scores"], name="scores.flat"),
        helper.make_node("Gather", ["all_boxes", "idx"], ["boxes"], name="out.boxes", axis=0),
        helper.make_node("Gather", ["all_scores", "idx"], ["scores"], name="out.scores", axis=0),
        helper.make_node("Gather", ["sel", "col1"], ["cls2"], name="sel.class", axis=1),
        helper.make_node("Reshape", ["cls2", "flat_s"], ["labels"], name="out.labels"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["K"]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["K"])]
        + ([helper.make_tensor_value_info("batch_index", TensorProto.INT64, ["K"])] if symbolic_batch else []), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    contract = ModelContract(name="tiny-test", family="test", framework=framework, input_height=32, input_width=32,
                             resize="letterbox", label_space="coco80", score_threshold=0.55, iou_threshold=0.5,
                             max_detections=100, weights="random-init", source_params=108,
                             extra={"batch": "symbolic"} if symbolic_batch else {})
    return save_model(model, path, contract)


TINY_CONV_MACS = 32 * 32 * 4 * 3 * 3 * 3  # output pixels x out channels x (in channels x kernel area)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_detector(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


# --------------------------------------------------------------------------- statistics and timing

def test_latency_statistics_match_hand_values():
    lat = Latency.of([4.0, 1.0, 3.0, 2.0])
    assert (lat.n, lat.mean, lat.min, lat.max, lat.p50) == (4, 2.5, 1.0, 4.0, 2.5)
    assert lat.std == pytest.approx(np.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3))  # sample std, ddof=1
    assert lat.p90 == pytest.approx(3.7) and lat.p99 == pytest.approx(3.97)  # linear interpolation


def test_time_runs_counts_warmup_and_runs():
    calls = []
    samples = time_runs(lambda: calls.append(1), warmup=3, runs=5, seconds=None)
    assert len(calls) == 8 and len(samples) == 5 and all(s >= 0 for s in samples)
    calls.clear()
    samples = time_runs(lambda: calls.append(1), warmup=0, runs=None, seconds=0.05)
    assert len(samples) == len(calls) >= 1


@pytest.mark.parametrize("kwargs", [dict(runs=0), dict(seconds=0.0), dict(warmup=-1), dict(runs=2, seconds=1.0)])
def test_time_runs_rejects_bad_counts(kwargs):
    args = dict(warmup=0, runs=None, seconds=None)
    args.update(kwargs)
    with pytest.raises(ConfigError):
        time_runs(lambda: None, **args)


def test_default_image_is_a_real_busy_coco_image(coco_dir):
    image = default_image()
    assert image.parent == coco_dir / "val2017" and image.suffix == ".jpg"
    doc = json.loads((coco_dir / "annotations" / "instances_val2017.json").read_text())
    counts: dict[int, int] = {}
    for ann in doc["annotations"]:
        if not ann["iscrowd"]:
            counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    assert int(image.stem) in {i for i, c in counts.items() if c == max(counts.values())}


# --------------------------------------------------------------------------- bench on a tiny contract graph

def test_bench_tiny_model_figures_and_store_record(tiny):
    results = bench_models([tiny], ["cpu"], warmup=1, runs=4, threads=1, peak=True)
    (r,) = results
    assert r.latency.n == 4 and len(r.samples_ms) == 4
    assert r.latency.p50 == pytest.approx(float(np.median(r.samples_ms)))
    assert r.latency.min <= r.latency.p50 <= r.latency.p99 <= r.latency.max
    assert r.throughput_ips == pytest.approx(1000.0 / r.latency.mean)
    assert r.providers_ran == ["CPUExecutionProvider"] and r.settings["threads"] == 1
    assert r.detections >= 1  # a real image gives candidates above the threshold
    # the analyzer's MACs include the convolution worked out by hand, and the fraction follows from them
    assert r.macs >= TINY_CONV_MACS
    assert r.achieved_gflops == pytest.approx(2 * r.macs / (r.latency.p50 / 1e3) / 1e9)
    assert r.fraction_of_peak == pytest.approx(r.achieved_gflops / r.machine_peak_gflops)
    (rec,) = [x for x in store.load("bench").records if x["model_sha256"] == r.model_sha256]
    assert rec["model"] == "tiny-test" and rec["provider"] == "cpu"
    assert rec["contract"]["detbench.weights"] == "random-init"
    data = rec["data"]
    for key in ("latency_ms", "throughput_ips", "session_seconds", "peak_rss_mb", "runs", "warmup", "batch",
                "providers_ran", "machine_peak_gflops", "fraction_of_peak", "native", "nodes"):
        assert key in data, key
    assert set(data["latency_ms"]) == {"mean", "std", "p50", "p90", "p99", "min", "max"}
    assert data["runs"] == 4 and data["native"] is None and data["nodes"] is None


def test_seconds_mode_runs_until_the_budget(tiny):
    r = bench_model(tiny, "cpu", warmup=0, seconds=0.2, peak=False)
    assert r.latency.n >= 1 and sum(r.samples_ms) <= 200 + r.latency.max + 50


def test_batch_above_one_is_refused_on_batch1_graphs(tiny):
    with pytest.raises(ConfigError, match="fixed batch of 1"):
        bench_model(tiny, "cpu", runs=1, batch=2, peak=False)


def test_batch_above_one_runs_on_symbolic_batch_graph(tmp_path):
    model = tiny_detector(tmp_path / "tiny-n.onnx", symbolic_batch=True)
    r = bench_model(model, "cpu", warmup=0, runs=2, batch=3, peak=False)
    assert r.batch == 3 and r.throughput_ips == pytest.approx(3000.0 / r.latency.mean)


def test_native_for_unknown_framework_is_a_clear_error(tiny):
    with pytest.raises(ConfigError, match="no native runtime for source framework 'test'"):
        bench_model(tiny, "cpu", runs=1, native=True, peak=False)


# --------------------------------------------------------------------------- per-node profile join

def _save_graph(path: Path, nodes, inits, x_channels: int) -> Path:
    """A float graph ``x [1, x_channels, 64, 64] -> y [1, 16, 64, 64]`` saved at IR 10."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, x_channels, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def _profiled(path: Path, tmp_path: Path, optimization: str, macs: dict[str, int]):
    """Three profiled runs on the CPU provider, the first dropped; per-kernel times joined to ``macs``."""
    from runtime.nodes import load_trace
    from runtime.backends.onnxruntime import OrtSettings, create_session

    session, _ = create_session(path, "cpu", OrtSettings(optimization=optimization, profile_prefix=str(tmp_path / "p")))
    shape = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    kernels, runs = kernel_times(load_trace(session.end_profiling()), skip_runs=1)
    return attribute(onnx.load(path).graph, kernels, macs, runs), runs


def _conv_bn_act_graph(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
             nh.from_array(np.ones(16, np.float32), "g"), nh.from_array(np.zeros(16, np.float32), "b"),
             nh.from_array(np.zeros(16, np.float32), "m"), nh.from_array(np.ones(16, np.float32), "v"),
             nh.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv_0", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn1"], name="bn_0"),
             helper.make_node("LeakyRelu", ["bn1"], ["a1"], name="leaky_0", alpha=0.1),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv_1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["y"], name="relu_1")]
    return _save_graph(path, nodes, inits, x_channels=3)


# MACs worked out by hand: conv = H*W*Cout*Cin*k*k; BN and activations one per output element
HAND_MACS = {"conv_0": 64 * 64 * 16 * 3 * 9, "bn_0": 64 * 64 * 16, "leaky_0": 64 * 64 * 16,
             "conv_1": 64 * 64 * 16 * 16 * 9, "relu_1": 64 * 64 * 16}


@pytest.mark.parametrize("optimization", ["extended", "all"])
def test_fused_kernels_map_back_to_their_onnx_nodes(tmp_path, optimization):
    """extended: FusedConv keeps the Conv's name (BN+act after it); all: NCHWc kernels take the last output's name."""
    times, runs = _profiled(_conv_bn_act_graph(tmp_path / "g.onnx"), tmp_path, optimization, HAND_MACS)
    assert runs == 2
    groups = {tuple(g.originals): g for g in times.groups if g.originals}
    assert set(groups) == {("conv_0", "bn_0", "leaky_0"), ("conv_1", "relu_1")}, [g.kernel for g in times.groups]
    first, second = groups[("conv_0", "bn_0", "leaky_0")], groups[("conv_1", "relu_1")]
    assert first.macs == 64 * 64 * 16 * (27 + 2) and second.macs == 64 * 64 * 16 * (144 + 1)
    assert first.op_type == second.op_type == "Conv" and not times.unattributed
    assert times.by_op["Conv"]["macs"] == sum(HAND_MACS.values())
    assert sum(g.share for g in times.groups) == pytest.approx(1.0)
    assert first.gmacs_per_s == pytest.approx(first.macs / (first.mean_us * 1e3))


def _frozen_bn_residual_graph(path: Path) -> Path:
    """torchvision's ResNet block tail as exported: Conv -> Mul(scale) -> Add(bias) -> Add(residual) -> Relu."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w"),
             nh.from_array(rng.uniform(0.5, 1.5, (1, 16, 1, 1)).astype(np.float32), "scale"),
             nh.from_array(rng.standard_normal((1, 16, 1, 1)).astype(np.float32), "bias")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "scale"], ["m"], name="bn/Mul"),
             helper.make_node("Add", ["m", "bias"], ["b"], name="bn/Add"),
             helper.make_node("Add", ["b", "x"], ["r"], name="residual/Add"),
             helper.make_node("Relu", ["r"], ["y"], name="relu")]
    return _save_graph(path, nodes, inits, x_channels=16)


def test_frozen_batchnorm_residual_tail_is_booked_as_its_convolution(tmp_path):
    """onnxruntime runs Conv + FrozenBatchNorm (Mul, Add) as one NCHWc Conv kernel named after
    the bias Add's output; its time and MACs belong to the Conv (hand MACs: 64*64*16*16*9 for
    the conv, one per output element for each elementwise node)."""
    element = 64 * 64 * 16
    macs = {"conv": element * 16 * 9, "bn/Mul": element, "bn/Add": element, "residual/Add": element, "relu": element}
    times, _ = _profiled(_frozen_bn_residual_graph(tmp_path / "g.onnx"), tmp_path, "all", macs)
    conv = next(g for g in times.groups if "conv" in g.originals)
    # The residual input here is the graph input (not NCHWc), so onnxruntime stops the fusion at the bias Add.
    assert conv.originals == ["conv", "bn/Mul", "bn/Add"], [(g.kernel, g.originals) for g in times.groups]
    assert conv.kernel_op == conv.op_type == "Conv" and conv.macs == element * (16 * 9 + 2)
    assert "Mul" not in times.by_op and times.by_op["Conv"]["macs"] >= conv.macs


def test_kernel_times_average_over_kept_runs_only():
    trace = [{"cat": "Session", "name": "model_run", "ts": t0, "dur": 100} for t0 in (0, 1000, 2000)]
    trace += [{"cat": "Node", "name": "a_kernel_time", "ts": t0 + 10, "dur": d, "args": {"op_name": "Conv",
                                                                                         "provider": "CPU"}}
              for t0, d in ((0, 90), (1000, 10), (2000, 30))]
    (k,), runs = kernel_times(trace, skip_runs=1)
    assert runs == 2 and k.mean_us == 20.0 and k.calls_per_run == 1.0 and k.kernel_op == "Conv"


# --------------------------------------------------------------------------- real exports

def _needs(module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} (the exporter this test benchmarks) is not in the tree yet")


@pytest.fixture(scope="module")
def tiny_trained(exported, darknet_dir):
    return exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights")


def test_darknet_trained_export_bench_with_native_opencv(tiny_trained):
    r = bench_model(tiny_trained.path, "cpu", warmup=1, runs=3, native=True, peak=False)
    assert r.model == "yolov3-tiny" and r.contract["detbench.framework"] == "darknet"
    assert r.detections >= 1  # trained weights on the busiest COCO image
    native = r.native
    assert native["framework"] == "darknet" and "OpenCV" in native["runtime"] and native["runs"] == 3
    assert native["ratio"] == pytest.approx(r.latency.p50 / native["latency_ms"]["p50"])


def test_darknet_random_init_native_uses_the_same_random_weights(exported):
    """OpenCV, reading the random .weights written for --native, finds the export's best detection."""
    import tempfile

    import cv2
    import onnxruntime as ort

    from core.contract import read_contract
    from core.images import load_rgb, prepare_for
    from exporters.darknet.native import darknet_files

    result = exported("yolov3-tiny")
    contract = read_contract(result.path)
    assert contract.random_init
    tensor, _ = prepare_for(load_rgb(default_image()), contract)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, weights = darknet_files(result.path, contract, Path(tmp))
        net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setInput(tensor / np.float32(255.0))
    rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in net.forward(net.getUnconnectedOutLayersNames())])
    boxes, scores, labels = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(
        ["boxes", "scores", "labels"], {"images": tensor})
    class_scores = rows[:, 5:]  # OpenCV's yolo rows: cx, cy, w, h (relative), objectness, objectness x class prob
    best = int(np.argmax(class_scores.max(axis=1)))
    if len(scores) == 0:
        assert class_scores.max() < contract.score_threshold
        return
    assert class_scores[best].max() == pytest.approx(float(scores[0]), rel=1e-3, abs=1e-4)
    assert int(class_scores[best].argmax()) == int(labels[0])
    cx, cy, w, h = rows[best, :4] * np.array([contract.input_width, contract.input_height] * 2)
    assert np.allclose(boxes[0], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=0.5)
    r = bench_model(result.path, "cpu", warmup=0, runs=2, native=True, peak=False)
    assert r.native["framework"] == "darknet" and r.native["ratio"] > 0


def test_cli_bench_nodes_lists_top_kernels_with_gmacs(tiny_trained):
    from typer.testing import CliRunner

    import cli

    runner = CliRunner()
    out = runner.invoke(cli.app, ["bench", str(tiny_trained.path), "--runs", "2", "--warmup", "1", "--nodes",
                                  "--top", "5", "--threads", "2"], env={"COLUMNS": "160"})
    assert out.exit_code == 0, out.output
    assert "GMAC/s" in out.output and "convolutional_" in out.output and "by op type" in out.output
    rec = [x for x in store.load("bench").records if x["model"] == "yolov3-tiny" and x["data"]["nodes"]][-1]
    nodes = rec["data"]["nodes"]
    # every MAC the analyzer counted is attributed to a kernel or listed as unattributed
    from counting import profile_model

    total = profile_model(tiny_trained.path, shapes="measured", image=default_image(), allow_unknown=True).macs
    assert sum(e["macs"] for e in nodes["by_op"].values()) + nodes["unattributed_macs"] == total
    top = nodes["nodes"][0]
    assert top["op_type"] == "Conv" and top["gmacs_per_s"] > 0 and len(top["originals"]) >= 1
    assert rec["data"]["fraction_of_peak"] is not None and rec["data"]["machine_peak_gflops"] > 0


def test_pytorch_export_bench_with_native_eager(exported):
    _needs("exporters.pytorch.export")
    result = exported("ssd300_vgg16")
    r = bench_model(result.path, "cpu", warmup=1, runs=2, native=True, peak=False)
    assert r.native["framework"] == "pytorch" and "PyTorch" in r.native["runtime"]
    assert r.native["ratio"] == pytest.approx(r.latency.p50 / r.native["latency_ms"]["p50"])


def test_tensorflow_export_bench_with_native(exported):
    _needs("exporters.tensorflow.export")
    result = exported("ssd300")
    r = bench_model(result.path, "cpu", warmup=1, runs=2, native=True, peak=False)
    assert r.native["framework"] == "tensorflow" and "TensorFlow" in r.native["runtime"]
    assert r.native["ratio"] == pytest.approx(r.latency.p50 / r.native["latency_ms"]["p50"])


# --------------------------------------------------------------------------- GPU paths (where a device exists)

from runtime.backends import provider_usable  # noqa: E402

_CUDA_OK, _CUDA_WHY = provider_usable("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA_OK, reason=f"no usable CUDA device here ({_CUDA_WHY})")
@pytest.mark.parametrize("include_copies", [False, True])
def test_cuda_bench_with_and_without_host_copies(tiny, include_copies):
    r = bench_model(tiny, "cuda", warmup=1, runs=3, include_copies=include_copies, peak=True)
    assert r.providers_ran[0] == "CUDAExecutionProvider" and not r.fell_back
    assert r.settings["include_copies"] is include_copies and r.latency.n == 3 and r.detections >= 1
    assert r.machine_peak_gflops == r.peak["gpu_gflops"] and r.peak["gpu_gflops"] > 0


def test_default_timing_alternates_until_every_backend_meets_the_validity_rules():
    """Without --runs/--seconds, backends are timed in alternating slices until each has the runs and
    the timed duration the rules ask for (scaled-down rules, fake backends of 2 ms and 5 ms)."""
    import time as _time

    from runtime.bench import _alternate_until_valid
    from runtime.stats import ValidityRules

    order: list[str] = []

    def backend(name, ms):
        def call():
            order.append(name)
            _time.sleep(ms / 1e3)
        return call

    rules = ValidityRules(min_queries=20, min_duration_s=0.15, max_duration_s=5.0)
    samples = _alternate_until_valid({"a": backend("a", 2), "b": backend("b", 5)}, ["a", "b"], 2, rules,
                                     slice_seconds=0.02)
    for name in ("a", "b"):
        assert len(samples[name]) >= 20 and sum(samples[name]) / 1e3 >= 0.15
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert switches >= 3  # interleaved in slices, not one backend then the other
    capped = _alternate_until_valid({"slow": backend("slow", 30)}, ["slow"], 1,
                                    ValidityRules(min_queries=1000, min_duration_s=0.1, max_duration_s=0.3),
                                    slice_seconds=0.05)
    assert 0.3 <= sum(capped["slow"]) / 1e3 < 1.0 and len(capped["slow"]) < 1000  # stopped by the cap


def test_bench_scheduled_times_a_real_model_within_its_budget(tiny):
    """runtime.bench.bench_scheduled on a real file: the schedule's outcome travels in the record,
    the record's samples are the ones the verdict judges, and the thread count that ran is stated."""
    from runtime.backends import BackendSettings
    from runtime.bench import BenchSettings, ScheduledModel, bench_scheduled
    from runtime.schedule import ScheduleSettings

    results, outcomes, failed = bench_scheduled(
        [ScheduledModel(key="tiny", path=tiny, backends=["cpu"])], BenchSettings(warmup=1, peak=False, parity=False),
        BackendSettings(threads=1), ScheduleSettings(budget_s=3.0, p90=False))
    assert failed == {}
    (r,) = results["tiny"]
    o = outcomes[("tiny", "cpu")]
    record = r.to_record()
    assert record["samples_ms"] == o.samples and record["runs"] == len(o.samples) >= 1
    assert record["schedule"]["p50_valid"] == o.p50_valid
    assert (record["latency_validity"]["verdicts"]["p50"]["verdict"] == "VALID") == o.p50_valid
    assert record["threads"] == 1 and record["schedule"]["settings"]["budget_s"] == 3.0
    if not o.p50_valid:  # a loaded machine: the reason is said, never a silent INVALID
        assert o.reason
