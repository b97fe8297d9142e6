"""Bring your own data: COCO-format datasets with their own classes, and models with their own names.

1. A detector with non-COCO classes: torchvision Faster R-CNN MobileNetV3 320 with 6 outputs
   (5 named classes + background), random init, exported plainly, wrapped with its names. Its
   dataset is built here: the shared COCO images (symlinked), ground truth made from the
   original file's own detections (jittered, some relabelled, some dropped, plus crowd
   regions and an image without annotations), categories renamed in another case and
   spelling, renumbered from 40 with gaps, and one class the model does not know. The
   statistics are scored independently: the original file run in onnxruntime, labels mapped
   by a table written here, boxes brought back by hand, pycocotools called directly.
2. yolov3-tiny (official weights) on a renumbered, renamed copy of the shared COCO subset
   (another layout: annotations/<any>.json + images/) gives exactly its usual statistics.
3. Malformed datasets: each is refused with exit 8 naming the file and the entry.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from core.errors import DatasetError

MODEL_CLASSES = ["person", "car", "dog", "traffic_light", "umbrella"]  # umbrella: not in the dataset
# dataset category id -> name; another spelling of the model's names, one category the model lacks
DATASET_CATEGORIES = {40: "Person", 47: "CAR", 52: "Dog", 70: "Traffic Light", 93: "bicycle"}
MODEL_TO_CATEGORY = {0: 40, 1: 47, 2: 52, 3: 70}  # written out by hand; class 4 (umbrella) matches nothing
SIZE = (320, 320)
IMAGES = 12
ROOT = Path(__file__).resolve().parent.parent


def _build_detector(path: Path):
    import torch
    import torchvision

    from core.images import load_rgb, prepare
    from exporters.pytorch.builders import calibration_photo

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=len(MODEL_CLASSES) + 1, box_score_thresh=0.0,
        box_detections_per_img=50).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tensor, _ = prepare(load_rgb(calibration_photo()), SIZE[0], SIZE[1], "stretch")
    example = torch.from_numpy(tensor[0]) / 255.0
    # Untrained BatchNorm (mean 0, var 1) leaves the features nearly constant: statistics of a
    # real input make the random network respond to what it sees.
    def set_statistics(module, args):
        module.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(args[0].var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-2))

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    with torch.no_grad():
        model([example])
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        torch.onnx.export(model, ([example],), str(path), opset_version=17, dynamo=False, input_names=["image"],
                          output_names=["boxes", "labels", "scores"],
                          dynamic_axes={"image": {1: "height", 2: "width"}})


def _original_detections(onnx_path: Path, image_path: Path):
    """The original file's detections on one image, in original-image pixels (worked out here)."""
    import onnxruntime as ort
    from core.images import load_rgb

    rgb = load_rgb(image_path)
    h0, w0 = rgb.shape[:2]
    import cv2

    resized = cv2.resize(rgb, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    x = resized.transpose(2, 0, 1) * np.float32(1 / 255)  # the describe file's scale, in float32
    session = _original_detections.sessions.setdefault(
        str(onnx_path), ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]))
    boxes, labels, scores = session.run(["boxes", "labels", "scores"], {"image": x.astype(np.float32)})
    keep = np.argsort(-scores, kind="stable")[:100]
    boxes, labels, scores = boxes[keep].astype(np.float64), labels[keep], scores[keep]
    boxes[:, 0::2] = (boxes[:, 0::2] / (SIZE[1] / w0)).clip(0, w0)
    boxes[:, 1::2] = (boxes[:, 1::2] / (SIZE[0] / h0)).clip(0, h0)
    return boxes, labels, scores


_original_detections.sessions = {}


@pytest.fixture(scope="session")
def custom_model(tmp_path_factory):
    """(original ONNX file, wrapped ExportResult) of the 5-class random-init detector."""
    pytest.importorskip("torchvision")
    from exporters.foreign.wrap import wrap_onnx

    tmp = tmp_path_factory.mktemp("custom-model")
    original = tmp / "fasterrcnn5.onnx"
    _build_detector(original)
    (tmp / "classes.names").write_text("\n".join(MODEL_CLASSES) + "\n")
    describe = tmp / "fasterrcnn5.toml"
    describe.write_text(f"""
name = "fasterrcnn5"
family = "faster-rcnn"
input_size = [{SIZE[0]}, {SIZE[1]}]
resize = "stretch"
labels_file = "classes.names"
score_threshold = 0.0
iou_threshold = 0.5
max_detections = 100

[input]
name = "image"
layout = "CHW"
scale = 0.00392156862745098

[outputs]
layout = "detections"
boxes = "boxes"
scores = "scores"
labels = "labels"
label_offset = -1    # torchvision's class 0 is the background
""")
    return original, wrap_onnx(original, describe, tmp / "wrapped")


