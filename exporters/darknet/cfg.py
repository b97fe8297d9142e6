"""Darknet .cfg files: parsing, and the network plan (layers with their tensor shapes).

A cfg is read the way Darknet reads it (``parser.c``): all whitespace inside a line is
removed, empty lines and lines starting with ``#`` or ``;`` are skipped, ``[name]``
opens a section, anything else is ``key=value``. The first section is ``[net]``; the
following sections are the layers, numbered from 0 (the numbers ``route`` and
``shortcut`` refer to).

Stricter than Darknet on purpose: a line that is not ``key=value``, a value that does
not parse, an unknown section, or a key that would change the graph and is not
implemented here is a :class:`ModelDefinitionError` naming the file, line, section and
key — never silently ignored. Keys that only affect training are accepted and ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ModelDefinitionError

# Keys Darknet reads only while training (loss weights, augmentation, solver): they do
# not change the inference graph, so they are accepted and ignored.
_TRAINING_NET_KEYS = {
    "batch", "subdivisions", "momentum", "decay", "angle", "saturation", "exposure", "hue",
    "learning_rate", "burn_in", "max_batches", "policy", "steps", "scales", "step", "gamma",
    "power", "max_crop", "min_crop", "aspect",
}
_TRAINING_REGION_KEYS = {
    "bias_match", "jitter", "rescore", "object_scale", "noobject_scale", "class_scale",
    "coord_scale", "absolute", "thresh", "random",
}
_TRAINING_YOLO_KEYS = {"jitter", "ignore_thresh", "truth_thresh", "random"}

# Section name -> the keys implemented (graph-relevant) plus the ignored training keys.
_KEYS = {
    "net": {"width", "height", "channels"} | _TRAINING_NET_KEYS,
    "convolutional": {"batch_normalize", "filters", "size", "stride", "pad", "padding", "groups", "activation"},
    "maxpool": {"size", "stride", "padding"},
    "upsample": {"stride"},
    "route": {"layers"},
    "shortcut": {"from", "activation"},
    "reorg": {"stride"},
    "region": {"anchors", "classes", "coords", "num", "softmax"} | _TRAINING_REGION_KEYS,
    "yolo": {"mask", "anchors", "classes", "num"} | _TRAINING_YOLO_KEYS,
}
_ALIASES = {"network": "net", "conv": "convolutional", "max": "maxpool"}
ACTIVATIONS = ("leaky", "linear")


@dataclass(frozen=True)
class Section:
    """One ``[name]`` block: its options and the line numbers they came from."""

    kind: str
    line: int
    options: dict[str, str]
    option_lines: dict[str, int]


@dataclass(frozen=True)
class Cfg:
    path: Path
    net: Section
    layers: tuple[Section, ...]


def parse_cfg(path: Path) -> Cfg:
    """Read a Darknet cfg into sections (see the module docstring for the rules)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise ModelDefinitionError(f"Darknet cfg not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDefinitionError(f"{path}: cannot be read as a text cfg file ({exc})") from exc
    sections: list[Section] = []
    current: Section | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"\s+", "", raw)
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise ModelDefinitionError(f"{path}:{number}: malformed section header {raw.strip()!r}; expected [name]")
            name = line[1:-1].lower()
            kind = _ALIASES.get(name, name)
            if kind not in _KEYS:
                raise ModelDefinitionError(
                    f"{path}:{number}: unsupported layer type [{name}]; this exporter implements "
                    f"{', '.join('[' + k + ']' for k in _KEYS if k != 'net')}")
            current = Section(kind, number, {}, {})
            sections.append(current)
            continue
        if current is None:
            raise ModelDefinitionError(f"{path}:{number}: option {raw.strip()!r} before the first [section]")
        key, sep, value = line.partition("=")
        if not sep or not key or not value:
            raise ModelDefinitionError(
                f"{path}:{number}: [{current.kind}] cannot parse {raw.strip()!r}; expected key=value")
        if key not in _KEYS[current.kind]:
            raise ModelDefinitionError(
                f"{path}:{number}: [{current.kind}] key {key!r} is not implemented by the Darknet exporter "
                f"(it would change the graph); known keys: {', '.join(sorted(_KEYS[current.kind]))}")
        if key in current.options:
            raise ModelDefinitionError(
                f"{path}:{number}: [{current.kind}] key {key!r} given twice (first at line {current.option_lines[key]})")
        current.options[key] = value
        current.option_lines[key] = number
    if not sections or sections[0].kind != "net":
        raise ModelDefinitionError(f"{path}: the first section must be [net] (or [network])")
    extra_net = [s for s in sections[1:] if s.kind == "net"]
    if extra_net:
        raise ModelDefinitionError(f"{path}:{extra_net[0].line}: a second [net] section")
    if len(sections) == 1:
        raise ModelDefinitionError(f"{path}: no layers after [net]")
    return Cfg(path, sections[0], tuple(sections[1:]))


