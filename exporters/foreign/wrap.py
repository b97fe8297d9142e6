"""A foreign ONNX detector -> a contract ONNX file, by composing graphs around it.

``export --onnx FILE --describe FILE.toml``: the describe file (format in
:mod:`exporters.foreign.describe`, examples in ``exporters/foreign/describe_examples/``) says how the
file's inputs and outputs map onto the contract. The result is three graphs joined with
``onnx.compose.merge_models``:

- a prologue from the contract's ``images`` (float32 [1, 3, H, W], RGB, 0..255) to the
  file's image input (channel order, scale, mean/std, layout, batch axis), plus a
  constant for every other input the file has (e.g. ``image_shape``, fed the input size);
- the original graph, untouched except that its names carry the prefix ``src/`` and a
  dynamic input size is fixed to the described one;
- an epilogue from the file's outputs to ``boxes`` (x1, y1, x2, y2 input pixels),
  ``scores``, ``labels`` (int64, mapped to the label space) and ``masks``: box format and
  space, activations, objectness, YOLO head decoding, and, for candidates, class-aware
  ``NonMaxSuppression`` with the described thresholds, built by the same code as the
  Darknet exporter's (:func:`exporters.nms_graph.postprocess`).

The operator set is the file's own (converted to 11 when older: NonMaxSuppression and
Compress need it); the prologue and epilogue only use operators whose signature did not
change since opset 11. Every check of the describe file against the graph runs before
anything is built; validation (the wrapped file against the original file's outputs
decoded by :mod:`exporters.foreign.decode` on real COCO images) runs before anything is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters import ExportResult
from exporters.matching import MatchRules, match_detections
from exporters.nms_graph import GraphBuilder, PostProcess, postprocess
from exporters.foreign.decode import cap, decode, extra_value, model_inputs, query_width
from exporters.foreign.describe import Description, describe_error, read_description
from exporters.validation import Comparison, cpu_session, validation_images
from core.contract import INPUT_NAME, LABELS_KEY, ModelContract, save_model, sha256_file
from core.errors import ConfigError, ExportError
from core.names import file_in
from core.images import load_rgb, prepare
from core.ort_session import cpu_session as ort_cpu_session

WRAPPER_VERSION = "1"
VALIDATION_IMAGES = 3
MIN_OPSET = 11
SOURCE_PREFIX = "src/"
ATOL = RTOL = 1e-3
PARAMS_CONVENTION = "elements of every floating-point initializer and Constant tensor of the original graph"

_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_EXTRA_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
                "int32": TensorProto.INT32}
_LABEL_RANGES = {"coco80": (0, 79), "coco91": (1, 90)}


@dataclass
class Bound:
    """The describe file resolved against the graph: which input is the image, the extra
    inputs' shapes, and each described output's element type and (partly known) shape."""

    image_input: str
    image_type: int
    extra_shapes: dict[str, list[int]]
    outputs: dict[str, tuple[int, list[int | None]]] = field(default_factory=dict)
    opset: int = 0
    source_opset: int = 0


def wrap_onnx(onnx_file: Path, describe_file: Path, out: Path, *,
              progress: Callable[[str], None] | None = None) -> ExportResult:
    """Wrap, validate and save; ``out`` is a ``.onnx`` path or a folder (then ``<name>.onnx``).

    Raises :class:`ConfigError` (describe file or --onnx file unusable, naming the key),
    :class:`ValidationError` (wrapped file differs from the decoded original),
    :class:`ExportError` (the composition failed)."""
    progress = progress or (lambda _m: None)
    started = time.perf_counter()
    desc = read_description(describe_file)
    onnx_file = Path(onnx_file)
    target = Path(out) if Path(out).suffix == ".onnx" else file_in(Path(out), desc.name, where=f"--describe {desc.path}: name")
    progress(f"reading {onnx_file}")
    source = load_source(onnx_file)
    model, bound = bind(desc, source)
    progress("composing prologue, original graph and epilogue")
    wrapped = compose(desc, model, bound)
    progress("validating against the original file on COCO images")
    figures = validate(desc, onnx_file, wrapped, bound)
    contract = ModelContract(
        name=desc.name, family=desc.family, framework="onnx", input_height=desc.input_size[0],
        input_width=desc.input_size[1], resize=desc.resize, label_space=desc.label_space,
        score_threshold=desc.score_threshold, iou_threshold=desc.iou_threshold, max_detections=desc.max_detections,
        weights="sha256:" + sha256_file(onnx_file), source_params=count_params(source), pad_value=desc.pad_value,
        extra={"exporter": f"exporters.foreign.wrap {WRAPPER_VERSION}", "source": "foreign ONNX file",
               "source_file": onnx_file.name, "source_producer": f"{source.producer_name} {source.producer_version}".strip(),
               "source_opset": str(bound.source_opset), "opset": str(bound.opset),
               "describe_file": Path(describe_file).name, "describe": desc.text,
               **({LABELS_KEY: json.dumps(list(desc.labels))} if desc.labels else {}),
               "source_params_convention": PARAMS_CONVENTION,
               "nms": ("wrapper (ONNX NonMaxSuppression, class-aware)" if desc.outputs["nms"]
                       else "none (queries kept by top-k)" if desc.outputs["layout"] == "queries"
                       else "the original file's own"),
               "validated_against": "the original file in onnxruntime, outputs decoded by exporters.foreign.decode (numpy)"})
    progress(f"writing {target}")
    path = save_model(wrapped, target, contract)
    figures["file_bytes"] = path.stat().st_size
    return ExportResult(path=path, contract=contract, seconds=time.perf_counter() - started, validation=figures)


def load_source(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--onnx {path}: no such file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, OSError, missing external data
        raise ConfigError(f"--onnx {path} is not a readable ONNX file: {exc}") from exc


def count_params(model: onnx.ModelProto) -> int:
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                    total += int(np.prod(attr.t.dims))
    return total


# ----------------------------------------------------------------------------- binding


def _shape(value_info) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _has_shape(value_info) -> bool:
    return value_info.type.tensor_type.HasField("shape")


def bind(desc: Description, source: onnx.ModelProto) -> tuple[onnx.ModelProto, Bound]:
    """A copy of ``source`` with its image input fixed to the described size (opset raised to
    11 if older), and the describe file checked against it: raises :class:`ConfigError`
    naming the key for an input or output that is not in the graph or a shape that
    contradicts the described format."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    source_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if source_opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:  # the converter raises its own and RuntimeErrors
            raise ExportError(f"--onnx {desc.path}: opset {source_opset} could not be converted to {MIN_OPSET} "
                              f"(the wrapper's NMS needs it): {exc}") from exc
    opset = max(source_opset, MIN_OPSET)
    initializers = {i.name for i in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    for name in desc.extra_inputs:
        if name not in inputs:
            raise desc.bad(f"extra_inputs.{name}", f"the graph has no input {name!r}; its inputs are {sorted(inputs)}")
    image_name = desc.input["name"]
    if image_name is None:
        rest = [n for n in inputs if n not in desc.extra_inputs]
        if len(rest) != 1:
            raise desc.bad("input.name", f"missing, and the graph has {len(rest)} candidate image inputs {rest}")
        image_name = rest[0]
    if image_name not in inputs:
        raise desc.bad("input.name", f"the graph has no input {image_name!r}; its inputs are {sorted(inputs)}")
    unfed = sorted(n for n in inputs if n != image_name and n not in desc.extra_inputs)
    if unfed:
        raise desc.bad("extra_inputs", f"the graph's input(s) {unfed} are not described; give each a constant "
                                       "(e.g. extra_inputs.image_shape = { value = \"input_hw\" })")
    image = inputs[image_name]
    image_type = image.type.tensor_type.elem_type
    if image_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        raise desc.bad("input.name", f"input {image_name!r} has element type {TensorProto.DataType.Name(image_type)}; "
                                     "the wrapper feeds floating-point pixels")
    _fix_image_shape(desc, image)
    extra_shapes = {}
    for name, spec in desc.extra_inputs.items():
        declared = _shape(inputs[name]) if _has_shape(inputs[name]) else None
        values = extra_value(desc, {**spec, "shape": [-1]}, [-1]).size
        shape = spec["shape"] or declared
        if shape is None or any(d is None for d in shape):
            raise desc.bad(f"extra_inputs.{name}.shape", f"missing, and the graph declares {name!r} with shape "
                                                         f"{declared} (dynamic)")
        if declared is not None and (len(declared) != len(shape)
                                     or any(d is not None and d != s for d, s in zip(declared, shape))):
            raise desc.bad(f"extra_inputs.{name}.shape", f"{shape} contradicts the graph's {declared}")
        if int(np.prod(shape)) != values:
            raise desc.bad(f"extra_inputs.{name}.value", f"{values} value(s) do not fill shape {shape}")
        wanted = inputs[name].type.tensor_type.elem_type
        if wanted != _EXTRA_TYPES[spec["dtype"]]:
            raise desc.bad(f"extra_inputs.{name}.dtype", f"{spec['dtype']!r}, but the graph's input {name!r} is "
                                                         f"{TensorProto.DataType.Name(wanted)}")
        extra_shapes[name] = list(shape)
    bound = Bound(image_name, image_type, extra_shapes, opset=opset, source_opset=source_opset)
    _bind_outputs(desc, model, bound)
    return model, bound


def _fix_image_shape(desc: Description, image) -> None:
    height, width = desc.input_size
    layout = desc.input["layout"]
    wanted = {"NCHW": [1, 3, height, width], "NHWC": [1, height, width, 3], "CHW": [3, height, width],
              "HWC": [height, width, 3]}[layout]
    shape = image.type.tensor_type.shape
    if len(shape.dim) != len(wanted):
        raise desc.bad("input.layout", f"{layout!r} has {len(wanted)} axes, the graph's input {image.name!r} "
                                       f"has {len(shape.dim)} ({_shape(image)})")
    for dim, value, axis in zip(shape.dim, wanted, layout):
        if dim.HasField("dim_value") and dim.dim_value != value:
            key = "input_size" if axis in "HW" else "input.layout"
            raise desc.bad(key, f"the graph's input {image.name!r} is {_shape(image)} ({layout}), which contradicts "
                                f"{layout} = {wanted}")
        dim.Clear()
        dim.dim_value = value  # a dynamic size is fixed to the described one


def _bind_outputs(desc: Description, model: onnx.ModelProto, bound: Bound) -> None:
    outputs = {o.name: o for o in model.graph.output}
    wanted = desc.tensors
    for role, name in wanted.items():
        if name not in outputs:
            key = f"outputs.heads[{role[4:]}]" if role.startswith("head") else f"outputs.{role}"
            raise desc.bad(key, f"the graph has no output {name!r}; its outputs are {sorted(outputs)}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output] if _has_shape(v)}
    except Exception:  # a graph shape inference cannot follow still wraps; shapes stay as declared
        known = {}
    for role, name in wanted.items():
        info = known.get(name, outputs[name])
        elem = outputs[name].type.tensor_type.elem_type or info.type.tensor_type.elem_type
        bound.outputs[role] = (elem, _shape(info) if _has_shape(info) else [])
    _check_output_shapes(desc, bound)


def _check_output_shapes(desc: Description, bound: Bound) -> None:
    out, layout = desc.outputs, desc.outputs["layout"]
    shapes = {role: shape for role, (_, shape) in bound.outputs.items()}

    def bad(role: str, msg: str) -> ConfigError:
        return describe_error(desc.path, f"outputs.{role}", f"graph output {desc.tensors[role]!r} has shape "
                                                          f"{shapes[role] or 'unknown'}: {msg}")

    def rank(role: str, allowed: tuple[int, ...]) -> None:
        if shapes[role] and len(shapes[role]) not in allowed:
            raise bad(role, f"layout {layout!r} wants rank {' or '.join(map(str, allowed))}")

    def last(role: str, value: int, what: str, axis: int = -1) -> None:
        if shapes[role] and shapes[role][axis] is not None and shapes[role][axis] != value:
            raise bad(role, f"axis {axis} should be {value} ({what})")

    if "boxes" in shapes:
        rank("boxes", (2, 3))
        last("boxes", 4, "four box coordinates")
    if layout == "detections":
        rank("scores", (1, 2))
        rank("labels", (1, 2))
        if out["nms"] and out["num_classes"] is None:
            raise describe_error(desc.path, "outputs.num_classes", "missing")
    elif layout == "class_scores":
        rank("scores", (2, 3))
        classes = shapes["scores"][-1] if shapes["scores"] else None
        if out["num_classes"] is None:
            if classes is None:
                raise describe_error(desc.path, "outputs.num_classes", "missing, and the scores' class axis is dynamic")
            out["num_classes"] = classes  # read off the graph (the describe text in the metadata omits it)
        last("scores", out["num_classes"], f"num_classes = {out['num_classes']}")
        if "objectness" in shapes:
            rank("objectness", (1, 2, 3))
    elif layout == "packed":
        rank("output", (2, 3))
        width = 4 + int(out["objectness_column"]) + out["num_classes"]
        what = f"4 box values{' + objectness' if out['objectness_column'] else ''} + num_classes = {width}"
        last("output", width, what, -2 if out["transposed"] else -1)
    elif layout == "queries":
        role = "output" if "output" in shapes else "scores"
        rank(role, (2, 3))
        extra = (4 if role == "output" else 0) + int(out["no_object_class"])
        columns = shapes[role][-1] if shapes[role] else None
        if out["num_classes"] is None:
            if columns is None:
                raise describe_error(desc.path, "outputs.num_classes", f"missing, and the class axis of "
                                     f"{desc.tensors[role]!r} is dynamic")
            out["num_classes"] = columns - extra  # read off the graph (the describe text in the metadata omits it)
        if out["num_classes"] <= 0:
            raise bad(role, "leaves no class columns")
        last(role, out["num_classes"] + extra, f"{'4 box values + ' if role == 'output' else ''}num_classes = "
             f"{out['num_classes']}{' + the no-object class' if out['no_object_class'] else ''}")
    elif layout == "yolo_heads":
        for i, anchors in enumerate(out["anchors"]):
            role = f"head{i}"
            shape = shapes[role]
            channels = len(anchors) * (5 + out["num_classes"])
            if len(shape) not in (3, 4) or any(d is None for d in shape[-3:]):
                raise describe_error(desc.path, f"outputs.heads[{i}]", f"graph output {desc.tensors[role]!r} has "
                                     f"shape {shape or 'unknown'}; a raw YOLO head is [1, A·(5 + C), gh, gw] with "
                                     "a known grid size")
            if shape[-3] != channels:
                raise describe_error(desc.path, f"outputs.anchors[{i}]", f"{len(anchors)} anchors x (5 + num_classes "
                                     f"{out['num_classes']}) = {channels} channels, but head {desc.tensors[role]!r} "
                                     f"has {shape[-3]}")
    table = out["label_map"]
    if isinstance(table, list) and out["num_classes"] is not None and len(table) < out["num_classes"]:
        raise describe_error(desc.path, "outputs.label_map", f"has {len(table)} entries for {out['num_classes']} classes "
                             f"(num_classes{'' if 'num_classes' in desc.text else ', read off the graph'}); give one "
                             "label per class")


# ----------------------------------------------------------------------------- composing


def compose(desc: Description, model: onnx.ModelProto, bound: Bound) -> onnx.ModelProto:
    """prologue + ``src/``-prefixed original graph + epilogue, joined by ``onnx.compose.merge_models``."""
    from onnx import compose as onnx_compose

    source = onnx_compose.add_prefix(model, SOURCE_PREFIX)
    opsets = [o for o in source.opset_import if o.domain not in ("", "ai.onnx")]
    opsets.append(helper.make_opsetid("", bound.opset))
    del source.opset_import[:]
    source.opset_import.extend(opsets)
    pre, pre_map = _prologue(desc, bound)
    post, post_map, names = _epilogue(desc, bound)
    for part in (pre, post):
        part.ir_version = source.ir_version
        del part.opset_import[:]
        part.opset_import.extend(opsets)
    try:
        joined = onnx_compose.merge_models(pre, source, io_map=[(a, SOURCE_PREFIX + b) for a, b in pre_map],
                                           producer_name="detbench.exporters.foreign.wrap")
        joined = onnx_compose.merge_models(joined, post, io_map=[(SOURCE_PREFIX + a, b) for a, b in post_map],
                                           outputs=names, producer_name="detbench.exporters.foreign.wrap",
                                           name=desc.name)
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"composing {desc.name!r} with onnx.compose failed: {exc}") from exc
    # merge_models concatenates the parts' opset imports: one entry per domain, or onnxruntime's
    # quantizer (and other tools) cannot tell which default-domain version the graph uses.
    merged: dict[str, int] = {}
    for o in joined.opset_import:
        domain = "" if o.domain == "ai.onnx" else o.domain
        merged[domain] = max(merged.get(domain, 0), o.version)
    del joined.opset_import[:]
    joined.opset_import.extend(helper.make_opsetid(d, v) for d, v in merged.items())
    return joined


def _prologue(desc: Description, bound: Bound) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """``images`` -> the file's image input (and constants for its other inputs)."""
    g = GraphBuilder()
    inp = desc.input
    height, width = desc.input_size
    x = INPUT_NAME
    if inp["channel_order"] == "bgr":
        x = g.node("Gather", [x, g.const("pre.bgr", np.array([2, 1, 0], np.int64))], "pre.bgr", "pre.bgr", axis=1)
    if inp["scale"] != 1.0:
        x = g.node("Mul", [x, g.const("pre.scale", np.array(inp["scale"], np.float32))], "pre.scaled", "pre.scale")
    if any(m != 0 for m in inp["mean"]):
        mean = np.asarray(inp["mean"], np.float32).reshape(1, 3, 1, 1)
        x = g.node("Sub", [x, g.const("pre.mean", mean)], "pre.centred", "pre.mean")
    if any(s != 1 for s in inp["std"]):
        std = np.asarray(inp["std"], np.float32).reshape(1, 3, 1, 1)
        x = g.node("Div", [x, g.const("pre.std", std)], "pre.normalised", "pre.std")
    layout = inp["layout"]
    if layout in ("NHWC", "HWC"):
        x = g.node("Transpose", [x], "pre.nhwc", "pre.nhwc", perm=[0, 2, 3, 1])
    if layout in ("CHW", "HWC"):
        shape = [3, height, width] if layout == "CHW" else [height, width, 3]
        x = g.node("Reshape", [x, g.const("pre.unbatched", np.array(shape, np.int64))], "pre.unbatched", "pre.unbatch")
    if bound.image_type != TensorProto.FLOAT:
        x = g.node("Cast", [x], "pre.cast", "pre.cast", to=bound.image_type)
    x = g.node("Identity", [x], "pre.image", "pre.image")  # a named output even when nothing above applies
    mapping = [(x, bound.image_input)]
    outputs = [helper.make_tensor_value_info(x, bound.image_type, None)]
    for name, spec in desc.extra_inputs.items():
        value = extra_value(desc, spec, bound.extra_shapes[name])
        const = g.node("Constant", [], f"pre.extra.{name}", f"pre.extra.{name}",
                       value=numpy_helper.from_array(value, f"pre.extra.{name}.value"))
        mapping.append((const, name))
        outputs.append(helper.make_tensor_value_info(const, _EXTRA_TYPES[spec["dtype"]], list(value.shape)))
    graph = helper.make_graph(g.nodes, "prologue",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, height, width])],
                              outputs, initializer=g.inits)
    return helper.make_model(graph), mapping


