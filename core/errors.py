"""Every error detbench raises on purpose.

Library code raises these and never prints or exits; ``cli.py`` maps each class
to an exit code (``DetbenchError.exit_code``). Messages name the model, the node
or file, and the option that fixes the problem.
"""

from __future__ import annotations


class DetbenchError(Exception):
    """Base class. ``exit_code`` is what ``cli.py`` exits with."""

    exit_code = 1


class RegistryError(DetbenchError):
    """models.toml is malformed, or a name/key is not in it."""

    exit_code = 2


class ConfigError(DetbenchError):
    """A command-line option or setting has a value that cannot be used."""

    exit_code = 2


class WeightsError(DetbenchError):
    """Weights are missing, corrupt (sha256 mismatch), truncated or do not fit the model."""

    exit_code = 3


class FetchError(WeightsError):
    """A download failed (HTTP error, connection, checksum)."""


class ModelDefinitionError(DetbenchError):
    """A model definition (e.g. a Darknet .cfg) is malformed or uses an unsupported layer/key."""

    exit_code = 3


class ExportError(DetbenchError):
    """Conversion from the source framework to ONNX failed."""

    exit_code = 4


class ValidationError(ExportError):
    """The exported ONNX graph does not reproduce its source model.

    ``mismatches`` holds every mismatch found, so they can be reported together.
    """

    def __init__(self, model: str, mismatches: list[str], fix: str | None = None):
        self.model = model
        self.mismatches = list(mismatches)
        lines = [f"export of {model!r} does not match its source model ({len(self.mismatches)} mismatch(es)):"]
        lines += [f"  - {m}" for m in self.mismatches]
        if fix:
            lines.append(fix)
        super().__init__("\n".join(lines))


class WriteError(ExportError):
    """A file detbench makes could not be written (disk full, file-size limit, read-only folder).

    Names the file; nothing half-written is left under its name. The export exit code: for
    ``export`` and ``quantize`` the file written is the product of the command."""

    def __init__(self, path, exc: OSError, outcome: str = "nothing was written under that name"):
        self.path = path
        reason = exc.strerror or str(exc)
        super().__init__(f"cannot write {path}: {reason}; {outcome} (free disk space, raise the file-size limit "
                         "(ulimit -f) or choose another folder)")


class ContractError(DetbenchError):
    """An ONNX file does not follow the exported-model contract (inputs, outputs, metadata)."""

    exit_code = 5


class UnsupportedOperatorError(DetbenchError):
    """The analyzer met operators it has no counting rule for (``ops`` lists them)."""

    exit_code = 6

    def __init__(self, ops: dict[str, list[str]], model: str = ""):
        self.ops = ops
        where = f" in {model}" if model else ""
        listing = ", ".join(f"{op} ({len(nodes)} node(s), e.g. {nodes[0]!r})" for op, nodes in sorted(ops.items()))
        super().__init__(
            f"no counting rule for {len(ops)} operator type(s){where}: {listing}. "
            "Pass --allow-unknown to profile anyway (these nodes are then listed as uncounted)."
        )


class ProviderUnavailableError(DetbenchError):
    """An execution provider was requested but cannot run (or onnxruntime replaced it by CPU)."""

    exit_code = 7


class DatasetError(DetbenchError):
    """A dataset (COCO annotations, images, results file) is missing or malformed."""

    exit_code = 8


class ClusterLostError(DetbenchError):
    """A Ray cluster lost the nodes that could run the work; what was finished is kept (``--resume`` continues)."""

    exit_code = 9
