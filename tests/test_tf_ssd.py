"""TensorFlow/Keras SSD (VGG-16) through tf2onnx, the SavedModel path, and the proof against torchvision.

Every registry entry with framework "tensorflow" must have its prior count and parameter
count worked out by hand below (a new entry without them fails). Independent references:
the hand-worked counts, torchvision's ssd300_vgg16 (weights copied into the Keras network),
and the SavedModel called directly by TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from exporters.registry import load_registry
from exporters.tensorflow.convert import import_tensorflow

TF_MODELS = [spec.name for spec in load_registry() if spec.framework == "tensorflow"]

# Sum over source layers of H x W x boxes-per-location (2 + 2 x extra aspect ratios).
PRIORS_BY_HAND = {
    "ssd300": 38 * 38 * 4 + 19 * 19 * 6 + 10 * 10 * 6 + 5 * 5 * 6 + 3 * 3 * 4 + 1 * 1 * 4,
    "ssd512": 64 * 64 * 4 + 32 * 32 * 6 + 16 * 16 * 6 + 8 * 8 * 6 + 4 * 4 * 6 + 2 * 2 * 4 + 1 * 1 * 4,
}
PUBLISHED_PRIORS = {"ssd300": 8732, "ssd512": 24564}  # Liu et al. 2016, Table 7 / text


def _conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


# (kernel, in, out) of every convolution, written out from the paper's figure 2 / Caffe prototxt
_VGG = [(3, 3, 64), (3, 64, 64), (3, 64, 128), (3, 128, 128), (3, 128, 256), (3, 256, 256), (3, 256, 256),
        (3, 256, 512), (3, 512, 512), (3, 512, 512), (3, 512, 512), (3, 512, 512), (3, 512, 512)]
_FC = [(3, 512, 1024), (1, 1024, 1024)]
_EXTRAS = {"ssd300": [(1, 1024, 256), (3, 256, 512), (1, 512, 128), (3, 128, 256),
                      (1, 256, 128), (3, 128, 256), (1, 256, 128), (3, 128, 256)]}
_EXTRAS["ssd512"] = _EXTRAS["ssd300"] + [(1, 256, 128), (4, 128, 256)]
# (channels, boxes per location) of each source layer
_SOURCES = {"ssd300": [(512, 4), (1024, 6), (512, 6), (256, 6), (256, 4), (256, 4)],
            "ssd512": [(512, 4), (1024, 6), (512, 6), (256, 6), (256, 6), (256, 4), (256, 4)]}


def params_by_hand(name: str, classes: int) -> int:
    """Every weight: convolutions (kernel + bias), 512 L2Norm scales, 3 x 3 heads (4 + classes per box)."""
    body = sum(_conv(*c) for c in _VGG + _FC + _EXTRAS[name]) + 512
    heads = sum(_conv(3, c, a * 4) + _conv(3, c, a * classes) for c, a in _SOURCES[name])
    return body + heads


@pytest.fixture(scope="module")
def tf():
    return import_tensorflow()


# ---------------------------------------------------------------- registry entries


@pytest.mark.parametrize("name", TF_MODELS)
def test_prior_count_matches_hand_count(name, registry, tf):
    from exporters.tensorflow.ssd_keras import build_ssd, decoded_priors
    from exporters.tensorflow.export import config_from_spec

    assert name in PRIORS_BY_HAND, f"{name}: work its prior count out by hand in PRIORS_BY_HAND"
    assert PRIORS_BY_HAND[name] == PUBLISHED_PRIORS[name]
    config = config_from_spec(registry.get(name))
    model = build_ssd(config)
    spec, boxes = decoded_priors(model, config)
    assert spec.count() == PRIORS_BY_HAND[name]
    assert boxes.shape == (PRIORS_BY_HAND[name], 4)
    assert model.outputs[0].shape[1] == PRIORS_BY_HAND[name]  # the heads emit one prediction per prior
    assert model.count_params() == params_by_hand(name, 81)


@pytest.mark.parametrize("name", TF_MODELS)
def test_export_follows_contract_and_validates(name, exported, registry, coco_dir):
    import onnx
    import onnxruntime as ort

    from core.contract import IR_VERSION, read_contract
    from core.images import load_rgb, prepare_for

    spec = registry.get(name)
    result = exported(name)
    contract = read_contract(result.path)
    h, w = spec.input_size
    assert (contract.name, contract.framework, contract.label_space) == (name, "tensorflow", "coco80")
    assert (contract.input_height, contract.input_width, contract.resize) == (h, w, spec.resize)
    assert contract.random_init and contract.max_detections == 100
    assert contract.source_params == params_by_hand(name, 81)
    assert int(contract.extra["priors"]) == PRIORS_BY_HAND[name]
    assert contract.extra["channel_order"] == "bgr" and json.loads(contract.extra["mean"]) == [104.0, 117.0, 123.0]
    assert json.loads(contract.extra["variances"]) == [0.1, 0.2]
    assert contract.extra["opset"] == "17" and contract.extra["tf2onnx_version"]

    # validation against TensorFlow: every image, final detections and every decoded prior within 1e-3
    figures = result.validation
    assert figures["images"] == 3 and all(n > 0 for n in figures["detections_per_image"])
    for key in ("max_abs_diff_boxes", "max_abs_diff_scores", "max_abs_diff_prior_boxes", "max_abs_diff_prior_scores"):
        assert figures[key] <= 1e-3, (key, figures[key])

    model = onnx.load(result.path)
    assert model.ir_version == IR_VERSION
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in model.graph.input] == ["images"] and dims == [1, 3, h, w]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels"]
    ops = {n.op_type for n in model.graph.node}
    assert "NonMaxSuppression" in ops  # NMS inside the graph

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    image, _ = prepare_for(load_rgb(sorted((coco_dir / "val2017").glob("*.jpg"))[-1]), contract)
    boxes, scores, labels = session.run(None, {"images": image})
    k = len(scores)
    assert 0 < k <= 100 and boxes.shape == (k, 4) and labels.shape == (k,) and labels.dtype == np.int64
    assert (scores > contract.score_threshold).all() and (np.diff(scores) <= 0).all()
    assert labels.min() >= 0 and labels.max() <= 79
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert boxes.min() >= 0 and boxes[:, 0::2].max() <= w and boxes[:, 1::2].max() <= h


def test_bad_weights_are_typed_errors(registry, tmp_path, tf):
    from exporters import export_model
    from core.errors import WeightsError

    spec = registry.get(TF_MODELS[0])
    with pytest.raises(WeightsError, match="not found"):
        export_model(spec, tmp_path / "x.onnx", weights=tmp_path / "missing.weights.h5")
    wrong = tmp_path / "weights.pth"
    wrong.write_bytes(b"not keras")
    with pytest.raises(WeightsError, match="not a Keras weights file"):
        export_model(spec, tmp_path / "x.onnx", weights=wrong)
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------- torchvision ssd300_vgg16


TV_MEAN = (0.48235, 0.45882, 0.40784)  # torchvision's SSD normalisation: (x / 255 - mean) / (1 / 255)


@pytest.fixture(scope="module")
def torchvision_pair(tf, registry, tmp_path_factory):
    """A randomly initialised torchvision ssd300_vgg16 and the Keras SSD300 holding its weights.

    torchvision's SSD300 differs from the registered (Caffe) one only by configuration:
    91 classes (coco91 labels), RGB input minus 255 x its mean, and priors whose widths and
    heights are clipped to the image (``clip=True``). Those are set in the spec; nothing in
    the network changes.
    """
    import torch
    from torchvision.models.detection import ssd300_vgg16

    from exporters.tensorflow.ssd_keras import build_ssd
    from exporters.tensorflow.export import config_from_spec

    torch.manual_seed(0)
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91).eval()
    base = registry.get("ssd300")
    source = dict(base.source, channel_order="rgb", mean=[255 * m for m in TV_MEAN], clip_priors=True)
    spec = dataclasses.replace(base, name="ssd300-torchvision-weights", label_space="coco91",
                              source=MappingProxyType(source))
    config = config_from_spec(spec)
    model = build_ssd(config)
    _copy_torchvision_weights(tv, model, config)
    weights = tmp_path_factory.mktemp("tv") / "ssd300_from_torchvision.weights.h5"
    model.save_weights(str(weights))
    return tv, model, config, spec, weights


def _copy_torchvision_weights(tv, model, config) -> None:
    """OIHW -> HWIO for every convolution, in network order; heads keep their channel order
    (both frameworks lay out box ``a``, class ``c`` of a cell at channel ``a * C + c``)."""
    import torch

    def hwio(conv):
        return [conv.weight.detach().numpy().transpose(2, 3, 1, 0), conv.bias.detach().numpy()]

    torch_convs = [m for m in tv.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    keras_convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D" and "mbox" not in layer.name]
    assert len(torch_convs) == len(keras_convs) == 23  # 13 VGG + fc6 + fc7 + 8 extra
    for conv, layer in zip(torch_convs, keras_convs):
        layer.set_weights(hwio(conv))
    model.get_layer("conv4_3_norm").set_weights([tv.backbone.scale_weight.detach().numpy()])
    for i, source in enumerate(config.source_layers):
        model.get_layer(f"{source}_mbox_loc").set_weights(hwio(tv.head.regression_head.module_list[i]))
        model.get_layer(f"{source}_mbox_conf").set_weights(hwio(tv.head.classification_head.module_list[i]))


def _torch_run(tv, tensor):
    """torchvision's own pipeline on a contract tensor (already 300 x 300, so its resize is the identity)."""
    import torch

    with torch.no_grad():
        images, _ = tv.transform([torch.from_numpy(tensor[0] / 255.0).float()])
        features = list(tv.backbone(images.tensors).values())
        head = tv.head(features)
        anchors = tv.anchor_generator(images, features)[0]
        detections = tv([torch.from_numpy(tensor[0] / 255.0).float()])[0]
    return head, anchors.numpy(), {k: v.numpy() for k, v in detections.items()}


