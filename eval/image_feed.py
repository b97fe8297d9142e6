"""Feeding images to a session, and remembering what was already detected.

:func:`prefetched` decodes and resizes images in background threads (OpenCV releases
the GIL while decoding and resizing) and yields them in order, keeping at most
``prefetch`` prepared tensors in flight, so the execution provider does not wait on
JPEG decoding and memory stays bounded.

:class:`DetectionCache` is a JSONL file with one line per finished image
(``{"image_id": ..., "detections": [...COCO results entries...], "session_seconds": ...}``),
written (``write`` + ``flush``, so it survives the process being killed) as each image
finishes, after a header line naming what produced it, and fsync'd by a background
thread so that an fsync (milliseconds on a virtual disk) never holds up the session;
closing the cache waits for the last fsync. A resumed run reads it, skips the images
it holds and appends the rest; a line cut short by a kill is dropped (that image is
simply run again). The file is locked (``flock``, exclusive) while open: a second
evaluation given the same cache is refused instead of interleaving its lines.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from core.errors import ConfigError, DatasetError
from core.images import Placement, load_rgb, prepare_for

CACHE_FORMAT = "detbench-eval-cache/1"


@dataclass
class Prepared:
    """One image ready for the session, or the reason it cannot be evaluated (``error``)."""

    image: Any  # eval.dataset.CocoImage
    tensor: np.ndarray | None = None
    placement: Placement | None = None
    error: str | None = None


def prepare_image(image, contract) -> Prepared:
    """Decode ``image.path`` and resize it as ``contract`` says; a bad file becomes ``Prepared.error``."""
    try:
        rgb = load_rgb(image.path)
    except DatasetError as exc:
        return Prepared(image, error=str(exc))
    h, w = rgb.shape[:2]
    if (w, h) != (image.width, image.height):
        # Boxes would be mapped back into the wrong frame: this is not the annotated image.
        return Prepared(image, error=f"{image.path}: decodes to {w}x{h}, the annotations say {image.width}x{image.height}")
    tensor, placement = prepare_for(rgb, contract)
    return Prepared(image, tensor, placement)


def prefetched(items: Iterable[Any], work: Callable[[Any], Prepared], *, workers: int = 2,
               prefetch: int = 4) -> Iterator[Prepared]:
    """``work(item)`` for each item, computed by ``workers`` threads, yielded in input order.

    At most ``prefetch`` results are computed ahead of the consumer. Stopping the
    iteration early (an exception in the consumer) cancels what has not started.
    """
    if workers < 1 or prefetch < 1:
        raise ConfigError(f"decode workers ({workers}) and prefetch depth ({prefetch}) must be at least 1")
    source = iter(items)
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="detbench-decode") as pool:
        try:
            for item in source:
                pending.append(pool.submit(work, item))
                if len(pending) >= prefetch:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(source, _END)
                if nxt is not _END:
                    pending.append(pool.submit(work, nxt))
                yield result
        finally:
            for fut in pending:
                fut.cancel()


_END = object()


class DetectionCache:
    """Per-image detections of one (model, dataset, preprocessing) evaluation, resumable.

    ``fingerprint`` identifies what produced the detections; resuming with a cache
    whose header differs raises :class:`ConfigError` instead of mixing two models' results.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = dict(fingerprint)
        self.done: dict[int, list[dict[str, Any]]] = {}
        self.session_seconds: dict[int, float] = {}
        self._fh = None
        self._dirty = threading.Event()
        self._stop = False
        self._syncer: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def open(self, resume: bool) -> "DetectionCache":
        """Start a new cache (``resume=False``: an existing file is replaced) or continue one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        # Opened without truncating, and locked before anything is read or cut: a run that is
        # still writing this file keeps it intact.
        fh = open(self.path, "a", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ConfigError(
                f"detection cache {self.path} is in use by another evaluation that is still running; wait for it "
                "to finish (then --resume reuses its images), or pass --cache FILE to give this run its own cache"
            ) from None
        except OSError as exc:  # a file system without flock: run unlocked rather than not at all
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                fh.close()
                raise
        try:
            if resume and existed:
                # Cut a torn last line so the next append starts on a line of its own.
                fh.truncate(self._load())
            else:
                fh.truncate(0)
                self._fh = fh
                self._write({"format": CACHE_FORMAT, **self.fingerprint})
        except BaseException:
            self._fh = None
            fh.close()
            raise
        self._fh = fh
        self._syncer = threading.Thread(target=self._sync_loop, name="detbench-cache-fsync", daemon=True)
        self._syncer.start()
        return self

    def _sync_loop(self) -> None:
        """fsync whenever lines were written since the last fsync, until closed."""
        while True:
            self._dirty.wait()
            self._dirty.clear()
            try:
                os.fsync(self._fh.fileno())
            except OSError as exc:  # reported by close(); the lines are still in the kernel's cache
                self._sync_error = exc
            if self._stop:
                return

    def _load(self) -> int:
        """Read header and finished images; return the byte length of the intact prefix."""
        with open(self.path, "rb") as fh:
            raw = fh.read()
        lines = raw.split(b"\n")
        if not lines or not lines[0]:
            raise ConfigError(f"detection cache {self.path} is empty; run without --resume to start afresh")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ConfigError(f"detection cache {self.path} has no readable header; delete it or run without --resume") from None
        expected = {"format": CACHE_FORMAT, **self.fingerprint}
        differing = sorted(k for k in set(expected) | set(header) if header.get(k) != expected.get(k))
        if differing:
            raise ConfigError(
                f"detection cache {self.path} was made by a different evaluation (differs in: {', '.join(differing)}); "
                "run without --resume to start afresh, or pass --cache FILE to keep both")
        valid = len(lines[0]) + 1
        # Only complete lines (terminated by "\n") count; the last element after split is partial or empty.
        for line in lines[1:-1]:
            try:
                entry = json.loads(line)
                image_id = int(entry["image_id"])
                detections = entry["detections"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break
            self.done[image_id] = detections
            self.session_seconds[image_id] = float(entry.get("session_seconds", 0.0))
            valid += len(line) + 1
        return valid

    def _write(self, obj: dict[str, Any]) -> None:
        # One write() of a whole line: once it returns, a killed process cannot lose or tear it.
        self._fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._fh.flush()
        self._dirty.set()

    def add(self, image_id: int, detections: list[dict[str, Any]], session_seconds: float) -> None:
        """Record one finished image (in the kernel when this returns; on disk at the next background fsync)."""
        self._write({"image_id": int(image_id), "detections": detections, "session_seconds": session_seconds})
        self.done[int(image_id)] = detections
        self.session_seconds[int(image_id)] = session_seconds

    def close(self) -> None:
        """Wait for the final fsync and close the file."""
        if self._fh is None:
            return
        if self._syncer is not None:
            self._stop = True
            self._dirty.set()
            self._syncer.join()
            self._syncer = None
        try:
            os.fsync(self._fh.fileno())  # lines written while the last background fsync ran
        except OSError as exc:
            self._sync_error = exc
        self._fh.close()
        self._fh = None
        if self._sync_error is not None:
            raise DatasetError(f"detection cache {self.path} could not be synced to disk: {self._sync_error}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
