"""Which constant tensors of a graph count as parameters.

Convention (stated in every profile, see :data:`CONVENTION`):

- **Parameters** are the learned tensors a framework itself counts: weights and biases of
  Conv / ConvTranspose / Gemm / MatMul (+ the Add of a bias right after a constant-weight
  MatMul), scale and bias of Batch/Instance/Layer/GroupNormalization, PRelu slopes, and, in
  the network part, stand-alone per-channel scales or biases (a Mul or Add by a
  per-channel constant that is not half of a folded normalisation, e.g. SSD's L2Norm
  scale).
- **BatchNorm running statistics** (BatchNormalization mean and var) do not count: they are
  buffers, not parameters, in Darknet and PyTorch alike.
- **Folded-normalisation constants** are reported on their own line and not counted:
  per-channel ``x * a + b`` pairs (torchvision's FrozenBatchNorm2d exports as Mul/Add
  with [1, C, 1, 1] constants, which PyTorch keeps as buffers, not parameters) and
  per-channel Sub/Div (input normalisation ``(x - mean) / std``).
- Everything else (anchors, shape and index constants, scalars) is *other constants*.

Initializers and Constant nodes are treated alike (torch sometimes emits weights as
Constant nodes); an Identity of a constant is the same tensor, and so is the
DequantizeLinear of a constant (an INT8 model's stored weight is the parameter it
dequantizes to: the count is the same as the float model's, the bytes are not); a weight used by several
nodes (one head applied to every FPN level) counts once. A bias counts once per distinct
weight it serves: torch.onnx merges initializers of identical value, so the all-zero
biases of a random-init export collapse into one tensor shared by unrelated layers, and
counting that tensor once would lose a framework parameter per layer (see
:func:`_secondary_owner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CONVENTION = (
    "parameters = weights and biases of Conv/ConvTranspose/Gemm/MatMul, scale and bias of "
    "Batch/Instance/Layer/GroupNormalization, PRelu slopes, stand-alone per-channel Mul/Add "
    "constants in the network part; NOT counted: BatchNormalization running mean/var, "
    "folded-normalisation constants (per-channel x*a+b pairs such as FrozenBatchNorm2d, and "
    "per-channel Sub/Div input normalisation: reported as folded_norm_constants), other "
    "constants (anchors, shapes, scalars); a weight once however many nodes use it, a bias once per "
    "distinct weight it serves (torch.onnx merges identical initializers, e.g. zero biases)"
)

WEIGHT, RUNNING_STATS, FOLDED, OTHER = "param", "bn_running_stats", "folded_norm", "other"
_PRECEDENCE = {WEIGHT: 3, RUNNING_STATS: 2, FOLDED: 1, OTHER: 0}
_FLOAT_TYPES = (1, 10, 11, 16)
# ONNX TensorProto element type -> bytes per stored value (parameters are float, or int8/int32 when quantized)
_STORED_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2}

# op type -> input indices holding learned tensors
_WEIGHT_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "PRelu": (1,),
}


@dataclass
class ConstInfo:
    dims: tuple[int, ...]
    data_type: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.dims)) if self.dims else 1

    @property
    def per_channel(self) -> bool:
        return (self.data_type in _FLOAT_TYPES and self.numel > 1
                and sum(1 for d in self.dims if d > 1) == 1)


@dataclass
class ParamReport:
    params: int = 0
    param_bytes: int = 0  # bytes of the parameters as stored (4 per float32 value, 1 per int8 value)
    folded_norm_constants: int = 0
    bn_running_stats: int = 0
    other_constants: int = 0
    roles: dict[str, str] = field(default_factory=dict)   # constant tensor -> role
    by_node: dict[str, int] = field(default_factory=dict)  # node key -> parameters first used there


def constants_of(graphs) -> tuple[dict[str, ConstInfo], dict[str, str]]:
    """Constant tensors (initializers, Constant nodes) and Identity aliases (alias -> source)."""
    consts: dict[str, ConstInfo] = {}
    alias: dict[str, str] = {}
    for graph in graphs:
        for init in graph.initializer:
            consts[init.name] = ConstInfo(tuple(int(d) for d in init.dims), init.data_type)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        consts[node.output[0]] = ConstInfo(tuple(int(d) for d in attr.t.dims), attr.t.data_type)
    changed = True
    while changed:  # Identity chains of constants, and dequantized constants (QDQ INT8 weights)
        changed = False
        for graph in graphs:
            for node in graph.node:
                if node.op_type in ("Identity", "DequantizeLinear") and node.output[0] not in alias:
                    src = alias.get(node.input[0], node.input[0])
                    if src in consts:
                        alias[node.output[0]] = src
                        changed = True
    return consts, alias


def classify(entries, graphs) -> ParamReport:
    """Assign every constant a role. ``entries``: (key, NodeProto, part) for every node walked,
    part being "network" or "postprocess"."""
    consts, alias = constants_of(graphs)

    def canon(name: str) -> str | None:
        name = alias.get(name, name)
        return name if name in consts else None

    consumers: dict[str, list] = {}
    for key, node, part in entries:
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((key, node, i, part))

    role: dict[str, str] = {}
    # tensor -> {owner: first node key}. A bias-like tensor's owner is the weight tensor of the
    # layer it serves; a primary weight's owner is None (see _secondary_owner).
    owners: dict[str, dict[str | None, str]] = {}

    def assign(tensor: str, r: str, key: str, owner: str | None = None) -> None:
        if _PRECEDENCE[r] >= _PRECEDENCE.get(role.get(tensor, OTHER), 0):
            role[tensor] = r
        if r == WEIGHT:
            owners.setdefault(tensor, {}).setdefault(owner, key)

    def const_inputs(node):
        return [(i, canon(n)) for i, n in enumerate(node.input) if n and canon(n)]

    weight_matmul_outputs: dict[str, str] = {}  # MatMul output -> its constant weight
    for key, node, part in entries:
        op = node.op_type
        cins = const_inputs(node)
        for _i, c in cins:
            role.setdefault(c, OTHER)
        if op in _WEIGHT_INPUTS:
            for i, c in cins:
                if i in _WEIGHT_INPUTS[op] and consts[c].dims:  # rank >= 1
                    assign(c, WEIGHT, key, _secondary_owner(node, i, canon))
            if op == "BatchNormalization":
                for i, c in cins:
                    if i in (3, 4):
                        assign(c, RUNNING_STATS, key)
            if op == "MatMul" and cins:
                weight_matmul_outputs[node.output[0]] = cins[0][1]

    # Per-channel arithmetic: Mul/Sub/Div first, so that the Add half of an x*a+b pair is
    # already known to be folded normalisation when Adds are looked at.
    for wanted in (("Mul", "Sub", "Div"), ("Add",)):
        for key, node, part in entries:
            if node.op_type not in wanted or len(node.input) != 2:
                continue
            cins = const_inputs(node)
            if len(cins) != 1:
                continue
            i, c = cins[0]
            other = node.input[1 - i]
            if node.op_type == "Add" and other in weight_matmul_outputs and consts[c].dims:
                # the bias of a Linear exported as MatMul + Add
                assign(c, WEIGHT, key, weight_matmul_outputs[other])
                continue
            if part != "network" or not consts[c].per_channel:
                continue
            if node.op_type in ("Sub", "Div"):
                assign(c, FOLDED, key)
            elif node.op_type == "Mul":
                partner = _affine_partner(node, consumers, canon, consts)
                if partner is not None:
                    assign(c, FOLDED, key)
                    assign(partner, FOLDED, key)
                else:
                    assign(c, WEIGHT, key)
            elif role.get(c) != FOLDED:
                assign(c, WEIGHT, key)

    report = ParamReport(roles=role)
    for tensor, r in role.items():
        n = consts[tensor].numel
        if r == WEIGHT:
            for key in owners[tensor].values():
                report.params += n
                report.param_bytes += n * _STORED_BYTES.get(consts[tensor].data_type, 4)
                report.by_node[key] = report.by_node.get(key, 0) + n
        elif r == RUNNING_STATS:
            report.bn_running_stats += n
        elif r == FOLDED:
            report.folded_norm_constants += n
        else:
            report.other_constants += n
    return report


def _secondary_owner(node, index: int, canon) -> str | None:
    """The weight tensor a bias-like input serves (None for a layer's primary weight).

    torch.onnx merges initializers with identical values into one tensor — in a random-init
    export, every all-zero bias of the same shape becomes one initializer used by many
    unrelated layers. A framework layer owns its bias, so a bias is counted once per distinct
    weight it is applied with; a module applied several times (one RPN head on five FPN levels)
    uses the same weight every time and so still counts once.
    """
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "Gemm") and index == 2:
        return canon(node.input[1]) or f"<dynamic weight of {node.name or op}>"
    if op in ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"):
        # scale and bias serve the layer defined by all of its constant inputs together
        return "|".join(canon(n) or "" for n in node.input[1:])
    return None


def _affine_partner(mul, consumers, canon, consts) -> str | None:
    """The per-channel constant of the Add/Sub that alone consumes ``mul``'s output, if any."""
    users = consumers.get(mul.output[0], [])
    if len(users) != 1:
        return None
    _key, nxt, _i, _part = users[0]
    if nxt.op_type not in ("Add", "Sub") or len(nxt.input) != 2:
        return None
    for name in nxt.input:
        c = canon(name)
        if c is not None and consts[c].per_channel:
            return c
    return None