def test_parameter_counts_agree_with_torchvision(torchvision_pair, registry, tf):
    from exporters.tensorflow.ssd_keras import build_ssd
    from exporters.tensorflow.export import config_from_spec

    tv, model, _, _, _ = torchvision_pair
    tv_params = sum(p.numel() for p in tv.parameters())
    assert tv_params == 35_641_826 == registry.get("ssd300_vgg16").published["params"].value
    assert model.count_params() == tv_params  # same network, same class count
    # 81 instead of 91 classes changes only the six classification heads: 10 classes x
    # sum_k A_k (9 C_k + 1) = 10 x (4*4609 + 6*9217 + 6*4609 + 6*2305 + 4*2305 + 4*2305) = 1,336,620
    head_difference = 10 * sum(a * (9 * c + 1) for c, a in _SOURCES["ssd300"])
    assert head_difference == 1_336_620
    ours = build_ssd(config_from_spec(registry.get("ssd300"))).count_params()
    assert ours == tv_params - head_difference == 34_305_206


def test_same_priors_and_raw_outputs_as_torchvision(torchvision_pair, tf):
    from exporters.tensorflow.ssd_keras import decoded_priors
    from exporters.validation import validation_images
    from core.images import load_rgb, prepare

    tv, model, config, _, _ = torchvision_pair
    _, priors = decoded_priors(model, config)
    corners = np.concatenate([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], axis=1) * 300
    for path in validation_images(2):
        tensor, _ = prepare(load_rgb(path), 300, 300, "stretch")
        head, anchors, _ = _torch_run(tv, tensor)
        np.testing.assert_allclose(corners, anchors, atol=1e-3)
        loc, conf = model(tensor, training=False)
        np.testing.assert_allclose(np.asarray(loc)[0], head["bbox_regression"][0].numpy(), atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(np.asarray(conf)[0], head["cls_logits"][0].numpy(), atol=1e-3, rtol=1e-3)


def test_paper_priors_differ_from_torchvision_only_where_clipped():
    """Caffe's SSD300 does not clip priors; torchvision clamps w/h to the image. With the
    COCO scales only the two 2:1 boxes of the 1 x 1 map (0.87 x sqrt 2 = 1.23 wide) differ."""
    from exporters.tensorflow.ssd_priors import PriorSpec, default_boxes

    common = dict(image_size=(300, 300), feature_sizes=((38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)),
                  steps=tuple((s, s) for s in (8, 16, 32, 64, 100, 300)),
                  scales=(0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
                  aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)))
    paper = default_boxes(PriorSpec(**common, clip_wh=False))
    clipped = default_boxes(PriorSpec(**common, clip_wh=True))
    differ = np.flatnonzero(np.abs(paper - clipped).max(axis=1) > 0)
    assert list(differ) == [8732 - 2, 8732 - 1]
    np.testing.assert_allclose(paper[-2, 2:], [0.87 * 2 ** 0.5, 0.87 / 2 ** 0.5], rtol=1e-6)


