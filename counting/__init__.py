"""The graph analyzer: per-node MACs, parameters and memory traffic of an ONNX detector.

``profile_model(path, shapes="static"|"measured", image=None, allow_unknown=False)``
returns a :class:`ModelProfile` (``.to_dict()`` is the results-store record and, with
``nodes=True``, the JSON the report reads). Modules:

- ``counting.ops``: op type -> counting function, the cost constants in one place;
- ``counting.shapes``: static shape inference and measured shapes (one onnxruntime run);
- ``counting.folding``: exact evaluation of shape arithmetic that ONNX inference skips;
- ``counting.params``: which constant tensors count as parameters;
- ``counting.analyzer``: the walk over the graph and its If/Loop bodies, totals, the
  network / post-processing split, the onnx-tool cross-check;
- ``counting.render``: per-node CSV rows and the JSON file.
"""

from __future__ import annotations

import time
from pathlib import Path

from counting.analyzer import CROSS_CHECK_SECONDS, ModelProfile, NodeProfile, analyze, onnx_tool_cross_check
from core.errors import ConfigError, ContractError, UnsupportedOperatorError

__all__ = ["ModelProfile", "NodeProfile", "profile_model", "SHAPE_MODES"]

SHAPE_MODES = ("static", "measured")


def profile_model(path, *, shapes: str = "static", image=None, allow_unknown: bool = False,
                  cross_check: bool = False, cross_check_seconds: float = CROSS_CHECK_SECONDS) -> ModelProfile:
    """Count every node of the ONNX file at ``path``.

    ``shapes="static"`` resolves shapes by ONNX shape inference at the input size the
    file's detbench metadata states (files without it use their declared input dims);
    ``"measured"`` runs the graph once in onnxruntime on ``image`` (default: a COCO
    val2017 image of the shared data folder) and counts with the shapes that occurred.
    Raises :class:`UnsupportedOperatorError` listing every op without a counting rule
    unless ``allow_unknown``. ``cross_check`` adds onnx-tool's figures (``.onnx_tool``) for the
    network part, or the reason there are none (it is stopped after ``cross_check_seconds``).
    """
    import onnx

    from counting.shapes import measured_shapes, static_shapes
    from core.contract import PREFIX, ModelContract

    if shapes not in SHAPE_MODES:
        raise ConfigError(f"--shapes {shapes!r}: use one of {', '.join(SHAPE_MODES)}")
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"no ONNX file at {path}")
    start = time.perf_counter()
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, OSError, onnx's own errors
        raise ContractError(f"{path} is not a readable ONNX file: {exc}") from exc
    props = {p.key: p.value for p in model.metadata_props}
    contract = None
    if any(k.startswith(PREFIX) for k in props):
        contract = ModelContract.from_props(props, str(path))
    input_hw = contract.input_size if contract else None
    if shapes == "static":
        table = static_shapes(model, input_hw, keep_weights=False)  # counting needs dims, not values
    else:
        table = measured_shapes(model, path, contract, image)

    nodes, report, unknown = analyze(model, table)
    if unknown and not allow_unknown:
        raise UnsupportedOperatorError(unknown, model=str(path))
    inits = {i.name for i in model.graph.initializer}
    graph_input = next((i for i in model.graph.input if i.name not in inits), None)
    if graph_input is None:
        raise ContractError(f"{path}: the graph has no input (every graph input is an initializer): nothing to "
                            "profile; a detector takes an image tensor as its input")
    input_shape = table.get(graph_input.name) or ()
    profile = ModelProfile(
        path=str(path), model=contract.name if contract else path.stem, mode=shapes,
        input_shape=tuple(input_shape), image=table.image, nodes=nodes, params=report.params, param_bytes=report.param_bytes,
        folded_norm_constants=report.folded_norm_constants, bn_running_stats=report.bn_running_stats,
        other_constants=report.other_constants, unknown_ops=unknown, static_mismatches=table.static_mismatches,
        shapes_exposed_all=table.exposed_all, contract={k: v for k, v in props.items() if k.startswith(PREFIX)},
    )
    profile.seconds = time.perf_counter() - start
    if cross_check:
        shape = tuple(d if isinstance(d, int) else 1 for d in input_shape)
        del model  # its weights were emptied for counting; onnx-tool reads the file again
        profile.onnx_tool = onnx_tool_cross_check(path, graph_input.name, shape, nodes, cross_check_seconds)
    return profile
