"""``litert``: Google's LiteRT (TensorFlow Lite) interpreter with XNNPACK, float32, on a model converted by onnx2tf.

The converter, ``onnx2tf`` 1.29, pins tensorflow 2.19, onnx 1.19, onnxruntime 1.23 and numpy 1.26,
none of which can share detbench's environment; it lives in a venv of its own under the cache
folder (``<cache>/litert/onnx2tf-<version>/``), created once from the pinned list beside this
file by ``python cli.py backends --setup litert`` (:meth:`LiteRtBackend.setup`; the only step that
needs the package registry). Conversions run in that venv as a child process (a converter crash
is a per-model failure), offline: the child gets an unreachable proxy, and the ``images`` input is
kept NCHW (``-k images``), which is also what stops onnx2tf from fetching its calibration sample
(it does so only for inputs that look like NHWC images). Artifacts are cached
(:mod:`runtime.backends.convert`).

The whole graph is converted first: onnx2tf turns NonMaxSuppression into TFLite's, and with
``-onwdt`` its output has as many rows as detections (without it, always ``max_detections`` rows,
the padding scored near 0, which parity and mAP would count as detections). Where the whole graph
does not convert, or its converted model does not load, the network part runs on LiteRT and the
post-processing on onnxruntime CPU (:mod:`runtime.backends.split`). onnx2tf makes tensors
channel-last: the network part's outputs are put back in ONNX's layout, each one's layout decided
at open by comparing with onnxruntime CPU on one input (a shape alone is ambiguous when two
dimensions are equal).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.contract import INPUT_NAME
from core.errors import ConfigError, ProviderUnavailableError
from core.files import write_text_atomic
from core.paths import cache_dir, results_dir
from runtime.backends.base import Backend, BackendSettings, Capabilities, Runner, RunnerInfo, native_output_captured
from runtime.backends.convert import ConversionFailed, converted, first_reason, probe_conversion

ONNX2TF_VERSION = "1.29.24"
REQUIREMENTS = Path(__file__).with_name("onnx2tf-requirements.txt")
READY = "detbench-ready.json"  # written last: a venv without it is an interrupted creation
SETUP_HINT = "`python cli.py backends --setup litert` creates it (once, from the package registry: about 2.6 GB, minutes)"
# onnx2tf reads these before converting; an unreachable proxy makes any download fail at once
_OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def converter_env() -> Path:
    """The onnx2tf venv's folder (whether or not it exists): ``$DETBENCH_LITERT_VENV``, else under the cache."""
    value = os.environ.get("DETBENCH_LITERT_VENV")
    return Path(value).expanduser().resolve() if value else cache_dir() / "litert" / f"onnx2tf-{ONNX2TF_VERSION}"


