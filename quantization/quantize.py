"""Static INT8 quantization of an exported detector, calibrated on COCO images.

:func:`quantize_model` turns a contract-following float32 ONNX file into an INT8 one
through ``onnxruntime.quantization.quantize_static`` (QDQ format by default) that still
follows the contract: same input ``images``, same outputs, NMS inside, plus metadata
saying how it was quantized (``detbench.precision = int8``, calibration method and image
ids, the nodes kept in float, the float source's name and sha256).

What is quantized is decided from the graph's structure, never from node names: the
analyzer's network / post-processing split (``counting.analyzer.graph_parts``) tells the
network's learned ops apart from box decoding, TopK, NMS, RoI ops and mask pasting.
Quantized by default: the network's Conv / MatMul / Gemm, and the network ops between
them that onnxruntime runs on 8-bit data (activations, residual Add, pooling, Concat,
Resize), so that convolutions hand int8 tensors to each other instead of paying a
Quantize/DequantizeLinear pair around every activation. Kept float: every node whose
output a post-processing node (or a graph output) reads — the detection heads, the
features RoiAlign samples — because 8-bit logits and box offsets turn into tied scores and
shifted boxes; and all of post-processing.

Calibration tensors are made exactly as evaluation makes its inputs
(``core.images.prepare_for`` on ``load_rgb``), from the first N images of a COCO folder by
image id (or the ids given). The ids are recorded in the file so that evaluation can refuse
to score a model on its own calibration images (:func:`core.calibration.calibration_overlap`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from core.contract import (INPUT_NAME, OUTPUT_NAMES, PREFIX, ModelContract, load_checked, read_contract, save_model,
                           sha256_file)
from core.errors import ConfigError, DatasetError, ExportError
from core.calibration import CALIBRATION_IDS_KEY, SELECTION_IDS_KEY
from core.images import load_rgb, prepare_for
from core.ort_session import cpu_session
from counting.analyzer import NETWORK, graph_parts

METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
PRECISION_KEY = "precision"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}

# Learned ops quantized by default (their weights become int8).
LINEAR_OPS = ("Conv", "MatMul", "Gemm")
# Network ops onnxruntime's CPU provider runs on 8-bit data when they sit between quantized
# nodes (QLinearLeakyRelu/QLinearAdd/QLinearConcat/... or Q/DQ simply dropped around them).
CHAIN_OPS = ("LeakyRelu", "Relu", "Clip", "Sigmoid", "Add", "MaxPool", "AveragePool", "GlobalAveragePool",
             "Concat", "Resize", "Pad", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice")
# Inputs that carry feature data for the chain ops that take more than data (shapes, scales, pads).
_DATA_INPUT_0 = {"Resize", "Pad", "Reshape", "Slice", "Squeeze", "Unsqueeze", "Split", "Transpose", "Flatten",
                 "MaxPool", "AveragePool", "GlobalAveragePool", "LeakyRelu", "Relu", "Clip", "Sigmoid"}
# Ops that mean a graph is already quantized.
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
              "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}

ProgressFn = Callable[[str], None]
_CALIBRATION_BUDGET = 4 << 30  # bytes of intermediate tensors held at once during calibration


@dataclass(frozen=True)
class QuantizeSettings:
    """How to quantize.

    ``calibration``: a COCO folder (``annotations/instances_*.json`` + its images folder) or a
    plain folder of images (COCO file names give the ids); ``images``: how many calibration
    images, the first N by image id unless ``image_ids`` names them; ``method``: onnxruntime's
    calibration (minmax | entropy | percentile, ``percentile`` at ``percentile``); ``per_channel``:
    one weight scale per output channel; ``format``: qdq (Quantize/DequantizeLinear pairs,
    onnxruntime's recommended CPU format) or qoperator (QLinearConv & co. written directly);
    ``chain``: also quantize the network ops between convolutions (see the module docstring);
    ``symmetric_activations``: int8 activations with zero point 0 instead of uint8;
    ``symmetric_weights``: int8 weights with zero point 0 (onnxruntime's default);
    ``out``: the file to write (default :func:`default_output`); ``exclude``: further network
    nodes (names in the optimized graph, as :func:`plan` lists them) kept float;
    ``selection_ids``: the images an accuracy-driven choice was made on, recorded so that
    evaluation refuses them too; ``ranges_cache``: a file holding (or receiving) the calibration
    ranges, so that several variants of one calibration are quantized without re-calibrating;
    ``metadata``: further ``(key, value)`` pairs recorded in the file.
    """

    calibration: Path | None = None
    images: int = 32
    method: str = "entropy"
    per_channel: bool = True
    format: str = "qdq"
    chain: bool = True
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    percentile: float = 99.999
    image_ids: tuple[int, ...] | None = None
    out: Path | None = None
    exclude: tuple[str, ...] = ()
    selection_ids: tuple[int, ...] | None = None
    ranges_cache: Path | None = None
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_model` wrote and how."""

    path: Path
    contract: ModelContract
    source: Path
    source_sha256: str
    calibration_ids: list[int]
    calibration_files: list[str]
    quantized_nodes: list[str]
    float_nodes: list[str]
    activation_type: str
    weight_type: str
    seconds: float
    settings: dict = field(default_factory=dict)


def default_output(path: Path) -> Path:
    """``<folder>/<stem>@int8.onnx`` beside the float model."""
    path = Path(path)
    return path.with_name(f"{path.stem}@int8{path.suffix or '.onnx'}")


def is_quantized(model) -> str | None:
    """Why ``model`` (a ModelProto) already is quantized, or None."""
    props = {p.key: p.value for p in model.metadata_props}
    precision = props.get(PREFIX + PRECISION_KEY)
    if precision is not None and precision != "float32":
        return f"its metadata says {PREFIX}{PRECISION_KEY} = {precision}"
    found = sorted({n.op_type for n in model.graph.node if n.op_type in _QUANT_OPS or n.op_type.startswith("QLinear")})
    if found:
        return f"it holds quantized operators ({', '.join(found)})"
    return None


def calibration_images(folder: Path, count: int,
                       image_ids: Iterable[int] | None = None) -> list[tuple[int | None, Path]]:
    """``[(image id, file)]`` of the calibration images: ``image_ids`` if given, else the first
    ``count`` by id. Raises :class:`DatasetError` for a folder without (readable) images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"calibration folder not found: {folder} (pass --calibration COCO_DIR)")
    entries = _coco_entries(folder)
    if entries is None:  # a plain folder of images: COCO file names are zero-padded ids
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        entries = {}
        for i, p in enumerate(files):
            entries[int(p.stem) if p.stem.isdigit() else -(i + 1)] = p
    entries = {i: p for i, p in entries.items() if p.is_file()}
    if not entries:
        raise DatasetError(f"calibration folder {folder} holds no images (expected a COCO folder with "
                           "annotations/instances_*.json and its images, or a folder of .jpg/.png files)")
    if image_ids is not None:
        wanted = sorted({int(i) for i in image_ids})
        missing = [i for i in wanted if i not in entries]
        if missing:
            raise DatasetError(f"calibration image id(s) not in {folder}: {missing[:10]}")
        return [(i, entries[i]) for i in wanted]
    if count <= 0:
        raise ConfigError(f"--images {count}: calibration needs at least one image")
    if count > len(entries):
        raise ConfigError(f"--images {count}: {folder} holds only {len(entries)} image(s)")
    return [(i if i >= 0 else None, entries[i]) for i in sorted(entries, key=lambda i: (i < 0, abs(i)))[:count]]


def _coco_entries(folder: Path) -> dict[int, Path] | None:
    ann_dir = folder / "annotations"
    files = sorted(ann_dir.glob("instances_*.json")) if ann_dir.is_dir() else []
    if not files:
        return None
    ann = files[0]
    split = ann.stem[len("instances_"):]
    try:
        with open(ann, encoding="utf-8") as fh:
            images = json.load(fh)["images"]
        images_dir = folder / split if (folder / split).is_dir() else folder / "images"
        return {int(img["id"]): images_dir / img["file_name"] for img in images}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{ann} is not a COCO instances file ({exc}); point --calibration at a COCO folder "
                           "or a folder of images") from exc


@dataclass(frozen=True)
class Int8Types:
    """The integer types a quantized file uses, and why: what suits this CPU's int8 kernels."""

    activation: str
    weight: str
    reduce_range: bool  # weights in 7 bits
    why: str


def cpu_int8_types() -> Int8Types:
    """What onnxruntime recommends for this CPU. Without VNNI, MLAS's u8s8 kernels use
    VPMADDUBSW, whose int16 pair sums saturate with 8-bit weights (255 * 127 * 2 > 32767):
    weights keep 7 bits there (``reduce_range``), which cannot saturate."""
    flags = _cpu_flags()
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if vnni:
        return Int8Types("uint8", "int8", False,
                         f"x86 CPU with {', '.join(vnni)}: uint8 activations, int8 weights, full range")
    return Int8Types("uint8", "int8", True, "x86 CPU without VNNI: uint8 activations, int8 weights in 7 bits "
                     "(reduce_range: VPMADDUBSW's int16 sums saturate with 8-bit weights)")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # no /proc (not Linux): no flag is known, and the choice records that
        return set()
    return set()


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Plan:
    """Which top-level nodes to quantize and which stay float (by name)."""

    quantize: list[str]
    keep_float: list[str]
    boundary: list[str]  # network nodes kept float because post-processing reads their output
    postprocess: list[str] = field(default_factory=list)


def plan(model, chain: bool = True, exclude: frozenset[str] = frozenset()) -> Plan:
    """Decide from the graph's structure what to quantize (see the module docstring).

    ``exclude``: learned layers kept float by choice; the chain ops that read only them stay
    float too (a chain op is quantized only when every data input comes from a quantized node),
    so a layer kept float is float up to the next quantized convolution."""
    graph = model.graph
    parts = graph_parts(graph)
    consts = {i.name for i in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    outputs = {o.name for o in graph.output}

    def read_by_postprocess(i: int) -> bool:
        for out in graph.node[i].output:
            if out in outputs or any(parts[c] != NETWORK for c in consumers.get(out, [])):
                return True
        return False

    quantized: set[int] = set()
    boundary: list[int] = []
    for i, node in enumerate(graph.node):  # graph order is topological
        if parts[i] != NETWORK:
            continue
        if node.op_type in LINEAR_OPS:
            if node.name in exclude:
                continue
            if len(node.input) > 1 and node.input[1] not in consts:
                continue  # weights computed at run time: nothing to pre-quantize
            if read_by_postprocess(i):
                boundary.append(i)
                continue
            quantized.add(i)
        elif chain and node.op_type in CHAIN_OPS:
            data = node.input[:1] if node.op_type in _DATA_INPUT_0 else node.input
            sources = [producer.get(n) for n in data if n and n not in consts]
            if not sources or any(s is None or s not in quantized for s in sources):
                continue
            if read_by_postprocess(i):
                boundary.append(i)
                continue
            quantized.add(i)
    names = [n.name for n in graph.node]
    return Plan(quantize=[names[i] for i in sorted(quantized)],
                keep_float=[names[i] for i, n in enumerate(graph.node)
                            if i not in quantized and n.op_type != "Constant"],
                boundary=[names[i] for i in boundary],
                postprocess=[names[i] for i in range(len(names)) if parts[i] != NETWORK])


def quantizable_layers(path) -> list[tuple[str, str]]:
    """``[(node name, op type)]`` of the learned layers (Conv/MatMul/Gemm) :func:`quantize_model`
    quantizes in the float model at ``path``, named as ``QuantizeSettings.exclude`` expects."""
    with tempfile.TemporaryDirectory(prefix="detbench-quant-") as tmp:
        model, _ = load_checked(path, load_weights=True)
        prepared = _optimize(model, Path(tmp) / "optimized.onnx")
    by_name = {n.name: n.op_type for n in prepared.graph.node}
    return [(n, by_name[n]) for n in plan(prepared).quantize if by_name[n] in LINEAR_OPS]


def layer_macs(path, names: Iterable[str]) -> dict[str, int]:
    """MACs per run of each node in ``names`` of the optimized graph :func:`quantizable_layers`
    names, counted by the analyzer at the file's input size (0 where a shape stays unresolved)."""
    from counting.analyzer import analyze
    from counting.shapes import static_shapes

    contract = read_contract(path)
    with tempfile.TemporaryDirectory(prefix="detbench-quant-") as tmp:
        model, _ = load_checked(path, load_weights=True)
        prepared = _optimize(model, Path(tmp) / "optimized.onnx")
    nodes, _, _ = analyze(prepared, static_shapes(prepared, contract.input_size, keep_weights=False))
    counted = {n.name: int(n.macs or 0) for n in nodes if n.status == "counted"}
    return {name: counted.get(name, 0) for name in names}


# --------------------------------------------------------------------------- quantization


def quantize_model(path, settings: QuantizeSettings | None = None,
                   progress: ProgressFn | None = None) -> QuantizeResult:
    """Quantize the float detector at ``path`` to INT8 (see the module docstring).

    Everything is checked before anything is written: the file must follow the contract
    and not already be quantized (:class:`ConfigError`), the calibration folder must hold
    images (:class:`DatasetError`), and onnxruntime must both quantize the graph and run
    the result (:class:`ExportError` naming the operator or the step otherwise). The file
    is written atomically through :func:`core.contract.save_model` (full onnx checker).
    """
    import onnx

    settings = settings or QuantizeSettings()
    say = progress or (lambda message: None)
    started = time.perf_counter()
    path = Path(path)
    if settings.method not in METHODS:
        raise ConfigError(f"--method {settings.method!r}: use one of {', '.join(METHODS)}")
    if settings.format not in FORMATS:
        raise ConfigError(f"--format {settings.format!r}: use one of {', '.join(FORMATS)}")
    contract = read_contract(path)
    # the same loader (and ContractError) as every other command: external data outside the
    # model's folder is refused there, never followed
    model, _ = load_checked(path, load_weights=True)
    why = is_quantized(model)
    if why:
        raise ConfigError(f"{path} is already quantized: {why}. Quantize the float32 export instead "
                          f"(`python cli.py export {contract.name.split('@')[0]}`).")
    out = Path(settings.out) if settings.out is not None else default_output(path)
    if out.resolve() == path.resolve():
        raise ConfigError(f"--out {out} is the float model itself: choose another file")
    calibration = Path(settings.calibration) if settings.calibration is not None else _default_calibration()
    chosen = calibration_images(calibration, settings.images, settings.image_ids)
    say(f"preparing {len(chosen)} calibration image(s) from {calibration}")
    tensors = [prepare_for(load_rgb(p), contract)[0] for _, p in chosen]
    source_sha = sha256_file(path)
    int8_types = cpu_int8_types()
    if settings.symmetric_activations:
        int8_types = replace(int8_types, activation="int8", why=int8_types.why + "; int8 symmetric activations asked for")
    act_name, weight_name, why_types = int8_types.activation, int8_types.weight, int8_types.why

    with tempfile.TemporaryDirectory(prefix="detbench-quant-") as tmp:
        say("optimizing the float graph (onnxruntime basic level: BatchNorm folded into Conv, constants folded)")
        prepared = _optimize(model, Path(tmp) / "optimized.onnx")
        del model
        chosen_plan = plan(prepared, chain=settings.chain)
        if settings.exclude:
            unknown = sorted(set(settings.exclude) - set(chosen_plan.quantize))
            if unknown:
                raise ConfigError(f"nodes to keep float are not quantized nodes of {path}: {', '.join(unknown[:5])}")
            chosen_plan = plan(prepared, chain=settings.chain, exclude=frozenset(settings.exclude))
        if not chosen_plan.quantize:
            raise ExportError(f"{path}: the network holds no Conv/MatMul/Gemm with constant weights outside the "
                              "nodes post-processing reads; there is nothing to quantize")
        say(f"calibrating ({settings.method}) and quantizing {len(chosen_plan.quantize)} node(s)")
        quant_path = Path(tmp) / "quantized.onnx"
        _quantize_static(prepared, quant_path, tensors, chosen_plan, settings, int8_types)
        quantized = onnx.load(str(quant_path))
        _restore_float_inputs(quantized, set(chosen_plan.postprocess))
        onnx.save_model(quantized, str(quant_path))
        say("checking that the quantized model runs")
        _smoke_test(quant_path, tensors[0], path, _opset(prepared))

    float_nodes = chosen_plan.keep_float
    ids = sorted(i for i, _ in chosen if i is not None)
    files = [p.name for _, p in chosen]
    extra = {k: v for k, v in contract.extra.items() if not k.startswith("quantization")}
    extra.update({
        PRECISION_KEY: "int8",
        "quantized_from": contract.name,
        "quantized_from_sha256": source_sha,
        "quantization_method": settings.method,
        "quantization_format": settings.format,
        "quantization_per_channel": str(settings.per_channel).lower(),
        "quantization_chain": str(settings.chain).lower(),
        "quantization_activation_type": act_name,
        "quantization_weight_type": weight_name,
        "quantization_reduce_range": str(int8_types.reduce_range).lower(),
        "quantization_types_why": why_types,
        "quantization_tool": f"onnxruntime.quantization {_ort_version()} quantize_static",
        "calibration_images": str(len(chosen)),
        CALIBRATION_IDS_KEY: json.dumps(ids),
        SELECTION_IDS_KEY: json.dumps(sorted(int(i) for i in settings.selection_ids or ())),
        "kept_float_by_accuracy": json.dumps(sorted(settings.exclude)),
        "calibration_files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        "float_nodes": json.dumps(float_nodes),
    })
    if settings.method == "percentile":
        extra["quantization_percentile"] = str(settings.percentile)
    extra.update(dict(settings.metadata))
    new_contract = ModelContract(**{**_fields(contract), "name": f"{contract.name}@int8", "extra": extra})
    say(f"writing {out}")
    save_model(quantized, out, new_contract)
    return QuantizeResult(
        path=out, contract=new_contract, source=path, source_sha256=source_sha, calibration_ids=ids,
        calibration_files=files, quantized_nodes=chosen_plan.quantize, float_nodes=float_nodes,
        activation_type=act_name, weight_type=weight_name, seconds=time.perf_counter() - started,
        settings={"method": settings.method, "images": len(chosen), "per_channel": settings.per_channel,
                  "format": settings.format, "chain": settings.chain, "calibration": str(calibration)})


def _default_calibration() -> Path:
    from core.paths import data_dir

    return data_dir() / "coco-val2017-subset"


def _fields(contract: ModelContract) -> dict:
    import dataclasses

    return {f.name: getattr(contract, f.name) for f in dataclasses.fields(contract)}


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _optimize(model, target: Path):
    """The graph after onnxruntime's basic (ONNX-only, semantics-preserving) optimizations.

    Folding BatchNorm into the convolution before quantizing matters: otherwise the Conv
    output would be quantized before BN rescales it. ``quant_pre_process`` is not used: its
    symbolic shape inference fails on NonMaxSuppression's data-dependent shapes.
    """
    import onnx
    try:
        cpu_session(model, basic_optimization_into=target)
    except Exception as exc:  # onnxruntime raises its own exception classes
        raise ExportError(f"onnxruntime cannot load the float model to optimize it before quantization: {exc}") from exc
    optimized = onnx.load(str(target))
    used = set()
    for i, node in enumerate(optimized.graph.node):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_q{i}"
        used.add(node.name)
    try:
        optimized = onnx.shape_inference.infer_shapes(optimized)
    except Exception:  # shapes only help the quantizer; a graph it cannot infer is still quantized
        logging.getLogger(__name__).debug("shape inference failed before quantization", exc_info=True)
    return optimized


def _calibration_chunk(model) -> int:
    """Images per calibration chunk: the budget over one image's float intermediate tensors
    (those whose shapes static inference resolves; the rest of a two-stage detector is small
    next to its backbone)."""
    import onnx

    per_image = 0
    for vi in model.graph.value_info:
        t = vi.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if t.elem_type == onnx.TensorProto.FLOAT and dims and all(d > 0 for d in dims):
            per_image += 4 * int(np.prod(dims, dtype=np.int64))
    return max(1, _CALIBRATION_BUDGET // max(per_image, 1))


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared tensors."""

    def __init__(self, tensors: list[np.ndarray]):
        self.tensors = tensors
        self.index = 0

    def get_next(self):
        if self.index >= len(self.tensors):
            return None
        self.index += 1
        return {INPUT_NAME: self.tensors[self.index - 1]}

    def rewind(self):
        self.index = 0

    def __len__(self):
        return len(self.tensors)

    def set_range(self, start_index: int, end_index: int):
        self.tensors = self.tensors[start_index:end_index]
        self.index = 0


def _quantize_static(model, target: Path, tensors, chosen: Plan, settings: QuantizeSettings,
                     int8_types: Int8Types) -> None:
    """Calibrate, then quantize with onnxruntime.

    Calibration runs through ``create_calibrator`` rather than inside ``quantize_static``,
    whose own call cannot set the histogram options: its entropy calibration keeps 128
    bins for 128 quantized bins, so the only candidate threshold is the full range (it
    degenerates to MinMax), and its percentile calibration forces symmetric ranges. The
    ranges reach ``quantize_static`` through its calibration cache file.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    calib_options = {
        "minmax": {},
        # TensorRT's entropy calibration: 2048-bin histograms, thresholds over 128 quantized bins
        "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
        "percentile": {"num_bins": 2048, "percentile": settings.percentile, "symmetric": False},
    }[settings.method]
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    by_name = {n.name: n for n in model.graph.node}
    op_types = sorted({by_name[n].op_type for n in chosen.quantize})
    recipe = _StaticRecipe(
        quant_format=QuantFormat.QDQ if settings.format == "qdq" else QuantFormat.QOperator, op_types=op_types,
        nodes=tuple(chosen.quantize), per_channel=settings.per_channel, reduce_range=int8_types.reduce_range,
        activation_type=types[int8_types.activation], weight_type=types[int8_types.weight],
        method=methods[settings.method],
        extra={"ActivationSymmetric": settings.symmetric_activations, "WeightSymmetric": settings.symmetric_weights})
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # the quantizer logs advice through the root logger
    step = "calibration"
    try:
        model_path = target.with_name("prepared.onnx")
        onnx.save_model(model, str(model_path))
        cache = Path(settings.ranges_cache) if settings.ranges_cache is not None else target.with_name("ranges.json")
        if settings.ranges_cache is not None and cache.is_file():
            step = "quantization"
            _quantize_with_ranges(model_path, target, cache, recipe)
            return
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(target.with_name("aug.onnx")),
                                           calibrate_method=methods[settings.method], extra_options=calib_options)
            # every intermediate tensor of every image is held until collected (GBs per image for
            # an 800x1024 Mask R-CNN): images go in chunks that fit a memory budget. Ranges and
            # histograms merge across chunks, but a histogram's bins are laid out by the first
            # chunk, so one chunk (all images) is preferred when it fits.
            chunk = _calibration_chunk(model)
            for start in range(0, len(tensors), chunk):
                calibrator.collect_data(_Reader(tensors[start:start + chunk]))
            ranges = calibrator.compute_data()
        if not isinstance(ranges, TensorsData):
            raise ExportError(f"calibration returned {type(ranges).__name__}, not tensor ranges")
        del calibrator
        save_tensors_data(ranges, cache)
        step = "quantization"
        _quantize_with_ranges(model_path, target, cache, recipe)
    except ExportError:
        raise
    except Exception as exc:  # the quantizer raises ValueError, RuntimeError, KeyError, onnx errors...
        raise ExportError(f"onnxruntime.quantization failed during {step} ({type(exc).__name__}: {exc}); "
                          f"operators selected for quantization: {', '.join(op_types)}") from exc
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class _StaticRecipe:
    """What ``quantize_static`` is told besides the files: the same whether the ranges were just
    calibrated or read from a ranges cache."""

    quant_format: object  # onnxruntime.quantization.QuantFormat
    op_types: list[str]
    nodes: tuple[str, ...]
    per_channel: bool
    reduce_range: bool
    activation_type: object  # onnxruntime.quantization.QuantType
    weight_type: object
    method: object  # onnxruntime.quantization.CalibrationMethod
    extra: dict


def _quantize_with_ranges(model_path: Path, target: Path, cache: Path, recipe: _StaticRecipe) -> None:
    from onnxruntime.quantization import quantize_static

    quantize_static(
        str(model_path), str(target), None,
        quant_format=recipe.quant_format,
        op_types_to_quantize=recipe.op_types, nodes_to_quantize=list(recipe.nodes),
        per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
        activation_type=recipe.activation_type, weight_type=recipe.weight_type,
        calibrate_method=recipe.method, extra_options=recipe.extra, calibration_cache_path=str(cache),
    )


def _restore_float_inputs(model, postprocess: set[str]) -> int:
    """Point post-processing nodes back at the float tensors the quantizer rounded for them.

    A tensor that a quantized node reads gets one Quantize/DequantizeLinear pair, and the
    quantizer hands the dequantized copy to *every* reader, post-processing included (e.g. an
    FPN level that both a quantized RPN convolution and RoiAlign read). Post-processing must
    see the float value: ``DequantizeLinear(QuantizeLinear(x))`` inputs of those nodes become
    ``x`` again. Returns how many inputs were rewired.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for node in model.graph.node:
        if node.name not in postprocess:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a weight stored as int8: there is no float tensor to go back to
            node.input[k] = q.input[0]
            rewired += 1
    if rewired:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        while dead:  # pairs nobody reads any more
            for n in dead:
                model.graph.node.remove(n)
            used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
            dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                    and not any(o in used for o in n.output)]
    return rewired


def _smoke_test(path: Path, tensor: np.ndarray, source: Path, opset: int) -> None:
    hint = "" if opset >= 13 else (
        f" (the float model uses opset {opset}: per-channel Quantize/DequantizeLinear need opset 13, and operators "
        "deprecated since, such as Upsample, cannot be quantized; re-export it at opset 13 or later)")

    try:
        session = cpu_session(path)
        outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: tensor})
    except Exception as exc:
        raise ExportError(f"the INT8 model quantized from {source} does not run on onnxruntime CPU, so it was not "
                          f"written: {exc}{hint}") from exc
    boxes, scores, labels = outputs[:3]
    if boxes.dtype != np.float32 or scores.dtype != np.float32 or labels.dtype != np.int64:
        raise ExportError(f"the INT8 model quantized from {source} changed output types "
                          f"(boxes {boxes.dtype}, scores {scores.dtype}, labels {labels.dtype})")