def test_onnx_export_of_torchvision_weights_matches_torchvision(torchvision_pair, tmp_path_factory, tf):
    """The Keras SSD300 holding torchvision's weights, exported through the ordinary path
    (--weights file, tf2onnx, validation), detects what torchvision detects on real images."""
    import onnxruntime as ort

    from exporters import export_model
    from exporters.tensorflow.convert import compare_runs
    from exporters.validation import Comparison, validation_images
    from core.contract import read_contract
    from core.images import load_rgb, prepare

    tv, _, _, spec, weights = torchvision_pair
    result = export_model(spec, tmp_path_factory.mktemp("tv-onnx") / "ssd300_tv.onnx", weights=weights)
    contract = read_contract(result.path)
    assert contract.label_space == "coco91" and contract.weights.startswith("sha256:")
    assert contract.source_params == 35_641_826
    # torchvision's post-processing with the registry's thresholds, without its 400-per-class pre-NMS cut
    tv.score_thresh, tv.nms_thresh = spec.score_threshold, spec.iou_threshold
    tv.detections_per_img, tv.topk_candidates = spec.max_detections, 10 ** 6
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    comparison = Comparison("ssd300 (torchvision weights) vs torchvision")
    counts = []
    for path in validation_images(3):
        tensor, _ = prepare(load_rgb(path), 300, 300, "stretch")
        _, _, reference = _torch_run(tv, tensor)
        boxes, scores, labels = session.run(None, {"images": tensor})
        compare_runs(comparison, path.stem, reference, {"boxes": boxes, "scores": scores, "labels": labels})
        counts.append(len(scores))
    comparison.raise_if_any()
    assert all(c > 0 for c in counts)
    print("torchvision vs ONNX:", {k: v for k, v in comparison.figures.items()})


