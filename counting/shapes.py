"""Tensor shapes for every value of a graph, static or measured.

*Static*: ``onnx.shape_inference`` with the graph input fixed to the model's input size
(the contract's ``input_height`` x ``input_width``, batch 1). Dims it cannot resolve
(data-dependent: proposals kept after NMS, detections) stay marked — a symbol name or
``"?"`` — never guessed.

*Measured*: the graph is run once in onnxruntime (CPU) on a real image prepared as the
contract says, with intermediate values added as graph outputs, and the shapes that
came out are recorded. Values inside If/Loop bodies cannot be graph outputs; they are
resolved by re-running static inference with every measured outer shape pinned.

Exposing *every* intermediate makes onnxruntime keep all of them alive at once
(gigabytes for a ResNet-101 at 800 x 1024), so values whose static shape is already
fully resolved (exactly: the input size is fixed) are exposed only while the estimated
total stays under :data:`EXPOSE_ALL_BUDGET_BYTES`; the data-dependent ones are always
measured, and each value says where its shape came from (``ShapeTable.source``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from counting.folding import MAX_ELEMENTS, fold_shape_values
from core.errors import ConfigError, ContractError, DatasetError
from core.ort_session import cpu_session

# Above this estimated size of all statically known intermediates, only the values static
# inference cannot resolve are exposed as outputs in measured mode (see module docstring).
EXPOSE_ALL_BUDGET_BYTES = 1 << 30
# Initializers larger than this are emptied (dims kept) while shape inference runs:
# inference needs their dims, not their values, and serialising 250 MB of weights
# would dominate a static profile.
_STRIP_ABOVE_BYTES = 1 << 12

_ELEM_SIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 14: 8, 15: 16}


def elem_size(elem_type: int | None) -> int:
    """Bytes per element of an ONNX TensorProto data type (float32 when unknown)."""
    return _ELEM_SIZE.get(elem_type or 1, 4)


@dataclass
class ShapeTable:
    """name -> shape (tuple of int | str), element type, and where the shape came from."""

    shapes: dict[str, tuple] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)
    # "static" | "measured" | "inferred" (derived by inference from measured shapes) | "initializer"
    source: dict[str, str] = field(default_factory=dict)
    mode: str = "static"
    image: str | None = None
    static_mismatches: list[str] = field(default_factory=list)
    exposed_all: bool = True

    def get(self, name: str) -> tuple | None:
        return self.shapes.get(name) if name else None


def resolved(shape: tuple | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _shape_of(type_proto) -> tuple | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def iter_graphs(graph):
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == attr.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def fix_input_size(model, input_hw: tuple[int, int] | None, batch: int = 1) -> None:
    """Pin the first graph input to [batch, C, H, W] (symbolic dims replaced)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        return
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) == 4:
        if input_hw is not None:
            dims[2].dim_value, dims[3].dim_value = input_hw
        if not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch


def _collect(model, table: ShapeTable, source: str) -> None:
    for graph in iter_graphs(model.graph):
        for init in graph.initializer:
            table.shapes[init.name] = tuple(int(d) for d in init.dims)
            table.types[init.name] = init.data_type
            table.source[init.name] = "initializer"
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            if vi.name in table.source and table.source[vi.name] in ("initializer", "measured"):
                continue
            shape = _shape_of(vi.type)
            if shape is None and vi.name in table.shapes:
                continue
            table.shapes[vi.name] = shape
            if vi.type.HasField("tensor_type"):
                table.types[vi.name] = vi.type.tensor_type.elem_type
            table.source[vi.name] = source
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        table.shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
                        table.types[node.output[0]] = attr.t.data_type
                        table.source[node.output[0]] = "initializer"


class _Stripped:
    """Empty large initializers (dims kept) so shape inference stays cheap; their data is put
    back on exit unless ``restore`` is False (the caller no longer needs weight values)."""

    def __init__(self, model, restore: bool = True):
        self.model = model
        self.restore = restore
        self.saved: list[tuple[object, bytes]] = []

    def __enter__(self):
        for graph in iter_graphs(self.model.graph):
            for init in graph.initializer:
                if init.data_type in (1, 10, 11, 16) and len(init.raw_data) > _STRIP_ABOVE_BYTES:
                    if self.restore:
                        self.saved.append((init, init.raw_data))
                    init.ClearField("raw_data")
        return self.model

    def __exit__(self, *exc):
        for init, data in self.saved:
            init.raw_data = data
        self.saved.clear()
        return False