@pytest.fixture(scope="session")
def custom_dataset(custom_model, coco_dir, tmp_path_factory):
    """A COCO-format dataset of the model's classes (see the module docstring); its folder."""
    original, _ = custom_model
    root = tmp_path_factory.mktemp("custom-dataset")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(7)
    source = json.loads((coco_dir / "annotations" / "instances_val2017.json").read_text())
    images, annotations = [], []
    for k, entry in enumerate(sorted(source["images"], key=lambda e: e["id"])[:IMAGES]):
        name = f"frame_{k:03d}.jpg"
        (root / "images" / name).symlink_to(coco_dir / "val2017" / entry["file_name"])
        images.append({"id": 500 + 3 * k, "file_name": name, "width": entry["width"], "height": entry["height"]})
        if k == 4:
            continue  # an image without annotations
        boxes, labels, _ = _original_detections(original, coco_dir / "val2017" / entry["file_name"])
        for j in range(min(len(boxes), 12)):
            if rng.random() < 0.25:
                continue  # a miss the model's detection will not find
            x1, y1, x2, y2 = boxes[j] + rng.normal(0, 6, 4)
            cls = int(labels[j]) - 1
            if rng.random() < 0.15 or cls == 4:
                cls = int(rng.integers(0, 4))  # relabelled (and umbrella ground truth becomes a known class)
            w, h = max(x2 - x1, 2.0), max(y2 - y1, 2.0)
            annotations.append({"id": len(annotations) + 1, "image_id": images[-1]["id"],
                                "category_id": MODEL_TO_CATEGORY[cls], "bbox": [float(x1), float(y1), w, h],
                                "area": w * h, "iscrowd": 0})
        if k % 3 == 0:  # a crowd region: detections inside it are neither hits nor false positives
            annotations.append({"id": len(annotations) + 1, "image_id": images[-1]["id"], "category_id": 40,
                                "bbox": [0.0, 0.0, entry["width"] / 3, entry["height"] / 3],
                                "area": entry["width"] * entry["height"] / 9.0, "iscrowd": 1,
                                "segmentation": {"counts": [0, 1], "size": [1, 1]}})
        if k == 2:  # ground truth of the class the model lacks
            annotations.append({"id": len(annotations) + 1, "image_id": images[-1]["id"], "category_id": 93,
                                "bbox": [10.0, 10.0, 50.0, 40.0], "area": 2000.0, "iscrowd": 0})
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in DATASET_CATEGORIES.items()]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "my_objects.json").write_text(json.dumps(data))
    return root


