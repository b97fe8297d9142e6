"""The OpenVINO runtime reading the exported .onnx file directly, on the CPU.

``openvino`` computes in float32 and ``openvino-bf16`` in bfloat16. OpenVINO's CPU plugin
picks bf16 by itself on a CPU with native bf16 (avx512_bf16, AMX) when not told, so the
precision hint is always set, and the precision that ran is read back from the compiled
model (``INFERENCE_PRECISION_HINT``) and recorded; a compiled model that does not run the
requested precision is refused. The model is compiled with ``PERFORMANCE_HINT=LATENCY``
(one stream: one request at a time, as every detbench benchmark runs) and, when set,
``INFERENCE_NUM_THREADS``; ``--provider-option KEY=VALUE`` adds any other compile property
(e.g. ``NUM_STREAMS``, ``CPU_DENORMALS_OPTIMIZATION``).

Per-layer profile (``--nodes``): OpenVINO's performance counters (``PERF_COUNT``) give one
entry per executed layer of the compiled (fused) graph. The compiled graph's layers carry
the ONNX node names they were fused from in their ``originalLayersNames`` runtime info; see
:func:`attribute_layers` for what maps and what stays unattributed.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from core.contract import INPUT_NAME
from core.errors import ConfigError, ContractError, ProviderUnavailableError
from runtime.backends.base import Backend, BackendSettings, Capabilities, Runner, RunnerInfo, tiny_model_bytes

# what we ask for -> what OpenVINO's INFERENCE_PRECISION_HINT reads back as
PRECISIONS = {"f32": "f32", "bf16": "bf16"}


def _core():
    import openvino as ov

    return ov.Core()


def cpu_has_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, as OpenVINO's CPU plugin reports it."""
    capabilities = [str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    if "BF16" in capabilities:
        return True, ""
    return False, (f"this CPU has no native bf16 (OpenVINO's CPU plugin reports {', '.join(capabilities)}; "
                   "bf16 needs avx512_bf16 or AMX), so openvino-bf16 would only emulate it; use `openvino` (f32)")


def _precision(compiled) -> str:
    """The inference precision a compiled model runs (``f32``, ``bf16``, ``f16``), as OpenVINO reads it back."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _config(precision: str, settings: BackendSettings, perf_count: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if settings.threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(settings.threads)
    for key, value in settings.provider_options.items():
        if key == "INFERENCE_PRECISION_HINT":
            raise ConfigError("--provider-option INFERENCE_PRECISION_HINT: the precision is the backend's name "
                              "(openvino = f32, openvino-bf16 = bf16)")
        config[key] = value
    if perf_count:
        config["PERF_COUNT"] = True
    return config


class OpenVinoRunner(Runner):
    def __init__(self, backend: str, path: Path, compiled, settings: BackendSettings, precision: str,
                 seconds: float, fell_back: bool, input_name: str = INPUT_NAME):
        super().__init__()
        import openvino as ov

        self.input_name = input_name
        self.path, self.compiled, self.settings, self.precision = Path(path), compiled, settings, precision
        self.request = compiled.create_infer_request()
        self.outputs = list(compiled.outputs)
        # an output tensor can carry several names (Mask R-CNN's `boxes` is also an inner value's
        # name): take the graph output's own name, which is what the contract names
        wanted = _graph_output_names(path)
        self.output_names = [next((n for n in wanted if n in o.get_names()), o.get_any_name()) for o in self.outputs]
        ran = _precision(compiled)
        props = {}
        for key in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS",
                    "ENABLE_HYPER_THREADING", "SCHEDULING_CORE_TYPE"):
            try:
                value = compiled.get_property(key)
                props[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
            except RuntimeError:  # a property this plugin version does not expose
                continue
        threads = compiled.get_property("INFERENCE_NUM_THREADS")
        self.info = RunnerInfo(backend=backend, library="openvino", version=ov.get_version(), device="cpu",
                               precision=ran, threads=int(threads) if threads else settings.threads,
                               load_seconds=seconds, fell_back=fell_back,
                               detail={"requested_precision": precision, "compiled_properties": props,
                                       "compile_config": {k: str(v) for k, v in
                                                          _config(precision, settings).items()}})

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.request.infer({self.input_name: images})
        out = {}
        for name, port in zip(self.output_names, self.outputs):
            value = np.array(self.request.get_tensor(port).data, copy=True)  # the request reuses its buffers
            out[name] = value.astype(np.int64) if name == "labels" else value
        return out

    def bind(self, images: np.ndarray):
        request = self.request
        feeds = {INPUT_NAME: images}
        scores = self.outputs[self.output_names.index("scores")] if "scores" in self.output_names else None

        def call() -> None:
            request.infer(feeds)
            if scores is not None:
                self._last = {"scores": request.get_tensor(scores).data}

        return call

    def layer_profile(self, images: np.ndarray, node_macs: dict[str, int], *, runs: int, warmup: int):
        """OpenVINO's per-layer counters (a separate compiled model with PERF_COUNT), averaged over
        ``runs`` after ``warmup``, joined with the analyzer's MACs by :func:`attribute_layers`."""
        import onnx

        core = _core()
        compiled = core.compile_model(core.read_model(str(self.path)), "CPU",
                                      _config(self.precision, self.settings, perf_count=True))
        request = compiled.create_infer_request()
        for _ in range(warmup):
            request.infer({INPUT_NAME: images})
        totals: dict[str, float] = defaultdict(float)
        kinds: dict[str, tuple[str, str]] = {}
        runs = max(1, runs)
        for _ in range(runs):
            request.infer({INPUT_NAME: images})
            for entry in request.get_profiling_info():
                if str(entry.status).endswith("EXECUTED") and not str(entry.status).endswith("NOT_EXECUTED"):
                    totals[entry.node_name] += entry.real_time.total_seconds() * 1e6
                    kinds[entry.node_name] = (entry.node_type, entry.exec_type)
        fused: dict[str, list[str]] = {}
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
            fused[op.get_friendly_name()] = [n for n in names.split(",") if n]
        layers = [(name, kinds[name][0], kinds[name][1], us / runs, fused.get(name, [name]))
                  for name, us in totals.items()]
        graph = onnx.load(str(self.path), load_external_data=False).graph
        return attribute_layers(graph, layers, node_macs, runs)

    def close(self) -> None:
        self.request = self.compiled = None


class OpenVinoBackend(Backend):
    """The OpenVINO runtime on the CPU at one inference precision."""

    def __init__(self, name: str, precision: str, description: str):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(precision)
        self.name, self.precision, self.description = name, precision, description
        self.capabilities = Capabilities(precision=precision, layer_profiler=True, passive_wait=False)

    def _probe(self) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            return False, f"the openvino package is not installed ({exc}); `pip install 'openvino>=2026.4,<2026.5'`"
        if self.precision == "bf16":
            ok, why = cpu_has_bf16()
            if not ok:
                return False, why
        with tempfile.TemporaryDirectory(prefix="detbench-probe-") as tmp:
            probe = Path(tmp) / "probe.onnx"
            probe.write_bytes(tiny_model_bytes())
            try:
                runner = self.open(probe, BackendSettings(), input_name="x")
            except (ProviderUnavailableError, ContractError) as exc:
                return False, str(exc)
            out = runner.run(np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32))
        if out.get("y") is None or out["y"].tolist() != [[0.0, 2.0, 0.0, 4.0]]:
            return False, f"OpenVINO ran the one-node probe model but returned {out}"
        return True, ""

    def open(self, path: Path, settings: BackendSettings, input_name: str = INPUT_NAME) -> OpenVinoRunner:
        core = _core()
        start = time.perf_counter()
        try:
            model = core.read_model(str(path))
            compiled = core.compile_model(model, "CPU", _config(self.precision, settings))
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for unreadable files and unsupported ops
            raise ContractError(f"OpenVINO cannot read or compile {path}: {str(exc).strip().splitlines()[0]}") from exc
        seconds = time.perf_counter() - start
        ran = _precision(compiled)
        fell_back = ran != self.precision
        if fell_back and not settings.allow_fallback:
            raise ProviderUnavailableError(
                f"backend {self.name!r}: OpenVINO was asked for {self.precision} inference but compiled {path} "
                f"for {ran}; no number is reported under {self.name!r} for another precision "
                "(pass --allow-fallback to measure anyway; the result then records the precision that ran)")
        if input_name == INPUT_NAME and INPUT_NAME not in {n for i in compiled.inputs for n in i.get_names()}:
            raise ContractError(f"{path}: OpenVINO sees no input {INPUT_NAME!r}; not a detbench contract model")
        return OpenVinoRunner(self.name, path, compiled, settings, self.precision, seconds, fell_back, input_name)

    def open_streams(self, path: Path, settings: BackendSettings, streams: int,
                     threads_per_stream: int | None) -> list[OpenVinoRunner]:
        """One model compiled for throughput (``PERFORMANCE_HINT=THROUGHPUT``, ``NUM_STREAMS=streams``,
        ``INFERENCE_NUM_THREADS=streams x threads_per_stream`` when given), one infer request per stream:
        OpenVINO's own way of running requests concurrently on CPU cores split between streams."""
        if streams < 1:
            raise ConfigError(f"streams {streams}: must be at least 1")
        options = {**settings.provider_options, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)}
        from dataclasses import replace

        tuned = replace(settings, provider_options=options,
                        threads=streams * threads_per_stream if threads_per_stream else settings.threads)
        first = self.open(path, tuned)
        return [first] + [OpenVinoRunner(self.name, path, first.compiled, tuned, self.precision,
                                         first.info.load_seconds, first.info.fell_back)
                          for _ in range(streams - 1)]


