"""The exported-model contract: what every detbench ONNX file carries.

An exported detector has

- one input ``images``: float32 ``[N, 3, H, W]``, RGB, values 0..255, already resized
  by the caller as ``resize`` says (normalisation is inside the graph);
- outputs ``boxes`` float32 ``[K, 4]`` as (x1, y1, x2, y2) in input-tensor pixels,
  ``scores`` float32 ``[K]``, ``labels`` int64 ``[K]`` in ``label_space``
  (Mask R-CNN adds ``masks``); NMS is inside the graph;
- ``metadata_props`` under ``detbench.`` describing how to feed it and where it came from.

``N`` is 1 unless the file says ``detbench.batch = symbolic`` (``export NAME --batch``, where the
exporter can build it): then the ``images`` input's first dimension is symbolic, NMS and the
``max_detections`` cap apply to each image on its own (a box of image i never suppresses one
of image j), and an extra output ``batch_index`` int64 ``[K]`` says which image of the batch
each detection belongs to; the detections of image i, in order, are those of the batch-1 file
on that image alone.

Everything needed to run, evaluate or profile the file is read from the file itself
(:func:`read_contract`); models.toml is not consulted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ContractError, ExportError, WriteError
from core.files import atomic_path
from core.names import NAME_RULE, name_problem

PREFIX = "detbench."
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels")
RESIZE_MODES = ("letterbox", "stretch")
LABEL_SPACES = ("coco80", "coco91", "names")
COCO_LABEL_SPACES = ("coco80", "coco91")  # what exporters without class names (registry, SavedModel) can declare
# label_space "names": labels index the model's own class names, carried as a JSON list under this key.
LABELS_KEY = "labels"
RANDOM_INIT = "random-init"
# A file with a symbolic batch axis says so under this key, and carries the image of each detection.
BATCH_KEY = "batch"
BATCH_SYMBOLIC = "symbolic"
BATCH_INDEX_OUTPUT = "batch_index"

# onnxruntime(-gpu) 1.31 loads IR <= 13 while onnx 1.23 writes 14 by default. IR 10
# (onnx 1.16) covers every opset the exporters use and loads in every runtime we pin.
IR_VERSION = 10
# Every exporter targets the same default opset so graphs are comparable op for op.
DEFAULT_OPSET = 17


# What to do about a file without (complete) detbench metadata. Each remedy is named with
# the command that has it, so no command suggests an option it does not take.
MISSING_METADATA_HINT = (
    "Re-export it with `python cli.py export NAME`; a detector exported elsewhere can be wrapped into a "
    "contract file with `python cli.py export --onnx FILE --describe FILE.toml`, or evaluated as it is by "
    "describing it: `python cli.py eval FILE --input-size HxW --resize letterbox|stretch "
    "--label-space coco80|coco91`.")


@dataclass(frozen=True)
class ModelContract:
    """The ``detbench.*`` metadata of an exported detector.

    ``input_height``/``input_width`` are the tensor size the graph expects;
    ``resize`` says how an image is brought to it (``letterbox``: aspect kept, centred,
    padded with ``pad_value``; ``stretch``: both axes scaled independently);
    ``label_space`` says what ``labels`` means (``coco80``: 0..79 contiguous;
    ``coco91``: COCO category ids 1..90; ``names``: 0..N-1 into the model's own class names,
    ``extra["labels"]``, a JSON list); ``weights`` is ``sha256:<hex>`` or ``random-init``.
    """

    name: str
    family: str
    framework: str
    input_height: int
    input_width: int
    resize: str
    label_space: str
    score_threshold: float
    iou_threshold: float
    max_detections: int
    weights: str
    source_params: int
    pad_value: float = 127.5
    extra: dict[str, str] = field(default_factory=dict)

    REQUIRED = (
        "name", "family", "framework", "input_height", "input_width", "resize", "label_space",
        "score_threshold", "iou_threshold", "max_detections", "weights", "source_params",
    )

    @property
    def random_init(self) -> bool:
        return self.weights == RANDOM_INIT

    @property
    def labels(self) -> list[str] | None:
        """The model's own class names (label space ``names``), else ``None``."""
        raw = self.extra.get(LABELS_KEY)
        if raw is None:
            return None
        return json.loads(raw) if isinstance(raw, str) else list(raw)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.input_height, self.input_width)

    @property
    def batch_symbolic(self) -> bool:
        """Whether the file takes N > 1 images per call (``detbench.batch = symbolic``, output ``batch_index``)."""
        return self.extra.get(BATCH_KEY) == BATCH_SYMBOLIC

    def to_props(self) -> dict[str, str]:
        props = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            props[PREFIX + f.name] = str(getattr(self, f.name))
        for key, value in self.extra.items():
            props[PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "<model>", hint: str | None = None) -> "ModelContract":
        """The contract in ``props``; ``hint`` replaces :data:`MISSING_METADATA_HINT` when keys are missing
        (a command names the options it really has)."""
        ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        missing = [k for k in cls.REQUIRED if k not in ours]
        if missing:
            raise ContractError(
                f"{source} lacks detbench metadata keys: {', '.join(PREFIX + k for k in missing)}. "
                + (hint or MISSING_METADATA_HINT))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                if f.name == "extra" or f.name not in ours:
                    continue
                raw = ours[f.name]
                kwargs[f.name] = int(raw) if f.type in ("int", int) else float(raw) if f.type in ("float", float) else raw
        except ValueError as exc:
            raise ContractError(f"{source}: malformed detbench metadata value ({exc})") from exc
        kwargs["extra"] = {k: v for k, v in ours.items() if k not in known}
        contract = cls(**kwargs)
        contract.check(source)
        return contract

    def check(self, source: str = "<model>") -> None:
        problem = name_problem(self.name)  # commands derive file names from it (NAME@int8, caches, weights)
        if problem is not None:
            raise ContractError(f"{source}: name {self.name!r} {problem}; {NAME_RULE}")
        for key in ("score_threshold", "iou_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:  # NaN too
                raise ContractError(f"{source}: {key} {getattr(self, key)} is not a number in 0..1")
        if self.resize not in RESIZE_MODES:
            raise ContractError(f"{source}: resize {self.resize!r} is not one of {RESIZE_MODES}")
        if self.label_space not in LABEL_SPACES:
            raise ContractError(f"{source}: label_space {self.label_space!r} is not one of {LABEL_SPACES}")
        if self.label_space == "names":
            problem = labels_problem(self.extra.get(LABELS_KEY))
            if problem:
                raise ContractError(f"{source}: label_space 'names' needs {PREFIX}{LABELS_KEY}, a JSON list of class "
                                    f"names: {problem}")
        if self.input_height <= 0 or self.input_width <= 0:
            raise ContractError(f"{source}: input size {self.input_height}x{self.input_width} is not positive")
        if not (self.weights == RANDOM_INIT or self.weights.startswith("sha256:")):
            raise ContractError(f"{source}: weights must be 'sha256:<hex>' or {RANDOM_INIT!r}, got {self.weights!r}")
        if BATCH_KEY in self.extra and self.extra[BATCH_KEY] != BATCH_SYMBOLIC:
            raise ContractError(f"{source}: {PREFIX}{BATCH_KEY} {self.extra[BATCH_KEY]!r}: the only value is "
                                f"{BATCH_SYMBOLIC!r} (a batch-1 file has no such key)")


def labels_problem(raw) -> str | None:
    """What is wrong with a ``labels`` metadata value (JSON text or list), or ``None``."""
    if raw is None:
        return "missing"
    try:
        names = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc})"
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)):
        return f"must be a non-empty list of non-empty strings, got {str(raw)[:60]!r}"
    return None


