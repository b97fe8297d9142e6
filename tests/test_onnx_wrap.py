"""`export --onnx FILE --describe F`: foreign ONNX detectors wrapped into contract files.

The foreign files are built here from models detbench can produce itself, so their true
detections are known independently of the wrapper:

1. a torchvision Faster R-CNN (MobileNetV3 320, deterministic random init) exported plainly
   with its own transform: CHW 0..1 input of any size, NMS inside, boxes in the pixels of
   the image it was given, COCO category ids. Truth: PyTorch's own detections.
2. Darknet yolov3-tiny (official weights) cut at its two raw YOLO heads: no decoding, no NMS.
   Truth: the registered export's graph (decoding + NMS) on the same image.
3. the same network's candidates as one [1, N, 4 + 80] tensor: normalised cxcywh boxes and
   per-class logits (sigmoid scores). Truth: the registered export's graph.
4. the same candidates needing an extra ``image_shape`` input, taking NHWC BGR mean/std
   input, with yxyx boxes in the pixels ``image_shape`` names and per-class scores apart,
   labels mapped to COCO category ids by a table. Truth: the registered export's graph.

Each wrapped file must give the true detections, and its COCO statistics (normal eval)
must equal those of the original file's outputs decoded by the numpy decoder and scored
by ``score_results``. Bad describe files fail before anything is written, naming the key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.contract import read_contract, sha256_file
from core.errors import ConfigError
from core.images import load_rgb, prepare

COCO_IMAGES = 4  # per kind, for the COCO-statistics check
CHECK_IMAGES = 2  # per kind, for the truth check (the export itself validates on 3 more)
TINY_SIZE = (416, 416)
TINY_ANCHORS = [[[81, 82], [135, 169], [344, 319]], [[10, 14], [23, 27], [37, 58]]]
TORCH_SIZE = (384, 512)  # not square, not the model's own 320: its transform resizes, boxes come back
MEAN_BGR = [0.406, 0.456, 0.485]
STD_BGR = [0.225, 0.224, 0.229]


# ----------------------------------------------------------------------------- foreign files


def _darknet(darknet_dir: Path):
    from exporters.darknet.cfg import parse_cfg, plan_network
    from exporters.darknet.graph import build_model, drop_head_outputs, head_output_name
    from exporters.nms_graph import PostProcess
    from exporters.darknet.weights import read_weights
    from exporters.registry import load_registry

    spec = load_registry().get("yolov3-tiny")
    plan = plan_network(parse_cfg(darknet_dir / "yolov3-tiny.cfg"), TINY_SIZE)
    weights = read_weights(darknet_dir / "yolov3-tiny.weights", plan)
    post = PostProcess(spec.score_threshold, spec.iou_threshold, spec.max_detections)
    full = build_model(plan, weights, post, expose_heads=True)
    heads = [head_output_name(h) for h in plan.heads]
    contract = drop_head_outputs(onnx.load_from_string(full.SerializeToString()))
    return spec, onnx.shape_inference.infer_shapes(full), heads, contract


def _cut(model, inputs: list[str], outputs: list[str]):
    return onnx.utils.Extractor(model).extract_model(inputs, outputs)


def _graft(base, nodes: list, inputs: list, outputs: list, inits: list):
    """``base`` with extra nodes, graph inputs replaced by ``inputs`` and outputs by ``outputs``."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    before = [n for n in nodes if n.name.startswith("pre_")]
    after = [n for n in nodes if not n.name.startswith("pre_")]
    body = list(g.node)
    del g.node[:]
    g.node.extend(before + body + after)
    g.initializer.extend(inits)
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def build_raw_heads(full, heads):
    model = _cut(full, ["input_01"], heads)  # the graph after Darknet's /255: 0..1 input
    model.ir_version = 10
    return model


