"""Writing files so that a reader never sees a half-written one: every writer of the project
goes through :func:`atomic_file` (or :func:`atomic_path` for libraries that take a file name)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from core.errors import WriteError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file name beside ``path`` for the block to write; renamed onto ``path`` when the
    block ends without an exception (after an fsync), removed otherwise. ``OSError`` propagates:
    callers name the file in their own error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """:func:`atomic_path` opened in ``mode`` for the block (``open``'s keyword arguments apply)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh
        fh.flush()


def write_text_atomic(path: Path, text: str, *, newline: str | None = None) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    try:
        with atomic_file(path, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)
    except OSError as exc:
        raise WriteError(Path(path), exc) from exc
    return Path(path)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """:func:`write_text_atomic` for bytes (downloads, model files produced elsewhere)."""
    try:
        with atomic_file(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise WriteError(Path(path), exc) from exc
    return Path(path)