def _pycocotools_stats(data: dict, results: list, cat_ids=None) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(data)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def test_custom_classes_on_a_custom_dataset_score_as_pycocotools(custom_model, custom_dataset, tmp_path):
    from core.contract import read_contract
    from eval.coco import STAT_NAMES, evaluate_model

    original, wrapped = custom_model
    contract = read_contract(wrapped.path)
    assert contract.label_space == "names" and contract.labels == MODEL_CLASSES
    result = evaluate_model(wrapped.path, coco_dir=custom_dataset, per_category=True, store=False,
                            results_file=tmp_path / "r.json", cache_file=tmp_path / "c.jsonl")
    assert result.annotations_file.endswith("my_objects.json") and result.images_evaluated == IMAGES
    mapping = result.settings["label_mapping"]
    assert mapping == {"by": "name", "matched": 4, "model_unmatched": ["umbrella"], "dataset_unmatched": ["bicycle"]}

    data = json.loads((custom_dataset / "annotations" / "my_objects.json").read_text())
    expected = []
    for image in data["images"]:
        boxes, labels, scores = _original_detections(original, custom_dataset / "images" / image["file_name"])
        for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores):
            cls = int(label) - 1
            if cls in MODEL_TO_CATEGORY:
                expected.append({"image_id": image["id"], "category_id": MODEL_TO_CATEGORY[cls],
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    assert result.scores["detections"] == len(expected) > 50
    reference = _pycocotools_stats(data, expected)
    assert 0.01 < reference[1] < 0.95  # a real ranking problem, not all-or-nothing
    for name, value in zip(STAT_NAMES, reference):
        assert result.scores["stats"][name] == pytest.approx(value, abs=1e-6), name
    # the per-class table names the dataset's classes, each AP as pycocotools gives it for that class alone
    table = result.scores["per_category"]
    assert list(table) == list(DATASET_CATEGORIES.values())
    for cat_id, name in DATASET_CATEGORIES.items():
        alone = _pycocotools_stats(data, expected, [cat_id])
        assert table[name]["id"] == cat_id
        assert table[name]["AP"] == pytest.approx(alone[0], abs=1e-6), name
        assert table[name]["AP50"] == pytest.approx(alone[1], abs=1e-6), name
    assert table["bicycle"]["AP"] == 0.0  # ground truth no model class can find

    # the stored record names its dataset; the report shows the accuracy "on" it, never as COCO's
    from report.collect import Accuracy, ModelRow, _foreign_dataset
    from report.table import display_rows

    stored = evaluate_model(wrapped.path, coco_dir=custom_dataset, resume=True, results_file=tmp_path / "r.json",
                            cache_file=tmp_path / "c.jsonl")
    assert stored.images_resumed == IMAGES and stored.scores["stats"] == result.scores["stats"]
    data = stored.record["data"]
    assert data["dataset"]["name"] == custom_dataset.name and data["dataset"]["coco_categories"] is False
    assert data["label_mapping"]["model_unmatched"] == ["umbrella"]
    assert _foreign_dataset(data) == custom_dataset.name
    assert _foreign_dataset({"dataset": {"name": "coco-val2017-subset", "coco_categories": True}}) is None
    row = ModelRow(name="fasterrcnn5", input_size=SIZE, dataset=custom_dataset.name,
                   map50=Accuracy(100 * data["map50"], "measured", "x"))
    cells, _ = display_rows([row])
    assert cells[0]["mAP@0.5 (%)"].endswith(f"on {custom_dataset.name}")
    assert row.label == f"fasterrcnn5 @320x320 [on {custom_dataset.name}]"


def test_cli_eval_prints_the_mapping_and_the_per_class_table(custom_model, custom_dataset, tmp_path):
    from typer.testing import CliRunner

    import cli

    _, wrapped = custom_model
    result = CliRunner().invoke(cli.app, ["eval", str(wrapped.path), "--coco", str(custom_dataset), "--per-category",
                                          "--out", str(tmp_path / "r.json"), "--cache", str(tmp_path / "c.jsonl")],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "by class name: 4 matched" in result.output and "umbrella" in result.output
    for name in ("Person", "CAR", "Dog", "Traffic Light", "bicycle"):
        assert name in result.output


def test_nothing_in_common_is_refused_naming_both_sides(custom_model, custom_dataset, tmp_path):
    from typer.testing import CliRunner

    import cli

    data = json.loads((custom_dataset / "annotations" / "my_objects.json").read_text())
    for cat in data["categories"]:
        cat["name"] = "widget " + cat["name"]
    ann = tmp_path / "widgets.json"
    ann.write_text(json.dumps(data))
    _, wrapped = custom_model
    result = CliRunner().invoke(cli.app, ["eval", str(wrapped.path), "--annotations", str(ann), "--images",
                                          str(custom_dataset / "images")], terminal_width=400)
    assert result.exit_code == DatasetError.exit_code == 8, result.output
    text = " ".join(result.output.split())
    assert "none of the model's 5 classes" in text and "'umbrella'" in text and "'widget Person'" in text


# ----------------------------------------------------------------------------- yolov3-tiny, renumbered


def test_yolov3_tiny_on_a_renumbered_copy_gives_its_usual_statistics(registry, exported, coco_dir, tmp_path):
    from eval.coco import evaluate_model
    from exporters.weights import locate_weights

    weights = locate_weights(registry.get("yolov3-tiny"))
    if weights is None:
        pytest.skip("yolov3-tiny: no trained weights here")
    model = exported("yolov3-tiny", weights=weights)
    usual = evaluate_model(model.path, coco_dir=coco_dir, store=False, results_file=tmp_path / "a.json",
                           cache_file=tmp_path / "a.jsonl")
    data = json.loads((coco_dir / "annotations" / "instances_val2017.json").read_text())
    # ids 3 * id + 100 (order kept, so COCOeval averages the classes in the same order), names
    # respelled, categories listed in reverse, images under images/ and the file under another name
    spell = {"traffic light": "Traffic_Light", "tv": "TV", "potted plant": "potted-plant", "person": "PERSON"}
    renumber = {c["id"]: 3 * c["id"] + 100 for c in data["categories"]}
    data["categories"] = [{**c, "id": renumber[c["id"]], "name": spell.get(c["name"], c["name"])}
                          for c in reversed(data["categories"])]
    for ann in data["annotations"]:
        ann["category_id"] = renumber[ann["category_id"]]
    copy_dir = tmp_path / "renumbered"
    (copy_dir / "annotations").mkdir(parents=True)
    (copy_dir / "annotations" / "objects.json").write_text(json.dumps(data))
    (copy_dir / "images").symlink_to(coco_dir / "val2017")
    renamed = evaluate_model(model.path, coco_dir=copy_dir, store=False, results_file=tmp_path / "b.json",
                             cache_file=tmp_path / "b.jsonl")
    assert renamed.settings["label_mapping"] == {"by": "name", "matched": 80, "model_unmatched": [],
                                                 "dataset_unmatched": []}
    assert usual.settings["label_mapping"]["by"] == "numbering"
    assert renamed.images_evaluated == usual.images_evaluated == 144
    assert renamed.scores["detections"] == usual.scores["detections"]
    assert renamed.scores["stats"] == usual.scores["stats"]  # exactly
    assert usual.scores["map50"] > 0.15


# ----------------------------------------------------------------------------- malformed datasets


def _good() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                       {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 12], "area": 120,
                             "iscrowd": 0}],
            "categories": [{"id": 7, "name": "widget"}, {"id": 9, "name": "gadget"}]}


