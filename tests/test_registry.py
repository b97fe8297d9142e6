"""models.toml and its loader: every entry parses, names and keys are checked, specs are frozen.

The expected model set is transcribed by hand from DESIGN.md's table and issue 2 (the
extra configurations), so a registry that loses or renames a model fails here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib

import pytest

from exporters.registry import load_registry
from core.errors import RegistryError
from core.paths import models_toml

# DESIGN.md, "The configurations to cover (from the paper)": name -> (framework, (H, W)).
PAPER_TABLE = {
    "yolov2-416": ("darknet", (416, 416)),
    "yolov2-608": ("darknet", (608, 608)),
    "yolov3-tiny": ("darknet", (416, 416)),
    "yolov3-320": ("darknet", (320, 320)),
    "yolov3-416": ("darknet", (416, 416)),
    "yolov3-608": ("darknet", (608, 608)),
    "ssd300": ("tensorflow", (300, 300)),
    "ssd512": ("tensorflow", (512, 512)),
    "retinanet-800": ("pytorch", (800, 800)),
    "faster-rcnn-vgg16": ("pytorch", (600, 850)),
    "mask-rcnn-800": ("pytorch", (800, 1024)),
}
# Issue 2, item 4: registered beside the paper's eleven.
EXTRA = ("yolov2-tiny", "yolov3-spp-608", "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
         "maskrcnn_resnet50_fpn", "ssd300_vgg16")
# The keys a [models.NAME] table may have (models.toml's header documents the same list).
VALID_KEYS = ("description", "family", "framework", "input_size", "iou_threshold", "label_space",
              "max_detections", "paper", "published", "resize", "score_threshold", "source", "weights")
HEX64 = re.compile(r"^[0-9a-f]{64}$")

REGISTERED = load_registry().names


def minimal_entry(name: str = "toy", **extra_lines: str) -> str:
    lines = {
        "family": '"toy"', "framework": '"pytorch"', "input_size": "[320, 480]", "resize": '"stretch"',
        "label_space": '"coco91"', "score_threshold": "0.05", "iou_threshold": "0.5", "max_detections": "100",
        "source": '{ builder = "torchvision" }', **extra_lines,
    }
    return f'[models."{name}"]\n' + "".join(f"{k} = {v}\n" for k, v in lines.items()) + "\n"


def load_text(tmp_path, text: str):
    path = tmp_path / "models.toml"
    path.write_text(text)
    return load_registry(path)


def test_every_entry_of_models_toml_is_loaded_in_file_order(registry):
    with open(models_toml(), "rb") as fh:
        raw = tomllib.load(fh)["models"]
    assert registry.names == list(raw)
    assert len(registry) == len(raw) >= len(PAPER_TABLE) + len(EXTRA)
    for spec in registry:
        assert spec.input_size == tuple(raw[spec.name]["input_size"])
        assert spec.framework == raw[spec.name]["framework"]


@pytest.mark.parametrize("name", REGISTERED)
def test_entry_is_well_formed(registry, name):
    spec = registry.get(name)
    assert spec.name == name and spec.family and spec.description
    assert 0 < spec.score_threshold < 1 and 0 < spec.iou_threshold < 1 and spec.max_detections == 100
    w = spec.weights
    if w.public:
        assert w.file and w.url.endswith("/" + w.file), "the cached file name must be the published one"
        assert not (w.sha256 and w.sha256_prefix), "give the full sha256 or, where only that is published, its prefix"
        if w.sha256:
            assert HEX64.match(w.sha256)
        if w.sha256_prefix:
            # torchvision embeds the digest's first hex digits in the file name: they must agree.
            assert re.fullmatch(r"[0-9a-f]{8,64}", w.sha256_prefix)
            assert f"-{w.sha256_prefix}." in w.file
    else:
        assert w.sha256 is None and w.sha256_prefix is None and w.file is None
    if spec.framework == "darknet":
        assert spec.height % 32 == 0 and spec.width % 32 == 0, "Darknet's strides need multiples of 32"
        assert (spec.resize, spec.label_space) == ("letterbox", "coco80")
        assert spec.source["cfg_url"].endswith("/" + spec.source["cfg"])
        assert HEX64.match(spec.source["cfg_sha256"])
    for figure, published in spec.published.items():
        assert published.source and published.convention, f"{figure} needs its source and convention"
        if figure in ("map", "map50"):
            assert 0 < published.value <= 100  # percent, as published
    if "map" in spec.published and "map50" in spec.published:
        assert spec.published["map"].value < spec.published["map50"].value


def test_darknet_entries_match_the_real_cfg_files(registry, darknet_dir):
    """The registered cfg sha256 values are those of pjreddie's files in the shared data."""
    darknet = [s for s in registry if s.framework == "darknet"]
    assert darknet
    for spec in darknet:
        cfg = darknet_dir / spec.source["cfg"]
        assert hashlib.sha256(cfg.read_bytes()).hexdigest() == spec.source["cfg_sha256"], cfg


def test_registered_yolov3_tiny_sha256_is_that_of_the_official_file(registry, darknet_dir):
    spec = registry.get("yolov3-tiny")
    data = (darknet_dir / spec.weights.file).read_bytes()
    assert len(data) == 35_434_956  # as data/README.md states
    assert hashlib.sha256(data).hexdigest() == spec.weights.sha256


