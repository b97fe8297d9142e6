"""PyTorch models in their native runtime: eager mode (``torch.inference_mode``) on the exporter's
``ContractWrapper`` around the torchvision detector it builds (normalisation, network, decoding, NMS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.native_model import NativeModel, matching_weights


def open_native(path: Path, contract, *, threads: int | None = None, weights: Path | None = None) -> NativeModel:
    import torch

    from exporters.registry import load_registry
    from exporters.pytorch.builders import build_model, load_weights
    from exporters.pytorch.export import ContractWrapper

    spec = load_registry().get(contract.name)
    if threads is not None:
        torch.set_num_threads(int(threads))
    # the exporter's own builder: random-init is deterministic (seeded init + calibration), so
    # this is the very module the ONNX file was exported from and validated against
    model = build_model(spec, contract.input_size, calibrate=contract.random_init)
    if not contract.random_init:
        load_weights(model, matching_weights(path, contract, spec, weights), spec.name)
    wrapper = ContractWrapper(model).eval()
    names = wrapper.output_names

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = wrapper(torch.from_numpy(np.ascontiguousarray(images)))
        out = {name: value.numpy() for name, value in zip(names, outputs)}
        out["labels"] = out["labels"].astype(np.int64)
        return out

    return NativeModel("pytorch", "PyTorch", torch.__version__,
                       f"PyTorch {torch.__version__} eager (inference_mode, {torch.get_num_threads()} intra-op threads)",
                       "the exporter's ContractWrapper around the torchvision detector (normalisation, network, "
                       "decoding, NMS)", run, threads)
