"""The counting table: ONNX op type -> a small function giving that node's MACs.

A MAC is one multiply-accumulate. Convolutions and matrix products are counted
exactly (one MAC per weight tap per output value; bias additions are not counted,
as neither Darknet's BFLOPs nor torchvision's "GFLOPS" count them). Every other op
is counted in MAC-equivalents with the constants of :data:`COST`, the one place
where such choices are made. Ops that only move or reinterpret data
(:data:`ZERO_MAC_OPS`) cost zero MACs, and say so.

A counting function receives a :class:`NodeContext` and returns an ``int``; when a
shape it needs is unresolved it raises :class:`Unresolved` (the node is then
reported as unresolved, never counted as zero). An op type that is in neither
table is *unknown*: the analyzer lists it and refuses to give totals unless the
caller allows unknown ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

# A shape is a tuple of dims; a dim is an int, or a str naming what is unknown about it
# (a symbolic dim such as "N" or "?"): counting functions treat any non-int as unresolved.
Shape = tuple

# --------------------------------------------------------------------------- cost constants
# MAC-equivalents charged per element for ops that are not convolutions or matrix
# products. They matter little for detectors (convolutions dominate by two to three
# orders of magnitude) but they are stated, so every figure can be reproduced.
COST = {
    # Add, Sub, Mul, Div, Max, Min, Pow, Mod, ...: one arithmetic op per output element.
    "elementwise": 1,
    # Equal, Greater, Less, And, Or, Not, Where, IsNaN, ...: one per output element.
    "compare": 1,
    # Relu, LeakyRelu, Clip, Abs, Neg, Floor, Ceil, Round, Sign, Reciprocal: one per element.
    "activation": 1,
    # Exp, Log, Sqrt, Sigmoid, Tanh, Erf, Softplus, ...: one per element (as most counters do;
    # their real cost depends on the math library).
    "transcendental": 1,
    # HardSigmoid / HardSwish / Mish / Gelu are compositions: a few ops per element.
    "composite_activation": 3,
    # Softmax / LogSoftmax: exponent, running sum, divide per element.
    "softmax": 3,
    # Inference BatchNormalization is y = x * a + b once a, b are folded: one MAC per element.
    "batchnorm": 1,
    # Instance/Layer/Group normalisation: mean, variance, normalise, scale+shift per element.
    "normalization": 4,
    # MaxPool / AveragePool / LpPool: one comparison or add per window tap per output value.
    "pool_tap": 1,
    # Reductions (ReduceSum, ReduceMax, ArgMax, CumSum, ...): one op per *input* element.
    "reduce": 1,
    # Resize / Upsample: MACs per output element per interpolation tap; nearest copies (0).
    "resize_tap": 1,
    # RoiAlign: bilinear interpolation = 4 taps per sampling point, one MAC per tap.
    "roialign_tap": 4,
    # MaxRoiPool: one comparison per output value (a lower bound: the bin area is
    # data-dependent).
    "roipool": 1,
    # TopK: one comparison per input element per log2(k) (heap selection).
    "topk": 1,
    # NonMaxSuppression: one comparison per (box, class) score against the threshold; the
    # number of pairwise IoU tests depends on the scores and is not counted.
    "nms_per_score": 1,
}

# Ops that only move, reshape, select or describe data: zero MACs, by definition.
ZERO_MAC_OPS = {
    "Identity", "Constant", "ConstantOfShape", "Shape", "Size", "Reshape", "Flatten", "Squeeze",
    "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND",
    "Expand", "Tile", "Pad", "Cast", "CastLike", "Range", "NonZero", "ScatterElements", "ScatterND",
    "Scatter", "DepthToSpace", "SpaceToDepth", "OneHot", "EyeLike", "Compress", "Dropout",
    "SequenceConstruct", "SequenceAt", "SequenceInsert", "SequenceEmpty", "SequenceLength",
    "SplitToSequence", "ConcatFromSequence", "Trilu", "Unique", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Optional", "OptionalGetElement", "OptionalHasElement",
}
ZERO_MAC_REASON = "data movement / shape bookkeeping (no arithmetic on values)"

# QuantizeLinear / DequantizeLinear (INT8 models): one scale (and zero-point shift) per element.
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Mod", "Sum", "Mean", "PRelu",
                   "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot",
                   "QuantizeLinear", "DequantizeLinear"}
COMPARE_OPS = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Not",
               "Where", "IsNaN", "IsInf"}
ACTIVATION_OPS = {"Relu", "LeakyRelu", "Clip", "Abs", "Neg", "Floor", "Ceil", "Round", "Sign",
                  "Reciprocal", "Elu", "Selu", "Celu", "ThresholdedRelu", "Shrink"}
TRANSCENDENTAL_OPS = {"Exp", "Log", "Sqrt", "Sigmoid", "Tanh", "Erf", "Softplus", "Softsign", "Sin", "Cos",
                      "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh"}
COMPOSITE_ACTIVATION_OPS = {"HardSigmoid", "HardSwish", "Mish", "Gelu"}
REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "CumSum"}
POOL_OPS = {"MaxPool", "AveragePool", "LpPool"}
GLOBAL_POOL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}

# Ops whose MACs Darknet's BFLOPs count ("convolution-only" figure).
CONV_OPS = {"Conv", "ConvTranspose"}
# Ops whose MACs torchvision's "GFLOPS" count (aten convolution, mm, addmm, bmm, matmul).
LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Ops that belong to detection post-processing wherever they stand in the graph.
POSTPROCESS_OPS = {"NonMaxSuppression", "TopK", "RoiAlign", "MaxRoiPool"}
# Control flow: counted through their bodies (see counting.graph).
CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}


class Unresolved(Exception):
    """A shape the counting function needs is not known (static mode, data-dependent dim)."""


@dataclass
class NodeContext:
    """What a counting function may look at: attributes, shapes, small constant inputs."""

    op_type: str
    name: str
    attrs: dict[str, Any]
    input_shapes: Sequence[Shape | None]
    output_shapes: Sequence[Shape | None]
    constants: Sequence[np.ndarray | None] = field(default_factory=list)

    def inp(self, i: int) -> Shape:
        if i >= len(self.input_shapes) or self.input_shapes[i] is None:
            raise Unresolved(f"input {i} has no known shape")
        return self.input_shapes[i]

    def out(self, i: int = 0) -> Shape:
        if i >= len(self.output_shapes) or self.output_shapes[i] is None:
            raise Unresolved(f"output {i} has no known shape")
        return self.output_shapes[i]

    def has_input(self, i: int) -> bool:
        return i < len(self.input_shapes) and self.input_shapes[i] is not None

    def const(self, i: int) -> np.ndarray | None:
        return self.constants[i] if i < len(self.constants) else None


def numel(shape: Shape | None) -> int:
    if shape is None:
        raise Unresolved("rank unknown")
    total = 1
    for d in shape:
        if not isinstance(d, int):
            raise Unresolved(f"dimension unresolved in {shape_str(shape)}")
        total *= int(d)
    return total


def dim(shape: Shape, i: int) -> int:
    d = shape[i]
    if not isinstance(d, int):
        raise Unresolved(f"dimension {i} unresolved in {shape_str(shape)}")
    return int(d)


def shape_str(shape: Shape | None) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


# --------------------------------------------------------------------------- linear ops
def conv_macs(n: NodeContext) -> int:
    """Output values x (Cin / group) x kernel taps: W is [Cout, Cin/g, k...]."""
    w = n.inp(1)
    return numel(n.out(0)) * numel(w[1:])


def conv_transpose_macs(n: NodeContext) -> int:
    """Every input value is scattered through Cout/g x kernel taps: W is [Cin, Cout/g, k...]."""
    x, w = n.inp(0), n.inp(1)
    return numel(x) * numel(w[1:])


def gemm_macs(n: NodeContext) -> int:
    """[M, K] x [K, N]: M x N x K (the beta*C term is a bias, not counted)."""
    a, b = n.inp(0), n.inp(1)
    k = dim(a, 0) if n.attrs.get("transA", 0) else dim(a, 1)
    m = dim(a, 1) if n.attrs.get("transA", 0) else dim(a, 0)
    cols = dim(b, 0) if n.attrs.get("transB", 0) else dim(b, 1)
    return m * k * cols


def matmul_macs(n: NodeContext) -> int:
    """numpy matmul semantics: output elements x K (broadcast batch dims included in the output)."""
    a = n.inp(0)
    k = dim(a, -1)  # a 1-D A is a [1, K] row; a 1-D B is a [K, 1] column: K is a's last dim either way
    return numel(n.out(0)) * k


# --------------------------------------------------------------------------- per-element families
def per_output_element(cost: int) -> Callable[[NodeContext], int]:
    def count(n: NodeContext) -> int:
        return cost * numel(n.out(0))
    return count


def per_input_element(cost: int) -> Callable[[NodeContext], int]:
    def count(n: NodeContext) -> int:
        return cost * numel(n.inp(0))
    return count


def pool_macs(n: NodeContext) -> int:
    return COST["pool_tap"] * numel(n.out(0)) * math.prod(n.attrs["kernel_shape"])


def global_pool_macs(n: NodeContext) -> int:
    return COST["pool_tap"] * numel(n.inp(0))


def softmax_macs(n: NodeContext) -> int:
    return COST["softmax"] * numel(n.out(0))


def resize_macs(n: NodeContext) -> int:
    """Nearest copies (0). (bi/tri)linear: 2 taps per resized axis; cubic: 4 per resized axis."""
    mode = n.attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "nearest":
        return 0
    x, y = n.inp(0), n.out(0)
    resized_axes = sum(1 for a, b in zip(x, y) if not (isinstance(a, int) and isinstance(b, int)) or a != b)
    taps_per_axis = 4 if mode == "cubic" else 2
    return COST["resize_tap"] * numel(y) * taps_per_axis ** resized_axes


def roialign_macs(n: NodeContext) -> int:
    """Output values x sampling points per bin x 4 bilinear taps.

    ``sampling_ratio`` 0 means adaptive (ceil(roi_size / output_size) per axis, data-dependent):
    counted as one point per axis, a lower bound.
    """
    ratio = int(n.attrs.get("sampling_ratio", 0))
    points = max(ratio, 1) ** 2
    return COST["roialign_tap"] * numel(n.out(0)) * points


def maxroipool_macs(n: NodeContext) -> int:
    return COST["roipool"] * numel(n.out(0))


def topk_macs(n: NodeContext) -> int:
    x = n.inp(0)
    k = n.const(1)
    if k is None:
        # K is data-dependent (torchvision takes min(k, num_anchors)): the output tells it.
        out = n.out(0)
        axis = int(n.attrs.get("axis", -1))
        kval = dim(out, axis)
    else:
        kval = int(np.asarray(k).reshape(-1)[0])
    return COST["topk"] * numel(x) * max(1, math.ceil(math.log2(kval + 1)))


def nms_macs(n: NodeContext) -> int:
    """Scores are [batch, classes, boxes]: one threshold test per score."""
    return COST["nms_per_score"] * numel(n.inp(1))


def zero(_n: NodeContext) -> int:
    return 0


COUNTERS: dict[str, Callable[[NodeContext], int]] = {
    "Conv": conv_macs,
    "ConvTranspose": conv_transpose_macs,
    "Gemm": gemm_macs,
    "MatMul": matmul_macs,
    "BatchNormalization": per_output_element(COST["batchnorm"]),
    "InstanceNormalization": per_output_element(COST["normalization"]),
    "LayerNormalization": lambda n: COST["normalization"] * numel(n.out(0)),
    "GroupNormalization": per_output_element(COST["normalization"]),
    "LRN": lambda n: numel(n.out(0)) * int(n.attrs.get("size", 1)),
    "Softmax": softmax_macs,
    "LogSoftmax": softmax_macs,
    "Resize": resize_macs,
    "Upsample": resize_macs,
    "RoiAlign": roialign_macs,
    "MaxRoiPool": maxroipool_macs,
    "TopK": topk_macs,
    "NonMaxSuppression": nms_macs,
    **{op: pool_macs for op in POOL_OPS},
    **{op: global_pool_macs for op in GLOBAL_POOL_OPS},
    **{op: per_output_element(COST["elementwise"]) for op in ELEMENTWISE_OPS},
    **{op: per_output_element(COST["compare"]) for op in COMPARE_OPS},
    **{op: per_output_element(COST["activation"]) for op in ACTIVATION_OPS},
    **{op: per_output_element(COST["transcendental"]) for op in TRANSCENDENTAL_OPS},
    **{op: per_output_element(COST["composite_activation"]) for op in COMPOSITE_ACTIVATION_OPS},
    **{op: per_input_element(COST["reduce"]) for op in REDUCE_OPS},
    **{op: zero for op in ZERO_MAC_OPS},
    # Control flow costs nothing itself; its bodies are walked (counting.graph).
    **{op: zero for op in CONTROL_FLOW_OPS},
}


def is_known(op_type: str, domain: str = "") -> bool:
    return domain in ("", "ai.onnx") and op_type in COUNTERS


def count_macs(ctx: NodeContext) -> int:
    """MACs of one node. Raises KeyError for an unknown op, :class:`Unresolved` for missing shapes."""
    return int(COUNTERS[ctx.op_type](ctx))


def conventions() -> dict[str, Any]:
    """The counting conventions, as stated in every profile."""
    return {
        "mac": "one multiply-accumulate; FLOPs = 2 x MACs",
        "linear_ops": "Conv/ConvTranspose/Gemm/MatMul: exact MACs (one per weight tap per output); "
                      "bias additions not counted (as Darknet and torchvision)",
        "conv_only": "MACs of Conv and ConvTranspose only: Darknet's BFLOPs = 2 x this",
        "linear_only": "MACs of Conv, ConvTranspose, Gemm and MatMul: what torchvision's 'GFLOPS' count",
        "other_ops_cost": dict(COST),
        "zero_mac_ops": f"{', '.join(sorted(ZERO_MAC_OPS))}: {ZERO_MAC_REASON}",
        "control_flow": "If: the costlier branch is counted (an upper bound; which branch ran is not "
                        "observable); Loop: body x trip count (constant M, or the leading dim of a scan "
                        "output, measured in measured mode); the If/Loop node itself costs nothing",
    }
