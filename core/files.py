"""Writing files so that a reader never sees a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.errors import WriteError


def write_text_atomic(path: Path, text: str, *, newline: str | None = None) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    return _write_atomic(path, "w", text, encoding="utf-8", newline=newline)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """:func:`write_text_atomic` for bytes (downloads, model files produced elsewhere)."""
    return _write_atomic(path, "wb", data)


def _write_atomic(path: Path, mode: str, content, **open_kwargs) -> Path:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
