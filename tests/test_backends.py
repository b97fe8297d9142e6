"""Backends: one interface over onnxruntime providers, OpenVINO and the native frameworks.

Parametrised over every registered name: a backend that runs here opens yolov3-tiny (official
weights), returns the contract's outputs, and agrees with onnxruntime CPU within its stated
tolerance on real COCO images; one that cannot run here is skipped with probe()'s reason.
The independent reference is onnxruntime CPU (another implementation of the same graph).
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from core.errors import ConfigError, ProviderUnavailableError
from core.images import load_rgb, prepare_for
from runtime.backends import BackendSettings, backend_names, get_backend, list_backends
from runtime.inputs import busiest_images
from runtime.parity import BF16, F32, check_parity, compare


@pytest.fixture(scope="module")
def tiny_trained(exported, darknet_dir):
    return exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights")


@pytest.fixture(scope="module")
def reference(tiny_trained):
    with get_backend("cpu").open(tiny_trained.path, BackendSettings(threads=2)) as runner:
        yield runner


@pytest.mark.parametrize("name", backend_names())
def test_every_backend_runs_here_or_skips_with_its_reason(name, tiny_trained, reference):
    backend = get_backend(name)
    ok, reason = backend.probe()
    if not ok:
        assert reason  # a refusal always says why
        pytest.skip(f"{name} cannot run here: {reason.splitlines()[0]}")
    with backend.open(tiny_trained.path, BackendSettings(threads=2)) as runner:
        tensor, _ = prepare_for(load_rgb(busiest_images(1)[0]), tiny_trained.contract)
        out = runner.run(tensor)
        assert set(out) >= {"boxes", "scores", "labels"}
        k = out["scores"].shape[0]
        assert out["boxes"].shape == (k, 4) and out["labels"].shape == (k,) and k >= 1
        assert out["boxes"].dtype == np.float32 and out["scores"].dtype == np.float32 and out["labels"].dtype == np.int64
        assert np.all(np.diff(out["scores"]) <= 0)  # best first, as the contract's NMS emits them
        info = runner.info
        assert info.backend == name and info.library and info.version and info.load_seconds > 0
        if name == "cpu":
            return
        parity = check_parity(runner, reference, busiest_images(2))
        if name == "native":
            # OpenCV's Darknet path decodes one label per box (argmax) where the graph keeps every
            # class above threshold; its figures are recorded, and where boxes match they match to rounding
            assert parity.max_box_px is not None and parity.max_box_px < 1e-2
            return
        assert parity.agrees, parity.reasons
        assert info.precision == ("bf16" if name.endswith("bf16") else "f32")


def test_openvino_f32_matches_onnxruntime_cpu_on_official_weights(tiny_trained, reference):
    """Same graph, two float32 runtimes: every detection one to one within 1e-2 px and 1e-4 in score."""
    ok, reason = get_backend("openvino").probe()
    if not ok:
        pytest.skip(reason)
    with get_backend("openvino").open(tiny_trained.path, BackendSettings(threads=2)) as runner:
        assert runner.info.precision == "f32"  # read back from the compiled model, never assumed
        parity = check_parity(runner, reference, busiest_images(3))
    assert parity.verdict == "agree" and parity.tolerance == {**parity.tolerance, "rule": "index"}
    assert parity.matched == parity.total == parity.reference_detections == parity.backend_detections > 0
    assert parity.max_box_px <= F32.box_px and parity.max_score <= F32.score


def test_empty_detections_come_back_as_empty_arrays(tiny_trained):
    """A grey image gives no detection above threshold on some backends: K = 0 must be a valid output."""
    grey = np.full((1, 3, 416, 416), 128.0, np.float32)
    for name in ("cpu", "openvino"):
        backend = get_backend(name)
        if not backend.probe()[0]:
            continue
        with backend.open(tiny_trained.path, BackendSettings()) as runner:
            out = runner.run(grey)
        assert out["boxes"].shape[1:] == (4,) and out["labels"].dtype == np.int64
        assert out["boxes"].shape[0] == out["scores"].shape[0] == out["labels"].shape[0]


def test_compare_rules_on_hand_made_detections():
    ref = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), "scores": np.array([0.9, 0.5], np.float32),
           "labels": np.array([1, 2])}
    same = {k: v.copy() for k, v in ref.items()}
    same["boxes"][0, 0] += 0.001
    assert compare(ref, same, F32, iou_threshold=0.45, max_detections=100)["ok"]
    moved = {k: v.copy() for k, v in ref.items()}
    moved["boxes"][1] += 1.0  # one pixel: IoU 0.82, a bf16-sized difference, far beyond float32 rounding
    assert not compare(ref, moved, F32, iou_threshold=0.45, max_detections=100)["ok"]
    figures = compare(ref, moved, BF16, iou_threshold=0.45, max_detections=100)
    assert figures["ok"] and figures["matched"] == figures["required"] == 2 and figures["max_box_px"] == 1.0
    relabelled = {k: v.copy() for k, v in ref.items()}
    relabelled["labels"][0] = 3
    assert not compare(ref, relabelled, BF16, iou_threshold=0.45, max_detections=100)["ok"]


def test_unknown_backend_lists_every_known_name():
    with pytest.raises(ConfigError) as err:
        get_backend("gpu")
    for backend in list_backends():
        assert backend.name in str(err.value)


def test_cli_unknown_backend_exits_2_and_lists_names(tiny_trained):
    import cli

    out = CliRunner().invoke(cli.app, ["bench", str(tiny_trained.path), "-p", "tpu", "--runs", "1", "--no-peak"])
    assert out.exit_code == ConfigError.exit_code == 2
    assert "openvino-bf16" in out.output and "native" in out.output


def test_cli_refused_backend_exits_7_with_reason(tiny_trained):
    import cli

    refused = next((b for b in list_backends() if not b.probe()[0]), None)
    if refused is None:
        pytest.skip("every registered backend runs on this machine")
    out = CliRunner().invoke(cli.app, ["bench", str(tiny_trained.path), "-p", "cpu", "-p", refused.name, "--runs", "1",
                                       "--no-peak"], env={"COLUMNS": "200"})
    assert out.exit_code == ProviderUnavailableError.exit_code == 7
    assert refused.probe()[1].splitlines()[0][:60] in " ".join(out.output.split())
    assert "latency" not in out.output  # refused before anything was measured


def test_cli_backends_lists_every_name_and_why_not():
    import cli

    out = CliRunner().invoke(cli.app, ["backends"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    for backend in list_backends():
        assert backend.name in out.output
        if not backend.probe()[0]:
            assert f"{backend.name}:" in out.output


def test_side_by_side_bench_alternates_and_relates_to_cpu(tiny_trained):
    from runtime.bench import BenchSettings, bench_side_by_side

    names = ["cpu"] + [n for n in ("openvino",) if get_backend(n).probe()[0]]
    results = bench_side_by_side(tiny_trained.path, names, BenchSettings(warmup=1, runs=4, rounds=2, peak=False),
                                 BackendSettings(threads=2))
    assert [r.provider for r in results] == names
    for r in results:
        assert r.latency.n == 4 and r.rounds == 2 and r.first_run_ms > 0 and r.session_seconds > 0
        assert r.ratio_to_cpu == pytest.approx(r.latency.p50 / results[0].latency.p50)
        record = r.to_record()
        assert record["cold_start"]["steady_p50_ms"] == r.latency.p50
        assert record["backend"]["precision"] == "f32"
    assert results[0].parity_verdict == "reference"
    if len(results) > 1:
        assert results[1].parity["verdict"] == "agree" and results[1].parity_verdict == "agree"


def test_openvino_layer_profile_conserves_macs(tiny_trained):
    """Every analyzer MAC is booked on an OpenVINO layer or listed as unattributed."""
    if not get_backend("openvino").probe()[0]:
        pytest.skip(get_backend("openvino").probe()[1])
    from counting import profile_model

    profile = profile_model(tiny_trained.path, shapes="static", allow_unknown=True)
    node_macs = {n.name: int(n.total_macs) for n in profile.nodes}
    tensor, _ = prepare_for(load_rgb(busiest_images(1)[0]), tiny_trained.contract)
    with get_backend("openvino").open(tiny_trained.path, BackendSettings(threads=2)) as runner:
        times = runner.layer_profile(tensor, node_macs, runs=2, warmup=1)
    booked = sum(g.macs for g in times.groups)
    assert booked + sum(times.unattributed.values()) == sum(node_macs.values())
    conv_macs = sum(m for n, m in node_macs.items() if n.endswith(".conv"))
    # the convolutions are where the MACs are: all of them must land on a layer (none unattributed)
    assert times.by_op["Conv"]["macs"] >= conv_macs and not any(n.endswith(".conv") for n in times.unattributed)
