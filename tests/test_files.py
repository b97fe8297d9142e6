"""The one atomic writer (core/files.py): a reader sees the old file or the whole new one, never a
part, and a failed write leaves neither a changed file nor a temporary one behind."""

from __future__ import annotations

import pytest

from core.errors import WriteError
from core.files import atomic_file, atomic_path, write_bytes_atomic, write_text_atomic


def test_a_block_that_fails_changes_nothing(tmp_path):
    target = tmp_path / "model.weights"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "wb") as fh:
            fh.write(b"half of the new")
            assert target.read_bytes() == b"old"  # not yet in place while being written
            raise RuntimeError("the writer failed half way")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.weights"]


def test_a_finished_block_replaces_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "doc.json"
    with atomic_file(target, "w", encoding="utf-8") as fh:
        fh.write("{}")
    assert target.read_text() == "{}"
    with atomic_path(target) as tmp:  # for writers that take a file name (onnx.save_model)
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("[1]")
    assert target.read_text() == "[1]" and sorted(p.name for p in target.parent.iterdir()) == ["doc.json"]


def test_write_helpers_name_the_file_they_could_not_write(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match="a-file"):
        write_text_atomic(blocker / "inside.txt", "text")
    with pytest.raises(WriteError, match="a-file"):
        write_bytes_atomic(blocker / "inside.bin", b"bytes")