def test_weights_of_another_network_are_rejected(torchvision_pair, registry, tmp_path):
    from exporters.tensorflow.ssd_keras import build_ssd
    from exporters.tensorflow.export import config_from_spec, load_keras_weights
    from core.errors import WeightsError

    _, _, _, _, weights = torchvision_pair  # 91 classes
    model = build_ssd(config_from_spec(registry.get("ssd300")))  # 81 classes
    with pytest.raises(WeightsError, match="does not fit"):
        load_keras_weights(model, weights, "ssd300")


# ---------------------------------------------------------------- SavedModel path


# The describe preset for TF OD API SavedModels, pointed at the tiny model below.
_PRESET = (Path(__file__).resolve().parent.parent / "exporters" / "foreign" / "describe_examples" / "tf_od_api_saved_model.toml")
DESCRIPTION = (_PRESET.read_text().replace('name = "ssd-mobilenet-v2-320-od-api"', 'name = "tiny-od-api"')
               .replace("score_threshold = 0.0", "score_threshold = 0.7"))
assert "tiny-od-api" in DESCRIPTION and "score_threshold = 0.7" in DESCRIPTION
TINY_PARAMS = 4 * 4 * 3 * 16 + 16 * 4 + 16 * 90  # stem, box head, class head (no biases)