# ----------------------------------------------------------------------------- values


def _where(cfg: Cfg, section: Section, key: str | None = None) -> str:
    line = section.option_lines.get(key, section.line) if key else section.line
    what = f"[{section.kind}]" + (f" key {key!r}" if key else "")
    return f"{cfg.path}:{line}: {what}"


def _int(cfg: Cfg, s: Section, key: str, default: int | None = None) -> int:
    if key not in s.options:
        if default is None:
            raise ModelDefinitionError(f"{_where(cfg, s)}: required key {key!r} is missing")
        return default
    try:
        return int(s.options[key])
    except ValueError:
        raise ModelDefinitionError(f"{_where(cfg, s, key)}: {s.options[key]!r} is not an integer") from None


def _ints(cfg: Cfg, s: Section, key: str) -> list[int]:
    if key not in s.options:
        raise ModelDefinitionError(f"{_where(cfg, s)}: required key {key!r} is missing")
    try:
        return [int(v) for v in s.options[key].split(",") if v != ""]
    except ValueError:
        raise ModelDefinitionError(
            f"{_where(cfg, s, key)}: {s.options[key]!r} is not a comma-separated list of integers") from None


def _floats(cfg: Cfg, s: Section, key: str) -> list[float]:
    if key not in s.options:
        raise ModelDefinitionError(f"{_where(cfg, s)}: required key {key!r} is missing")
    try:
        return [float(v) for v in s.options[key].split(",") if v != ""]
    except ValueError:
        raise ModelDefinitionError(
            f"{_where(cfg, s, key)}: {s.options[key]!r} is not a comma-separated list of numbers") from None


def _positive(cfg: Cfg, s: Section, key: str, value: int) -> int:
    if value <= 0:
        raise ModelDefinitionError(f"{_where(cfg, s, key)}: must be a positive integer, got {value}")
    return value


def _activation(cfg: Cfg, s: Section, default: str) -> str:
    act = s.options.get("activation", default)
    if act not in ACTIVATIONS:
        raise ModelDefinitionError(
            f"{_where(cfg, s, 'activation' if 'activation' in s.options else None)}: activation {act!r} is not "
            f"implemented (supported: {', '.join(ACTIVATIONS)})")
    return act


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Shape:
    c: int
    h: int
    w: int


@dataclass(frozen=True)
class Layer:
    """A layer of the plan. ``inputs`` are layer indices (-1 = the network input)."""

    index: int
    kind: str
    line: int
    inputs: tuple[int, ...]
    out: Shape