def converter_python() -> Path | None:
    """The venv's interpreter when the venv was created completely, else None."""
    env = converter_env()
    python = env / "bin" / "python"
    return python if (env / READY).is_file() and python.exists() else None


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def create_converter_env(progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Create the onnx2tf venv from the pinned list (a no-op when it is there); what was made:
    folder, seconds, size in MB. Raises ConfigError with pip's last lines when the install fails."""
    say = progress or (lambda _msg: None)
    env = converter_env()
    ready = env / READY
    if ready.is_file():
        return json.loads(ready.read_text(encoding="utf-8"))
    shutil.rmtree(env, ignore_errors=True)  # a creation that was interrupted
    env.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    say(f"litert: creating the converter venv {env}")
    steps = [([sys.executable, "-m", "venv", str(env)], "python -m venv"),
             ([str(env / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
               "-r", str(REQUIREMENTS)], f"pip install onnx2tf {ONNX2TF_VERSION} and its pins (about 2.6 GB)")]
    for command, what in steps:
        say(f"litert: {what}")
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(env, ignore_errors=True)
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
            raise ConfigError(f"litert: {what} failed (exit {proc.returncode}): {tail}")
    info = {"folder": str(env), "onnx2tf": ONNX2TF_VERSION, "seconds": round(time.perf_counter() - start, 1),
            "size_mb": round(_folder_mb(env), 1), "requirements": str(REQUIREMENTS)}
    write_text_atomic(ready, json.dumps(info, indent=1))
    return info


def _litert_version() -> str:
    return importlib.metadata.version("ai-edge-litert")


def _versions() -> str:
    return f"onnx2tf {ONNX2TF_VERSION}, ai-edge-litert {_litert_version()}"


def _input_rank(onnx_file: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    return {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input if i.name not in init}


def convert_onnx(onnx_file: Path, out: Path) -> dict:
    """onnx2tf in its venv, offline; leaves ``model.tflite`` (float32) in ``out``. ConversionFailed
    with the converter's reason."""
    python = converter_python()
    if python is None:
        raise ConversionFailed(f"the onnx2tf venv {converter_env()} is absent: {SETUP_HINT}")
    work = out / "onnx2tf"
    keep = [n for n, rank in _input_rank(onnx_file).items() if 3 <= rank <= 5]  # NCHW stays NCHW
    command = [str(python), "-m", "onnx2tf", "-i", str(onnx_file), "-o", str(work), "-onwdt", "-n"]
    if keep:
        command += ["-k", *keep]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(_OFFLINE, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=str(out), env=env)
    log = proc.stdout + proc.stderr
    produced = work / f"{onnx_file.stem}_float32.tflite"
    if proc.returncode != 0 or not produced.is_file():
        if proc.returncode < 0:  # onnx2tf holds several copies of the weights: 7 GB on yolov3-416 (248 MB)
            raise ConversionFailed(f"onnx2tf {ONNX2TF_VERSION} was killed by signal {-proc.returncode} while "
                                   f"converting {onnx_file.name} ({onnx_file.stat().st_size / 1e6:.0f} MB of ONNX)"
                                   + (": out of memory?" if proc.returncode == -9 else ""))
        raise ConversionFailed(f"onnx2tf {ONNX2TF_VERSION} failed on {onnx_file.name} (exit {proc.returncode}): "
                               f"{_failure(log)}")
    produced.rename(out / "model.tflite")
    # the SavedModel and the float16 model onnx2tf also writes are not what this backend runs
    shutil.rmtree(work)
    return {"command": " ".join(["onnx2tf", *command[3:]]).replace(str(onnx_file), onnx_file.name)
            .replace(str(work), "OUT")}


def _failure(log: str) -> str:
    """What onnx2tf's log says failed: the exception, the line of it that names the shapes or the
    operator (Keras puts it below a generic first line), and the ONNX node it was converting."""
    import re

    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines() if ln.strip()]
    first = first_reason("\n".join(lines), ("Error:", "error:", "not support", "Unsupported"))
    detail = ""
    if first in lines:
        after = lines[lines.index(first) + 1:lines.index(first) + 4]
        detail = next((ln for ln in after if not ln.startswith(("Call arguments", "•", "ERROR", "File "))), "")
    nodes = [ln.split("onnx_op_name:", 1)[1].strip() for ln in lines if "onnx_op_name:" in ln]
    return (first + (f" {detail[:200]}" if detail else "") + (f" (ONNX node {nodes[-1]})" if nodes else ""))[:500]


@dataclass(frozen=True)
class LiteRtSettings:
    """LiteRT's options: ``threads`` (None = 2, an explicit count as the other CPU runtimes get)
    and ``part`` (``auto``: whole graph, else the network part; ``network``: the network part only)."""

    threads: int | None = None
    part: str = "auto"

    @classmethod
    def of(cls, settings: BackendSettings) -> "LiteRtSettings":
        part = settings.provider_options.get("part", "auto")
        if part not in ("auto", "network"):
            raise ConfigError(f"--provider-option part={part!r}: use part=auto (whole graph where it converts) "
                              "or part=network")
        unknown = set(settings.provider_options) - {"part"}
        if unknown:
            raise ConfigError(f"--provider-option {', '.join(sorted(unknown))}: litert takes only part=auto|network")
        return cls(threads=settings.threads, part=part)


class LiteRtModel:
    """A converted .tflite on LiteRT's interpreter (XNNPACK delegate, float32): inputs -> outputs by the
    names of its serving signature (onnx2tf keeps the ONNX names there)."""

    def __init__(self, artifact: Path, threads: int | None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            with native_output_captured():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interpreter = Interpreter(model_path=str(artifact), num_threads=threads or 2)
                signature = self.interpreter.get_signature_runner()
                self.inputs = {n: d["index"] for n, d in signature.get_input_details().items()}
                self.outputs = {n: d["index"] for n, d in signature.get_output_details().items()}
                del signature  # allocate_tensors refuses while the runner holds the interpreter's tensors
                self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:  # e.g. a Flex (TensorFlow) op the interpreter lacks
            raise ConversionFailed(f"LiteRT cannot load the converted {artifact.name}: "
                                   f"{str(exc).strip().splitlines()[0][:300]}") from exc

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        interpreter = self.interpreter
        for name, value in inputs.items():
            interpreter.set_tensor(self.inputs[name], value)
        interpreter.invoke()
        # an output with no rows (no detection) cannot be read with get_tensor ("Invalid tensor size"):
        # its shape, from the details, is the answer
        details = {d["index"]: d for d in interpreter.get_output_details()}
        return {name: (interpreter.get_tensor(i) if all(details[i]["shape"])
                       else np.empty(tuple(details[i]["shape"]), details[i]["dtype"]))
                for name, i in self.outputs.items()}


class LiteRtRunner(Runner):
    """The whole contract graph on LiteRT."""

    def __init__(self, path: Path, model: LiteRtModel, info: RunnerInfo):
        super().__init__()
        self.path, self.model, self.info = Path(path), model, info

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.model(**{INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})


def _channel_first(value: np.ndarray) -> np.ndarray:
    """onnx2tf's channel-last tensor back in ONNX's channel-first layout (N, C, ...)."""
    return np.transpose(value, (0, value.ndim - 1, *range(1, value.ndim - 1)))


class LiteRtNetwork:
    """The network part on LiteRT, as a callable: images -> cut tensors by their ONNX names, in ONNX's layout.

    The cut tensors are renamed ``cut<i>`` before conversion (onnx2tf rewrites names with ``/`` or
    ``:``); each output's layout (as is, or channel-last to put back) is decided once against
    onnxruntime CPU on a deterministic input."""

    def __init__(self, model: LiteRtModel, cut: list[str], reference: bytes, input_shape: list[int]):
        from runtime.backends.onnxruntime import OrtSettings, create_session

        self.model, self.cut = model, cut
        missing = [f"cut{i}" for i in range(len(cut)) if f"cut{i}" not in model.outputs]
        if missing:
            raise ConversionFailed(f"the converted network part lacks outputs {', '.join(missing)}")
        x = (np.random.default_rng(0).random(input_shape) * 255).astype(np.float32)
        session, _ = create_session(reference, "cpu", OrtSettings(threads=1))
        want = dict(zip(cut, session.run(cut, {INPUT_NAME: x})))
        got = self.model(**{INPUT_NAME: x})
        self.layouts: dict[str, str] = {}
        for i, name in enumerate(cut):
            value, expected = got[f"cut{i}"], np.asarray(want[name])
            candidates = {"as is": value} if value.ndim < 3 else {"as is": value, "channel-last": _channel_first(value)}
            errors = {k: float(np.max(np.abs(v.astype(np.float64) - expected))) if v.shape == expected.shape
                      else float("inf") for k, v in candidates.items()}
            layout = min(errors, key=errors.get)
            if errors[layout] == float("inf"):
                raise ConversionFailed(f"the converted network part's {name!r} has shape {list(value.shape)}, "
                                       f"ONNX's is {list(expected.shape)} (in neither layout)")
            self.layouts[name] = layout

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        got = self.model(**{INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        return {name: (_channel_first(got[f"cut{i}"]) if self.layouts[name] == "channel-last" else got[f"cut{i}"])
                for i, name in enumerate(self.cut)}


def _whole_graph_check(path: Path, model: LiteRtModel) -> dict[str, Any]:
    """The converted whole graph's detections against onnxruntime CPU's on the busiest COCO image of the
    shared subset (random values where the subset is absent): ConversionFailed when they differ, so that
    the network part runs instead. onnx2tf can convert a graph into one that runs and computes other
    boxes (its channel-last rewriting of a Transpose feeding a Reshape); the network part's outputs are
    checked tensor by tensor, the whole graph only through its detections."""
    from core.contract import read_contract
    from core.errors import DetbenchError
    from runtime.backends.onnxruntime import OrtSettings, create_session
    from runtime.inputs import default_image, input_tensor, model_input_shape
    from runtime.parity import CONVERTED, compare

    contract = read_contract(path)
    try:
        image = default_image()
        x, source = input_tensor(contract, image, 1, model_input_shape(path), str(path)), image.name
    except DetbenchError:
        shape = [d if isinstance(d, int) else 1 for d in model_input_shape(path)]
        x, source = (np.random.default_rng(0).random(shape) * 255).astype(np.float32), "random values"
    session, _ = create_session(path, "cpu", OrtSettings(threads=1))
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT_NAME: x})))
    got = model(**{INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
    missing = sorted(set(want) - set(got))
    if missing:
        raise ConversionFailed(f"the converted whole graph lacks outputs {', '.join(missing)}")
    figures = compare(want, got, CONVERTED, iou_threshold=contract.iou_threshold,
                      max_detections=contract.max_detections, score_threshold=contract.score_threshold)
    # stricter than the parity gate, which lets a detection at a decision boundary go unpaired: here the
    # cost of doubt is only running the network part instead
    if not figures["ok"] or figures["matched"] != figures["reference"]:
        why = "; ".join(figures["reasons"][:2]) or f"{figures['matched']} of {figures['reference']} detections paired"
        raise ConversionFailed(f"the converted whole graph disagrees with onnxruntime CPU on {source}: {why}")
    return {"input": source, "detections": figures["reference"], "matched": figures["matched"]}


def _renamed_network(network: bytes, cut: list[str]) -> bytes:
    """The network part with its outputs renamed ``cut<i>`` (through Identity nodes)."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(network)
    graph = model.graph
    outputs = list(graph.output)
    del graph.output[:]
    for i, (name, value) in enumerate(zip(cut, outputs)):
        graph.node.append(helper.make_node("Identity", [name], [f"cut{i}"], name=f"detbench_cut{i}"))
        renamed = onnx.ValueInfoProto()
        renamed.CopyFrom(value)
        renamed.name = f"cut{i}"
        graph.output.append(renamed)
    return model.SerializeToString()


class LiteRtBackend(Backend):
    def __init__(self, name: str, description: str):
        super().__init__()
        self.name, self.description = name, description
        # postprocess=False: the whole graph runs on LiteRT where it converts, otherwise the network part
        # does (runner.part_samples() says which); XNNPACK's threads spin between runs
        self.capabilities = Capabilities(postprocess=False, converts=True, passive_wait=False)

    def setup(self, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        info = create_converter_env(progress)
        self._probed = None
        return info

    def _probe(self) -> tuple[bool, str]:
        try:
            from ai_edge_litert.interpreter import Interpreter  # noqa: F401
        except ImportError as exc:
            return False, f"ai-edge-litert is not installed ({exc}); `pip install -e .` installs it (ai-edge-litert==2.3.0)"
        if converter_python() is None:
            return False, (f"its converter, onnx2tf, needs a venv of its own (it pins tensorflow 2.19, onnx 1.19, numpy "
                           f"1.26), which is absent ({converter_env()}): {SETUP_HINT}")
        # converted once into the results' cache (about 10 s of TensorFlow start-up), not at every probe
        return probe_conversion(self.name, "onnx2tf", _versions(), convert_onnx,
                                lambda folder, x: LiteRtModel(folder / "model.tflite", 1)(x=x)["y"],
                                f"LiteRT {_litert_version()} with onnx2tf {ONNX2TF_VERSION}",
                                root=results_dir() / "converted")

    def open(self, path: Path, settings: BackendSettings) -> Runner:
        from runtime.backends.split import SplitRunner, split_model

        own = LiteRtSettings.of(settings)
        if converter_python() is None:
            raise ProviderUnavailableError(f"litert: the onnx2tf venv is absent: {SETUP_HINT}")
        whole_failure = ""
        if own.part == "auto":
            try:
                conv = converted(self.name, Path(path).read_bytes(), "onnx2tf", _versions(), {"part": "whole"},
                                 convert_onnx)
                start = time.perf_counter()
                model = LiteRtModel(Path(conv.artifact) / "model.tflite", own.threads)
                seconds = time.perf_counter() - start
                check = _whole_graph_check(Path(path), model)
                info = self._info(seconds, own, conv.to_dict(), "whole graph on LiteRT (NonMaxSuppression included)")
                info.detail["whole_graph_check"] = check
                return LiteRtRunner(path, model, info)
            except ConversionFailed as exc:
                whole_failure = str(exc)
        try:
            split = split_model(Path(path))
            conv = converted(self.name, _renamed_network(split.network, split.cut), "onnx2tf", _versions(),
                             {"part": "network"}, convert_onnx)
            start = time.perf_counter()
            network = LiteRtNetwork(LiteRtModel(Path(conv.artifact) / "model.tflite", own.threads), split.cut,
                                    split.network, split.input_shape)
        except ConversionFailed as exc:
            raise ConversionFailed(f"whole graph: {whole_failure}; network part: {exc}" if whole_failure
                                   else str(exc)) from exc
        info = self._info(time.perf_counter() - start, own, conv.to_dict(),
                          "network part on LiteRT, post-processing on onnxruntime CPU")
        info.detail["layouts"] = network.layouts
        if whole_failure:
            info.detail["whole_graph_failure"] = whole_failure
        return SplitRunner(path, split, network, info, settings)

    def _info(self, seconds: float, own: LiteRtSettings, conversion: dict, part: str) -> RunnerInfo:
        return RunnerInfo(backend=self.name, library="ai-edge-litert", version=_litert_version(), device="cpu",
                          precision="f32", threads=own.threads or 2, load_seconds=seconds,
                          detail={"conversion": conversion, "settings": own.__dict__, "part": part,
                                  "delegate": "XNNPACK (the interpreter's default CPU delegate)"})