@pytest.fixture(scope="module")
def saved_model(tf, tmp_path_factory):
    """A small detector in the TF2 Object Detection API's SavedModel form: uint8 [1, H, W, 3]
    input of any size, outputs detection_boxes (normalised y1 x1 y2 x2), detection_scores,
    detection_classes (1-based floats), num_detections (float), padded to 50."""

    class TinyDetector(tf.Module):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.stem = tf.Variable(rng.normal(0, 0.5, (4, 4, 3, 16)).astype(np.float32))
            self.loc = tf.Variable(rng.normal(0, 0.3, (1, 1, 16, 4)).astype(np.float32))
            self.cls = tf.Variable(rng.normal(0, 0.1, (1, 1, 16, 90)).astype(np.float32))
            g = (np.arange(16) + 0.5) / 16
            cy, cx = np.meshgrid(g, g, indexing="ij")
            self.anchors = tf.constant(np.stack([cy.ravel(), cx.ravel()], 1).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
        def __call__(self, input_tensor):
            x = tf.image.resize(tf.cast(input_tensor, tf.float32) / 255.0 - 0.5, [64, 64])
            f = tf.nn.relu(tf.nn.conv2d(x, self.stem, 4, "SAME"))
            loc = tf.reshape(tf.nn.conv2d(f, self.loc, 1, "SAME"), [-1, 4])
            scores = tf.sigmoid(tf.reshape(tf.nn.conv2d(f, self.cls, 1, "SAME"), [1, -1, 90]))
            centre = self.anchors + 0.05 * loc[:, :2]
            half = 0.1 * tf.exp(0.2 * loc[:, 2:])
            boxes = tf.concat([centre - half, centre + half], 1)[None, :, None, :]
            b, s, c, n = tf.image.combined_non_max_suppression(boxes, scores, 50, 50, 0.5, 0.3)
            return {"detection_boxes": b, "detection_scores": s, "detection_classes": c + 1.0,
                    "num_detections": tf.cast(n, tf.float32)}

    root = tmp_path_factory.mktemp("saved-model")
    module = TinyDetector()
    tf.saved_model.save(module, str(root / "model"), signatures={"serving_default": module.__call__})
    (root / "describe.toml").write_text(DESCRIPTION)
    return root / "model", root / "describe.toml"


def test_saved_model_export_matches_the_saved_model(saved_model, tmp_path, tf):
    import onnxruntime as ort

    from exporters.validation import validation_images
    from exporters.tensorflow.saved_model import export_saved_model
    from core.contract import read_contract
    from core.images import load_rgb, prepare

    folder, description = saved_model
    result = export_saved_model(folder, description, tmp_path)
    assert result.path == tmp_path / "tiny-od-api.onnx"
    contract = read_contract(result.path)
    assert (contract.name, contract.framework, contract.label_space) == ("tiny-od-api", "tensorflow", "coco91")
    assert (contract.input_height, contract.input_width, contract.score_threshold) == (320, 320, 0.7)
    assert contract.source_params == TINY_PARAMS and contract.weights.startswith("sha256:")

    # the SavedModel itself, called the way its users call it, mapped to the contract by hand
    serving = tf.saved_model.load(str(folder)).signatures["serving_default"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    kept_any = False
    for path in validation_images(3):
        tensor, _ = prepare(load_rgb(path), 320, 320, "stretch")
        raw = serving(input_tensor=tf.constant(tensor[0].transpose(1, 2, 0).astype(np.uint8)[None]))
        n = int(raw["num_detections"].numpy()[0])
        scores = raw["detection_scores"].numpy()[0, :n]
        keep = scores >= 0.7
        y1, x1, y2, x2 = raw["detection_boxes"].numpy()[0, :n][keep].T
        expected_boxes = np.stack([x1 * 320, y1 * 320, x2 * 320, y2 * 320], axis=1)
        expected_labels = raw["detection_classes"].numpy()[0, :n][keep].astype(np.int64)
        boxes, got_scores, labels = session.run(None, {"images": tensor})
        assert len(got_scores) == keep.sum()
        np.testing.assert_allclose(boxes, expected_boxes, atol=1e-3)
        np.testing.assert_allclose(got_scores, scores[keep], atol=1e-5)
        np.testing.assert_array_equal(labels, expected_labels)
        kept_any |= bool(keep.any()) and bool((~keep).any())
    assert kept_any, "the score threshold never separated detections; the test would not see it applied"


def test_saved_model_description_errors_name_the_key(saved_model, tmp_path, tf):
    from exporters.tensorflow.saved_model import export_saved_model
    from core.errors import ConfigError

    folder, _ = saved_model
    typo = tmp_path / "typo.toml"
    typo.write_text(DESCRIPTION.replace("box_format", "box_fromat"))
    with pytest.raises(ConfigError, match="box_fromat"):
        export_saved_model(folder, typo, tmp_path)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(DESCRIPTION.replace('scores = "detection_scores"', 'scores = "scores"'))
    with pytest.raises(ConfigError, match="detection_scores"):  # lists the outputs that exist
        export_saved_model(folder, wrong, tmp_path)
    with pytest.raises(ConfigError, match="saved_model.pb"):
        export_saved_model(tmp_path, wrong, tmp_path)


def test_cli_export_saved_model(saved_model, tmp_path):
    from typer.testing import CliRunner

    import cli

    folder, description = saved_model
    out = tmp_path / "cli.onnx"
    run = CliRunner().invoke(cli.app, ["export", "--saved-model", str(folder), "--describe", str(description),
                                       "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert out.is_file() and "tiny-od-api" in run.output
    run = CliRunner().invoke(cli.app, ["export", "ssd300", "--saved-model", str(folder), "--describe", str(description)])
    assert run.exit_code == 2 and "not both" in run.output


# ---------------------------------------------------------------- environment


def test_tensorflow_and_torchvision_load_in_one_process_and_pip_check_is_clean():
    # torchvision loads Triton's native library, which crashes when TensorFlow was loaded first;
    # import_tensorflow() loads Triton first. Run in a child so a crash cannot take pytest down.
    code = ("from exporters.tensorflow.convert import import_tensorflow; tf = import_tensorflow(); import torchvision, torch; "
            "import google.protobuf as pb; print(tf.__version__, torch.__version__, pb.__version__)")
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