def _infer(model, restore: bool = True):
    with _Stripped(model, restore) as light:
        return _infer_light(light)


def _infer_light(light):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and a few unrelated C++ errors
        raise ContractError(f"onnx shape inference failed on this graph: {exc}") from exc


def _unresolved_count(table: ShapeTable) -> int:
    return sum(1 for name, src in table.source.items() if src != "initializer" and not resolved(table.shapes[name]))


def _small_values(graph) -> dict[str, np.ndarray]:
    import onnx

    values = {}
    for init in graph.initializer:
        if (init.raw_data or not init.dims) and int(np.prod(init.dims)) <= MAX_ELEMENTS:
            values[init.name] = onnx.numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and int(np.prod(attr.t.dims)) <= MAX_ELEMENTS:
                    values[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
    return values


def static_shapes(model, input_hw: tuple[int, int] | None, keep_weights: bool = True) -> ShapeTable:
    """Static shapes of every value (the input pinned to ``input_hw``, batch 1).

    Where ONNX inference leaves shapes unresolved, shape arithmetic that only depends on
    constants and resolved shapes is evaluated exactly (``counting.folding``) and inference
    re-run with those values, until nothing more resolves (at most 3 rounds).
    With ``keep_weights=False`` the large weight tensors of ``model`` are emptied for good
    (dims kept): faster, for callers that only count."""
    import onnx

    fix_input_size(model, input_hw)
    with _Stripped(model, keep_weights) as light:
        table = ShapeTable(mode="static")
        _collect(_infer_light(light), table, "static")
        folded_all: dict[str, np.ndarray] = {}
        for _round in range(3):
            before = _unresolved_count(table)
            if not before:
                break
            folded = fold_shape_values(light.graph, table.shapes, {**_small_values(light.graph), **folded_all})
            folded = {k: v for k, v in folded.items() if k not in folded_all}
            # only worth another inference if a new value feeds a node whose output is unresolved
            feeds = {i for n in light.graph.node if any(not resolved(table.shapes.get(o)) for o in n.output if o)
                     for i in n.input}
            if not folded or not feeds.intersection(folded):
                break
            folded_all.update(folded)
            work = onnx.ModelProto()
            work.CopyFrom(light)  # cheap: the weights are stripped
            kept = [n for n in work.graph.node if not (n.output and all(o in folded_all for o in n.output))]
            del work.graph.node[:]
            work.graph.node.extend(kept)
            work.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in folded_all.items())
            candidate = ShapeTable(mode="static")
            _collect(_infer_light(work), candidate, "static")
            for name, value in folded_all.items():
                candidate.source[name] = "static"
            if _unresolved_count(candidate) >= before:
                break
            table = candidate
    return table


def default_image() -> Path:
    """The first COCO val2017 image of the shared data folder ($DETBENCH_DATA)."""
    from core.paths import data_dir

    folder = data_dir() / "coco-val2017-subset" / "val2017"
    images = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not images:
        raise DatasetError(f"no COCO image found in {folder} for --shapes measured; pass --image FILE "
                           "or set DETBENCH_DATA to the folder holding coco-val2017-subset/")
    return images[0]


# Expose every intermediate only when few values are unresolved statically (their size is unknown,
# so the memory estimate would not hold otherwise).
_EXPOSE_ALL_MAX_UNRESOLVED = 0.1


def _run_exposing(model, names: list[str], tensor: np.ndarray, path: Path, image: Path) -> dict[str, tuple]:
    """One onnxruntime (CPU) run with ``names`` added as graph outputs: name -> shape."""
    import onnx

    run_model = onnx.ModelProto()
    run_model.CopyFrom(model)
    del run_model.graph.value_info[:]
    existing = {o.name for o in run_model.graph.output}
    for name in names:
        if name not in existing:
            run_model.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        session = cpu_session(run_model)
        del run_model
        input_name = session.get_inputs()[0].name
        outs = [o.name for o in session.get_outputs()]
        values = session.run(outs, {input_name: tensor})
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        raise ContractError(f"{path}: onnxruntime could not run the graph to measure shapes on {image}: {exc}") from exc
    found = {n: tuple(int(d) for d in v.shape) for n, v in zip(outs, values) if isinstance(v, np.ndarray)}
    found[input_name] = tuple(int(d) for d in tensor.shape)
    return found


