"""Where the time goes: onnxruntime's per-node profile joined with the analyzer's per-node MACs.

onnxruntime's profiler (``SessionOptions.enable_profiling``) writes a Chrome-trace JSON
with one ``<kernel name>_kernel_time`` event per executed kernel per run. The kernels
are those of the *optimised* graph, so their names differ from the ONNX file's nodes:

- fusions that keep the first node's name: Conv+BatchNormalization (BN folded into the
  weights), Conv+activation (``FusedConv``), Conv+Add (+activation), MatMul+Add (``Gemm``),
  ... -> the kernel is named after the Conv/MatMul; the folded/fused nodes *after* it
  have no kernel of their own ("head" kernels);
- the CPU provider's NCHWc layout transformer (optimisation level ``all``) renames a
  convolution chain after the tensor it finally writes: ``<output tensor>_nchwc``; that
  tensor is the output of the chain's *last* original node (e.g. the LeakyRelu), and the
  Conv/BN before it are absorbed ("tail" kernels);
- kernels onnxruntime adds (``ReorderInput``/``ReorderOutput`` for NCHWc, memory copies)
  match no original node.

How original nodes are mapped to kernels (:func:`attribute`): a kernel whose name is an
original node name, or starts with one followed by ``/`` or ``_`` (longest match), is a head
kernel of that node; ``<tensor>_nchwc`` is a tail kernel of the node producing ``<tensor>``.
Then, until nothing changes, an unmapped node of a fusable type (BatchNormalization,
activations, Add: :data:`FUSABLE`) joins the group of its producer when that producer is
a Conv/ConvTranspose/MatMul/Gemm head kernel and the node is its output's only consumer
(BN/activation/residual Add fused after a Conv), or a Conv/fusable node joins the group
of its only consumer when that consumer is in a tail group (Conv/BN before an NCHWc
chain's end). Original nodes still unmapped ran no
kernel (constant-folded or eliminated); their MACs are listed as ``unattributed_macs``.
A group's MACs are the sum of its original nodes' MACs; its op type is that of the
original node with most MACs (so a FusedConv counts as ``Conv``), and the executed
kernel's op type is kept beside it.

Times are the kernel durations onnxruntime records (microseconds, averaged over the
profiled runs); achieved GMAC/s = MACs / time. Profiling adds overhead per kernel, so the
latency figures of a benchmark come from a separate, unprofiled session.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

KERNEL_SUFFIX = "_kernel_time"
# ops onnxruntime fuses into the Conv/MatMul kernel *before* them (and NCHWc into the chain's last kernel)
# Mul: onnxruntime folds a constant per-channel Mul after a Conv into its weights; torchvision's
# FrozenBatchNorm2d exports as exactly that Mul + Add. Without it, ResNet convolutions fused into a
# BatchNorm Add's kernel were left out of the kernel's group and their time was booked as "Add".
FUSABLE = {"BatchNormalization", "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Add", "Sum",
           "Mul", "Elu", "Selu", "HardSwish", "Mish", "Softplus", "Gelu"}
ANCHORS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
NCHWC_SUFFIX = "_nchwc"


@dataclass(frozen=True)
class KernelTime:
    """One executed kernel: mean time per run (µs) over the profiled runs."""

    name: str
    kernel_op: str
    provider: str
    mean_us: float
    calls_per_run: float


@dataclass
class NodeGroup:
    """One kernel and the original ONNX nodes it executes."""

    kernel: str
    kernel_op: str
    provider: str
    op_type: str
    originals: list[str]
    macs: int
    mean_us: float
    share: float = 0.0

    @property
    def gmacs_per_s(self) -> float | None:
        return self.macs / (self.mean_us * 1e3) if self.mean_us > 0 and self.macs else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gmacs_per_s"] = self.gmacs_per_s
        return out


@dataclass
class NodeTimes:
    """Per-kernel and per-op-type time, share of the total kernel time and achieved GMAC/s.

    ``total_us`` is the sum of kernel times per run (it excludes the session's own
    overhead between kernels, so it is a little below the run's latency);
    ``unattributed`` lists original nodes that ran no kernel with their MACs.
    """

    runs: int
    total_us: float
    groups: list[NodeGroup]
    by_op: dict[str, dict[str, Any]]
    unattributed: dict[str, int] = field(default_factory=dict)
    mapping: str = "see runtime.nodes: head kernels keep the first fused node's name, NCHWc kernels the last output's"

    def top(self, n: int) -> list[NodeGroup]:
        return sorted(self.groups, key=lambda g: g.mean_us, reverse=True)[:n]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        groups = self.top(top) if top else sorted(self.groups, key=lambda g: g.mean_us, reverse=True)
        return {"runs": self.runs, "total_us": self.total_us, "by_op": self.by_op,
                "nodes": [g.to_dict() for g in groups], "nodes_listed": len(groups), "nodes_total": len(self.groups),
                "unattributed_macs": sum(self.unattributed.values()), "unattributed_nodes": sorted(self.unattributed),
                "mapping": self.mapping, "time_unit": "microseconds per run (kernel time)",
                "rate_unit": "GMAC/s (1 MAC = 1 multiply-accumulate = 2 FLOPs)"}


def kernel_times(trace: list[dict[str, Any]], skip_runs: int = 0) -> tuple[list[KernelTime], int]:
    """Per-kernel mean time per run from an onnxruntime profile, skipping the first ``skip_runs`` runs.

    Runs are delimited by the trace's ``model_run`` session events; returns the kernels and
    the number of runs averaged over.
    """
    run_windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace
                         if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept = run_windows[skip_runs:]
    if not kept:
        raise ValueError(f"profile holds {len(run_windows)} run(s); none left after skipping {skip_runs}")

    def in_kept(ts: int) -> bool:
        return any(start <= ts <= end for start, end in kept)

    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    info: dict[str, tuple[str, str]] = {}
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(KERNEL_SUFFIX):
            continue
        if not in_kept(event["ts"]):
            continue
        name = event["name"][: -len(KERNEL_SUFFIX)]
        totals[name] += event["dur"]
        calls[name] += 1
        args = event.get("args", {})
        info[name] = (args.get("op_name", "?"), args.get("provider", "?"))
    n = len(kept)
    return [KernelTime(name, info[name][0], info[name][1], totals[name] / n, calls[name] / n) for name in totals], n


def load_trace(path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def attribute(graph, kernels: Iterable[KernelTime], node_macs: dict[str, int], runs: int) -> NodeTimes:
    """Join kernels with the original graph's per-node MACs (see the module docstring for the rules).

    ``graph`` is the original ``onnx.GraphProto`` (top level; nodes inside If/Loop bodies run
    inside their parent's kernel and are attributed to it through ``node_macs`` of the parent
    when the analyzer reports them there).
    """
    kernels = list(kernels)
    nodes = {n.name: n for n in graph.node}
    order = [n.name for n in graph.node]
    producer = {out: n.name for n in graph.node for out in n.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in graph.node:
        for inp in n.input:
            if inp:
                consumers[inp].append(n.name)
    graph_outputs = {o.name for o in graph.output}

    group_of: dict[str, str] = {}       # original node -> kernel name
    kind: dict[str, str] = {}           # kernel name -> "head" | "tail" | "added"
    anchor: dict[str, str] = {}         # kernel name -> the original node its name designates
    by_length = sorted(nodes, key=len, reverse=True)
    for k in kernels:
        if k.name in nodes:
            group_of[k.name], kind[k.name], anchor[k.name] = k.name, "head", k.name
        elif k.name.endswith(NCHWC_SUFFIX) and producer.get(k.name[: -len(NCHWC_SUFFIX)]) in nodes:
            last = producer[k.name[: -len(NCHWC_SUFFIX)]]
            group_of[last], kind[k.name], anchor[k.name] = k.name, "tail", last
        else:
            match = next((n for n in by_length if k.name.startswith(n) and k.name[len(n)] in "/_"), None)
            if match is not None and match not in group_of:
                group_of[match], kind[k.name], anchor[k.name] = k.name, "head", match
            else:
                kind[k.name] = "added"

    def sole_consumer(node_name: str) -> str | None:
        return only_consumer(nodes[node_name], consumers, graph_outputs)

    changed = True
    while changed:
        changed = False
        for name in order:
            if name in group_of:
                continue
            node = nodes[name]
            # folded/fused after a head kernel (BN, activation, Add into FusedConv)
            for inp in (node.input if node.op_type in FUSABLE else ()):
                p = producer.get(inp)
                if (p in group_of and kind[group_of[p]] == "head" and sole_consumer(p) == name
                        and nodes[anchor[group_of[p]]].op_type in ANCHORS):
                    group_of[name] = group_of[p]
                    changed = True
                    break
            if name in group_of:
                continue
            # absorbed before a tail (NCHWc) kernel
            c = sole_consumer(name)
            if c in group_of and kind[group_of[c]] == "tail" and (node.op_type in FUSABLE or node.op_type in ANCHORS):
                group_of[name] = group_of[c]
                changed = True

    members: dict[str, list[str]] = defaultdict(list)
    for name in order:
        if name in group_of:
            members[group_of[name]].append(name)
    total_us = sum(k.mean_us for k in kernels)
    groups = []
    for k in kernels:
        originals = members.get(k.name, [])
        macs = sum(int(node_macs.get(n, 0)) for n in originals)
        if originals:
            primary = max(originals, key=lambda n: (int(node_macs.get(n, 0)), n == k.name))
            op_type = nodes[primary].op_type
        else:
            op_type = f"{k.kernel_op} (added by onnxruntime)"
        groups.append(NodeGroup(kernel=k.name, kernel_op=k.kernel_op, provider=k.provider, op_type=op_type,
                                originals=originals, macs=macs, mean_us=k.mean_us,
                                share=k.mean_us / total_us if total_us else 0.0))
    return node_times(runs, total_us, groups, order, group_of, node_macs)


def node_times(runs: int, total_us: float, groups: list[NodeGroup], order: list[str], group_of: dict[str, str],
               node_macs: dict[str, int], mapping: str = "") -> NodeTimes:
    """Per-op-type totals of ``groups`` (kernels or layers already joined with their original nodes),
    and the original nodes (``order``) that ran in no group, with their MACs."""
    by_op: dict[str, dict[str, Any]] = {}
    for g in groups:
        entry = by_op.setdefault(g.op_type, {"kernels": 0, "macs": 0, "us": 0.0})
        entry["kernels"] += 1
        entry["macs"] += g.macs
        entry["us"] += g.mean_us
    for entry in by_op.values():
        entry["share"] = entry["us"] / total_us if total_us else 0.0
        entry["gmacs_per_s"] = entry["macs"] / (entry["us"] * 1e3) if entry["us"] > 0 and entry["macs"] else None
    unattributed = {n: int(node_macs.get(n, 0)) for n in order if n not in group_of}
    kwargs = {"mapping": mapping} if mapping else {}
    return NodeTimes(runs=runs, total_us=total_us, groups=groups, by_op=by_op, unattributed=unattributed, **kwargs)


def only_consumer(node, consumers: dict[str, Any], graph_outputs: set[str]) -> str | None:
    """The one node reading ``node``'s outputs (None when several do, or an output leaves the graph)."""
    outs = [o for o in node.output if o]
    users = {c for o in outs for c in consumers.get(o, ())}
    if len(users) != 1 or any(o in graph_outputs for o in outs):
        return None
    return next(iter(users))
