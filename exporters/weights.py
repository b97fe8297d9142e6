"""Official weights and model definition files: finding them locally, downloading them.

Search order for a registered file name: the download cache (``DETBENCH_CACHE``,
where :func:`fetch` puts files), then the shared data folder (``DETBENCH_DATA``) and its
``darknet/`` subfolder. An explicit ``--weights PATH`` always wins over all of these.

One function decides which local copy is used, :func:`resolve_file`: the first copy in
search order that verifies against models.toml's sha256 (or the publisher's prefix, or
the digest recorded when it was fetched unverified). A copy that fails is skipped and
reported, never used: ``list`` (:func:`weights_status`), ``export``
(:func:`locate_weights`) and ``fetch`` all go through it, so they agree on the file.

:func:`fetch` downloads what models.toml registers (weights ``url``; a Darknet entry's
``source.cfg_url``) and verifies it against the registered sha256 (or the prefix a
publisher embeds in its file names) before the file appears under its final name.
:func:`weights_status` says, without downloading, what ``list`` shows.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from exporters.registry import ModelSpec
from core.contract import sha256_file
from core.errors import FetchError, WeightsError
from core.files import write_bytes_atomic
from core.paths import cache_dir, data_dir


def search_dirs() -> list[Path]:
    return [cache_dir(), data_dir() / "darknet", data_dir()]


def locate_file(file_name: str) -> Path | None:
    """The first existing ``file_name`` in :func:`search_dirs`, or None (no verification:
    for files models.toml pins no digest for; registered files go through :func:`resolve_file`)."""
    for folder in search_dirs():
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Resolution:
    """Which local copy of a registered file is used (:func:`resolve_file`).

    ``path`` is the chosen copy (None: no usable copy); ``verification`` how it was
    checked (``"sha256"``, ``"sha256-prefix"``, ``"unverified"`` = matches the digest
    recorded in ``sidecar`` when fetched, or ``None`` = models.toml pins nothing and
    nothing was recorded). ``rejected`` lists every copy that failed, with why.
    """

    path: Path | None
    sha256: str | None = None
    verification: str | None = None
    sidecar: Path | None = None
    rejected: tuple[tuple[Path, str], ...] = ()


def resolve_file(item: "RemoteFile", folders: list[Path] | None = None) -> Resolution:
    """The copy of ``item`` to use: the first in ``folders`` (default :func:`search_dirs`) that verifies.

    A copy whose sha256 differs from the registered one (or from the digest recorded
    beside it when it was fetched) is rejected, whatever its place in the search order.
    A copy with nothing to check against is used only when no copy verifies.
    """
    rejected: list[tuple[Path, str]] = []
    unchecked: Path | None = None
    seen: set[Path] = set()
    for folder in folders if folders is not None else search_dirs():
        candidate = folder / item.file_name
        key = candidate.resolve()
        if key in seen or not candidate.is_file():
            continue
        seen.add(key)
        digest = _digest(candidate)
        if item.sha256 or item.prefix:
            if item.matches(digest):
                return Resolution(candidate, digest, item.verification, None, tuple(rejected))
            rejected.append((candidate, f"has sha256 {digest}, expected {item.expected}"))
            continue
        sidecar = candidate.with_name(candidate.name + SIDECAR_SUFFIX)
        recorded = _read_sidecar(sidecar)
        if recorded == digest:
            return Resolution(candidate, digest, UNVERIFIED, sidecar, tuple(rejected))
        if recorded:
            rejected.append((candidate, f"has sha256 {digest}, but {recorded} was recorded in {sidecar.name} "
                                        "when it was fetched"))
        elif unchecked is None:
            unchecked = candidate
    if unchecked is not None:
        return Resolution(unchecked, _digest(unchecked), None, None, tuple(rejected))
    return Resolution(None, rejected=tuple(rejected))


_DIGESTS: dict[tuple[Path, int, int], str] = {}


def _digest(path: Path) -> str:
    # list, export and fetch may each ask about the same large file in one process.
    stat = path.stat()
    key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def weights_file(spec: ModelSpec) -> "RemoteFile | None":
    """``spec``'s registered weights file with what verifies it (None: no file is registered)."""
    if not spec.weights.file and not spec.weights.url:
        return None
    file_name = spec.weights.file or spec.weights.url.rstrip("/").rsplit("/", 1)[-1]
    return RemoteFile("weights", spec.weights.url or "", file_name, _hex(spec.weights.sha256),
                      _hex(spec.weights.sha256_prefix))