def _pinned_inference(model, measured: dict[str, tuple], types: dict[str, int]):
    """Static inference with every measured shape pinned (value_info edited in place, restored)."""
    import onnx

    existing = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    saved_vi = list(model.graph.value_info)
    del model.graph.value_info[:]
    for name, shape in measured.items():
        if name in existing:
            continue
        model.graph.value_info.append(
            onnx.helper.make_tensor_value_info(name, types.get(name) or onnx.TensorProto.FLOAT, list(shape)))
    try:
        return _infer(model)
    finally:
        del model.graph.value_info[:]
        model.graph.value_info.extend(saved_vi)


def _keep_static(table: ShapeTable, static: ShapeTable) -> None:
    """Values static mode resolved (exactly, with shape folding) keep that shape where the
    pinned re-inference, which does not fold, leaves them open."""
    for name, shape in static.shapes.items():
        if resolved(shape) and not resolved(table.shapes.get(name)):
            table.shapes[name] = shape
            table.types.setdefault(name, static.types.get(name, 1))
            table.source[name] = static.source.get(name, "static")


def measured_shapes(model, path: Path, contract, image: Path | None = None,
                    budget_bytes: int = EXPOSE_ALL_BUDGET_BYTES) -> ShapeTable:
    """Shapes measured by onnxruntime on a real image (see module docstring).

    Every intermediate is exposed when static inference resolved (nearly) all of them and
    they fit in ``budget_bytes``; otherwise the values static inference could not resolve
    are exposed, the measured shapes are pinned, and inference re-derives the rest (a second
    run exposes whatever would still be unresolved).
    """
    from core.images import load_rgb, prepare_for

    if contract is None:
        raise ConfigError(f"{path}: --shapes measured needs the detbench metadata (input size, resize mode) "
                          "to prepare the image; re-export the model with `python cli.py export`")
    image = Path(image) if image else default_image()
    tensor, _placement = prepare_for(load_rgb(image), contract)

    static = static_shapes(model, contract.input_size)
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producer_op = {}
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            if out and out not in inits:
                producer_op[out] = node.op_type
    candidates = list(producer_op)
    unresolved = [n for n in candidates if not resolved(static.shapes.get(n))]
    known_bytes = sum(int(np.prod(static.shapes[n])) * elem_size(static.types.get(n))
                      for n in candidates if resolved(static.shapes.get(n)))
    expose_all = known_bytes <= budget_bytes and len(unresolved) <= _EXPOSE_ALL_MAX_UNRESOLVED * max(len(candidates), 1)
    # Exposing only the non-derivable unresolved values would save memory, but whenever inference
    # cannot derive the rest from them a second full run is needed; static inference (with exact
    # shape folding) already resolves the big backbone tensors, so the unresolved ones are the
    # data-dependent, moderate-size ones: expose them all and run once.
    exposed = candidates if expose_all else unresolved
    measured = _run_exposing(model, exposed, tensor, path, image)
    inferred = _pinned_inference(model, measured, static.types)
    table = ShapeTable(mode="measured", image=str(image), exposed_all=expose_all)
    _collect(inferred, table, "inferred")
    _keep_static(table, static)
    still = [n for n in candidates if n not in measured and not resolved(table.shapes.get(n))]
    if still:
        measured.update(_run_exposing(model, still, tensor, path, image))
        inferred = _pinned_inference(model, measured, static.types)
        table = ShapeTable(mode="measured", image=str(image), exposed_all=expose_all)
        _collect(inferred, table, "inferred")
        _keep_static(table, static)
    table.static_mismatches = [f"{n}: static {static.shapes[n]} vs measured {measured[n]}" for n in measured
                               if resolved(static.shapes.get(n)) and tuple(static.shapes[n]) != measured[n]]
    for name, shape in measured.items():
        table.shapes[name] = shape
        table.source[name] = "measured"
    return table