def test_every_configuration_of_the_design_table_is_registered(registry):
    for name, (framework, size) in PAPER_TABLE.items():
        assert name in registry, f"{name} (DESIGN.md) is not in models.toml"
        spec = registry.get(name)
        assert (spec.framework, spec.input_size) == (framework, size), name


def test_the_paper_flag_marks_exactly_the_eleven_paper_configurations(registry):
    assert {s.name for s in registry if s.paper} == set(PAPER_TABLE)
    assert len(PAPER_TABLE) == 11


@pytest.mark.parametrize("name", EXTRA)
def test_extra_configurations_of_issue_2_are_registered(registry, name):
    assert name in registry
    assert registry.get(name).paper is False


@pytest.mark.parametrize("name", [n for n in EXTRA if n.endswith(("_fpn", "_vgg16"))])
def test_torchvision_references_have_public_prefix_verified_weights(registry, name):
    spec = registry.get(name)
    assert spec.weights.url.startswith("https://download.pytorch.org/models/")
    assert spec.weights.sha256_prefix and {"map", "params"} <= set(spec.published)


def test_unknown_model_name_lists_the_valid_ones(registry):
    with pytest.raises(RegistryError) as err:
        registry.get("yolov4-416")
    assert "'yolov4-416'" in str(err.value)
    for name in registry.names:
        assert name in str(err.value)
    with pytest.raises(RegistryError) as err:
        registry.select(["yolov3-416", "ssd1000", "yolov9"])
    assert "['ssd1000', 'yolov9']" in str(err.value) and "yolov3-416" in str(err.value)


def test_select_without_names_is_every_model_and_with_names_keeps_their_order(registry):
    assert [s.name for s in registry.select(None)] == registry.names
    assert [s.name for s in registry.select(["ssd300", "yolov3-tiny"])] == ["ssd300", "yolov3-tiny"]


def test_unknown_key_is_an_error_listing_the_valid_keys(tmp_path):
    with pytest.raises(RegistryError) as err:
        load_text(tmp_path, minimal_entry(colour='"red"'))
    message = str(err.value)
    assert "'toy'" in message and "'colour'" in message and str(tmp_path / "models.toml") in message
    for key in VALID_KEYS:
        assert f"'{key}'" in message


@pytest.mark.parametrize("lines, expected", [
    ({"weights": '{ format = "darknet", md5 = "abc" }'}, "unknown weights key(s) ['md5']"),
    ({"published": '{ fps = { value = 30, source = "x" } }'}, "unknown published figure 'fps'"),
    ({"published": '{ map = { value = 30 } }'}, "published.map needs value and source"),
    ({"resize": '"crop"'}, "resize 'crop' is not one of ('letterbox', 'stretch')"),
    ({"label_space": '"voc"'}, "label_space 'voc' is not one of ('coco80', 'coco91')"),
    ({"framework": '"caffe"'}, "framework 'caffe' is not one of"),
    ({"input_size": "[416]"}, "input_size must be [height, width]"),
    ({"input_size": "[416, -1]"}, "input_size must be [height, width]"),
])
def test_malformed_entries_are_errors_naming_the_problem(tmp_path, lines, expected):
    with pytest.raises(RegistryError) as err:
        load_text(tmp_path, minimal_entry(**lines))
    assert expected in str(err.value) and "'toy'" in str(err.value)


def test_missing_required_key_is_named(tmp_path):
    text = minimal_entry().replace('label_space = "coco91"\n', "")
    with pytest.raises(RegistryError, match=r"missing key\(s\) \['label_space'\]"):
        load_text(tmp_path, text)


def test_unreadable_registries_are_errors_naming_the_file(tmp_path):
    with pytest.raises(RegistryError, match="not found.*DETBENCH_MODELS"):
        load_registry(tmp_path / "absent.toml")
    with pytest.raises(RegistryError, match="not valid TOML"):
        load_text(tmp_path, "[models.toy\n")
    with pytest.raises(RegistryError, match=r"unknown top-level table\(s\) \['model'\]"):
        load_text(tmp_path, minimal_entry().replace("[models.", "[model."))


def test_detbench_models_env_var_selects_the_registry(tmp_path, monkeypatch):
    path = tmp_path / "other.toml"
    path.write_text(minimal_entry("only-me"))
    monkeypatch.setenv("DETBENCH_MODELS", str(path))
    registry = load_registry()
    assert registry.names == ["only-me"] and registry.path == path
    spec = registry.get("only-me")
    assert (spec.height, spec.width, spec.weights.format, spec.weights.public) == (320, 480, "none", False)


def test_specs_are_frozen(registry):
    spec = registry.get("yolov3-416")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.input_size = (608, 608)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.weights.url = "http://example.invalid/evil.weights"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.published["map"].value = 99.0
    with pytest.raises(TypeError):
        spec.source["cfg"] = "other.cfg"  # read-only mapping
    with pytest.raises(TypeError):
        spec.published["map50"] = spec.published["map"]
    assert load_registry().get("yolov3-416") == spec  # equal by value, loaded afresh