def _epilogue(desc: Description, bound: Bound) -> tuple[onnx.ModelProto, list[tuple[str, str]], list[str]]:
    """The file's outputs -> ``boxes``, ``scores``, ``labels`` (+ ``masks``)."""
    g = GraphBuilder()
    out, layout = desc.outputs, desc.outputs["layout"]
    inputs, mapping = [], []

    def take(role: str, as_float: bool = True) -> str:
        elem, shape = bound.outputs[role]
        name = f"post.in.{role}"
        inputs.append(helper.make_tensor_value_info(name, elem, shape or None))
        mapping.append((desc.tensors[role], name))
        if as_float and elem != TensorProto.FLOAT:
            return g.node("Cast", [name], f"{name}.float", f"{name}.float", to=TensorProto.FLOAT)
        return name

    def reshape(x: str, shape: list[int], name: str) -> str:
        return g.node("Reshape", [x, g.const(f"{name}.shape", np.array(shape, np.int64))], name, name)

    classes = out["num_classes"]
    if layout == "queries":
        names = _queries(g, desc, take, reshape)
        return _epilogue_model(g, desc, inputs, names, bound), mapping, names
    if layout == "yolo_heads":
        boxes, scores = [], []
        for i, anchors in enumerate(out["anchors"]):
            b, s = _yolo_head(g, desc, i, take(f"head{i}"), bound.outputs[f"head{i}"][1], anchors)
            boxes.append(b)
            scores.append(s)
        boxes = g.node("Concat", boxes, "post.boxes", "post.boxes", axis=1) if len(boxes) > 1 else boxes[0]
        scores = g.node("Concat", scores, "post.scores", "post.scores", axis=1) if len(scores) > 1 else scores[0]
    elif layout == "packed":
        width = 4 + int(out["objectness_column"]) + classes
        raw = take("output")
        if out["transposed"]:
            rows = g.node("Transpose", [reshape(raw, [width, -1], "post.columns")], "post.rows", "post.rows", perm=[1, 0])
        else:
            rows = reshape(raw, [-1, width], "post.rows")
        boxes = reshape(_to_xyxy(g, desc, _columns(g, rows, 0, 4, "post.box")), [1, -1, 4], "post.boxes")
        scores = _activate(g, _columns(g, rows, width - classes, width, "post.class"), out["score_activation"], "post.class")
        if out["objectness_column"]:
            obj = _columns(g, rows, 4, 5, "post.obj")
            if out["score_activation"] == "sigmoid":
                obj = g.node("Sigmoid", [obj], "post.obj.sigmoid", "post.obj.sigmoid")
            scores = g.node("Mul", [scores, obj], "post.score", "post.score")
        scores = reshape(scores, [1, -1, classes], "post.scores")
    elif layout == "class_scores":
        boxes = reshape(_to_xyxy(g, desc, reshape(take("boxes"), [-1, 4], "post.box")), [1, -1, 4], "post.boxes")
        scores = _activate(g, reshape(take("scores"), [1, -1, classes], "post.class"), out["score_activation"],
                           "post.class")
        if "objectness" in desc.tensors:
            obj = reshape(take("objectness"), [1, -1, 1], "post.obj")
            if out["score_activation"] == "sigmoid":
                obj = g.node("Sigmoid", [obj], "post.obj.sigmoid", "post.obj.sigmoid")
            scores = g.node("Mul", [scores, obj], "post.scores", "post.scores")
    else:
        boxes = _to_xyxy(g, desc, reshape(take("boxes"), [-1, 4], "post.box"))
        scores = reshape(take("scores"), [-1], "post.score")
        ids = reshape(take("labels", as_float=False), [-1], "post.class")
        if bound.outputs["labels"][0] in _FLOAT_TYPES:
            ids = g.node("Round", [ids], "post.class.round", "post.class.round")
        ids = g.node("Cast", [ids], "post.class.int", "post.class.int", to=TensorProto.INT64)
        if not out["nms"]:
            names = _select(g, desc, boxes, scores, ids, take("masks", as_float=False) if "masks" in desc.tensors else None,
                            take("num_detections", as_float=False) if "num_detections" in desc.tensors else None)
            return _epilogue_model(g, desc, inputs, names, bound), mapping, names
        one_hot = g.node("OneHot", [ids, g.const("post.classes", np.array(classes, np.int64)),
                                    g.const("post.one_hot", np.array([0.0, 1.0], np.float32))],
                         "post.one_hot", "post.one_hot", axis=-1)
        scores = g.node("Mul", [one_hot, reshape(scores, [-1, 1], "post.score.column")], "post.score.matrix",
                        "post.score.matrix")
        scores = reshape(scores, [1, -1, classes], "post.scores")
        boxes = reshape(boxes, [1, -1, 4], "post.boxes")
    postprocess(g, boxes, scores, PostProcess(desc.score_threshold, desc.iou_threshold, desc.max_detections))
    # postprocess names its class indices "labels"; the label mapping below produces the output.
    for node in g.nodes:
        for k, name in enumerate(node.output):
            if name == "labels":
                node.output[k] = "post.class.selected"
    _map_labels(g, desc, "post.class.selected")
    names = ["boxes", "scores", "labels"]
    return _epilogue_model(g, desc, inputs, names, bound), mapping, names


