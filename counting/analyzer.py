"""Walk an ONNX graph (If/Loop/Scan bodies included) and count every node.

Output contract (:class:`ModelProfile`): one :class:`NodeProfile` per node of the graph
and of its subgraphs, in graph order, each with its shapes, MACs per execution, the
number of executions counted (a Loop body runs trip-count times; the branch of an If
that is not counted has 0), parameters first used there, bytes read and written, and
which part of the detector it belongs to. Totals only ever sum counted nodes; a node
whose shapes are unresolved is listed as such (``status == "unresolved"``), never
counted as zero; an op without a counting rule is ``"unknown"``.

Network vs post-processing: a node belongs to the *network* when it is a learned op
(Conv, ConvTranspose, Gemm, MatMul, a normalisation) or feeds one through its *data*
inputs — shape inputs, gather/scatter indices, and the box coordinates of RoI ops do
not count as data. Everything else (box decoding, score filtering, NMS, mask pasting)
is *post-processing*, and so are the RoI ops themselves (RoiAlign, MaxRoiPool) and
TopK / NonMaxSuppression wherever they stand. Under this rule a two-stage detector's
RPN decode + NMS is post-processing while its box head (fed by RoiAlign's features) is
network.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from counting import ops
from counting.params import CONVENTION as PARAM_CONVENTION
from counting.params import classify
from counting.shapes import ShapeTable, elem_size, iter_graphs, resolved

NETWORK, POSTPROCESS = "network", "postprocess"
LEARNED_OPS = ops.LINEAR_OPS | {"BatchNormalization", "InstanceNormalization", "LayerNormalization",
                                "GroupNormalization"}
# op -> indices of the inputs that carry feature data (the rest are shapes, indices, coordinates)
_DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Shape": (), "Size": (), "ConstantOfShape": (), "Range": (), "NonZero": (), "OneHot": (),
    "Reshape": (0,), "Expand": (0,), "Tile": (0,), "Slice": (0,), "Pad": (0,), "Resize": (0,),
    "Upsample": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Split": (0,), "TopK": (0,),
    "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "ScatterND": (0, 2),
    "ScatterElements": (0, 2), "Scatter": (0, 2), "Where": (1, 2), "RoiAlign": (0,), "MaxRoiPool": (0,),
    "CumSum": (0,), **{op: (0,) for op in ops.REDUCE_OPS},
}
_SMALL_CONST = 64  # constant inputs up to this many elements are handed to counting functions


@dataclass
class NodeProfile:
    name: str
    op_type: str
    part: str
    status: str  # counted | unresolved | unknown
    inputs: list[tuple[str, Any]]
    outputs: list[tuple[str, Any]]
    macs: int | None  # per execution
    executions: int
    params: int = 0
    bytes_read: int | None = None
    bytes_written: int | None = None
    shape_source: str = "static"
    subgraph: str = ""
    note: str = ""

    @property
    def total_macs(self) -> int:
        return (self.macs or 0) * self.executions if self.status == "counted" else 0

    @property
    def intensity(self) -> float | None:
        """FLOPs per byte moved (2 x MACs / (bytes read + written))."""
        if self.macs is None or self.bytes_read is None or self.bytes_written is None:
            return None
        moved = self.bytes_read + self.bytes_written
        return 2 * self.macs / moved if moved else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [[n, ops.shape_str(s)] for n, s in self.inputs]
        d["outputs"] = [[n, ops.shape_str(s)] for n, s in self.outputs]
        d["arithmetic_intensity"] = self.intensity
        return d


@dataclass
class ModelProfile:
    """Per-node counts and totals of one ONNX file (see the module docstring)."""

    path: str
    model: str
    mode: str
    input_shape: tuple
    image: str | None
    nodes: list[NodeProfile]
    params: int
    folded_norm_constants: int
    bn_running_stats: int
    other_constants: int
    unknown_ops: dict[str, list[str]]
    static_mismatches: list[str] = field(default_factory=list)
    shapes_exposed_all: bool = True
    param_bytes: int = 0
    onnx_tool: dict[str, Any] | None = None
    contract: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    # ---- totals over counted nodes
    def _sum(self, pred=lambda n: True) -> int:
        return sum(n.total_macs for n in self.nodes if pred(n))

    @property
    def macs(self) -> int:
        return self._sum()

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def conv_macs(self) -> int:
        return self._sum(lambda n: n.op_type in ops.CONV_OPS)

    @property
    def linear_macs(self) -> int:
        return self._sum(lambda n: n.op_type in ops.LINEAR_OPS)

    @property
    def postprocess_macs(self) -> int:
        return self._sum(lambda n: n.part == POSTPROCESS)

    @property
    def network_macs(self) -> int:
        return self._sum(lambda n: n.part == NETWORK)

    @property
    def unresolved(self) -> list[NodeProfile]:
        return [n for n in self.nodes if n.status == "unresolved" and n.executions > 0]

    def _bytes(self, attr: str) -> int:
        return sum((getattr(n, attr) or 0) * n.executions for n in self.nodes if n.status != "unknown")

    def by_op(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for n in self.nodes:
            row = table.setdefault(n.op_type, {"nodes": 0, "macs": 0, "params": 0, "bytes": 0, "unresolved": 0})
            row["nodes"] += 1
            row["macs"] += n.total_macs
            row["params"] += n.params
            row["bytes"] += ((n.bytes_read or 0) + (n.bytes_written or 0)) * n.executions
            row["unresolved"] += int(n.status == "unresolved" and n.executions > 0)
        return dict(sorted(table.items(), key=lambda kv: -kv[1]["macs"]))

    def top(self, count: int) -> list[NodeProfile]:
        return sorted(self.nodes, key=lambda n: -n.total_macs)[:count]

    def to_dict(self, nodes: bool = False) -> dict[str, Any]:
        """The store record's ``data`` (and, with ``nodes``, every node: the --json output)."""
        d = {
            "mode": self.mode,
            "model": self.model,
            "path": self.path,
            "input_shape": list(self.input_shape),
            "image": self.image,
            "macs": self.macs,
            "flops": self.flops,
            "conv_macs": self.conv_macs,
            "conv_flops": 2 * self.conv_macs,
            "linear_macs": self.linear_macs,
            "network_macs": self.network_macs,
            "postprocess_macs": self.postprocess_macs,
            "params": self.params,
            "param_bytes": self.param_bytes,
            "folded_norm_constants": self.folded_norm_constants,
            "bn_running_stats": self.bn_running_stats,
            "other_constants": self.other_constants,
            "bytes_read": self._bytes("bytes_read"),
            "bytes_written": self._bytes("bytes_written"),
            "by_op": self.by_op(),
            "unknown_ops": sorted(self.unknown_ops),
            "unknown_nodes": self.unknown_ops,
            "unresolved_nodes": [n.name for n in self.unresolved],
            "complete": not self.unknown_ops and not self.unresolved,
            "static_mismatches": self.static_mismatches,
            "shape_sources": self.shape_sources(),
            "onnx_tool": self.onnx_tool,
            "seconds": round(self.seconds, 3),
            "conventions": {**ops.conventions(), "params": PARAM_CONVENTION,
                            "postprocess": "nodes that feed no learned op through data inputs, plus RoI ops, "
                                           "TopK and NonMaxSuppression (see counting.analyzer)",
                            "shapes": self.shapes_note()},
        }
        if nodes:
            d["nodes"] = [n.to_dict() for n in self.nodes]
        return d

    def shape_sources(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.shape_source] = counts.get(n.shape_source, 0) + 1
        return counts

    def shapes_note(self) -> str:
        if self.mode == "static":
            return ("static: onnx shape inference with the input fixed to " + ops.shape_str(self.input_shape)
                    + "; data-dependent dims are left unresolved and their nodes listed as unresolved")
        how = ("every intermediate value exposed as an output" if self.shapes_exposed_all else
               "exposed as outputs: every value static inference could not resolve (data-dependent); the "
               "others were exact statically at the fixed input size and are re-derived by inference from "
               "the measured ones ('inferred from measured')")
        return (f"measured: onnxruntime (CPU) on {self.image} ({how}); If/Loop bodies resolved by static "
                "inference from the measured outer shapes")