def locate_weights(spec: ModelSpec) -> Path | None:
    """Official weights for ``spec`` if a copy that verifies is present locally (never downloads).

    None when there is no local copy; :class:`WeightsError` (naming every copy and the
    fix) when the only copies fail their sha256, rather than handing a damaged file on.
    """
    status = weights_status(spec)
    if status.state == "corrupt":
        raise WeightsError(status.problem)
    return status.path if status.state == "present" else None


@dataclass(frozen=True)
class WeightsStatus:
    """Whether ``spec``'s official weights are usable without a download.

    ``state`` is ``"present"`` (``path`` is the local copy :func:`resolve_file` chose),
    ``"corrupt"`` (copies exist but none verifies: ``problem`` names them and the fix),
    ``"fetchable"`` (a public ``url``; ``python cli.py fetch NAME``) or ``"none"`` (nothing
    is published: exports use deterministic random initialisation). ``rejected`` lists
    copies that failed verification, also when another copy is used.
    """

    state: str
    path: Path | None = None
    url: str | None = None
    rejected: tuple[tuple[Path, str], ...] = ()
    name: str = ""

    @property
    def problem(self) -> str:
        """What is wrong with the rejected copies and what to do, or '' when none was rejected."""
        if not self.rejected:
            return ""
        copies = "; ".join(f"{path} {why}" for path, why in self.rejected)
        if self.state == "present":
            return (f"{self.name}: ignored a damaged copy ({copies}); using {self.path}. "
                    "Delete the damaged copy to silence this.")
        fix = (f"run `python cli.py fetch {self.name}` (it sets the damaged copy aside and downloads a verified one)"
               if self.url else "replace it with the official file")
        return (f"{self.name}: the local weights fail their sha256 check: {copies}. To fix: {fix}, "
                "or delete it and export with --random-init.")


def weights_status(spec: ModelSpec) -> WeightsStatus:
    item = weights_file(spec)
    found = resolve_file(item) if item is not None else Resolution(None)
    if found.path is not None:
        return WeightsStatus("present", path=found.path, url=spec.weights.url, rejected=found.rejected, name=spec.name)
    if found.rejected:
        return WeightsStatus("corrupt", url=spec.weights.url, rejected=found.rejected, name=spec.name)
    if spec.weights.public:
        return WeightsStatus("fetchable", url=spec.weights.url, name=spec.name)
    return WeightsStatus("none", name=spec.name)


# ----------------------------------------------------------------------------- fetch
#
# Downloads go to a temporary file beside the final one and are renamed only once the
# sha256 verified, so the cache never holds a partial or unverified file under a name
# that ``locate_weights`` would hand to an exporter.

#: ``progress(file_name, bytes_done, bytes_total_or_None)``, called as chunks arrive.
FetchProgress = Callable[[str, int, Optional[int]], None]

CHUNK_BYTES = 1 << 20
USER_AGENT = "detbench-fetch/0.1 (+python urllib)"
SIDECAR_SUFFIX = ".sha256"
REJECTED_SUFFIX = ".rejected"

# How a file was verified (``FetchedFile.verified``).
VERIFIED_FULL = "sha256"
VERIFIED_PREFIX = "sha256-prefix"
UNVERIFIED = "unverified"


@dataclass(frozen=True)
class FetchedFile:
    """One file of a model, present in a local folder after :func:`fetch`.

    ``verified`` is ``"sha256"`` (the full published digest matched), ``"sha256-prefix"``
    (only the publisher's ``prefix`` of the digest could be checked) or ``"unverified"``
    (nothing published; ``sha256`` was computed here and recorded in ``sidecar``).
    ``downloaded`` is False when a present file verified and was kept; ``replaced`` says
    why a present file was rejected and downloaded again.
    """

    kind: str  # "weights" or "cfg"
    path: Path
    url: str
    sha256: str
    size: int
    verified: str
    downloaded: bool
    prefix: str | None = None
    sidecar: Path | None = None
    replaced: str | None = None


@dataclass(frozen=True)
class FetchOutcome:
    """What :func:`fetch` did for one model. ``note`` explains an empty ``files``."""

    model: str
    files: tuple[FetchedFile, ...]
    note: str = ""

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]