def _epilogue_model(g: GraphBuilder, desc: Description, inputs: list, names: list[str], bound: Bound) -> onnx.ModelProto:
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["K"]),
               helper.make_tensor_value_info("labels", TensorProto.INT64, ["K"])]
    if "masks" in names:
        outputs.append(helper.make_tensor_value_info("masks", bound.outputs["masks"][0], None))
    return helper.make_model(helper.make_graph(g.nodes, "epilogue", inputs, outputs, initializer=g.inits))


def _columns(g: GraphBuilder, rows: str, start: int, end: int, name: str) -> str:
    return g.node("Slice", [rows, g.const(f"{name}.start", np.array([start], np.int64)),
                            g.const(f"{name}.end", np.array([end], np.int64)),
                            g.const(f"{name}.axis", np.array([-1], np.int64))], name, name)


def _activate(g: GraphBuilder, x: str, activation: str, name: str) -> str:
    if activation == "sigmoid":
        return g.node("Sigmoid", [x], f"{name}.sigmoid", f"{name}.sigmoid")
    if activation == "softmax":
        # Softmax before opset 13 flattens to 2-D at ``axis``; on the last axis both agree.
        return g.node("Softmax", [x], f"{name}.softmax", f"{name}.softmax", axis=-1)
    return x


def _to_xyxy(g: GraphBuilder, desc: Description, boxes: str) -> str:
    """[M, 4] in the described format and space -> [M, 4] (x1, y1, x2, y2) input pixels."""
    fmt = desc.outputs["box_format"]
    if fmt == "yxyx":
        boxes = g.node("Gather", [boxes, g.const("post.xyxy.order", np.array([1, 0, 3, 2], np.int64))],
                       "post.xyxy", "post.xyxy", axis=1)
    elif fmt in ("xywh", "cxcywh"):
        first = _columns(g, boxes, 0, 2, "post.box.first")
        size = _columns(g, boxes, 2, 4, "post.box.size")
        if fmt == "xywh":
            corner = g.node("Add", [first, size], "post.box.far", "post.box.far")
            boxes = g.node("Concat", [first, corner], "post.xyxy", "post.xyxy", axis=1)
        else:
            half = g.node("Mul", [size, g.const("post.half", np.array(0.5, np.float32))], "post.box.half", "post.box.half")
            near = g.node("Sub", [first, half], "post.box.near", "post.box.near")
            far = g.node("Add", [first, half], "post.box.far", "post.box.far")
            boxes = g.node("Concat", [near, far], "post.xyxy", "post.xyxy", axis=1)
    if desc.outputs["box_space"] == "normalized":
        height, width = desc.input_size
        boxes = g.node("Mul", [boxes, g.const("post.pixels", np.array([width, height, width, height], np.float32))],
                       "post.xyxy.pixels", "post.xyxy.pixels")
    return boxes