class _Walker:
    def __init__(self, model, table: ShapeTable):
        import onnx

        self.table = table
        self.small: dict[str, np.ndarray] = {}
        for g in iter_graphs(model.graph):
            for init in g.initializer:
                if int(np.prod(init.dims)) <= _SMALL_CONST:
                    self.small[init.name] = onnx.numpy_helper.to_array(init)
            for node in g.node:
                if node.op_type == "Constant":
                    for attr in node.attribute:
                        if attr.name == "value" and int(np.prod(attr.t.dims)) <= _SMALL_CONST:
                            self.small[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
        self.entries: list[tuple[str, Any, str]] = []
        self.profiles: list[NodeProfile] = []
        self.unknown: dict[str, list[str]] = {}

    def walk(self, graph, prefix: str, executions: int, parts: dict[int, str] | None, parent_part: str) -> int:
        """Profile every node of ``graph``; return the MACs counted (x executions)."""
        total = 0
        for idx, node in enumerate(graph.node):
            key = prefix + (node.name or f"{node.op_type}_{idx}")
            part = parts[idx] if parts is not None else (NETWORK if node.op_type in LEARNED_OPS else parent_part)
            profile = self._count(node, key, part, executions, prefix.rstrip("/"))
            self.profiles.append(profile)
            self.entries.append((key, node, part))
            if node.op_type in ops.CONTROL_FLOW_OPS:
                profile.macs = 0
                total += self._control_flow(node, key, part, executions, profile)
            else:
                total += profile.total_macs
        return total

    def _control_flow(self, node, key, part, executions, profile) -> int:
        bodies = {a.name: a.g for a in node.attribute if a.type == a.GRAPH}
        if node.op_type == "If":
            costs = {}
            spans = {}
            for branch in ("then_branch", "else_branch"):
                first = len(self.profiles)
                costs[branch] = self.walk(bodies[branch], f"{key}/{branch}/", executions, None, part)
                spans[branch] = (first, len(self.profiles))
            chosen = max(costs, key=costs.get)
            for branch, (a, b) in spans.items():
                if branch != chosen:
                    for p in self.profiles[a:b]:
                        p.executions = 0
                        p.note = (p.note + "; " if p.note else "") + "branch not counted (the other is costlier)"
            profile.note = f"{chosen} counted (costlier branch: an upper bound)"
            return costs[chosen]
        trips, how = self._trip_count(node)
        profile.note = how
        body = bodies.get("body")
        return self.walk(body, f"{key}/body/", executions * trips, None, part) if body is not None else 0

    def _trip_count(self, node) -> tuple[int, str]:
        if node.op_type == "Scan":
            n_scan = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
            for name in list(node.input)[len(node.input) - n_scan:]:
                shape = self.table.get(name)
                if shape and isinstance(shape[0], int):
                    return shape[0], f"body x {shape[0]} iterations (scan input length)"
            return 1, "scan length unresolved: body counted once (a lower bound)"
        body = next(a.g for a in node.attribute if a.name == "body")
        n_carried = len(body.input) - 2
        for name in list(node.output)[n_carried:]:
            shape = self.table.get(name)
            if shape and isinstance(shape[0], int):
                src = self.table.source.get(name, "static")
                return shape[0], f"body x {shape[0]} iterations ({src} length of scan output {name!r})"
        m = self.small.get(node.input[0]) if node.input and node.input[0] else None
        if m is not None and 0 <= int(np.asarray(m).reshape(-1)[0]) < 2 ** 31:
            trips = int(np.asarray(m).reshape(-1)[0])
            return trips, f"body x {trips} iterations (constant trip count M)"
        return 1, "trip count unresolved: body counted once (a lower bound)"

    def _count(self, node, key, part, executions, subgraph) -> NodeProfile:
        import onnx

        t = self.table
        in_shapes = [t.get(n) for n in node.input]
        out_shapes = [t.get(n) for n in node.output]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                 if a.type not in (a.GRAPH, a.GRAPHS)}
        ctx = ops.NodeContext(node.op_type, key, attrs, in_shapes, out_shapes,
                              [self.small.get(n) for n in node.input])
        status, macs, note = "counted", None, ""
        if not ops.is_known(node.op_type, node.domain):
            status, note = "unknown", "no counting rule for this op"
            label = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            self.unknown.setdefault(label, []).append(key)
        else:
            try:
                macs = ops.count_macs(ctx)
            except ops.Unresolved as exc:
                status, note = "unresolved", str(exc)
        srcs = {t.source.get(n, "static") for n in node.output if n}
        if srcs == {"measured"}:
            source = "measured"
        elif srcs and srcs <= {"measured", "inferred", "initializer"}:
            source = "inferred from measured"
        else:
            source = "static"
        if subgraph:
            source += " (subgraph)"
        return NodeProfile(
            name=key, op_type=node.op_type, part=part, status=status,
            inputs=list(zip(node.input, in_shapes)), outputs=list(zip(node.output, out_shapes)),
            macs=macs, executions=executions,
            bytes_read=_bytes(node.input, t), bytes_written=_bytes(node.output, t),
            shape_source=source, subgraph=subgraph, note=note,
        )


