"""Batch > 1 exports (`export NAME --batch`): a symbolic batch axis, NMS per image, `batch_index`.

The batch file of yolov3-tiny with the official weights is checked image by image against the
batch-1 file (itself validated against OpenCV's Darknet importer at export), on real COCO images
run together in one call: each image's detections must be the batch-1 file's on that image alone.
Two copies of one image in a batch must both keep every detection (a cross-image NMS would make
one copy suppress the other), and the order of the images in the batch must not matter.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from core.contract import BATCH_INDEX_OUTPUT, read_contract
from core.errors import ConfigError
from core.images import load_rgb, prepare_for


@pytest.fixture(scope="module")
def weights(darknet_dir):
    return darknet_dir / "yolov3-tiny.weights"


@pytest.fixture(scope="module")
def batch_export(tmp_path_factory, registry, weights):
    from exporters import default_output, export_model

    spec = registry.get("yolov3-tiny")
    out = default_output(spec, tmp_path_factory.mktemp("batch"), batch=True)
    return export_model(spec, out, weights=weights, batch=True)


@pytest.fixture(scope="module")
def single_export(exported, weights):
    return exported("yolov3-tiny", weights=weights)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _tensors(contract, count):
    from runtime.inputs import busiest_images

    return [prepare_for(load_rgb(p), contract)[0] for p in busiest_images(count)]


def _per_image(out: dict, i: int) -> dict:
    mine = out[BATCH_INDEX_OUTPUT] == i
    return {k: out[k][mine] for k in ("boxes", "scores", "labels")}


def _same(ours: dict, alone: dict, where: str) -> None:
    assert len(ours["scores"]) == len(alone["scores"]) > 0, where
    np.testing.assert_array_equal(ours["labels"], alone["labels"], err_msg=where)
    np.testing.assert_allclose(ours["scores"], alone["scores"], rtol=1e-4, atol=1e-5, err_msg=where)
    np.testing.assert_allclose(ours["boxes"], alone["boxes"], rtol=1e-4, atol=1e-3, err_msg=where)


def test_batch_file_follows_the_contract(batch_export):
    path = batch_export.path
    assert path.name == "yolov3-tiny@batch.onnx"
    contract = read_contract(path)
    assert contract.name == "yolov3-tiny@batch" and contract.batch_symbolic
    assert contract.extra["batch"] == "symbolic" and not contract.random_init
    model = onnx.load(str(path))
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert not dim0.HasField("dim_value") and dim0.dim_param == "N"
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert list(outputs) == ["boxes", "scores", "labels", BATCH_INDEX_OUTPUT]
    assert outputs[BATCH_INDEX_OUTPUT] == onnx.TensorProto.INT64
    # validated at export against OpenCV's heads and the batch-1 graph, image by image, on 3 real images
    batch = batch_export.validation["batch"]
    assert len(set(batch["images"])) == 3 and all(n > 0 for n in batch["detections_per_image"])
    assert "OpenCV" in batch["compared"] and batch["max_head_diff"] < 1e-3
    assert batch_export.validation["reference"].startswith("opencv")


def test_three_coco_images_in_one_call_match_batch_one_image_by_image(batch_export, single_export):
    contract = read_contract(single_export.path)
    tensors = _tensors(contract, 3)
    single, batched = _session(single_export.path), _session(batch_export.path)
    names = [o.name for o in batched.get_outputs()]
    out = dict(zip(names, batched.run(None, {"images": np.concatenate(tensors)})))
    assert np.all(np.diff(out[BATCH_INDEX_OUTPUT]) >= 0) and set(out[BATCH_INDEX_OUTPUT].tolist()) == {0, 1, 2}
    assert len({t.tobytes() for t in tensors}) == 3  # three different images
    for i, tensor in enumerate(tensors):
        alone = dict(zip(["boxes", "scores", "labels"], single.run(["boxes", "scores", "labels"], {"images": tensor})))
        _same(_per_image(out, i), alone, f"image {i}")
    # reversed order: each image still gets its own detections
    rev = dict(zip(names, batched.run(None, {"images": np.concatenate(tensors[::-1])})))
    for i in range(3):
        _same(_per_image(rev, 2 - i), _per_image(out, i), f"reversed image {i}")


def test_nms_never_crosses_images(batch_export, single_export):
    contract = read_contract(single_export.path)
    (tensor,) = _tensors(contract, 1)
    alone = dict(zip(["boxes", "scores", "labels"], _session(single_export.path).run(
        ["boxes", "scores", "labels"], {"images": tensor})))
    batched = _session(batch_export.path)
    names = [o.name for o in batched.get_outputs()]
    out = dict(zip(names, batched.run(None, {"images": np.concatenate([tensor, tensor])})))
    # identical boxes in two images: an NMS or a max_detections cap over the batch would drop one copy
    for i in (0, 1):
        _same(_per_image(out, i), alone, f"copy {i}")
    assert len(out["scores"]) == 2 * len(alone["scores"])


def test_offline_tries_batches_on_the_batch_file_only(batch_export, single_export):
    from runtime.backends import BackendSettings
    from runtime.scenarios.common import Model
    from runtime.scenarios.offline import offline
    from runtime.scenarios.settings import OFFLINE, ScenarioSettings

    settings = ScenarioSettings.scaled_down(OFFLINE, streams=1, trial_seconds=0.2, offline_min_samples=4,
                                            offline_min_seconds=0.2)
    assert not Model.load(single_export.path, None).batchable
    model = Model.load(batch_export.path, None)
    assert model.batchable and "symbolic" in model.batch_note
    result = offline(model, "cpu", settings, BackendSettings(threads=1), parity_images=0)
    assert sorted(t["batch"] for t in result.figures["trials"]) == [1, 2, 4]
    assert result.figures["samples"] % result.figures["config"]["batch"] == 0


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "ssd300"])
def test_exporters_without_a_batch_graph_refuse_with_the_reason(name, registry, tmp_path):
    from exporters import batch_support, default_output, export_model

    spec = registry.get(name)
    ok, why = batch_support(spec)
    assert not ok and "no symbolic batch axis" in why
    out = default_output(spec, tmp_path, batch=True)
    with pytest.raises(ConfigError, match="no symbolic batch axis") as err:
        export_model(spec, out, batch=True)
    assert spec.framework in str(err.value) and "without --batch" in str(err.value)
    assert not out.exists()


def test_list_says_which_models_can_export_a_batch(registry, monkeypatch):
    from rich.console import Console
    from typer.testing import CliRunner

    import cli

    monkeypatch.setattr(cli, "console", Console(width=400, force_terminal=False, color_system=None))
    result = CliRunner().invoke(cli.app, ["list"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.split()[:1] == ["name"])
    assert header.split()[-2:] == ["B", "weights"]  # the weights state stays the line's last cell
    rows = {line.split()[0]: line.split()[-2] for line in result.output.splitlines() if line.split()
            and line.split()[0] in registry.names}
    for spec in registry:
        assert rows[spec.name] == ("yes" if spec.framework == "darknet" else "-"), spec.name
    assert "pytorch:" in result.output and "tensorflow:" in result.output  # the reasons, once per framework