def _yolo_head(g: GraphBuilder, desc: Description, i: int, raw: str, shape: list[int], anchors: list) -> tuple[str, str]:
    """Candidates of one raw YOLO head: boxes [1, A·cells, 4] (xyxy input pixels), scores [1, A·cells, C]."""
    name = f"post.head{i}"
    a, c = len(anchors), desc.outputs["num_classes"]
    gh, gw = shape[-2], shape[-1]
    cells = gh * gw
    height, width = desc.input_size
    t = g.node("Reshape", [raw, g.const(f"{name}.split", np.array([1, a, 5 + c, cells], np.int64))],
               f"{name}.split", f"{name}.split")
    t = g.node("Transpose", [t], f"{name}.entries", f"{name}.entries", perm=[0, 1, 3, 2])  # [1, A, cells, 5 + C]
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    grid = np.stack([cols.ravel(), rows.ravel()], axis=1)[None, None]  # cell index = row * gw + col
    xy = g.node("Sigmoid", [_columns(g, t, 0, 2, f"{name}.xy.raw")], f"{name}.xy.sigmoid", f"{name}.xy.sigmoid")
    xy = g.node("Add", [xy, g.const(f"{name}.grid", grid)], f"{name}.xy.cells", f"{name}.xy.cells")
    xy = g.node("Mul", [xy, g.const(f"{name}.stride", np.array([width / gw, height / gh], np.float32))],
                f"{name}.xy", f"{name}.xy")
    wh = g.node("Exp", [_columns(g, t, 2, 4, f"{name}.wh.raw")], f"{name}.wh.exp", f"{name}.wh.exp")
    half_anchors = (np.asarray(anchors, np.float32) / 2).reshape(1, a, 1, 2)
    half = g.node("Mul", [wh, g.const(f"{name}.half_anchors", half_anchors)], f"{name}.half_wh", f"{name}.half_wh")
    x1y1 = g.node("Sub", [xy, half], f"{name}.x1y1", f"{name}.x1y1")
    x2y2 = g.node("Add", [xy, half], f"{name}.x2y2", f"{name}.x2y2")
    box = g.node("Concat", [x1y1, x2y2], f"{name}.box", f"{name}.box", axis=3)
    box = g.node("Reshape", [box, g.const(f"{name}.box_shape", np.array([1, a * cells, 4], np.int64))],
                 f"{name}.boxes", f"{name}.boxes")
    obj = g.node("Sigmoid", [_columns(g, t, 4, 5, f"{name}.obj.raw")], f"{name}.objectness", f"{name}.objectness")
    cls = _activate(g, _columns(g, t, 5, 5 + c, f"{name}.cls.raw"), desc.outputs["score_activation"], f"{name}.cls")
    score = g.node("Mul", [obj, cls], f"{name}.score", f"{name}.score")
    score = g.node("Reshape", [score, g.const(f"{name}.score_shape", np.array([1, a * cells, c], np.int64))],
                   f"{name}.scores", f"{name}.scores")
    return box, score