ANCHORS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def attribute_layers(graph, layers: Iterable[tuple[str, str, str, float, list[str]]], node_macs: dict[str, int],
                     runs: int):
    """Join OpenVINO's executed layers with the ONNX graph's per-node MACs.

    ``layers`` are ``(layer name, layer type, kernel implementation, mean µs per run,
    originalLayersNames)``. Mapping rules, in order:

    1. a layer's ``originalLayersNames`` that are ONNX node names belong to it (OpenVINO lists
       every node it fused in: a Convolution layer carries its BatchNormalization and activation);
    2. transformations that rewrite a node before fusing it give the rewritten node a new
       name (the first Conv after the input's ``Div 255`` becomes ``Multiply_NNNN`` once the
       scale is folded into its weights, and the original Conv name is gone); so, until nothing
       changes, an unmapped Conv/MatMul/Gemm, or an unmapped elementwise node, whose only
       consumer belongs to a layer joins that layer;
    3. what remains unmapped ran no layer of its own that can be told (constant-folded,
       shape arithmetic, or renamed beyond recognition): its MACs are listed as unattributed.

    Layers OpenVINO adds (``Reorder`` between memory layouts, converts) map no ONNX node and
    are shown as "added by OpenVINO".
    """
    from runtime.nodes import FUSABLE, NodeGroup, node_times, only_consumer

    layers = list(layers)
    nodes = {n.name: n for n in graph.node}
    order = [n.name for n in graph.node]
    consumers: dict[str, set[str]] = defaultdict(set)
    for n in graph.node:
        for inp in n.input:
            if inp:
                consumers[inp].add(n.name)
    graph_outputs = {o.name for o in graph.output}
    group_of: dict[str, str] = {}
    for name, _type, _impl, _us, originals in layers:
        for original in originals:
            if original in nodes and original not in group_of:
                group_of[original] = name

    def sole_consumer(node_name: str) -> str | None:
        return only_consumer(nodes[node_name], consumers, graph_outputs)

    changed = True
    while changed:
        changed = False
        for name in order:
            if name in group_of or not (nodes[name].op_type in ANCHORS or nodes[name].op_type in FUSABLE
                                        or nodes[name].op_type == "Div"):
                continue
            consumer = sole_consumer(name)
            if consumer in group_of:
                group_of[name] = group_of[consumer]
                changed = True

    members: dict[str, list[str]] = defaultdict(list)
    for name in order:
        if name in group_of:
            members[group_of[name]].append(name)
    total_us = sum(layer[3] for layer in layers)
    groups = []
    for name, layer_type, impl, us, _originals in layers:
        originals = members.get(name, [])
        macs = sum(int(node_macs.get(n, 0)) for n in originals)
        if originals:
            op_type = nodes[max(originals, key=lambda n: int(node_macs.get(n, 0)))].op_type
        else:
            op_type = f"{layer_type} (added by OpenVINO)"
        groups.append(NodeGroup(kernel=name, kernel_op=f"{layer_type} [{impl}]", provider="OpenVINO CPU",
                                op_type=op_type, originals=originals, macs=macs, mean_us=us,
                                share=us / total_us if total_us else 0.0))
    return node_times(runs, total_us, groups, order, group_of, node_macs,
                      mapping="see runtime.backends.openvino.attribute_layers: OpenVINO's originalLayersNames, "
                              "then renamed Conv/elementwise nodes join their only consumer's layer")


def _graph_output_names(path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
