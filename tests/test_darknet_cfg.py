"""Darknet cfg parsing: malformed and unsupported cfgs give a ModelDefinitionError naming file, line and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from exporters import export_model
from exporters.darknet.cfg import parse_cfg, plan_network
from core.errors import ModelDefinitionError


def _variant(tmp_path: Path, darknet_dir: Path, old: str, new: str, count: int = 1) -> tuple[Path, int]:
    """yolov3-tiny.cfg with ``old`` replaced by ``new``; returns the file and the 1-based line of the change."""
    text = (darknet_dir / "yolov3-tiny.cfg").read_text()
    assert old in text, old
    line = text[: text.index(old)].count("\n") + 1
    path = tmp_path / "variant.cfg"
    path.write_text(text.replace(old, new, count))
    return path, line


def test_real_cfgs_parse_to_the_published_layer_counts(darknet_dir):
    # Darknet's own layer tables: yolov3 has 107 layers (0..106), yolov3-tiny 24 (0..23), yolov2 32 (0..31).
    assert len(parse_cfg(darknet_dir / "yolov3.cfg").layers) == 107
    assert len(parse_cfg(darknet_dir / "yolov3-tiny.cfg").layers) == 24
    assert len(parse_cfg(darknet_dir / "yolov2.cfg").layers) == 32


def test_yolov3_output_shapes_match_darknet_layer_table(darknet_dir):
    """Shapes at 416 agree with the layer table Darknet printed for yolov3.cfg (data/darknet)."""
    plan = plan_network(parse_cfg(darknet_dir / "yolov3.cfg"), (416, 416))
    table = (darknet_dir / "yolov3_416_darknet_layer_table_dog.txt").read_text().splitlines()
    checked = 0
    for row in table:
        parts = row.replace("x", " x ").split()  # Darknet prints "13 x  13 x1024"
        if len(parts) > 2 and parts[0].isdigit() and "->" in parts:
            arrow = parts.index("->")
            w, _, h, _, c = parts[arrow + 1: arrow + 6]
            out = plan.layers[int(parts[0])].out
            assert (out.w, out.h, out.c) == (int(w), int(h), int(c)), row
            checked += 1
    assert checked > 90


@pytest.mark.parametrize("old,new,problem", [
    ("filters=16\n", "filters 16\n", "expected key=value"),
    ("filters=16\n", "filters=sixteen\n", "'sixteen' is not an integer"),
    ("[maxpool]\nsize=2\nstride=2\n", "[dropout]\nprobability=.5\n", "unsupported layer type [dropout]"),
    ("filters=16\n", "filters=16\ndilation=2\n", "key 'dilation' is not implemented"),
    ("activation=leaky\n", "activation=mish\n", "activation 'mish' is not implemented"),
    ("layers = -4\n", "layers = 40\n", "refers to layer 40"),
    ("anchors = 10,14,", "anchors = 10,x14,", "not a comma-separated list of numbers"),
    ("[convolutional]\nbatch_normalize=1\nfilters=16", "[convolutional\nbatch_normalize=1\nfilters=16", "malformed section header"),
])
def test_malformed_cfg_names_file_line_and_problem(tmp_path, darknet_dir, old, new, problem):
    path, line = _variant(tmp_path, darknet_dir, old, new)
    with pytest.raises(ModelDefinitionError) as err:
        plan_network(parse_cfg(path), (416, 416))
    message = str(err.value)
    assert str(path) in message and problem in message
    # the error points at the changed line (or its section header) and not somewhere else
    reported = int(message.split(f"{path}:")[1].split(":")[0])
    assert line - 6 <= reported <= line + 1, (reported, line, message)


def test_head_channel_mismatch_is_an_error(tmp_path, darknet_dir):
    path, _ = _variant(tmp_path, darknet_dir, "filters=255", "filters=254")
    with pytest.raises(ModelDefinitionError, match=r"255|needs"):
        plan_network(parse_cfg(path), (416, 416))


def test_input_size_not_multiple_of_32_is_an_error(darknet_dir):
    with pytest.raises(ModelDefinitionError, match="multiple"):
        plan_network(parse_cfg(darknet_dir / "yolov3.cfg"), (400, 400))


def test_missing_cfg_names_the_file_and_the_fetch_command(registry, tmp_path):
    spec = registry.get("yolov3-tiny")
    ghost = dataclasses.replace(spec, source={"cfg": "no-such-model.cfg"})
    with pytest.raises(ModelDefinitionError) as err:
        export_model(ghost, tmp_path / "x.onnx")
    assert "no-such-model.cfg" in str(err.value) and "python cli.py fetch yolov3-tiny" in str(err.value)
    assert not (tmp_path / "x.onnx").exists()


def test_cfg_differing_from_the_registry_checksum_is_refused(registry, tmp_path, monkeypatch, darknet_dir):
    # a cfg of the registered name but other content (here: yolov2-tiny's text) must not be used silently
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "yolov3-tiny.cfg").write_text((darknet_dir / "yolov2-tiny.cfg").read_text())
    monkeypatch.setenv("DETBENCH_CACHE", str(cache))
    monkeypatch.setenv("DETBENCH_DATA", str(tmp_path / "no-data"))  # the only copy is the wrong one
    with pytest.raises(ModelDefinitionError, match="sha256") as err:
        export_model(registry.get("yolov3-tiny"), tmp_path / "x.onnx")
    assert str(cache / "yolov3-tiny.cfg") in str(err.value) and "fetch yolov3-tiny" in str(err.value)


def test_a_wrong_cfg_in_the_cache_does_not_hide_the_verified_one(registry, tmp_path, monkeypatch, darknet_dir):
    """Issue 12, rule 5 for cfgs: the cache comes first in the search order, but only a copy that verifies is used."""
    from exporters.darknet.export import find_cfg

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "yolov3-tiny.cfg").write_text((darknet_dir / "yolov2-tiny.cfg").read_text())
    monkeypatch.setenv("DETBENCH_CACHE", str(cache))
    monkeypatch.setenv("DETBENCH_DATA", str(darknet_dir.parent))
    assert find_cfg(registry.get("yolov3-tiny")) == darknet_dir / "yolov3-tiny.cfg"


# --------------------------------------------------------------------------- structure warnings (issue 12, rule 6)


def test_cfg_without_its_last_yolo_section_is_warned_about(tmp_path, darknet_dir):
    """yolov3-tiny without its final [yolo]: the last convolution (layer 22, 255 channels) feeds nothing,
    and anchors 0, 1, 2 (the second head's mask) are used by no head."""
    from exporters.darknet.cfg import structure_warnings

    text = (darknet_dir / "yolov3-tiny.cfg").read_text()
    cut = tmp_path / "cut.cfg"
    cut.write_text(text[:text.rindex("[yolo]")])
    plan = plan_network(parse_cfg(cut))
    assert len(plan.heads) == 1
    warnings = structure_warnings(plan)
    assert len(warnings) == 2
    assert "layer 22 [convolutional] (255x26x26)" in warnings[0] and "last layer" in warnings[0]
    assert "anchors [0, 1, 2] of the 6" in warnings[1] and "1 head(s) use 3 anchor(s)" in warnings[1]


def test_real_cfgs_have_no_structure_warnings(darknet_dir):
    from exporters.darknet.cfg import structure_warnings

    for cfg in sorted(darknet_dir.glob("*.cfg")):
        assert structure_warnings(plan_network(parse_cfg(cfg))) == [], cfg.name


def test_a_trailing_layer_and_a_shared_anchor_are_warned_about(tmp_path, darknet_dir):
    """Own cases: a convolution appended after the last [yolo] (computed, never used), and the
    second head's mask reusing anchor 3 of the first (anchor 0 then unused)."""
    from exporters.darknet.cfg import structure_warnings

    text = (darknet_dir / "yolov3-tiny.cfg").read_text()
    trailing = tmp_path / "trailing.cfg"
    trailing.write_text(text + "\n[convolutional]\nfilters=8\nsize=1\nstride=1\npad=1\nactivation=leaky\n")
    (warning,) = structure_warnings(plan_network(parse_cfg(trailing)))
    assert "layer 24 [convolutional] (8x26x26)" in warning and "it is the last layer of the cfg" in warning

    shared = tmp_path / "shared.cfg"
    shared.write_text(text.replace("mask = 0,1,2", "mask = 3,1,2"))
    unused, twice = structure_warnings(plan_network(parse_cfg(shared)))
    assert "anchors [0] of the 6" in unused
    lines = [n for n, line in enumerate(shared.read_text().splitlines(), 1) if line.strip() == "[yolo]"]
    assert f"3 (lines {lines[0]}, {lines[1]})" in twice
