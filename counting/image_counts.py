"""Operations actually executed on each image: the analyzer's measured-shapes mode, per image.

A two-stage detector's RoI heads run once per proposal and its mask head once per kept
detection, so its operation count depends on the picture; a one-stage detector's does not.
:class:`ImageCounter` measures that claim instead of assuming it: it loads the graph and
runs static inference once, opens ONE onnxruntime session that exposes the intermediates
static inference cannot size (every intermediate when they fit in memory, as
:func:`counting.shapes.measured_shapes` decides), and for each image runs it, pins the
shapes that occurred and counts every node with them.

The figures are MACs (1 MAC = 2 FLOPs), the same analyzer and conventions as ``profile``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.contract import read_contract
from core.errors import ContractError
from core.images import load_rgb, prepare_for
from core.ort_session import cpu_session
from counting.analyzer import NETWORK, POSTPROCESS, analyze
from counting.shapes import (EXPOSE_ALL_BUDGET_BYTES, _EXPOSE_ALL_MAX_UNRESOLVED, ShapeTable, _collect, _keep_static,
                             _pinned_inference, _run_exposing, _Stripped, elem_size, resolved, static_shapes)


@dataclass(frozen=True)
class ImageCount:
    """MACs executed on one image (measured shapes), and what the graph returned for it."""

    image: str
    macs: int
    network_macs: int
    postprocess_macs: int
    uncounted_nodes: int
    detections: int

    def to_dict(self) -> dict:
        return asdict(self)


class ImageCounter:
    """Per-image MAC counts of one exported detector (see the module docstring)."""

    def __init__(self, path, budget_bytes: int = EXPOSE_ALL_BUDGET_BYTES):
        import onnx

        self.path = Path(path)
        self.contract = read_contract(self.path)
        self.model = onnx.load(str(self.path))
        self.static = static_shapes(self.model, self.contract.input_size)
        inits = {i.name for i in self.model.graph.initializer}
        candidates = [out for node in self.model.graph.node if node.op_type != "Constant"
                      for out in node.output if out and out not in inits]
        unresolved = [n for n in candidates if not resolved(self.static.shapes.get(n))]
        known_bytes = sum(int(np.prod(self.static.shapes[n])) * elem_size(self.static.types.get(n))
                          for n in candidates if resolved(self.static.shapes.get(n)))
        expose_all = (known_bytes <= budget_bytes
                      and len(unresolved) <= _EXPOSE_ALL_MAX_UNRESOLVED * max(len(candidates), 1))
        self.candidates = candidates
        self.exposed = candidates if expose_all else unresolved
        run_model = onnx.ModelProto()
        run_model.CopyFrom(self.model)
        del run_model.graph.value_info[:]
        existing = {o.name for o in run_model.graph.output}
        run_model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in self.exposed if n not in existing)
        try:
            # One session for every image: creating it is what dominates a single measured profile.
            self.session = cpu_session(run_model)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise ContractError(f"{self.path}: onnxruntime cannot load the graph to measure shapes: {exc}") from exc
        del run_model
        # Counting needs dims, not weight values. Strip them once and for all: stripping and
        # restoring them around each image's inference (what a single measured profile does)
        # re-allocates them in the protobuf's arena every time, which never shrinks (it grew by
        # the model's size per image).
        with _Stripped(self.model, restore=False):
            pass
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def count(self, image) -> ImageCount:
        """Run ``image`` (a path) once and count every node with the shapes that occurred."""
        image = Path(image)
        tensor, _ = prepare_for(load_rgb(image), self.contract)
        try:
            values = self.session.run(self.output_names, {self.input_name: tensor})
        except Exception as exc:
            raise ContractError(f"{self.path}: onnxruntime could not run the graph on {image}: {exc}") from exc
        measured = {n: tuple(int(d) for d in v.shape) for n, v in zip(self.output_names, values)
                    if isinstance(v, np.ndarray)}
        measured[self.input_name] = tuple(int(d) for d in tensor.shape)
        table = ShapeTable(mode="measured", image=str(image))
        _collect(_pinned_inference(self.model, measured, self.static.types), table, "inferred")
        _keep_static(table, self.static)
        still = [n for n in self.candidates if n not in measured and not resolved(table.shapes.get(n))]
        if still:  # values neither exposed nor derivable: one more run exposing exactly them (with the weights)
            import onnx

            measured.update(_run_exposing(onnx.load(str(self.path)), still, tensor, self.path, image))
            table = ShapeTable(mode="measured", image=str(image))
            _collect(_pinned_inference(self.model, measured, self.static.types), table, "inferred")
            _keep_static(table, self.static)
        for name, shape in measured.items():
            table.shapes[name] = shape
            table.source[name] = "measured"
        nodes, _report, _unknown = analyze(self.model, table)
        scores = self.output_names.index("scores") if "scores" in self.output_names else None
        return ImageCount(
            image=image.name,
            macs=sum(n.total_macs for n in nodes),
            network_macs=sum(n.total_macs for n in nodes if n.part == NETWORK),
            postprocess_macs=sum(n.total_macs for n in nodes if n.part == POSTPROCESS),
            uncounted_nodes=sum(1 for n in nodes if n.status != "counted"),
            detections=int(values[scores].shape[0]) if scores is not None else -1,
        )