def _bytes(names, table: ShapeTable) -> int | None:
    total = 0
    for name in names:
        if not name:
            continue
        shape = table.get(name)
        if not resolved(shape):
            return None
        total += int(np.prod(shape, dtype=np.int64)) * elem_size(table.types.get(name))
    return total


def graph_parts(graph) -> dict[int, str]:
    """Top-level node index -> network | postprocess (see the module docstring).

    Helpers whose every consumer is in the network (shape arithmetic feeding a Reshape,
    index computations feeding a Scatter into the RoI-head features) join the network.
    """
    producer = {}
    consumers: dict[int, set[int]] = {i: set() for i in range(len(graph.node))}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            producer[out] = idx
    for idx, node in enumerate(graph.node):
        for name in node.input:
            if name in producer:
                consumers[producer[name]].add(idx)
    graph_outputs = {o.name for o in graph.output}
    learned = [i for i, n in enumerate(graph.node) if n.op_type in LEARNED_OPS or _contains_learned(n)]
    network: set[int] = set()
    stack = list(learned)
    while stack:
        i = stack.pop()
        if i in network:
            continue
        network.add(i)
        node = graph.node[i]
        wanted = _DATA_INPUTS.get(node.op_type)
        for j, name in enumerate(node.input):
            if not name or (wanted is not None and j not in wanted):
                continue
            p = producer.get(name)
            if p is not None and p not in network:
                stack.append(p)
    changed = True
    while changed:
        changed = False
        for i in range(len(graph.node) - 1, -1, -1):
            node = graph.node[i]
            if i in network or node.op_type in ops.POSTPROCESS_OPS or not consumers[i]:
                continue
            if any(o in graph_outputs for o in node.output):
                continue
            if consumers[i] <= network:
                network.add(i)
                changed = True
    return {i: (NETWORK if i in network and n.op_type not in ops.POSTPROCESS_OPS else POSTPROCESS)
            for i, n in enumerate(graph.node)}


