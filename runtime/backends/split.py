"""Network part on a runtime, post-processing on the host (onnxruntime CPU).

Runtimes that cannot run detection post-processing ops (NonMaxSuppression, TopK, ...) run the
*network part* of the contract graph; the rest runs on onnxruntime's CPU provider in the same
process. The cut follows the analyzer's network/post-processing split
(:func:`counting.analyzer.graph_parts`): the network part is every network node plus every node
those need (shape arithmetic is duplicated rather than cut), the post-processing part is every
other node; the tensors crossing the cut are the network part's outputs and the post part's
inputs (with ``images`` when post-processing reads it); a cut tensor whose shape static
inference cannot give (torchvision's transform computes sizes at run time) is measured by one
onnxruntime CPU run on a zero image of the contract's size. A graph whose network part would need a
post-processing op (a two-stage detector's RoI head after its RPN's NMS) has no such cut:
:class:`NoSplit` says so.

:class:`SplitRunner` times both parts of every call (``part_samples``) so that network,
post-processing and total latency are reported apart, and compares the runtime's network
outputs with onnxruntime CPU's (``network_parity``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.contract import INPUT_NAME
from runtime.backends.base import BackendSettings, Runner, RunnerInfo
from runtime.backends.convert import ConversionFailed


class NoSplit(ConversionFailed):
    """The graph has no network/post-processing cut a network-only runtime can take."""


@dataclass
class Split:
    network: bytes                 # serialized ModelProto: images -> cut tensors
    post: bytes                    # serialized ModelProto: cut tensors (+ images) -> contract outputs
    cut: list[str]                 # tensor names crossing the cut, in the network part's output order
    cut_shapes: dict[str, list[int]]
    post_ops: list[str]            # op types of the post-processing part (what the runtime does not run)
    network_nodes: int
    post_nodes: int
    input_shape: list[int]         # the images input (symbolic dimensions as 1)

    def describe(self) -> dict:
        return {"cut": self.cut, "post_ops": self.post_ops, "network_nodes": self.network_nodes,
                "post_nodes": self.post_nodes,
                "method": "counting.analyzer.graph_parts: network nodes and everything they need on the runtime, "
                          "the rest on onnxruntime CPU"}


def split_model(path: Path) -> Split:
    """Cut the contract graph at ``path`` into its network and post-processing parts."""
    import onnx
    from onnx import helper, shape_inference

    from counting.analyzer import NETWORK, graph_parts
    from counting.ops import CONTROL_FLOW_OPS, POSTPROCESS_OPS

    model = onnx.load(str(path))
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises its own InferenceError types
        raise NoSplit(f"{path}: ONNX shape inference failed, so the cut tensors cannot be typed: {exc}") from exc
    graph = model.graph
    parts = graph_parts(graph)
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    network: set[int] = set()
    stack = [i for i, part in parts.items() if part == NETWORK]
    while stack:
        i = stack.pop()
        if i in network:
            continue
        network.add(i)
        stack.extend(producer[n] for n in graph.node[i].input if n in producer)
    bad = sorted({graph.node[i].op_type for i in network} & (POSTPROCESS_OPS | CONTROL_FLOW_OPS))
    if bad:
        raise NoSplit(f"{path}: the network part needs {', '.join(bad)} (post-processing or control flow feeds "
                      "learned layers, as in a two-stage detector): no cut leaves them on the host")
    post = [i for i in range(len(graph.node)) if i not in network]
    if not post:
        raise NoSplit(f"{path}: the analyzer finds no post-processing nodes to run on the host")
    net_out = {o for i in network for o in graph.node[i].output}
    outputs = {o.name for o in graph.output}
    cut: list[str] = []
    for i in post:
        cut.extend(n for n in graph.node[i].input if n in net_out and n not in cut)
    cut.extend(o.name for o in graph.output if o.name in net_out and o.name not in cut)
    types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    shapes: dict[str, list[int]] = {}
    for name in cut:
        vi = types.get(name)
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim] if vi else None
        if vi is not None and dims and min(dims) >= 0:
            shapes[name] = dims
    unknown = [n for n in cut if n not in shapes]
    if unknown:  # e.g. torchvision's transform: sizes computed at run time that inference cannot fold
        for name, (dims, elem) in _measured_shapes(model, path, unknown).items():
            types[name] = helper.make_tensor_value_info(name, elem, dims)
            shapes[name] = dims
    init = {t.name: t for t in graph.initializer}

    def part(indices, inputs, outs, suffix):
        nodes = [graph.node[i] for i in sorted(indices)]
        used = {n for node in nodes for n in node.input}
        g = helper.make_graph(nodes, f"{graph.name}-{suffix}", inputs, outs,
                              [init[n] for n in sorted(used) if n in init])
        m = helper.make_model(g, opset_imports=list(model.opset_import))
        m.ir_version = model.ir_version
        return m.SerializeToString()

    image_input = [i for i in graph.input if i.name == INPUT_NAME]
    net_outputs = [types[n] for n in cut]
    post_used = {n for i in post for n in graph.node[i].input}
    post_inputs = [types[n] for n in cut] + [i for i in image_input if i.name in post_used]
    post_outputs = [o for o in graph.output]
    # a contract output produced on the network side passes through the post part unchanged
    passthrough = [o.name for o in graph.output if o.name in net_out]
    post_nodes = [graph.node[i] for i in post]
    if passthrough:
        raise NoSplit(f"{path}: contract output(s) {', '.join(passthrough)} come straight from the network part")
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in image_input[0].type.tensor_type.shape.dim] \
        if image_input else []
    return Split(input_shape=dims, network=part(network, image_input, net_outputs, "network"),
                 post=part(post, post_inputs, post_outputs, "post"), cut=cut, cut_shapes=shapes,
                 post_ops=sorted({n.op_type for n in post_nodes}), network_nodes=len(network), post_nodes=len(post))


def _measured_shapes(model, path: Path, names: list[str]) -> dict[str, tuple[list[int], int]]:
    """Shapes and element types of ``names`` from one onnxruntime CPU run on a zero image of the
    contract's size. The network part holds no data-dependent op (no post-processing, no control
    flow: checked before), so its tensors' shapes follow from the input size alone."""
    import onnx
    from onnx import helper

    from core.contract import read_contract
    from core.errors import ContractError
    from core.ort_session import cpu_session

    try:
        contract = read_contract(model)
    except ContractError as exc:
        raise NoSplit(f"{path}: the cut tensor(s) {', '.join(names)} have no static shape after shape inference, "
                      f"and the file gives no input size to measure them with ({exc})") from exc
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    try:
        session = cpu_session(probe)
        outs = session.run(names, {INPUT_NAME: np.zeros((1, 3, contract.input_height, contract.input_width),
                                                        np.float32)})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise NoSplit(f"{path}: the cut tensor(s) {', '.join(names)} have no static shape after shape inference, "
                      f"and one onnxruntime run to measure them failed: {exc}") from exc
    return {n: (list(o.shape), helper.np_dtype_to_tensor_dtype(o.dtype)) for n, o in zip(names, outs)}


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(double)": np.float64, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