def build_packed(full):
    """images 0..255 -> output [1, N, 84]: normalised (cx, cy, w, h), then 80 class logits."""
    base = _cut(full, ["images"], ["candidates.boxes", "candidates.scores"])
    w, h = TINY_SIZE[1], TINY_SIZE[0]
    n = helper.make_node
    nodes = [
        n("Slice", ["candidates.boxes", "k0", "k2", "k_axis"], ["x1y1"], name="t1"),
        n("Slice", ["candidates.boxes", "k2", "k4", "k_axis"], ["x2y2"], name="t2"),
        n("Add", ["x1y1", "x2y2"], ["twice_centre"], name="t3"),
        n("Mul", ["twice_centre", "k_half_norm"], ["centre"], name="t4"),
        n("Sub", ["x2y2", "x1y1"], ["size_px"], name="t5"),
        n("Div", ["size_px", "k_wh"], ["size"], name="t6"),
        n("Log", ["candidates.scores"], ["log_p"], name="t7"),
        n("Sub", ["k_one", "candidates.scores"], ["q"], name="t8"),
        n("Log", ["q"], ["log_q"], name="t9"),
        n("Sub", ["log_p", "log_q"], ["logits"], name="t10"),
        n("Concat", ["centre", "size", "logits"], ["output0"], name="t11", axis=2),
    ]
    inits = [_const("k0", np.array([0], np.int64)), _const("k2", np.array([2], np.int64)),
             _const("k4", np.array([4], np.int64)), _const("k_axis", np.array([2], np.int64)),
             _const("k_half_norm", np.array([0.5 / w, 0.5 / h], np.float32)),
             _const("k_wh", np.array([w, h], np.float32)), _const("k_one", np.array(1.0, np.float32))]
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, None, 84])
    return _graft(base, nodes, list(base.graph.input), [out], inits)


def build_image_shape(full):
    """image NHWC BGR ((pixel / 255 - mean) / std) + image_shape [1, 2] int64 (h, w) ->
    bboxes [1, N, 4] (y1, x1, y2, x2 in image_shape pixels), cls_scores [1, N, 80]."""
    base = _cut(full, ["input_01"], ["candidates.boxes", "candidates.scores"])
    h, w = TINY_SIZE
    n = helper.make_node
    nodes = [
        n("Mul", ["image", "k_std"], ["pre_a"], name="pre_1"),
        n("Add", ["pre_a", "k_mean"], ["pre_b"], name="pre_2"),
        n("Transpose", ["pre_b"], ["pre_c"], name="pre_3", perm=[0, 3, 1, 2]),
        n("Gather", ["pre_c", "k_rgb"], ["input_01"], name="pre_4", axis=1),
        n("Gather", ["candidates.boxes", "k_yxyx"], ["yxyx_px"], name="t1", axis=2),
        n("Div", ["yxyx_px", "k_hwhw"], ["yxyx_norm"], name="t2"),
        n("Cast", ["image_shape"], ["shape_f"], name="t3", to=TensorProto.FLOAT),
        n("Gather", ["shape_f", "k_hwhw_index"], ["hwhw"], name="t4", axis=1),
        n("Mul", ["yxyx_norm", "hwhw"], ["bboxes"], name="t5"),
        n("Identity", ["candidates.scores"], ["cls_scores"], name="t6"),
    ]
    inits = [_const("k_std", np.array(STD_BGR, np.float32)), _const("k_mean", np.array(MEAN_BGR, np.float32)),
             _const("k_rgb", np.array([2, 1, 0], np.int64)), _const("k_yxyx", np.array([1, 0, 3, 2], np.int64)),
             _const("k_hwhw", np.array([h, w, h, w], np.float32)),
             _const("k_hwhw_index", np.array([0, 1, 0, 1], np.int64))]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, "height", "width", 3]),
              helper.make_tensor_value_info("image_shape", TensorProto.INT64, [1, 2])]
    outputs = [helper.make_tensor_value_info("bboxes", TensorProto.FLOAT, [1, None, 4]),
               helper.make_tensor_value_info("cls_scores", TensorProto.FLOAT, [1, None, 80])]
    return _graft(base, nodes, inputs, outputs, inits)