@dataclass(frozen=True)
class RemoteFile:
    """A file models.toml says where to download and how to verify (full sha256, or only its prefix)."""

    kind: str
    url: str
    file_name: str
    sha256: str | None
    prefix: str | None

    def matches(self, digest: str) -> bool:
        if self.sha256:
            return digest == self.sha256
        return bool(self.prefix) and digest.startswith(self.prefix)

    @property
    def expected(self) -> str:
        return self.sha256 if self.sha256 else f"{self.prefix}… (prefix published by the source)"

    @property
    def verification(self) -> str:
        return VERIFIED_FULL if self.sha256 else VERIFIED_PREFIX if self.prefix else UNVERIFIED


def fetch_plan(spec: ModelSpec) -> list[RemoteFile]:
    """The downloadable files of ``spec``: its weights and, where registered, its model definition."""
    wanted = []
    if spec.weights.url:
        file_name = spec.weights.file or spec.weights.url.rstrip("/").rsplit("/", 1)[-1]
        wanted.append(RemoteFile("weights", spec.weights.url, file_name,
                                  _hex(spec.weights.sha256), _hex(spec.weights.sha256_prefix)))
    cfg_url = spec.source.get("cfg_url")
    if cfg_url:
        file_name = spec.source.get("cfg") or cfg_url.rstrip("/").rsplit("/", 1)[-1]
        wanted.append(RemoteFile("cfg", cfg_url, file_name, _hex(spec.source.get("cfg_sha256")), None))
    return wanted


def _hex(value: str | None) -> str | None:
    return value.strip().lower() if value else None


