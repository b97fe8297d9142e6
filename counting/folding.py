"""Exact evaluation of shape arithmetic, so static inference can see through it.

torchvision's exports compute sizes from the input's shape with float arithmetic
(``Shape -> Gather -> Cast -> Mul -> Floor -> Concat -> Resize``); ONNX shape inference
does not evaluate that, so every shape downstream of the transform's Resize stays
unknown although the input size is fixed. :func:`fold_shape_values` evaluates, with
numpy, every node whose inputs are all known small values (constants, or the ``Shape``
of a fully resolved tensor) — exact evaluation of the graph's own arithmetic, never a
guess — and returns the values of the outputs it computed. Ops it does not implement,
or values above :data:`MAX_ELEMENTS`, are simply left alone.
"""

from __future__ import annotations

import numpy as np

MAX_ELEMENTS = 4096


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _div(a, b):
    if np.issubdtype(np.result_type(a, b), np.integer):
        return (np.trunc(np.asarray(a, np.float64) / b)).astype(np.result_type(a, b))
    return np.asarray(a / b, dtype=np.result_type(a, b))


def _slice(node, x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else list(steps)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _unsqueeze(x, axes):
    out = x
    for a in sorted(int(v) % (x.ndim + len(axes)) for v in axes):
        out = np.expand_dims(out, a)
    return out


def _evaluate(node, args: list):
    import onnx

    op = node.op_type
    if op == "Identity":
        return args[0]
    if op == "Cast":
        return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
    if op in ("Add", "Sub", "Mul"):
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
        return fn(args[0], args[1]).astype(np.result_type(args[0], args[1]))
    if op == "Div":
        return _div(args[0], args[1])
    if op in ("Floor", "Ceil", "Sqrt", "Exp", "Log", "Abs", "Neg", "Round", "Not"):
        fn = {"Floor": np.floor, "Ceil": np.ceil, "Sqrt": np.sqrt, "Exp": np.exp, "Log": np.log, "Abs": np.abs,
              "Neg": np.negative, "Round": np.round, "Not": np.logical_not}[op]
        return fn(args[0]).astype(args[0].dtype)
    if op in ("Min", "Max"):
        fn = np.minimum if op == "Min" else np.maximum
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out
    if op in ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or"):
        fn = {"Equal": np.equal, "Greater": np.greater, "Less": np.less, "GreaterOrEqual": np.greater_equal,
              "LessOrEqual": np.less_equal, "And": np.logical_and, "Or": np.logical_or}[op]
        return fn(args[0], args[1])
    if op == "Where":
        return np.where(args[0], args[1], args[2])
    if op == "Gather":
        return np.take(args[0], args[1].astype(np.int64), axis=int(_attr(node, "axis", 0)))
    if op == "Unsqueeze":
        return _unsqueeze(args[0], [int(v) for v in np.asarray(args[1]).reshape(-1)])
    if op == "Squeeze":
        if len(args) > 1 and args[1] is not None:
            return np.squeeze(args[0], axis=tuple(int(v) for v in np.asarray(args[1]).reshape(-1)))
        return np.squeeze(args[0])
    if op == "Concat":
        return np.concatenate(args, axis=int(_attr(node, "axis")))
    if op == "Slice":
        return _slice(node, args[0], *[None if a is None else np.asarray(a).reshape(-1) for a in args[1:]])
    if op == "Transpose":
        perm = _attr(node, "perm")
        return np.transpose(args[0], None if perm is None else [int(v) for v in perm])
    if op == "Flatten":
        axis = int(_attr(node, "axis", 1)) % max(args[0].ndim, 1)
        return args[0].reshape(int(np.prod(args[0].shape[:axis])), -1)
    if op == "Reshape":
        shape = [int(v) for v in args[1]]
        shape = [args[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return args[0].reshape(shape)
    if op == "ConstantOfShape":
        value = _attr(node, "value")
        fill = onnx.numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
        return np.full([int(v) for v in args[0]], fill, dtype=np.asarray(fill).dtype)
    if op == "Expand":
        return args[0] * np.ones([int(v) for v in args[1]], dtype=args[0].dtype)
    if op == "Range":
        return np.arange(args[0], args[1], args[2]).astype(np.result_type(args[0], args[1], args[2]))
    if op in ("ReduceProd", "ReduceMin", "ReduceMax", "ReduceSum"):
        fn = {"ReduceProd": np.prod, "ReduceMin": np.min, "ReduceMax": np.max, "ReduceSum": np.sum}[op]
        axes = _attr(node, "axes")
        if len(args) > 1 and args[1] is not None:
            axes = [int(v) for v in np.asarray(args[1]).reshape(-1)]
        axis = None if not axes else tuple(int(a) for a in axes)
        return np.asarray(fn(args[0], axis=axis, keepdims=bool(_attr(node, "keepdims", 1)))).astype(args[0].dtype)
    if op == "Reciprocal":
        return (1 / args[0]).astype(args[0].dtype)
    if op == "Pow":
        return np.power(args[0], args[1]).astype(args[0].dtype)
    if op == "Clip":
        low = args[1] if len(args) > 1 and args[1] is not None else None
        high = args[2] if len(args) > 2 and args[2] is not None else None
        return np.clip(args[0], low, high)
    raise NotImplementedError(op)


def fold_shape_values(graph, shapes: dict, small: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of the top-level node outputs computable from constants and resolved shapes.

    ``shapes``: name -> shape (ints, or str for unresolved dims); ``small``: known constant
    values (small initializers and Constant nodes). Returns only newly computed values.
    """
    values = dict(small)
    computed: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "Constant" or not node.output:
            continue
        if node.op_type == "Shape":
            shape = shapes.get(node.input[0])
            if shape is not None and all(isinstance(d, int) for d in shape):
                start, end = _attr(node, "start", 0), _attr(node, "end", None)
                result = np.asarray(shape, dtype=np.int64)[start:end]
                values[node.output[0]] = computed[node.output[0]] = result
            continue
        if node.op_type == "Size":
            shape = shapes.get(node.input[0])
            if shape is not None and all(isinstance(d, int) for d in shape):
                values[node.output[0]] = computed[node.output[0]] = np.asarray(int(np.prod(shape)), np.int64)
            continue
        if any(name and name not in values for name in node.input) or len(node.output) != 1:
            continue
        args = [values[name] if name else None for name in node.input]
        try:
            with np.errstate(all="ignore"):
                result = np.asarray(_evaluate(node, args))
        except (NotImplementedError, ValueError, TypeError, IndexError):
            continue
        if result.size <= MAX_ELEMENTS:
            values[node.output[0]] = computed[node.output[0]] = result
    return computed