def build_torchvision(path: Path):
    """fasterrcnn_mobilenet_v3_large_320_fpn, random init (seed 0, logits spread on a COCO
    photo so that it detects), exported as torchvision documents it: a list of CHW images."""
    import torch
    import torchvision
    from exporters.pytorch.builders import _calibrate, calibration_photo

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.01).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tensor, _ = prepare(load_rgb(calibration_photo()), TORCH_SIZE[0], TORCH_SIZE[1], "stretch")
    photo = torch.from_numpy(tensor[0]) / 255.0

    # Untrained BatchNorm2d (mean 0, var 1) leaves MobileNetV3's features nearly constant: every
    # detection would score the same and the order among them is noise. Batch statistics of a
    # real photo make the random network respond to its input.
    def set_statistics(module, args):
        module.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(args[0].var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-2))

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    with torch.no_grad():
        model([photo])
    for hook in hooks:
        hook.remove()
    _calibrate(model, photo)
    # COCO's 91-id numbering has ten ids without a category; a trained model never predicts
    # them, and COCO evaluation rejects them. Their logits are pinned far below the others.
    from eval.dataset import COCO80_CATEGORY_IDS

    unused = sorted(set(range(1, 91)) - set(COCO80_CATEGORY_IDS))
    cls_score = model.roi_heads.box_predictor.cls_score
    cls_score.weight[unused] = 0.0
    cls_score.bias[unused] = -30.0
    example = torch.from_numpy(tensor[0]) / 255.0
    torch.onnx.export(model, ([example],), str(path), opset_version=17, dynamo=False, input_names=["image"],
                      output_names=["boxes", "labels", "scores"], dynamic_axes={"image": {1: "height", 2: "width"}})
    return model


# ----------------------------------------------------------------------------- describe files

EXAMPLES = Path(__file__).resolve().parent.parent / "exporters" / "foreign" / "describe_examples"


