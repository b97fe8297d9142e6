"""The same detector in its source runtime, timed like the onnxruntime run.

``--native`` answers "what does ONNX cost or gain against the framework the model
comes from": the model named by an ONNX file's contract is rebuilt in its source
framework with the same weights and run on the same prepared input tensor, with the
same warm-up, the same number of runs and the same thread count:

- ``darknet``: OpenCV's DNN module reading the original ``.cfg`` and ``.weights``
  (``cv2.dnn.readNetFromDarknet``), the runtime Python users run Darknet models with;
  for a random-init export the Darknet exporter writes the very same random weights as a
  ``.weights`` file. The timed call is ``net.forward`` of the YOLO/region outputs plus
  OpenCV's batched per-class NMS (``cv2.dnn.NMSBoxesBatched``) at the contract's score and
  IoU thresholds, so both sides do decode + NMS;
- ``pytorch``: PyTorch eager (``torch.inference_mode``) on the exporter's ``ContractWrapper``
  around the torchvision detector it builds (normalisation, backbone, heads, NMS);
- ``tensorflow``: the Keras model the TensorFlow exporter builds, with its decoding and
  NMS, as one ``tf.function`` (graph mode, the way TensorFlow serves a model).

Every builder is the exporter's own, so the native model is the one the ONNX file was
validated against. A framework whose exporter module is absent raises
:class:`ConfigError` naming the module; nothing is approximated.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.contract import read_contract
from core.errors import ConfigError

# framework -> the exporter module whose builders rebuild the source model
_EXPORTER_MODULES = {
    "darknet": "exporters.darknet",
    "pytorch": "exporters.torch_detectors",
    "tensorflow": "exporters.tf_ssd",
}


@dataclass
class NativeResult:
    """Latency of the source-framework run (milliseconds; same statistics as the ONNX run)."""

    framework: str
    runtime: str
    latency_ms: dict[str, float]
    runs: int
    warmup: int
    threads: int | None
    what: str
    samples_ms: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"framework": self.framework, "runtime": self.runtime, "latency_ms": self.latency_ms,
                "runs": self.runs, "warmup": self.warmup, "threads": self.threads, "what": self.what,
                "samples_ms": self.samples_ms, "setup_seconds": self.setup_seconds}


@dataclass
class NativeRunner:
    """A prepared source-framework model: ``run()`` is the timed call (its input already bound)."""

    framework: str
    runtime: str
    what: str
    run: Callable[[], Any]
    setup_seconds: float = 0.0


def _exporter(framework: str, path: Path):
    name = _EXPORTER_MODULES.get(framework)
    if name is None:
        raise ConfigError(f"{path}: no native runtime for source framework {framework!r} "
                          f"(known: {', '.join(_EXPORTER_MODULES)})")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name) or exc.name == name:
            raise ConfigError(f"{path}: --native needs {name} (the {framework} exporter, which rebuilds the source "
                              f"model), and it is not installed in this tree") from exc
        raise


def native_runner(path, tensor: np.ndarray, *, threads: int | None = None, weights: Path | None = None) -> NativeRunner:
    """Rebuild the model of ``path`` in its source framework, bound to ``tensor`` (contract input)."""
    import time

    path = Path(path)
    contract = read_contract(path)
    start = time.perf_counter()
    if contract.framework == "darknet":
        runner = _darknet_runner(path, contract, tensor, threads, weights)
    elif contract.framework == "pytorch":
        runner = _torch_runner(path, contract, tensor, threads, weights)
    elif contract.framework == "tensorflow":
        runner = _tf_runner(path, contract, tensor, threads, weights)
    else:
        _exporter(contract.framework, path)
        raise AssertionError("unreachable")
    runner.setup_seconds = time.perf_counter() - start
    return runner


def bench_native(path, tensor: np.ndarray, *, warmup: int, runs: int | None, seconds: float | None,
                 threads: int | None, weights: Path | None = None) -> NativeResult:
    """Time the source-framework model exactly like :func:`runtime.bench.bench_model` times onnxruntime."""
    from runtime.bench import Latency, time_runs

    runner = native_runner(path, tensor, threads=threads, weights=weights)
    samples = time_runs(runner.run, warmup=warmup, runs=runs, seconds=seconds)
    return NativeResult(framework=runner.framework, runtime=runner.runtime,
                        latency_ms=Latency.of(samples).to_dict(), runs=len(samples), warmup=warmup,
                        threads=threads, what=runner.what, samples_ms=samples, setup_seconds=runner.setup_seconds)


# --------------------------------------------------------------------------- Darknet via OpenCV

def _darknet_runner(path: Path, contract, tensor: np.ndarray, threads: int | None,
                    weights: Path | None = None) -> NativeRunner:
    import tempfile

    import cv2

    _exporter("darknet", path)
    if threads is not None:
        cv2.setNumThreads(int(threads))
    with tempfile.TemporaryDirectory(prefix="detbench-native-") as tmp:
        cfg, weights_file = darknet_files(path, contract, Path(tmp), weights)
        net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights_file))  # reads both files now; tmp may go
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    blob = np.ascontiguousarray(tensor / np.float32(255.0), dtype=np.float32)  # Darknet's input is RGB in 0..1
    outputs = net.getUnconnectedOutLayersNames()
    height, width = contract.input_height, contract.input_width
    score_threshold, iou_threshold = contract.score_threshold, contract.iou_threshold
    top_k = contract.max_detections

    def run():
        net.setInput(blob)
        heads = net.forward(outputs)
        rows = np.concatenate([h.reshape(-1, h.shape[-1]) for h in heads], axis=0)
        # OpenCV's yolo/region rows: cx, cy, w, h (relative), objectness, class scores (already x objectness)
        class_scores = rows[:, 5:]
        labels = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(rows)), labels]
        keep = scores >= score_threshold
        boxes = rows[keep, :4] * np.array([width, height, width, height], dtype=np.float32)
        xywh = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], axis=1)
        # cv2's batched NMS is class-aware like the graph's; it keeps per class, then the top max_detections
        kept = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores[keep].tolist(), labels[keep].tolist(),
                                       score_threshold, iou_threshold)
        return np.asarray(kept).reshape(-1)[:top_k]

    return NativeRunner("darknet", f"OpenCV DNN {cv2.__version__} (readNetFromDarknet, CPU backend)",
                        "net.forward on the cfg+weights, then per-class NMS (cv2.dnn.NMSBoxesBatched)", run)


def darknet_files(path: Path, contract, tmp: Path, weights: Path | None = None) -> tuple[Path, Path]:
    """The cfg and .weights the Darknet export of ``path`` was built from.

    The cfg is the registry's, checked against the sha256 the export recorded. Trained
    exports need the weights file whose sha256 the contract records (``weights``, else the
    located official file); random-init exports get the exporter's deterministic random
    weights written to ``tmp`` as a Darknet .weights file.
    """
    from exporters.darknet import find_cfg
    from exporters.registry import load_registry
    from core.contract import sha256_file
    from core.errors import ModelDefinitionError

    spec = load_registry().get(contract.name)
    cfg = find_cfg(spec)
    recorded = contract.extra.get("cfg_sha256")
    if recorded and sha256_file(cfg) != recorded:
        raise ModelDefinitionError(f"{path} was exported from a cfg with sha256 {recorded}, but {cfg} has another; "
                                   "re-export the model or restore its cfg")
    if contract.random_init:
        from exporters.darknet_cfg import parse_cfg, plan_network
        from exporters.darknet_weights import random_weights, write_weights

        plan = plan_network(parse_cfg(cfg), contract.input_size)
        return cfg, write_weights(tmp / f"{contract.name}-random.weights", random_weights(plan, contract.name))
    return cfg, _matching_weights(path, contract, spec, weights)


# --------------------------------------------------------------------------- PyTorch eager

def _torch_runner(path: Path, contract, tensor: np.ndarray, threads: int | None,
                  weights: Path | None = None) -> NativeRunner:
    import torch

    module = _exporter("pytorch", path)
    from exporters.registry import load_registry
    from exporters.torch_builders import build_model, load_weights

    spec = load_registry().get(contract.name)
    if threads is not None:
        torch.set_num_threads(int(threads))
    # the exporter's own builder: random-init is deterministic (seeded init + calibration), so
    # this is the very module the ONNX file was exported from and validated against
    model = build_model(spec, contract.input_size, calibrate=contract.random_init)
    if not contract.random_init:
        load_weights(model, _matching_weights(path, contract, spec, weights), spec.name)
    wrapper = module.ContractWrapper(model).eval()
    x = torch.from_numpy(np.ascontiguousarray(tensor))

    def run():
        with torch.inference_mode():
            return wrapper(x)

    return NativeRunner("pytorch", f"PyTorch {torch.__version__} eager (inference_mode, "
                        f"{torch.get_num_threads()} intra-op threads)",
                        "the exporter's ContractWrapper around the torchvision detector (normalisation, "
                        "network, decoding, NMS)", run)


def _matching_weights(path: Path, contract, spec, weights: Path | None) -> Path:
    """The weights file whose sha256 the contract records (``weights`` or the located official file)."""
    from exporters.weights import locate_weights
    from core.contract import sha256_file
    from core.errors import WeightsError

    candidate = Path(weights) if weights is not None else locate_weights(spec)
    if candidate is None or not candidate.is_file():
        raise WeightsError(f"{path} was exported with weights {contract.weights}; --native needs that file "
                           f"(pass --native-weights PATH or `python cli.py fetch {contract.name}`)")
    if "sha256:" + sha256_file(candidate) != contract.weights:
        raise WeightsError(f"{candidate} is not the weights {path} was exported with (it records {contract.weights}); "
                           "pass the matching file with --native-weights PATH")
    return candidate


# --------------------------------------------------------------------------- TensorFlow

def _tf_runner(path: Path, contract, tensor: np.ndarray, threads: int | None,
               weights: Path | None = None) -> NativeRunner:
    module = _exporter("tensorflow", path)
    from exporters.registry import load_registry
    from exporters.ssd_keras import build_ssd, calibrate_random_heads, decoded_priors, detect
    from exporters.tf_convert import import_tensorflow
    from core.contract import OUTPUT_NAMES

    tf = import_tensorflow()
    threads_note = ""
    if threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        except RuntimeError:  # TensorFlow fixes its pools at first use: say so in the result
            threads_note = f"; --threads {threads} not applied: TensorFlow was already initialised in this process"
    spec = load_registry().get(contract.name)
    config = module.config_from_spec(spec, contract.input_size)
    # the exporter's own steps, in its order, so random-init draws the very same weights
    tf.keras.utils.set_random_seed(module.RANDOM_SEED)
    model = build_ssd(config, seed=module.RANDOM_SEED)
    if contract.random_init:
        calibrate_random_heads(model, config, seed=module.RANDOM_SEED)
    else:
        module.load_keras_weights(model, _matching_weights(path, contract, spec, weights), spec.name)
    _, priors = decoded_priors(model, config)
    height, width = config.input_size
    signature = [tf.TensorSpec([1, 3, height, width], tf.float32, name="images")]

    def contract_outputs(images):
        out = detect(model, config, priors, images)
        return {k: out[k] for k in OUTPUT_NAMES}

    fn = tf.function(contract_outputs, input_signature=signature)
    x = tf.constant(tensor)

    def run():
        return {k: v.numpy() for k, v in fn(x).items()}

    intra = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    return NativeRunner("tensorflow", f"TensorFlow {tf.__version__} (tf.function, {intra} intra-op threads{threads_note})",
                        "the exporter's Keras SSD and in-graph decoding + NMS as one tf.function", run)
