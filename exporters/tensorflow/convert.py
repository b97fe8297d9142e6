"""What the TensorFlow exporters share: importing TF safely, tf2onnx conversion, running
the result in onnxruntime, and comparing detections between TF and ONNX (paired by
``exporters.matching.closest_counterparts``; the onnxruntime session and the validation images
are ``exporters.validation``'s, which the foreign-ONNX wrapper uses too).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from typing import Any, Callable, Sequence

import numpy as np

from exporters.matching import closest_counterparts
from exporters.validation import Comparison
from core.errors import ExportError


def import_tensorflow():
    """``import tensorflow`` with its C++ logging quietened.

    The TensorFlow/torchvision load order (triton first) is already settled by importing
    ``runtime`` (see ``core._load_order``), which this module does above.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def versions() -> dict[str, str]:
    import tf2onnx

    tf = import_tensorflow()
    import keras

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__}


def convert_function(fn, input_signature, output_names: Sequence[str], *, opset: int, model: str):
    """tf2onnx conversion of a ``tf.function`` returning a dict keyed by ``output_names``;
    the ONNX outputs carry those names, in that order, and its only inputs are the signature's.

    The function is frozen first (variables *and* captured tensors become constants):
    tf2onnx's own ``from_function`` turns a captured non-variable tensor, such as a
    constant restored from a SavedModel, into an extra graph input.
    Raises :class:`ExportError` naming the model when freezing or tf2onnx fails.
    """
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    tf = import_tensorflow()
    try:
        with _collecting_garbage():
            concrete = fn.get_concrete_function(*input_signature)
            keys = tf.nest.flatten({k: k for k in concrete.structured_outputs})  # the order of concrete.outputs
            frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
            graph_def = frozen.graph.as_graph_def(add_shapes=True)
            inputs = [t.name for t in frozen.inputs]
            outputs = [t.name for t in frozen.outputs]
            del concrete, frozen
            proto, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs, opset=opset,
                                                      tensors_to_rename={**dict(zip(outputs, keys)),
                                                                         **{n: n.split(":")[0] for n in inputs}})
    except Exception as exc:  # TF and tf2onnx raise many unrelated types
        raise ExportError(f"tf2onnx could not convert {model!r} (opset {opset}): {type(exc).__name__}: {exc}") from exc
    found = [o.name for o in proto.graph.output]
    if sorted(found) != sorted(output_names):
        raise ExportError(f"{model!r}: tf2onnx produced outputs {found}, expected {list(output_names)}")
    order = {name: i for i, name in enumerate(output_names)}
    outputs = sorted(proto.graph.output, key=lambda o: order[o.name])
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)
    return proto


@contextlib.contextmanager
def _collecting_garbage(interval: float = 1.0):
    """Run ``gc.collect()`` every ``interval`` seconds while the block runs.

    tf2onnx deep-copies the whole graph, weights included, before each of its optimizer
    passes; the discarded copies are reference cycles that Python's generational collector
    reclaims late (a few huge arrays barely move its allocation counters). For SSD300
    (137 MB of weights) that is a 15 GB peak instead of about 4.6 GB.
    """
    stop = threading.Event()

    def collect():
        while not stop.wait(interval):
            gc.collect()

    worker = threading.Thread(target=collect, name="tf2onnx-gc", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        gc.collect()


def keep_outputs(proto, names: Sequence[str]):
    """A copy of ``proto`` with only the outputs ``names`` and without the nodes only they used."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    kept = [o for o in model.graph.output if o.name in names]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    needed = set(names)
    live = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    live.reverse()
    del model.graph.node[:]
    model.graph.node.extend(live)
    initializers = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    return model


def compare_runs(comparison: Comparison, where: str, reference: dict[str, Any], onnx_out: dict[str, Any],
                 detection_keys: Sequence[str] = ("boxes", "scores", "labels")) -> None:
    """Record ``reference`` (TF) against ``onnx_out``: detections as matched sets, other arrays as they are."""
    ref = {k: np.asarray(reference[k]) for k in detection_keys}
    got = {k: np.asarray(onnx_out[k]) for k in detection_keys}
    pick = closest_counterparts(ref, got)
    comparison.detections(where, ref, {k: v[pick] if len(v) == len(pick) else v for k, v in got.items()})
    for key in reference:
        if key not in detection_keys:
            comparison.arrays(where, key, np.asarray(reference[key]), np.asarray(onnx_out[key]))


def run_onnx(session, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    return dict(zip(names, session.run(list(names), {"images": images})))


def run_tf(fn: Callable, images: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in fn(images).items()}
