"""Names users give models (models.toml entries, describe files, command options), and the
files named after them.

A name becomes part of file names (``results/onnx/NAME.onnx``, ``NAME@int8.onnx``,
``NAME-320x320.onnx``), so it is checked wherever it enters against one character set,
:data:`NAME_PATTERN`: a letter or digit, then letters, digits and ``. _ @ + -``; no path
separator, no ``..``, at most :data:`MAX_NAME_LENGTH` characters. :func:`file_in` is the one
place that turns a name into a path, and it checks the path stays in its folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from core.errors import ConfigError, DetbenchError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@+-]*"
MAX_NAME_LENGTH = 128
NAME_RULE = (f"names are 1 to {MAX_NAME_LENGTH} characters of {NAME_PATTERN} "
             "(letters, digits, '.', '_', '@', '+', '-'; first a letter or digit; no '..')")
_NAME = re.compile(NAME_PATTERN)


def name_problem(name) -> str | None:
    """Why ``name`` cannot be a model name, or None when it can."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters long"
    if not _NAME.fullmatch(name):
        bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._@+-]", c)})
        return f"holds {', '.join(repr(c) for c in bad)}" if bad else f"starts with {name[0]!r}"
    if ".." in name:
        return "holds '..'"
    return None


def check_name(name, where: str, error: type[DetbenchError] = ConfigError) -> str:
    """``name`` itself, or ``error`` naming ``where`` (file and key, or option) and the rule."""
    problem = name_problem(name)
    if problem is not None:
        raise error(f"{where}: name {name!r} {problem}; {NAME_RULE}")
    return name


def file_in(folder: Path, name: str, suffix: str = ".onnx", where: str = "name") -> Path:
    """``folder/<name><suffix>``, after checking ``name`` and that the path stays in ``folder``
    (compared lexically: a symlink the user placed in the folder is theirs to follow)."""
    check_name(name, where)
    folder = Path(folder)
    path = folder / f"{name}{suffix}"
    if Path(os.path.abspath(path)).parent != Path(os.path.abspath(folder)):
        raise ConfigError(f"{where}: {name!r} would name {path}, outside {folder}; {NAME_RULE}")
    return path