# Ops whose outputs have data-dependent shapes: nothing downstream of them is handed to onnx-tool.
_DATA_DEPENDENT_OPS = ops.POSTPROCESS_OPS | ops.CONTROL_FLOW_OPS | {"NonZero", "Unique", "Compress"}


def network_submodel(model):
    """The network nodes (and the shape arithmetic they need) that do not depend on any
    data-dependent op, as a model of their own: what onnx-tool can still infer when
    post-processing defeats it. Returns (ModelProto, the analyzer's names of the top-level
    nodes kept)."""
    import onnx

    graph = model.graph
    parts = graph_parts(graph)
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    tainted: set[str] = set()
    for node in graph.node:
        if node.op_type in _DATA_DEPENDENT_OPS or any(n in tainted for n in node.input):
            tainted.update(node.output)
    needed: set[int] = set()
    stack = [i for i, part in parts.items() if part == NETWORK]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(producer[n] for n in graph.node[i].input if n in producer)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    kept, keys = [], []
    for idx, node in enumerate(graph.node):
        if idx in needed and not any(o in tainted for o in node.output) \
                and all(not n or n in available for n in node.input):
            kept.append(node)
            keys.append(node.name or f"{node.op_type}_{idx}")
            available.update(node.output)
    produced = {o for n in kept for o in n.output}
    kept_ids = {id(n) for n in kept}
    needed_outside = {o.name for o in graph.output if o.name in produced}
    for node in graph.node:
        if id(node) not in kept_ids:
            needed_outside.update(n for n in node.input if n in produced)
    outputs = [onnx.ValueInfoProto(name=n) for n in sorted(needed_outside)]
    for vi in outputs:  # onnx-tool wants typed outputs
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    used = {n for node in kept for n in node.input}
    sub = onnx.helper.make_graph(kept, graph.name + "-network", list(graph.input),
                                 outputs, [i for i in graph.initializer if i.name in used])
    sub_model = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    sub_model.ir_version = model.ir_version
    return sub_model, keys


def _contains_learned(node) -> bool:
    for attr in node.attribute:
        if attr.type == attr.GRAPH:
            for g in iter_graphs(attr.g):
                if any(n.op_type in LEARNED_OPS for n in g.node):
                    return True
    return False


def analyze(model, table: ShapeTable) -> tuple[list[NodeProfile], Any, dict[str, list[str]]]:
    """Profile every node (subgraphs included) and classify the constants."""
    walker = _Walker(model, table)
    walker.walk(model.graph, "", 1, graph_parts(model.graph), NETWORK)
    report = classify(walker.entries, list(iter_graphs(model.graph)))
    for p in walker.profiles:
        p.params = report.by_node.get(p.name, 0)
    return walker.profiles, report, walker.unknown