class SplitRunner(Runner):
    """A network-part runner (``network``: images -> cut tensors by name) followed by the
    post-processing part on onnxruntime CPU; ``info`` is the network runtime's, with the split
    described in ``info.detail["split"]``."""

    def __init__(self, path: Path, split: Split, network: Callable[[np.ndarray], dict[str, np.ndarray]],
                 info: RunnerInfo, settings: BackendSettings):
        super().__init__()
        from runtime.backends.onnxruntime import OrtSettings, create_session

        self.path, self.split, self.network, self.info = Path(path), split, network, info
        threads = settings.threads
        self.post, _ = create_session(split.post, "cpu", OrtSettings(threads=threads, passive=bool(settings.passive_wait)))
        self.post_inputs = [i.name for i in self.post.get_inputs()]
        # runtimes hand back their own dtypes (float for a scalar int64 constant, int32 for int64):
        # the post part gets what its graph declares
        self.post_dtypes = {i.name: _ORT_DTYPES.get(i.type, np.float32) for i in self.post.get_inputs()}
        self.post_outputs = [o.name for o in self.post.get_outputs()]
        self.parts: dict[str, list[float]] = {"network": [], "postprocess": []}
        self.info.detail["split"] = split.describe()
        self._threads = threads

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        clock = time.perf_counter
        start = clock()
        cut = self.network(images)
        middle = clock()
        missing = [n for n in self.post_inputs if n != INPUT_NAME and n not in cut]
        if missing:  # a converter that accepted the graph but lost tensors (e.g. MNN on a QDQ INT8 file)
            raise ConversionFailed(f"{self.path}: the converted network ({self.info.backend}, {self.info.library}) does not produce "
                                   f"{', '.join(missing)}, which the post-processing needs")
        feeds = {n: images if n == INPUT_NAME else self._as_declared(n, cut[n]) for n in self.post_inputs}
        try:
            values = self.post.run(self.post_outputs, feeds)
        except Exception as exc:  # onnxruntime's own types: what the converted network gave does not fit
            got = ", ".join(f"{n} {list(np.shape(cut[n]))} {np.asarray(cut[n]).dtype}" for n in self.split.cut if n in cut)
            raise ConversionFailed(f"{self.path}: the post-processing part (onnxruntime CPU) cannot take what the "
                                   f"converted network ({self.info.backend}) produced ({got}): {exc}") from exc
        end = clock()
        self.parts["network"].append((middle - start) * 1e3)
        self.parts["postprocess"].append((end - middle) * 1e3)
        return {n: np.asarray(v) for n, v in zip(self.post_outputs, values)}

    def _as_declared(self, name: str, value) -> np.ndarray:
        """``value`` in the dtype and, when only the rank differs (a scalar handed back as [1], a
        kept unit axis), the shape the post part's graph declares for ``name``."""
        arr = np.ascontiguousarray(value, dtype=self.post_dtypes[name])
        shape = self.split.cut_shapes.get(name)
        if shape is not None and list(arr.shape) != shape and arr.size == int(np.prod(shape, dtype=np.int64)):
            arr = arr.reshape(shape)
        return arr

    def part_samples(self) -> dict[str, list[float]] | None:
        return self.parts

    def network_parity(self, tensors: list[np.ndarray]) -> dict:
        """Largest differences of the network outputs from onnxruntime CPU's on the same tensors
        (absolute, and relative to the largest magnitude of each output)."""
        from runtime.backends.onnxruntime import OrtSettings, create_session

        ref, _ = create_session(self.split.network, "cpu", OrtSettings(threads=self._threads))
        worst_abs, worst_rel = 0.0, 0.0
        for tensor in tensors:
            expected = dict(zip(self.split.cut, ref.run(self.split.cut, {INPUT_NAME: tensor})))
            got = self.network(tensor)
            for name in self.split.cut:
                a, b = np.asarray(expected[name], np.float64), np.asarray(got[name], np.float64).reshape(
                    expected[name].shape)
                diff = float(np.max(np.abs(a - b))) if a.size else 0.0
                worst_abs = max(worst_abs, diff)
                worst_rel = max(worst_rel, diff / max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12))
        return {"outputs": list(self.split.cut), "images": len(tensors), "max_abs": worst_abs, "max_rel": worst_rel,
                "reference": "onnxruntime CPU on the same network part"}