def _describe(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def darknet_parts(darknet_dir):
    """(yolov3-tiny graph with its heads exposed, head names, the registered export's graph)."""
    _, full, heads, contract = _darknet(darknet_dir)
    return full, heads, contract


@pytest.fixture(scope="session")
def raw_heads_file(darknet_parts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw-heads") / "heads.onnx"
    onnx.save(build_raw_heads(*darknet_parts[:2]), path)
    return path


@pytest.fixture(scope="session")
def foreign(tmp_path_factory, darknet_parts, raw_heads_file):
    """kind -> (original file, describe file, truth function tensor -> detections)."""
    import onnxruntime as ort

    tmp = tmp_path_factory.mktemp("foreign")
    full, heads, contract = darknet_parts
    truth_session = ort.InferenceSession(contract.SerializeToString(), providers=["CPUExecutionProvider"])

    def darknet_truth(tensor, labels=None):
        boxes, scores, classes = truth_session.run(["boxes", "scores", "labels"], {"images": tensor})
        return {"boxes": boxes, "scores": scores, "labels": classes if labels is None else labels[classes]}

    files = {}
    files["raw_heads"] = (raw_heads_file, EXAMPLES / "yolo_raw_heads.toml", darknet_truth)
    onnx.save(build_packed(full), tmp / "packed.onnx")
    files["packed"] = (tmp / "packed.onnx", EXAMPLES / "packed_cxcywh_sigmoid.toml", darknet_truth)
    onnx.save(build_image_shape(full), tmp / "image_shape.onnx")
    from eval.dataset import COCO80_CATEGORY_IDS

    table = np.asarray(COCO80_CATEGORY_IDS, np.int64)
    files["image_shape"] = (tmp / "image_shape.onnx", EXAMPLES / "image_shape_nhwc_bgr.toml",
                            lambda tensor: darknet_truth(tensor, table))

    import torch

    model = build_torchvision(tmp / "fasterrcnn.onnx")

    def torch_truth(tensor):
        with torch.no_grad():
            d = model([torch.from_numpy(tensor[0]) / 255.0])[0]
        return {"boxes": d["boxes"].numpy(), "scores": d["scores"].numpy(), "labels": d["labels"].numpy()}

    files["torchvision"] = (tmp / "fasterrcnn.onnx", EXAMPLES / "torchvision_detections.toml", torch_truth)
    return files


@pytest.fixture(scope="session")
def wrapped(foreign, tmp_path_factory):
    """kind -> ExportResult of the wrapped file (built once)."""
    from exporters.foreign.wrap import wrap_onnx

    out = tmp_path_factory.mktemp("wrapped")
    return {kind: wrap_onnx(src, describe, out) for kind, (src, describe, _) in foreign.items()}


KINDS = ["torchvision", "raw_heads", "packed", "image_shape"]
# PyTorch and onnxruntime run the plain torchvision export of this random-init network up to
# 0.17 px and 0.5% of a score apart (measured on these images, original file alone): the
# export's own noise, not the wrapper's. What a wrapper can get wrong (coordinate space, box
# format, layout, labels) moves boxes by tens of pixels. The wrapped file matches the
# original file itself at 1e-3 (export validation, and the COCO statistics below).
TRUTH_TOLERANCE = {"torchvision": (0.25, 1e-2)}


def _images(coco_dir: Path, count: int) -> list[Path]:
    return sorted((coco_dir / "val2017").glob("*.jpg"))[-count:]  # not the export's validation images


@pytest.mark.parametrize("kind", KINDS)
def test_wrapped_file_gives_the_true_detections(kind, foreign, wrapped, coco_dir):
    import onnxruntime as ort
    from exporters.matching import MatchRules, match_detections

    result = wrapped[kind]
    contract = result.contract
    truth = foreign[kind][2]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    atol, rtol = TRUTH_TOLERANCE.get(kind, (1e-3, 1e-3))
    problems, paired = [], 0
    for path in _images(coco_dir, CHECK_IMAGES):
        tensor, _ = prepare(load_rgb(path), contract.input_height, contract.input_width, contract.resize)
        ref = {k: np.asarray(v) for k, v in truth(tensor).items()}
        got = dict(zip(("boxes", "scores", "labels"), session.run(["boxes", "scores", "labels"], {"images": tensor})))
        matching = match_detections(ref, got, MatchRules(iou_threshold=contract.iou_threshold,
                                                         score_threshold=contract.score_threshold,
                                                         max_detections=contract.max_detections, atol=atol, rtol=rtol))
        problems += matching.mismatches(path.stem)
        paired += len(matching.pairs)
        # boundaries explain a few detections at most, never the bulk
        assert len(matching.pairs) >= 0.9 * max(len(ref["scores"]), len(got["scores"])), path.stem
    assert not problems, problems
    assert paired > 10  # the check compared real detections, not two empty lists


@pytest.mark.parametrize("kind", KINDS)
def test_coco_statistics_equal_the_decoded_original(kind, foreign, wrapped, coco_dir):
    import onnxruntime as ort
    from eval.coco import evaluate_model, score_results
    from eval.dataset import load_coco
    from exporters.foreign.decode import decode, model_inputs
    from exporters.foreign.describe import read_description
    from exporters.foreign.wrap import bind, load_source

    src, describe, _ = foreign[kind]
    desc = read_description(describe)
    _, bound = bind(desc, load_source(src))
    dataset = load_coco(coco_dir)
    images = dataset.select(COCO_IMAGES)
    label_map = dataset.label_map(desc.label_space)
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    names = list(dict.fromkeys(desc.tensors.values()))
    results = []
    for image in images:
        tensor, placement = prepare(load_rgb(image.path), *desc.input_size, desc.resize, desc.pad_value)
        raw = dict(zip(names, session.run(names, model_inputs(desc, tensor, bound.image_input, bound.extra_shapes))))
        det = decode(desc, raw)
        for (x1, y1, x2, y2), score, label in zip(placement.to_image(det["boxes"]), det["scores"], det["labels"]):
            results.append({"image_id": image.id, "category_id": int(label_map[label]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    ids = [image.id for image in images]
    expected = score_results(results, dataset, image_ids=ids)
    got = evaluate_model(wrapped[kind].path, coco_dir=coco_dir, image_ids=ids, store=False)
    assert got.scores["detections"] == expected["detections"] > 0
    for name, value in expected["stats"].items():
        assert got.scores["stats"][name] == pytest.approx(value, abs=1e-6), name


def test_wrapped_file_carries_the_contract_metadata(foreign, wrapped):
    for kind, result in wrapped.items():
        src, describe, _ = foreign[kind]
        contract = read_contract(result.path)
        assert contract.framework == "onnx"
        assert contract.weights == "sha256:" + sha256_file(src) and not contract.random_init
        assert contract.extra["describe"] == describe.read_text()
        assert contract.extra["source_file"] == src.name
        assert contract.source_params > 1_000_000, kind  # the original graph's weights, counted
        assert (contract.input_height, contract.input_width) == tuple(
            __import__("tomllib").loads(describe.read_text())["input_size"])
    # the wrapped graph holds the original one: every original initializer, unchanged, under src/
    src = onnx.load(str(foreign["raw_heads"][0]))
    out = {i.name: i for i in onnx.load(str(wrapped["raw_heads"].path)).graph.initializer}
    for init in src.graph.initializer:
        assert np.array_equal(numpy_helper.to_array(out["src/" + init.name]), numpy_helper.to_array(init))


RAW_HEADS = (EXAMPLES / "yolo_raw_heads.toml").read_text()

BAD_DESCRIBES = [
    # (what, edit of the raw-heads describe file, key the message must name)
    ("missing key", RAW_HEADS.replace('label_space = "coco80"\n', ""), "label_space"),
    ("missing table key", RAW_HEADS.replace("num_classes = 80\n", ""), "outputs.num_classes"),
    ("output not in the graph", RAW_HEADS.replace('"head_22"]', '"head_23"]'), "outputs.heads[1]"),
    ("input not in the graph", RAW_HEADS.replace('name = "input_01"', 'name = "data"'), "input.name"),
    ("shape contradicts anchors", RAW_HEADS.replace("[37, 58]]]", "[37, 58], [50, 60]]]"), "outputs.anchors[1]"),
    ("shape contradicts classes", RAW_HEADS.replace("num_classes = 80", "num_classes = 90"), "outputs.anchors[0]"),
    ("size contradicts the graph", RAW_HEADS.replace("input_size = [416, 416]", "input_size = [320, 320]"),
     "input_size"),
    ("layout contradicts the graph", RAW_HEADS.replace('layout = "NCHW"', 'layout = "HWC"'), "input.layout"),
    ("unknown enum value", RAW_HEADS.replace('score_activation = "sigmoid"', 'score_activation = "tanh"'),
     "outputs.score_activation"),
    ("unknown layout", RAW_HEADS.replace('layout = "yolo_heads"', 'layout = "ssd"'), "outputs.layout"),
    ("unknown key", RAW_HEADS + "\nbatch = 1\n", "outputs.batch"),
    ("no NMS for candidates", RAW_HEADS + "\nnms = false\n", "outputs.nms"),
]


@pytest.mark.parametrize("what,text,key", BAD_DESCRIBES, ids=[b[0] for b in BAD_DESCRIBES])
def test_bad_describe_file_fails_before_anything_is_written(what, text, key, raw_heads_file, tmp_path):
    from exporters.foreign.wrap import wrap_onnx

    describe = _describe(tmp_path, "bad", text)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        wrap_onnx(raw_heads_file, describe, out)
    message = str(info.value)
    assert str(describe) in message and f"{key}:" in message, message
    assert not out.exists()


def test_cli_export_onnx(raw_heads_file, tmp_path):
    from typer.testing import CliRunner

    import cli

    target = tmp_path / "wrapped.onnx"
    args = ["export", "--onnx", str(raw_heads_file), "--describe", str(EXAMPLES / "yolo_raw_heads.toml"),
            "--out", str(target)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert read_contract(target).name == "yolov3-tiny-heads"
    missing = CliRunner().invoke(cli.app, ["export", "--onnx", str(raw_heads_file), "--out", str(target)])
    assert missing.exit_code == ConfigError.exit_code and "--describe" in missing.output


def test_run_measures_a_foreign_file_like_a_registered_one(raw_heads_file, tmp_path, monkeypatch):
    """`run --onnx FILE --describe F`: wrapped, profiled, benched, evaluated, and a row of the report."""
    import dataclasses

    from core import store
    from pipeline.run import RunRequest, RunSettings, run_pipeline

    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path))
    settings = dataclasses.replace(RunSettings.quick(), sizes=False, int8_models=(), per_image=0, eval_limit=4)
    summary = run_pipeline(RunRequest(providers=["cpu"], strict=True,
                                      foreign=[(raw_heads_file, EXAMPLES / "yolo_raw_heads.toml")]), settings)
    assert summary.failures == []
    statuses = {o.step: o.status for o in summary.outcomes if o.model == "yolov3-tiny-heads"}
    assert statuses == {"export": "done", "profile": "done", "bench": "done", "eval": "done"}
    (export,) = store.load("export", "yolov3-tiny-heads", root=tmp_path).records
    assert export["contract"]["detbench.framework"] == "onnx"
    (evaluation,) = store.load("eval", "yolov3-tiny-heads", root=tmp_path).records
    assert evaluation["data"]["images_evaluated"] == 4 and evaluation["data"]["map50"] > 0
    assert "yolov3-tiny-heads" in (tmp_path / "report" / "table.md").read_text()