def read_names_file(path, option: str = "--labels") -> list[str]:
    """Class names from a names file (one per line, as Darknet's ``coco.names``; blank lines ignored)."""
    from core.errors import ConfigError

    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option} {path}: cannot be read ({exc})") from exc
    if not names:
        raise ConfigError(f"{option} {path}: holds no class names (one per line)")
    return names


def weights_tag(path: Path | None) -> str:
    """The metadata value for a weights file: ``sha256:<hex>``, or ``random-init`` for none."""
    return RANDOM_INIT if path is None else "sha256:" + sha256_file(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def attach(model, contract: ModelContract) -> None:
    """Write the contract into ``model.metadata_props`` (replacing older detbench keys)."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in contract.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def check_io(model, source: str = "<model>") -> list[str]:
    """Problems with the graph's inputs/outputs against the contract (empty list = fine)."""
    problems = []
    inputs = [i.name for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
    if inputs != [INPUT_NAME]:
        problems.append(f"{source}: inputs are {inputs}, the contract wants exactly [{INPUT_NAME!r}]")
    outputs = [o.name for o in model.graph.output]
    if tuple(outputs[:3]) != OUTPUT_NAMES:
        problems.append(f"{source}: outputs are {outputs}, the contract wants {list(OUTPUT_NAMES)} first")
    batch = next((p.value for p in model.metadata_props if p.key == PREFIX + BATCH_KEY), None)
    if batch == BATCH_SYMBOLIC:
        # without the image of each detection, N images' detections could not be told apart
        if BATCH_INDEX_OUTPUT not in outputs:
            problems.append(f"{source}: {PREFIX}{BATCH_KEY} = {BATCH_SYMBOLIC} but no output {BATCH_INDEX_OUTPUT!r} "
                            "says which image each detection belongs to")
        dims = next((list(i.type.tensor_type.shape.dim) for i in model.graph.input if i.name == INPUT_NAME), [])
        if dims and dims[0].HasField("dim_value"):
            problems.append(f"{source}: {PREFIX}{BATCH_KEY} = {BATCH_SYMBOLIC} but input {INPUT_NAME!r} has a fixed "
                            f"batch of {dims[0].dim_value}")
    return problems


def save_model(model, path: Path, contract: ModelContract) -> Path:
    """Attach the contract, pin the IR version, run the full checker and write atomically.

    Raises :class:`ExportError` listing every contract or checker problem; a file is
    only ever written under ``path`` once it passed.
    """
    import onnx

    path = Path(path)
    attach(model, contract)
    model.ir_version = IR_VERSION
    problems = check_io(model, str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # the checker raises several unrelated types
        problems.append(f"onnx.checker (full check) failed: {exc}")
    if problems:
        raise ExportError(f"export of {contract.name!r} is not a valid detbench model:\n  - " + "\n  - ".join(problems))
    try:
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
    except OSError as exc:
        raise WriteError(path, exc) from exc
    return path


def read_contract(path_or_model, overrides: dict[str, str] | None = None, *,
                  hint: str | None = None) -> ModelContract:
    """The contract of an ONNX file (path or loaded ModelProto), checked before anything uses the file.

    The one check every command shares: the file must load, its graph inputs/outputs must
    be the contract's (:func:`check_io`) and its metadata complete and valid. Raises
    :class:`ContractError` naming the file and what is wrong. ``overrides`` (keys without
    the prefix) supply or replace metadata for files exported elsewhere; ``hint`` is what
    the message advises when metadata is missing (default :data:`MISSING_METADATA_HINT`),
    so that a command only ever suggests options it has.
    """
    model, source = load_checked(path_or_model)
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in (overrides or {}).items():
        props[PREFIX + key] = str(value)
    return ModelContract.from_props(props, source, hint=hint)


def check_file(path) -> Path:
    """``path`` as a Path if it is a non-empty file; :class:`ContractError` saying what it is instead.

    Cheap (no parsing): for commands that read the graph themselves, such as ``profile``.
    """
    path = Path(path)
    if path.is_dir():
        raise ContractError(f"{path} is a directory, not an ONNX file: pass the .onnx file itself")
    if not path.is_file():
        raise ContractError(f"no ONNX file at {path}: check the path (exports are written to "
                            "results/onnx/NAME.onnx by `python cli.py export NAME`)")
    if path.stat().st_size == 0:
        raise ContractError(f"{path} is empty (0 bytes), not an ONNX file: re-export or re-copy it")
    return path


def load_checked(path_or_model, *, load_weights: bool = False):
    """``(model, source)``: the ONNX file loaded and its inputs/outputs checked against the contract.

    Raises :class:`ContractError` for a missing path, a directory, a file that is not
    ONNX, or a graph whose inputs/outputs are not the contract's.
    """
    import onnx

    if isinstance(path_or_model, (str, Path)):
        source = str(path_or_model)
        check_file(source)
        try:
            model = onnx.load(source, load_external_data=load_weights)
        except Exception as exc:  # protobuf DecodeError, OSError, onnx's own errors
            raise ContractError(f"{source} is not a readable ONNX file: {exc}") from exc
    else:
        model, source = path_or_model, "<model>"
    problems = check_io(model, source)
    if problems:
        raise ContractError("; ".join(problems) + ". detbench runs files that follow its contract "
                            "(written by `python cli.py export`); rename the graph's input/outputs "
                            "or re-export the model.")
    return model, source