def fetch(spec: ModelSpec, *, cache: Path | None = None, allow_unverified: bool = False,
          progress: FetchProgress | None = None, timeout: float = 60.0) -> FetchOutcome:
    """Make ``spec``'s official files present and verified locally; download what is missing.

    A file already present (in ``cache``, default ``DETBENCH_CACHE``, or the shared data
    folder) whose sha256 verifies is kept and not downloaded again. Anything downloaded
    lands in ``cache`` under the registered file name only after its sha256 verified.
    Without a published sha256 (full or prefix) the download is refused unless
    ``allow_unverified``; the computed digest is then recorded in ``<file>.sha256``.

    Raises :class:`FetchError` (HTTP or connection failure, truncated transfer,
    checksum mismatch, nothing to verify against) naming the model, URL and remedy.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    plan = fetch_plan(spec)
    if not plan:
        return FetchOutcome(spec.name, (), note=(
            f"{spec.name} has no published weights (weights format {spec.weights.format!r}, no url in "
            "models.toml): nothing to download. Exports use deterministic random initialisation "
            "(parameter counts, operations and latency are valid; accuracy is not). "
            "Pass --weights PATH to export with weights you trained."))
    files = tuple(_obtain(spec, item, cache, allow_unverified, progress, timeout) for item in plan)
    note = ""
    if not spec.weights.url:
        note = f"{spec.name} has no published weights: exports use deterministic random initialisation."
    return FetchOutcome(spec.name, files, note)


def _remedy(spec: ModelSpec, item: RemoteFile, dest: Path) -> str:
    if item.kind == "weights":
        return (f"download {item.url} by hand and pass --weights PATH, or put the file at {dest} "
                f"and re-run `python cli.py fetch {spec.name}` to verify it.")
    return (f"download {item.url} by hand and put it at {dest}, "
            f"then re-run `python cli.py fetch {spec.name}` to verify it.")


def _read_sidecar(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0].lower() if text else None


def _obtain(spec: ModelSpec, item: RemoteFile, cache: Path, allow_unverified: bool,
            progress: FetchProgress | None, timeout: float) -> FetchedFile:
    dest = cache / item.file_name
    sidecar = dest.with_name(dest.name + SIDECAR_SUFFIX)
    verifiable = item.sha256 is not None or item.prefix is not None

    # A present copy that verifies is all we need (the shared data folder counts too); the
    # choice is resolve_file's, the one `list` and `export` make.
    found = resolve_file(item, [cache] + [d for d in search_dirs() if d.resolve() != cache.resolve()])
    if found.path is not None and found.verification is not None:
        return FetchedFile(item.kind, found.path, item.url, found.sha256, found.path.stat().st_size,
                           found.verification, downloaded=False, prefix=item.prefix, sidecar=found.sidecar,
                           replaced=_ignored(found))
    rejected = [f"{path} {why}" for path, why in found.rejected]
    dest_failed = any(path == dest for path, _ in found.rejected)

    if not verifiable and not allow_unverified:
        raise FetchError(
            f"model {spec.name!r}: models.toml has no sha256 for its {item.kind} ({item.url}), so a download "
            "cannot be verified. Pass --allow-unverified to download it anyway (the computed sha256 is then "
            f"recorded in {sidecar.name}), or {_remedy(spec, item, dest)}"
            + (f" (Present but not matching: {'; '.join(rejected)}.)" if rejected else ""))

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"model {spec.name!r}: cannot create the cache folder {cache} ({exc}); "
                         "pass --cache-dir or set DETBENCH_CACHE to a writable folder") from exc

    # A corrupt file must not stay under the final name while we download its replacement.
    aside = None
    if dest_failed:
        aside = dest.with_name(dest.name + REJECTED_SUFFIX)
        os.replace(dest, aside)

    try:
        digest, size = _download(spec, item, dest, progress, timeout)
    except FetchError as exc:
        if aside is not None:
            raise FetchError(f"{exc}\n(The file that was present failed verification "
                             f"and was moved to {aside}.)") from exc
        raise
    if aside is not None:
        aside.unlink(missing_ok=True)
    recorded_in = None
    if not verifiable:
        write_bytes_atomic(sidecar, f"{digest}  {dest.name}\n".encode("ascii"))
        recorded_in = sidecar
    return FetchedFile(item.kind, dest, item.url, digest, size, item.verification, downloaded=True,
                       prefix=item.prefix, sidecar=recorded_in,
                       replaced="; ".join(rejected) + f"; replaced by a fresh download at {dest}" if rejected else None)


def _ignored(found: Resolution) -> str | None:
    if not found.rejected:
        return None
    return ("; ".join(f"{path} {why}" for path, why in found.rejected)
            + f": not used (the verified copy {found.path} is); delete the damaged copy")


def _download(spec: ModelSpec, item: RemoteFile, dest: Path, progress: FetchProgress | None,
              timeout: float) -> tuple[str, int]:
    """Stream ``item.url`` into a temporary file beside ``dest``; rename it to ``dest`` only once
    the transfer is complete and its sha256 verifies. Returns (sha256 hex, bytes)."""
    what = f"model {spec.name!r}: downloading {item.kind} from {item.url}"
    remedy = _remedy(spec, item, dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise FetchError(f"{what}: cannot write to {dest.parent} ({exc}); "
                         "pass --cache-dir or set DETBENCH_CACHE to a writable folder") from exc
    digest = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(item.url, headers={"User-Agent": USER_AGENT})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    announced = response.headers.get("Content-Length")
                    total = int(announced) if announced and announced.isdigit() else None
                    if progress:
                        progress(dest.name, 0, total)
                    while True:
                        chunk = response.read(CHUNK_BYTES)
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(dest.name, done, total)
            except urllib.error.HTTPError as exc:
                raise FetchError(f"{what} failed: HTTP {exc.code} {exc.reason}. To fix: {remedy}") from exc
            except urllib.error.URLError as exc:
                raise FetchError(f"{what} failed: cannot connect ({exc.reason}). "
                                 f"To fix: check the network or proxy settings, or {remedy}") from exc
            except http.client.IncompleteRead as exc:
                raise FetchError(f"{what} failed: the transfer was truncated after {done + len(exc.partial)} "
                                 f"bytes; nothing was kept. To fix: re-run to retry, or {remedy}") from exc
            except (socket.timeout, TimeoutError) as exc:
                raise FetchError(f"{what} failed: no data for {timeout:g} s after {done} bytes; "
                                 f"nothing was kept. To fix: re-run to retry, or {remedy}") from exc
            except (http.client.HTTPException, ConnectionError) as exc:
                raise FetchError(f"{what} failed after {done} bytes: {exc!r}; nothing was kept. "
                                 f"To fix: re-run to retry, or {remedy}") from exc
        if total is not None and done != total:
            raise FetchError(f"{what} failed: the transfer was truncated: received {done} of the {total} bytes "
                             f"the server announced (Content-Length); nothing was kept. "
                             f"To fix: re-run to retry, or {remedy}")
        found = digest.hexdigest()
        if not item.matches(found) and item.verification != UNVERIFIED:
            raise FetchError(f"{what}: sha256 mismatch: expected {item.expected}, found {found} ({done} bytes); "
                             f"the file was not kept. The download is corrupt or the publisher changed the file. "
                             f"To fix: re-run to retry, or {remedy}")
        os.replace(tmp, dest)
        return found, done
    except OSError as exc:  # writing the temporary file or renaming it (disk full, permissions)
        raise FetchError(f"{what} failed: {exc}. To fix: {remedy}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
