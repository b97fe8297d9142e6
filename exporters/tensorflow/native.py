"""TensorFlow models in their native runtime: the Keras SSD the TensorFlow exporter builds, with its
decoding and NMS, as one ``tf.function`` (graph mode, the way TensorFlow serves a model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.contract import OUTPUT_NAMES
from exporters.native_model import NativeModel, matching_weights


def open_native(path: Path, contract, *, threads: int | None = None, weights: Path | None = None) -> NativeModel:
    from exporters.tensorflow import export as tf_ssd
    from exporters.registry import load_registry
    from exporters.tensorflow.ssd_keras import build_ssd, calibrate_random_heads, decoded_priors, detect
    from exporters.tensorflow.convert import import_tensorflow

    tf = import_tensorflow()
    threads_note = ""
    if threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        except RuntimeError:  # TensorFlow fixes its pools at first use: say so in the result
            threads_note = f"; --threads {threads} not applied: TensorFlow was already initialised in this process"
    spec = load_registry().get(contract.name)
    config = tf_ssd.config_from_spec(spec, contract.input_size)
    # the exporter's own steps, in its order, so random-init draws the very same weights
    tf.keras.utils.set_random_seed(tf_ssd.RANDOM_SEED)
    model = build_ssd(config, seed=tf_ssd.RANDOM_SEED)
    if contract.random_init:
        calibrate_random_heads(model, config, seed=tf_ssd.RANDOM_SEED)
    else:
        tf_ssd.load_keras_weights(model, matching_weights(path, contract, spec, weights), spec.name)
    _, priors = decoded_priors(model, config)
    height, width = config.input_size
    signature = [tf.TensorSpec([1, 3, height, width], tf.float32, name="images")]

    def contract_outputs(images):
        out = detect(model, config, priors, images)
        return {k: out[k] for k in OUTPUT_NAMES}

    fn = tf.function(contract_outputs, input_signature=signature)

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        out = {k: v.numpy() for k, v in fn(tf.constant(images)).items()}
        out["labels"] = out["labels"].astype(np.int64)
        return out

    intra = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    return NativeModel("tensorflow", "TensorFlow", tf.__version__,
                       f"TensorFlow {tf.__version__} (tf.function, {intra} intra-op threads{threads_note})",
                       "the exporter's Keras SSD and in-graph decoding + NMS as one tf.function", run, threads)