def _queries(g: GraphBuilder, desc: Description, take, reshape) -> list[str]:
    """DETR-style queries -> the best ``top_k`` (query, class) detections, no NMS."""
    out = desc.outputs
    classes, width = out["num_classes"], query_width(desc)
    if "output" in desc.tensors:
        rows = reshape(take("output"), [-1, 4 + width], "post.rows")
        raw_boxes = _columns(g, rows, 0, 4, "post.box")
        logits = _columns(g, rows, 4, 4 + width, "post.logits")
    else:
        raw_boxes = reshape(take("boxes"), [-1, 4], "post.box")
        logits = reshape(take("scores"), [-1, width], "post.logits")
    boxes = _to_xyxy(g, desc, raw_boxes)
    probs = _activate(g, logits, out["score_activation"], "post.class")
    if out["no_object_class"]:
        probs = _columns(g, probs, 0, classes, "post.objects")
    if out["one_label_per_query"]:
        # ArgMax takes the first of equal maxima, as numpy's argmax does
        ids = g.node("ArgMax", [probs], "post.best", "post.best", axis=1, keepdims=1)
        scores = reshape(g.node("GatherElements", [probs, ids], "post.best.score", "post.best.score", axis=1), [-1],
                         "post.score")
        ids = reshape(ids, [-1], "post.class")
    else:
        # every (query, class) pair competes: row q * C + c
        zeros = g.node("Mul", [probs, g.const("post.zero", np.array(0.0, np.float32))], "post.zeros", "post.zeros")
        grid = g.node("Add", [zeros, g.const("post.class_index", np.arange(classes, dtype=np.float32)[None])],
                      "post.class.grid", "post.class.grid")
        ids = g.node("Cast", [reshape(grid, [-1], "post.class.flat")], "post.class", "post.class", to=TensorProto.INT64)
        scores = reshape(probs, [-1], "post.score")
        spread = g.node("Add", [reshape(boxes, [-1, 1, 4], "post.box.pair"),
                                reshape(zeros, [-1, classes, 1], "post.zeros.pair")], "post.box.grid", "post.box.grid")
        boxes = reshape(spread, [-1, 4], "post.box.flat")
    return _select(g, desc, boxes, scores, ids, None, None)