def _edit(path: list, value):
    def apply(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return data
    return apply


_DELETE = object()

MALFORMED = [
    # (case, edit, text the message must hold: the entry)
    ("unknown category", _edit(["annotations", 0, "category_id"], 8),
     "annotations[0] (id 1) has category id 8, which is not in categories"),
    ("bbox of 3 values", _edit(["annotations", 0, "bbox"], [1, 2, 10]), "annotations[0] (id 1) bbox [1, 2, 10]"),
    ("bbox of 5 values", _edit(["annotations", 0, "bbox"], [1, 2, 10, 4, 4]), "annotations[0] (id 1) bbox"),
    ("bbox with a string", _edit(["annotations", 0, "bbox"], [1, "2", 10, 4]), "not a finite number"),
    ("negative box width", _edit(["annotations", 0, "bbox"], [1, 2, -10, 4]), "negative width or height"),
    ("unknown image", _edit(["annotations", 0, "image_id"], 3), "annotations[0] (id 1) refers to image id 3"),
    ("iscrowd 2", _edit(["annotations", 0, "iscrowd"], 2), "annotations[0] (id 1) iscrowd 2 is not 0 or 1"),
    ("no area", _edit(["annotations", 0, "area"], _DELETE), "annotations[0] (id 1) lacks one of"),
    ("string image id", _edit(["images", 1, "id"], "b"), "images[1]: id 'b' is not an integer"),
    ("duplicate image id", _edit(["images", 1, "id"], 1), "images[1]: duplicate image id 1"),
    ("file listed twice", _edit(["images", 1, "file_name"], "a.jpg"), "images[1] (id 2): file_name 'a.jpg' is listed twice"),
    ("zero width", _edit(["images", 1, "width"], 0), "images[1] (id 2, b.jpg): width/height 0 x 48"),
    ("duplicate category id", _edit(["categories", 1, "id"], 7), "categories[1]: duplicate category id 7"),
    ("names equal but for case", _edit(["categories", 1, "name"], "Widget"),
     "categories[1] (id 9): name 'Widget' is the name of category id 7 too"),
    ("empty category name", _edit(["categories", 1, "name"], ""), "categories[1] (id 9): name '' is empty"),
    ("no categories", _edit(["categories"], _DELETE), "no 'categories' list"),
]


@pytest.mark.parametrize("case, edit, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_dataset_exits_8_naming_file_and_entry(case, edit, message, tmp_path):
    from typer.testing import CliRunner

    import cli

    ann = tmp_path / "annotations" / "broken.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(edit(_good())))
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError) as info:
        from eval.dataset import load_coco

        load_coco(tmp_path)
    assert str(ann) in str(info.value) and message in str(info.value), str(info.value)
    result = CliRunner().invoke(cli.app, ["eval", "--results", str(tmp_path / "r.json"), "--annotations", str(ann)],
                                terminal_width=400)
    assert result.exit_code == 8, result.output
    assert "Traceback" not in result.output


def test_layouts_found_by_coco_dir(tmp_path):
    from eval.dataset import resolve_paths

    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    (tmp_path / "train").mkdir()
    assert resolve_paths(tmp_path) == (tmp_path / "annotations" / "instances_train.json", tmp_path / "train")
    (tmp_path / "annotations" / "captions_train.json").write_text("{}")
    assert resolve_paths(tmp_path)[0].name == "instances_train.json"  # the instances file among several
    (tmp_path / "annotations" / "instances_val.json").write_text("{}")
    with pytest.raises(DatasetError, match="annotations/ holds 3 JSON files"):
        resolve_paths(tmp_path)
    other = tmp_path / "other"
    (other / "annotations").mkdir(parents=True)
    (other / "annotations" / "labels.json").write_text("{}")
    (other / "images").mkdir()
    assert resolve_paths(other) == (other / "annotations" / "labels.json", other / "images")


def test_file_without_metadata_takes_its_names_from_a_names_file(custom_model, custom_dataset, tmp_path):
    from typer.testing import CliRunner

    import cli
    from core.contract import PREFIX
    from core.errors import ContractError
    from eval.coco import evaluate_model

    _, wrapped = custom_model
    bare = onnx.load(str(wrapped.path))
    keep = [p for p in bare.metadata_props if not p.key.startswith(PREFIX)]
    del bare.metadata_props[:]
    bare.metadata_props.extend(keep)
    onnx.save(bare, tmp_path / "bare.onnx")
    described = {"input_height": SIZE[0], "input_width": SIZE[1], "resize": "stretch", "label_space": "names"}
    with pytest.raises(ContractError, match="label space 'names' needs the model's class names .*--labels FILE"):
        evaluate_model(tmp_path / "bare.onnx", coco_dir=custom_dataset, store=False, overrides=described)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(MODEL_CLASSES) + "\n")
    result = CliRunner().invoke(cli.app, ["eval", str(tmp_path / "bare.onnx"), "--coco", str(custom_dataset),
                                          "--input-size", f"{SIZE[0]}x{SIZE[1]}", "--resize", "stretch", "--labels",
                                          str(names), "--limit", "2", "--out", str(tmp_path / "r.json"),
                                          "--cache", str(tmp_path / "c.jsonl")], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "by class name: 4 matched" in result.output


BAD_DESCRIBES = [
    ("labels with a COCO space", 'label_space = "coco80"\nlabels = ["a", "b"]\n', "label_space"),
    ("names without labels", 'label_space = "names"\n', "label_space"),
    ("labels and labels_file", 'labels = ["a"]\nlabels_file = "x.names"\n', "labels_file"),
    ("labels_file missing", 'labels_file = "absent.names"\n', "labels_file"),
    ("labels not strings", 'labels = ["a", 2]\n', "labels"),
]
QUERIES = """name = "q"
input_size = [64, 64]
resize = "stretch"
iou_threshold = 0.5
{top}
[outputs]
layout = "queries"
{outputs}
"""
BAD_QUERIES = [
    ("queries with nms", 'output = "o"\nnms = true\n', "outputs.nms"),
    ("no-object without softmax", 'output = "o"\nno_object_class = true\nscore_activation = "sigmoid"\n',
     "outputs.no_object_class"),
    ("output and boxes", 'output = "o"\nboxes = "b"\n', "outputs.output"),
    ("boxes without scores", 'boxes = "b"\n', "outputs.scores"),
    ("top_k zero", 'output = "o"\ntop_k = 0\n', "outputs.top_k"),
]


@pytest.mark.parametrize("what, top, key", BAD_DESCRIBES, ids=[b[0] for b in BAD_DESCRIBES])
def test_bad_labels_in_a_describe_file_name_the_key(what, top, key, tmp_path):
    from core.errors import ConfigError
    from exporters.foreign.describe import read_description

    path = tmp_path / "d.toml"
    path.write_text(QUERIES.format(top=top, outputs='output = "o"'))
    with pytest.raises(ConfigError) as info:
        read_description(path)
    assert str(path) in str(info.value) and f"{key}:" in str(info.value), str(info.value)


@pytest.mark.parametrize("what, outputs, key", BAD_QUERIES, ids=[b[0] for b in BAD_QUERIES])
def test_bad_queries_describe_names_the_key(what, outputs, key, tmp_path):
    from core.errors import ConfigError
    from exporters.foreign.describe import read_description

    path = tmp_path / "d.toml"
    path.write_text(QUERIES.format(top='label_space = "coco80"', outputs=outputs))
    with pytest.raises(ConfigError) as info:
        read_description(path)
    assert str(path) in str(info.value) and f"{key}:" in str(info.value), str(info.value)
    path.write_text(QUERIES.format(top='labels = ["a", "b"]', outputs='output = "o"'))
    assert read_description(path).labels == ("a", "b") and read_description(path).label_space == "names"