# onnx-tool infers shapes by *evaluating* in numpy every node that feeds a shape computation.
# When post-processing sizes depend on scores (a TopK whose K is computed, NMS), that is the
# whole network: ssd300's full graph ran for more than 10 minutes in ConvNode.value_infer. So
# it only ever sees the network part, whose shapes follow from the input shape alone, and it
# runs in a child process that is stopped after CROSS_CHECK_SECONDS: a cross-check must never
# cost more than the profile it checks.
CROSS_CHECK_SECONDS = 8.0
NETWORK_SCOPE = "network part: {count} top-level nodes computable from the input alone"
SCOPE_NOTE = ("the full graph is not handed to onnx-tool: its shape inference evaluates the whole network "
              "in numpy when post-processing shapes depend on scores (more than 10 min on ssd300)")


def onnx_tool_cross_check(model, input_name: str, input_shape: tuple, nodes: list[NodeProfile],
                          time_limit: float = CROSS_CHECK_SECONDS) -> dict[str, Any]:
    """onnx-tool 1.0.1's own figures for the network part of ``model`` (a ModelProto or a path):
    the nodes computable from the input alone (:func:`network_submodel`).

    ``status`` is "ok" (figures, and ``ours`` on the same scope), "failed" (onnx-tool raised
    or its process died: ``stage`` and ``error`` say where) or "skipped" (``reason`` says
    why: nothing to check, or ``time_limit`` seconds passed). onnx-tool's MACs also count
    bias additions and element-wise work, so compare its Conv figure with ours
    (``conv_macs``) and its total with ours on the same scope.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    sub, keys = network_submodel(model)
    wanted = set(keys)
    selected = [n for n in nodes if not n.subgraph and n.name in wanted]
    base = {"scope": NETWORK_SCOPE.format(count=len(keys)), "note": SCOPE_NOTE, "time_limit_s": time_limit,
            "ours": {"macs": sum(n.total_macs for n in selected),
                     "conv_macs": sum(n.total_macs for n in selected if n.op_type in ops.CONV_OPS),
                     "params": sum(n.params for n in selected)}}
    if not keys:
        return {**base, "status": "skipped", "reason": "the graph has no network node computable from its input alone"}
    return {**base, **_bounded(_run_onnx_tool, (sub, input_name, input_shape), time_limit)}


def _bounded(function, args: tuple, time_limit: float) -> dict[str, Any]:
    """``function(*args)`` (which returns a small dict) in a child process stopped after
    ``time_limit`` seconds. Forked where possible, so the model is not serialised again."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, function, args), daemon=True)
    start = time.perf_counter()
    child.start()
    send.close()
    try:
        if receive.poll(time_limit):
            try:
                result = receive.recv()
            except EOFError:  # the child died before answering
                result = None
        else:
            return {"status": "skipped", "stage": "time limit",
                    "reason": f"onnx-tool did not finish within {time_limit:g} s (stopped; its shape "
                              "inference evaluates nodes in numpy); no cross-check figure"}
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        receive.close()
    if result is None:
        return {"status": "failed", "stage": "crashed",
                "error": f"onnx-tool's process ended with exit code {child.exitcode} without a result"}
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _child(send, function, args) -> None:
    try:
        result = function(*args)
    except BaseException as exc:  # reported to the parent, which decides; never re-raised here
        result = {"status": "failed", "stage": "crashed", "error": f"{type(exc).__name__}: {exc}"[:300]}
    send.send(result)
    send.close()


def _run_onnx_tool(source, input_name: str, input_shape: tuple) -> dict[str, Any]:
    import contextlib
    import io
    import warnings

    import onnx_tool

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = onnx_tool.Model(source, {"verbose": False})
        except Exception as exc:  # onnx-tool raises bare Exceptions/AssertionErrors of many kinds
            return {"status": "failed", "stage": "load", "error": f"{type(exc).__name__}: {exc}"[:300]}
        try:
            model.graph.shape_infer({input_name: np.zeros(input_shape, dtype=np.float32)})
        except Exception as exc:  # the known failure on detection post-processing happens here
            return {"status": "failed", "stage": "shape_infer", "error": f"{type(exc).__name__}: {exc}"[:300],
                    "note": "onnx-tool 1.0.1 cannot infer the shapes of this graph"}
        try:
            model.graph.profile()
        except Exception as exc:
            return {"status": "failed", "stage": "profile", "error": f"{type(exc).__name__}: {exc}"[:300]}
    graph = model.graph
    if not getattr(graph, "valid_profile", True):
        return {"status": "failed", "stage": "profile", "error": "onnx-tool reported an invalid profile"}
    conv = sum(int(n.macs[0]) for n in graph.nodemap.values() if n.op_type in ops.CONV_OPS)
    return {"status": "ok", "macs": int(graph.macs[0]), "conv_macs": conv, "params": int(graph.params),
            "convention": "onnx-tool's MACs include bias additions and element-wise ops; its params "
                          "count every initializer (BatchNorm running statistics included)"}