def _select(g: GraphBuilder, desc: Description, boxes: str, scores: str, ids: str, masks: str | None,
            count: str | None) -> list[str]:
    """Detections the file already selected: drop those below the score threshold (and past
    ``num_detections``), then the ``max_detections`` best, best first."""
    below = g.node("Less", [scores, g.const("post.score_threshold", np.array(desc.score_threshold, np.float32))],
                   "post.below", "post.below")
    keep = g.node("Not", [below], "post.keep", "post.keep")
    if count is not None:
        ones = g.node("ConstantOfShape", [g.node("Shape", [scores], "post.rows", "post.rows")], "post.ones", "post.ones",
                      value=numpy_helper.from_array(np.array([1], np.int64), "one"))
        position = g.node("CumSum", [ones, g.const("post.axis0", np.array(0, np.int64))], "post.position", "post.position")
        n = g.node("Cast", [g.node("Reshape", [count, g.const("post.count.shape", np.array([1], np.int64))],
                                   "post.count", "post.count")], "post.count.int", "post.count.int", to=TensorProto.INT64)
        past = g.node("Greater", [position, n], "post.past", "post.past")
        keep = g.node("And", [keep, g.node("Not", [past], "post.within", "post.within")], "post.valid", "post.valid")
    kept = {}
    for key, x in (("boxes", boxes), ("scores", scores), ("class", ids), ("masks", masks)):
        if x is not None:
            kept[key] = g.node("Compress", [x, keep], f"post.kept.{key}", f"post.kept.{key}", axis=0)
    k = g.node("Min", [g.node("Shape", [kept["scores"]], "post.kept.count", "post.kept.count"),
                       g.const("post.max_detections", np.array([cap(desc)], np.int64))], "post.k", "post.k")
    _, order = g.node("TopK", [kept["scores"], k], ["scores", "post.order"], "post.topk", axis=0, largest=1, sorted=1)
    g.node("Gather", [kept["boxes"], order], "boxes", "post.boxes.sorted", axis=0)
    g.node("Gather", [kept["class"], order], "post.class.selected", "post.class.sorted", axis=0)
    _map_labels(g, desc, "post.class.selected")
    names = ["boxes", "scores", "labels"]
    if masks is not None:
        g.node("Gather", [kept["masks"], order], "masks", "post.masks.sorted", axis=0)
        names.append("masks")
    return names