@dataclass(frozen=True)
class Conv(Layer):
    filters: int = 0
    size: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    batch_normalize: bool = False
    activation: str = "linear"
    in_channels: int = 0

    @property
    def weight_count(self) -> int:
        return self.filters * (self.in_channels // self.groups) * self.size * self.size

    @property
    def param_count(self) -> int:
        """Learned parameters: kernel, bias (BN beta when normalised), BN scale.
        BN running mean/variance are statistics, not parameters."""
        return self.weight_count + self.filters * (2 if self.batch_normalize else 1)

    @property
    def float_count(self) -> int:
        """Floats this layer takes from a .weights file (running statistics included)."""
        return self.weight_count + self.filters * (4 if self.batch_normalize else 1)


@dataclass(frozen=True)
class MaxPool(Layer):
    size: int = 1
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class Upsample(Layer):
    stride: int = 2


@dataclass(frozen=True)
class Route(Layer):
    pass


@dataclass(frozen=True)
class Shortcut(Layer):
    activation: str = "linear"


@dataclass(frozen=True)
class Reorg(Layer):
    stride: int = 1


@dataclass(frozen=True)
class Detection(Layer):
    """A ``[region]`` (YOLOv2) or ``[yolo]`` (YOLOv3) output layer.

    ``anchors`` are (w, h) per used anchor: in grid cells for region, in input pixels for yolo.
    """

    classes: int = 0
    anchors: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Plan:
    """A cfg resolved at a given input size: every layer with its output shape."""

    cfg: Cfg
    height: int
    width: int
    channels: int
    layers: tuple[Layer, ...] = field(default_factory=tuple)

    @property
    def convs(self) -> list[Conv]:
        return [layer for layer in self.layers if isinstance(layer, Conv)]

    @property
    def heads(self) -> list[Detection]:
        return [layer for layer in self.layers if isinstance(layer, Detection)]

    @property
    def param_count(self) -> int:
        return sum(c.param_count for c in self.convs)

    @property
    def float_count(self) -> int:
        return sum(c.float_count for c in self.convs)


def plan_network(cfg: Cfg, input_size: tuple[int, int] | None = None) -> Plan:
    """Resolve every layer's inputs and output shape; ``input_size`` (H, W) overrides the cfg's.

    Raises :class:`ModelDefinitionError` naming file, line and key for anything that is
    inconsistent (a bad layer reference, mismatched shapes, an invalid value).
    """
    net = cfg.net
    height = _positive(cfg, net, "height", _int(cfg, net, "height", 0)) if input_size is None else input_size[0]
    width = _positive(cfg, net, "width", _int(cfg, net, "width", 0)) if input_size is None else input_size[1]
    channels = _int(cfg, net, "channels", 3)
    if channels != 3:
        raise ModelDefinitionError(f"{_where(cfg, net, 'channels')}: {channels} input channels; detectors here take RGB (3)")
    if height <= 0 or width <= 0:
        raise ModelDefinitionError(f"{cfg.path}: input size {height}x{width} is not positive")
    shapes: list[Shape] = []
    layers: list[Layer] = []

    def ref(s: Section, key: str, value: int, index: int) -> int:
        target = index + value if value < 0 else value
        if not 0 <= target < index:
            raise ModelDefinitionError(
                f"{_where(cfg, s, key)}: refers to layer {value} (absolute {target}), which is not an earlier layer "
                f"(this is layer {index})")
        return target

    for index, s in enumerate(cfg.layers):
        prev = index - 1
        cur = shapes[prev] if index else Shape(channels, height, width)
        base = dict(index=index, kind=s.kind, line=s.line)
        if s.kind == "convolutional":
            filters = _positive(cfg, s, "filters", _int(cfg, s, "filters", 1))
            size = _positive(cfg, s, "size", _int(cfg, s, "size", 1))
            stride = _positive(cfg, s, "stride", _int(cfg, s, "stride", 1))
            groups = _positive(cfg, s, "groups", _int(cfg, s, "groups", 1))
            padding = _int(cfg, s, "padding", 0)
            if _int(cfg, s, "pad", 0):
                padding = size // 2
            if padding < 0:
                raise ModelDefinitionError(f"{_where(cfg, s, 'padding')}: negative padding {padding}")
            if cur.c % groups or filters % groups:
                raise ModelDefinitionError(
                    f"{_where(cfg, s, 'groups')}: {cur.c} input channels / {filters} filters not divisible by groups={groups}")
            bn = _int(cfg, s, "batch_normalize", 0)
            if bn not in (0, 1):
                raise ModelDefinitionError(f"{_where(cfg, s, 'batch_normalize')}: must be 0 or 1, got {bn}")
            out = Shape(filters, (cur.h + 2 * padding - size) // stride + 1, (cur.w + 2 * padding - size) // stride + 1)
            layer = Conv(**base, inputs=(prev,), out=out, filters=filters, size=size, stride=stride, padding=padding,
                         groups=groups, batch_normalize=bool(bn), activation=_activation(cfg, s, "logistic"),
                         in_channels=cur.c)
        elif s.kind == "maxpool":
            stride = _positive(cfg, s, "stride", _int(cfg, s, "stride", 1))
            size = _positive(cfg, s, "size", _int(cfg, s, "size", stride))
            padding = _int(cfg, s, "padding", size - 1)
            if padding < 0:
                raise ModelDefinitionError(f"{_where(cfg, s, 'padding')}: negative padding {padding}")
            out = Shape(cur.c, (cur.h + padding - size) // stride + 1, (cur.w + padding - size) // stride + 1)
            layer = MaxPool(**base, inputs=(prev,), out=out, size=size, stride=stride, padding=padding)
        elif s.kind == "upsample":
            stride = _int(cfg, s, "stride", 2)
            if stride <= 0:
                raise ModelDefinitionError(
                    f"{_where(cfg, s, 'stride')}: stride {stride} (Darknet's reverse/down-sampling) is not implemented")
            layer = Upsample(**base, inputs=(prev,), out=Shape(cur.c, cur.h * stride, cur.w * stride), stride=stride)
        elif s.kind == "route":
            sources = tuple(ref(s, "layers", v, index) for v in _ints(cfg, s, "layers"))
            if not sources:
                raise ModelDefinitionError(f"{_where(cfg, s, 'layers')}: no layers given")
            first = shapes[sources[0]]
            for src in sources[1:]:
                if (shapes[src].h, shapes[src].w) != (first.h, first.w):
                    raise ModelDefinitionError(
                        f"{_where(cfg, s, 'layers')}: cannot concatenate layer {sources[0]} ({first.h}x{first.w}) with "
                        f"layer {src} ({shapes[src].h}x{shapes[src].w}) at input {height}x{width}; Darknet YOLO "
                        "inputs must be multiples of 32")
            layer = Route(**base, inputs=sources, out=Shape(sum(shapes[i].c for i in sources), first.h, first.w))
        elif s.kind == "shortcut":
            src = ref(s, "from", _int(cfg, s, "from"), index)
            if shapes[src] != cur:
                raise ModelDefinitionError(
                    f"{_where(cfg, s, 'from')}: shortcut between shapes {shapes[src]} and {cur} (Darknet's resampling "
                    "shortcut) is not implemented")
            layer = Shortcut(**base, inputs=(prev, src), out=cur, activation=_activation(cfg, s, "linear"))
        elif s.kind == "reorg":
            stride = _positive(cfg, s, "stride", _int(cfg, s, "stride", 1))
            if cur.h % stride or cur.w % stride or cur.c % (stride * stride):
                raise ModelDefinitionError(
                    f"{_where(cfg, s, 'stride')}: input {cur.c}x{cur.h}x{cur.w} is not divisible by stride {stride} "
                    f"(channels by {stride * stride}); use an input size that is a multiple of 32")
            layer = Reorg(**base, inputs=(prev,), out=Shape(cur.c * stride * stride, cur.h // stride, cur.w // stride),
                          stride=stride)
        elif s.kind in ("region", "yolo"):
            layer = _detection(cfg, s, base, prev, cur)
        else:  # pragma: no cover - parse_cfg only lets known kinds through
            raise ModelDefinitionError(f"{_where(cfg, s)}: unsupported layer type")
        if min(layer.out.c, layer.out.h, layer.out.w) <= 0:
            raise ModelDefinitionError(
                f"{_where(cfg, s)}: layer {index} would have an empty output {layer.out} at input {height}x{width}")
        layers.append(layer)
        shapes.append(layer.out)
    plan = Plan(cfg, height, width, channels, tuple(layers))
    if not plan.heads:
        raise ModelDefinitionError(f"{cfg.path}: no [region] or [yolo] layer: not a YOLO detector")
    return plan


def structure_warnings(plan: Plan) -> list[str]:
    """What is odd about a plan that still builds: computed outputs nothing uses, anchors no head uses.

    Darknet runs such a cfg without a word (a YOLOv3 cfg that lost a ``[yolo]`` section
    becomes a detector with fewer heads); the exporter says so instead.
    """
    cfg = plan.cfg
    consumed = {i for layer in plan.layers for i in layer.inputs}
    warnings = []
    for layer in plan.layers:
        if layer.index not in consumed and not isinstance(layer, Detection):
            after = plan.layers[layer.index + 1] if layer.index + 1 < len(plan.layers) else None
            where = ("it is the last layer of the cfg" if after is None
                     else f"the next layer, [{after.kind}] at line {after.line}, does not read it")
            warnings.append(
                f"{cfg.path}:{layer.line}: layer {layer.index} [{layer.kind}] ({layer.out.c}x{layer.out.h}x{layer.out.w}) "
                f"feeds no other layer and no detection head ({where}): it is computed and thrown away. A missing "
                "[yolo]/[region] section after it would explain this; the export has "
                f"{len(plan.heads)} detection head(s)")
    yolo = [(layer, cfg.layers[layer.index]) for layer in plan.heads if layer.kind == "yolo"]
    if yolo:
        nums = {_int(cfg, s, "num", 1) for _, s in yolo}
        uses: dict[int, list[int]] = {}
        for layer, s in yolo:
            mask = _ints(cfg, s, "mask") if "mask" in s.options else list(range(_int(cfg, s, "num", 1)))
            for m in mask:
                uses.setdefault(m, []).append(layer.line)
        if len(nums) == 1:
            num = nums.pop()
            unused = [m for m in range(num) if m not in uses]
            if unused:
                warnings.append(
                    f"{cfg.path}: anchors {unused} of the {num} the [yolo] sections declare (num={num}) are used by "
                    f"no [yolo] layer's mask: {len(yolo)} head(s) use {len(uses)} anchor(s); a [yolo] section is "
                    "probably missing")
        else:
            warnings.append(f"{cfg.path}: the [yolo] sections declare different anchor counts (num={sorted(nums)})")
        twice = {m: lines for m, lines in uses.items() if len(lines) > 1}
        if twice:
            warnings.append(f"{cfg.path}: anchor(s) used by more than one [yolo] mask: "
                            + ", ".join(f"{m} (lines {', '.join(map(str, lines))})" for m, lines in sorted(twice.items())))
    return warnings


def _detection(cfg: Cfg, s: Section, base: dict, prev: int, cur: Shape) -> Detection:
    classes = _positive(cfg, s, "classes", _int(cfg, s, "classes", 20))
    num = _positive(cfg, s, "num", _int(cfg, s, "num", 1))
    values = _floats(cfg, s, "anchors")
    if len(values) != 2 * num:
        raise ModelDefinitionError(f"{_where(cfg, s, 'anchors')}: {len(values)} numbers, num={num} needs {2 * num}")
    pairs = [(values[2 * i], values[2 * i + 1]) for i in range(num)]
    if s.kind == "region":
        if _int(cfg, s, "coords", 4) != 4:
            raise ModelDefinitionError(f"{_where(cfg, s, 'coords')}: only coords=4 is implemented")
        if _int(cfg, s, "softmax", 0) != 1:
            raise ModelDefinitionError(f"{_where(cfg, s, 'softmax' if 'softmax' in s.options else None)}: "
                                       "only softmax=1 class probabilities are implemented")
        anchors = tuple(pairs)
    else:
        mask = _ints(cfg, s, "mask") if "mask" in s.options else list(range(num))
        bad = [m for m in mask if not 0 <= m < num]
        if bad or not mask:
            raise ModelDefinitionError(f"{_where(cfg, s, 'mask')}: mask {mask} must index the {num} anchors")
        anchors = tuple(pairs[m] for m in mask)
    expected = len(anchors) * (5 + classes)
    if cur.c != expected:
        raise ModelDefinitionError(
            f"{_where(cfg, s)}: input has {cur.c} channels; {len(anchors)} anchors x (5 + {classes} classes) needs "
            f"{expected} (check filters= of the convolution before it)")
    return Detection(**base, inputs=(prev,), out=cur, classes=classes, anchors=anchors)
