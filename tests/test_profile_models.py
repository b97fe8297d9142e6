"""The analyzer on the project's real exports, against independent figures.

- Darknet: convolution-only FLOPs against the BFLOPs Darknet itself prints (to three
  decimals, and layer by layer from Darknet's printed layer table for yolov3 at 416), and
  parameters against the count a Darknet cfg implies, worked out here by an independent
  walk of the cfg file (not the exporter's parser).
- torchvision references: parameters against torchvision's published num_params, and
  measured-mode MACs against its published "GFLOPS" (multiplications of convolutions and
  matrix products counted once, bias and everything else not counted).

Counts do not depend on weight values, so random-init exports are used throughout.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from counting import profile_model


# What Darknet prints as the BFLOPs total for a cfg at an input size (the acceptance
# figures: pjreddie/darknet's layer tables; yolov3 at 416 is in the shared data folder).
DARKNET_PRINTED_BFLOPS = {
    ("yolov3.cfg", 320): 38.973, ("yolov3.cfg", 416): 65.864, ("yolov3.cfg", 608): 140.692,
    ("yolov3-tiny.cfg", 416): 5.565, ("yolov2.cfg", 416): 29.464, ("yolov2.cfg", 608): 62.938,
    ("yolov3-spp.cfg", 608): 141.449,
}


def _registry_names(framework: str, need: str | None = None) -> list[str]:
    from exporters.registry import load_registry

    return [s.name for s in load_registry() if s.framework == framework and (need is None or need in s.published)]


# ----------------------------------------------------------------------------- an independent cfg walk
def _cfg_sections(path: Path) -> list[tuple[str, dict[str, str]]]:
    sections, current = [], None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            current = (line.strip("[]").strip(), {})
            sections.append(current)
        else:
            key, _, value = line.partition("=")
            current[1][key.strip()] = value.strip()
    return sections


def cfg_conv_layers(path: Path, height: int, width: int) -> dict[int, dict[str, int]]:
    """Darknet layer index -> {'macs', 'params', 'bn_filters'} of every convolution, from the cfg alone.

    Parameters as Darknet stores them: kernels, one bias per filter, and one scale per filter
    when batch-normalised (rolling mean/var are statistics, not parameters)."""
    sections = _cfg_sections(path)
    assert sections[0][0] in ("net", "network")
    c, h, w = int(sections[0][1].get("channels", 3)), height, width
    shapes: list[tuple[int, int, int]] = []
    convs = {}
    for idx, (kind, opts) in enumerate(sections[1:]):
        if kind == "convolutional":
            n, size = int(opts["filters"]), int(opts.get("size", 1))
            stride, groups = int(opts.get("stride", 1)), int(opts.get("groups", 1))
            pad = size // 2 if int(opts.get("pad", 0)) else int(opts.get("padding", 0))
            oh, ow = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
            bn = int(opts.get("batch_normalize", 0))
            weights = n * (c // groups) * size * size
            convs[idx] = {"macs": weights * oh * ow, "params": weights + n + (n if bn else 0),
                          "bn_filters": n if bn else 0}
            c, h, w = n, oh, ow
        elif kind == "maxpool":
            size, stride = int(opts.get("size", 2)), int(opts.get("stride", 2))
            padding = int(opts.get("padding", size - 1))
            h, w = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
        elif kind == "upsample":
            s = int(opts.get("stride", 2))
            h, w = h * s, w * s
        elif kind == "reorg":
            s = int(opts.get("stride", 2))
            c, h, w = c * s * s, h // s, w // s
        elif kind == "route":
            refs = [int(v) for v in opts["layers"].split(",")]
            refs = [r if r >= 0 else idx + r for r in refs]
            c = sum(shapes[r][0] for r in refs)
            h, w = shapes[refs[0]][1], shapes[refs[0]][2]
        elif kind in ("shortcut", "yolo", "region", "dropout", "softmax", "detection", "cost"):
            pass
        else:
            raise AssertionError(f"{path.name}: layer kind {kind!r} not handled by the test's cfg walk")
        shapes.append((c, h, w))
    return convs


def darknet_layer_table(path: Path) -> dict[int, float]:
    """Layer index -> BFLOPs from a layer table Darknet printed."""
    table = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(\d+)\s+conv\s+.*?([\d.]+)\s+BFLOPs\s*$", line)
        if m:
            table[int(m.group(1))] = float(m.group(2))
    return table


def _conv_layer_macs(profile) -> dict[int, int]:
    found = {}
    for node in profile.nodes:
        if node.op_type == "Conv":
            m = re.search(r"_(\d+)\.conv$", node.name)
            assert m, f"Darknet export node {node.name!r} does not name its layer"
            found[int(m.group(1))] = node.macs
    return found


# ----------------------------------------------------------------------------- Darknet
@pytest.fixture(scope="module")
def darknet_exports(exported):
    pytest.importorskip("exporters.darknet.export")
    return exported


@pytest.mark.parametrize("name", _registry_names("darknet"))
def test_darknet_conv_flops_and_params_match_darknet(name, registry, darknet_exports, darknet_dir):
    spec = registry.get(name)
    result = darknet_exports(name)
    profile = profile_model(result.path)
    cfg = darknet_dir / spec.source["cfg"]
    h, w = spec.input_size
    layers = cfg_conv_layers(cfg, h, w)

    assert not profile.unknown_ops
    # no unresolved node in the network part: static shapes suffice for every convolution
    assert not [n.name for n in profile.unresolved if n.part == "network"]
    assert _conv_layer_macs(profile) == {i: layer["macs"] for i, layer in layers.items()}
    assert profile.conv_macs == sum(layer["macs"] for layer in layers.values())
    assert profile.params == sum(layer["params"] for layer in layers.values())
    assert profile.params == result.contract.source_params
    # BatchNorm running mean + var: two per filter of every batch-normalised conv, not parameters
    assert profile.bn_running_stats == 2 * sum(layer["bn_filters"] for layer in layers.values())
    printed = DARKNET_PRINTED_BFLOPS.get((spec.source["cfg"], h))
    if printed is not None:
        assert round(profile.to_dict()["conv_flops"] / 1e9, 3) == printed
    assert profile.to_dict()["flops"] == 2 * profile.macs
    assert profile.postprocess_macs > 0 and profile.network_macs > profile.conv_macs


def test_darknet_per_layer_bflops_match_printed_table(registry, darknet_exports, darknet_dir):
    table = darknet_layer_table(darknet_dir / "yolov3_416_darknet_layer_table_dog.txt")
    assert len(table) == 75  # yolov3 has 75 convolutional layers
    spec = next(s for s in registry if s.framework == "darknet" and s.source.get("cfg") == "yolov3.cfg"
                and s.input_size == (416, 416))
    profile = profile_model(darknet_exports(spec.name).path)
    ours = {i: round(2 * macs / 1e9, 3) for i, macs in _conv_layer_macs(profile).items()}
    assert ours == table


def test_darknet_measured_mode_resolves_everything(registry, darknet_exports, coco_dir):
    spec = next(s for s in registry if s.framework == "darknet" and s.source.get("cfg") == "yolov3-tiny.cfg")
    path = darknet_exports(spec.name).path
    static = profile_model(path)
    assert static.unresolved, "the in-graph NMS should leave data-dependent shapes statically"
    image = sorted((coco_dir / "val2017").glob("*.jpg"))[0]
    measured = profile_model(path, shapes="measured", image=image)
    assert measured.to_dict()["complete"] is True
    assert measured.conv_macs == static.conv_macs and measured.params == static.params
    assert measured.static_mismatches == []
    assert measured.shape_sources().get("measured", 0) > 0


def test_onnx_tool_cross_check_on_darknet(registry, darknet_exports, darknet_dir):
    """onnx-tool sees the network part only (K of the in-graph TopK is computed from the
    scores); there its Conv MACs must equal ours plus one add per output of every conv that
    has a bias (onnx-tool counts bias additions; Darknet's convs without BatchNorm have one)."""
    spec = next(s for s in registry if s.framework == "darknet" and s.source.get("cfg") == "yolov3-tiny.cfg")
    profile = profile_model(darknet_exports(spec.name).path, cross_check=True)
    check = profile.onnx_tool
    assert check["scope"].startswith("network part") and "full graph is not handed" in check["note"]
    assert check["status"] == "ok", check
    bias_adds = sum(
        _numel(n.outputs[0][1]) for n in profile.nodes if n.op_type == "Conv" and len(n.inputs) == 3)
    assert bias_adds > 0
    assert check["conv_macs"] == check["ours"]["conv_macs"] + bias_adds
    assert check["ours"]["conv_macs"] == profile.conv_macs
    # onnx-tool counts every initializer it meets: ours + BatchNorm running statistics + small constants
    assert check["params"] >= profile.params + profile.bn_running_stats


def _numel(shape) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


# ----------------------------------------------------------------------------- torchvision references
@pytest.fixture(scope="module")
def torch_exports(exported):
    pytest.importorskip("exporters.pytorch.export")
    return exported


# Mask R-CNN's mask head per detection (torchvision MaskRCNNHeads + MaskRCNNPredictor):
# four 3x3 convs 256->256 on 14x14, a 2x2 stride-2 transposed conv 256->256 (14x14 in),
# and a 1x1 conv 256->91 on 28x28.
MASK_HEAD_MACS_PER_DETECTION = 4 * (256 * 256 * 9 * 14 * 14) + 256 * 256 * 4 * 14 * 14 + 256 * 91 * 28 * 28


@pytest.mark.slow
@pytest.mark.parametrize("name", _registry_names("pytorch", need="gmacs"))
def test_torchvision_reference_params_and_macs(name, registry, torch_exports, coco_dir):
    spec = registry.get(name)
    result = torch_exports(name)
    image = sorted((coco_dir / "val2017").glob("*.jpg"))[0]
    profile = profile_model(result.path, shapes="measured", image=image)
    assert not profile.unknown_ops
    # parameters: torchvision's published num_params, and PyTorch's own count of this module
    assert profile.params == int(spec.published["params"].value)
    assert profile.params == result.contract.source_params
    published = spec.published["gmacs"].value * 1e9
    linear = profile.linear_macs
    mask_head = 0
    if spec.family == "mask-rcnn":
        # torchvision's figure equals Faster R-CNN's: it was taken on an input on which no
        # detection reached the mask head. Take the measured detections' mask-head work out.
        detections = next(s for n, s in _outputs(profile) if n == "boxes")[0]
        mask_head = sum(n.total_macs for n in profile.nodes
                        if n.op_type in ("Conv", "ConvTranspose") and _leading(n) == detections
                        and n.part == "network" and _spatial(n) in (14, 28))
        assert mask_head == detections * MASK_HEAD_MACS_PER_DETECTION
        linear -= mask_head
    assert abs(linear - published) / published < 0.03, (linear / 1e9, published / 1e9)
    # Static mode (shape arithmetic evaluated exactly) resolves every convolution that does not
    # depend on the detections: all of them but the mask head's.
    static = profile_model(result.path)
    assert static.params == profile.params
    assert static.conv_macs == profile.conv_macs - mask_head


def _outputs(profile):
    for node in profile.nodes:
        yield from node.outputs


def _leading(node):
    shape = node.outputs[0][1]
    return shape[0] if shape else None


def _spatial(node):
    shape = node.inputs[0][1]
    return shape[-1] if shape else None


# ----------------------------------------------------------------------------- every registered model
@pytest.mark.slow
@pytest.mark.parametrize("name", _registry_names("pytorch", need=None)
                         + _registry_names("tensorflow"))
def test_every_registered_model_profiles_completely(name, registry, exported):
    """Each registered model's export has a counting rule for every op, and its parameter
    count (our convention) equals the source framework's own count in the contract."""
    spec = registry.get(name)
    module = {"pytorch": "exporters.pytorch.export", "tensorflow": "exporters.tensorflow.export"}[spec.framework]
    pytest.importorskip(module)
    result = exported(name)
    profile = profile_model(result.path)
    assert not profile.unknown_ops
    assert profile.conv_macs > 0
    assert profile.params == result.contract.source_params