def _map_labels(g: GraphBuilder, desc: Description, classes: str) -> None:
    out = desc.outputs
    if out["label_map"] is not None:
        g.node("Gather", [g.const("post.label_map", np.asarray(out["label_map"], np.int64)), classes], "labels",
               "post.label_map", axis=0)
    elif out["label_offset"]:
        g.node("Add", [classes, g.const("post.label_offset", np.array(out["label_offset"], np.int64))], "labels",
               "post.label_offset")
    else:
        g.node("Identity", [classes], "labels", "post.labels")


# ----------------------------------------------------------------------------- validation


def _session_from_file(path: Path):
    try:
        return ort_cpu_session(path)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot run the original file {path}: {exc}") from exc


def validate(desc: Description, onnx_file: Path, wrapped: onnx.ModelProto, bound: Bound) -> dict[str, Any]:
    """The wrapped file against the original file's outputs decoded in numpy, on real COCO
    images; every mismatch is collected and raised together (:class:`ValidationError`)."""
    comparison = Comparison(desc.name, atol=ATOL, rtol=RTOL)
    original = _session_from_file(onnx_file)
    try:
        session = cpu_session(wrapped)
    except Exception as exc:  # onnxruntime refuses the composed graph
        raise ExportError(f"onnxruntime cannot run the wrapped graph of {desc.name!r}: {exc}") from exc
    names = list(dict.fromkeys(desc.tensors.values()))
    wrapped_names = [o.name for o in session.get_outputs()]
    height, width = desc.input_size
    counts = []
    for path in validation_images(VALIDATION_IMAGES):
        tensor, _ = prepare(load_rgb(path), height, width, desc.resize, desc.pad_value)
        feed = model_inputs(desc, tensor, bound.image_input, bound.extra_shapes)
        raw = dict(zip(names, original.run(names, feed)))
        reference = decode(desc, raw)
        got = dict(zip(wrapped_names, session.run(wrapped_names, {INPUT_NAME: tensor})))
        compare(comparison, path.stem, reference, got, desc)
        counts.append(len(reference["scores"]))
    comparison.nothing_detected(counts, f"score_threshold {desc.score_threshold} or the [input] scale/mean/std of "
                                        f"{desc.path} may leave the model nothing to detect")
    comparison.raise_if_any(f"The wrapped file does not reproduce {onnx_file} as {desc.path} describes it; check the "
                            "describe file (box format and space, activations, label mapping, thresholds).")
    figures: dict[str, Any] = dict(comparison.figures)
    figures["detections_per_image"] = counts
    figures["reference"] = "original file in onnxruntime + exporters.foreign.decode (numpy decode and NMS)"
    return figures


def compare(comparison: Comparison, where: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
            desc: Description) -> None:
    """Detections compared as sets (:func:`exporters.matching.match_detections`): each
    paired within tolerance or explained by a boundary the outputs show (the cap, the score
    threshold and, when the wrapper runs NMS, its IoU boundary); labels int64 within the
    label space; masks of paired detections within tolerance."""
    labels = np.asarray(got["labels"])
    if labels.dtype != np.int64:
        comparison.mismatches.append(f"{where}: labels are {labels.dtype}, the contract wants int64")
    low, high = (0, len(desc.labels) - 1) if desc.labels else _LABEL_RANGES[desc.label_space]
    if labels.size and (labels.min() < low or labels.max() > high):
        comparison.mismatches.append(f"{where}: labels {labels.min()}..{labels.max()} fall outside {desc.label_space} "
                                     f"({low}..{high}); fix outputs.label_offset or outputs.label_map")
    ref = {k: np.asarray(v) for k, v in ref.items()}
    got = {k: np.asarray(v) for k, v in got.items() if k in ref}
    finite = all([comparison.finite(where, k, v, "the decoded original") for k, v in ref.items()]
                 + [comparison.finite(where, k, v, "ONNX") for k, v in got.items()])
    if not finite:
        return
    # Without NMS in the wrapper no IoU decision can differ: a threshold no IoU reaches
    # leaves the NMS rules nothing to explain.
    iou_threshold = desc.iou_threshold if desc.outputs["nms"] else 2.0
    matching = match_detections(ref, got, MatchRules(iou_threshold=iou_threshold, score_threshold=desc.score_threshold,
                                                     max_detections=cap(desc), atol=comparison.atol,
                                                     rtol=comparison.rtol))
    for key, value in matching.figures().items():
        comparison.figures[f"{where}:{key}"] = value
    comparison.mismatches.extend(matching.mismatches(where))
    if "masks" in ref and matching.pairs:
        rows, cols = (list(x) for x in zip(*matching.pairs))
        comparison.arrays(where, "masks", ref["masks"][rows], got["masks"][cols])
