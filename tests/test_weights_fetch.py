"""`fetch` against a real HTTP server started on 127.0.0.1 by the test.

The registry is a temporary models.toml whose URLs point at that server; every sha256
in it is computed here from the bytes the server sends (or deliberately not sent).
Requests are counted per path, so "not downloaded again" is observed, not assumed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exporters.registry import load_registry
from exporters.weights import (REJECTED_SUFFIX, SIDECAR_SUFFIX, UNVERIFIED, VERIFIED_FULL, VERIFIED_PREFIX, fetch,
                               locate_weights)
from core.errors import FetchError

# Three chunks and a bit (fetch streams 1 MiB chunks), so progress is reported several times.
GOOD = bytes(range(256)) * (4096 * 3 + 17)
CFG = b"[net]\nwidth=416\nheight=416\n\n[convolutional]\nfilters=16\nsize=3\nstride=1\npad=1\nactivation=leaky\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Served:
    """What the test server answers: path -> (body, announced Content-Length); hits per path."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, int]] = {}
        self.hits: Counter[str] = Counter()
        self.base = ""

    def add(self, path: str, body: bytes, announce: int | None = None) -> str:
        self.files[path] = (body, len(body) if announce is None else announce)
        return self.base + path


@pytest.fixture
def server():
    served = Served()

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: the connection closes after each response, which is how a short body ends.
        protocol_version = "HTTP/1.0"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            served.hits[self.path] += 1
            if self.path not in served.files:
                self.send_error(404, "Not Found")
                return
            body, announced = served.files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(announced))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep pytest output clean
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    served.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive(), "test HTTP server did not shut down"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """An empty cache and data folder, and no proxy between us and 127.0.0.1."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DETBENCH_DATA", str(tmp_path / "no-shared-data"))
    return tmp_path / "cache"


_COMMON = ('input_size = [416, 416]\nresize = "letterbox"\nlabel_space = "coco80"\n'
           "score_threshold = 0.005\niou_threshold = 0.45\nmax_detections = 100\n")


def darknet_entry(name: str, weights_url: str | None, cfg_url: str, cfg_sha: str | None, **weights) -> str:
    cfg = f'cfg = "{name}.cfg", cfg_url = "{cfg_url}"' + (f', cfg_sha256 = "{cfg_sha}"' if cfg_sha else "")
    w = {"file": f"{name}.weights", "format": "darknet", **weights}
    if weights_url:
        w["url"] = weights_url
    w_toml = ", ".join(f'{k} = "{v}"' for k, v in w.items())
    return (f'[models."{name}"]\nfamily = "toy"\nframework = "darknet"\n{_COMMON}'
            f"source = {{ {cfg} }}\nweights = {{ {w_toml} }}\n\n")


def torch_entry(name: str, url: str | None, **weights) -> str:
    w = {"format": "torch-state-dict", **weights}
    if url:
        w["url"] = url
        w.setdefault("file", url.rsplit("/", 1)[-1])
    w_toml = ", ".join(f'{k} = "{v}"' for k, v in w.items())
    return (f'[models."{name}"]\nfamily = "toy"\nframework = "pytorch"\n{_COMMON}'
            f'source = {{ builder = "torchvision" }}\nweights = {{ {w_toml} }}\n\n')


def registry_of(tmp_path: Path, *entries: str):
    path = tmp_path / "models.toml"
    path.write_text("".join(entries))
    return load_registry(path)


def cache_listing(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_good_files_are_verified_placed_atomically_and_not_downloaded_again(server, tmp_path, isolated):
    weights_url = server.add("/w/toy.weights", GOOD)
    cfg_url = server.add("/c/toy.cfg", CFG)
    spec = registry_of(tmp_path, darknet_entry("toy", weights_url, cfg_url, sha(CFG), sha256=sha(GOOD))).get("toy")
    cache = isolated
    final = cache / "toy.weights"
    calls = []

    def progress(name, done, total):
        calls.append((name, done, total))
        if name == "toy.weights" and done < len(GOOD):
            # Mid-transfer: bytes go to a temporary file; nothing exists under the final name yet.
            assert not final.exists()
            assert any(p.name.endswith(".part") for p in cache.iterdir())

    outcome = fetch(spec, progress=progress)

    assert outcome.paths == [final, cache / "toy.cfg"]
    assert final.read_bytes() == GOOD and (cache / "toy.cfg").read_bytes() == CFG
    weights, cfg = outcome.files
    assert (weights.kind, weights.verified, weights.downloaded, weights.sha256, weights.size) == (
        "weights", VERIFIED_FULL, True, sha(GOOD), len(GOOD))
    assert (cfg.kind, cfg.verified, cfg.downloaded, cfg.sha256) == ("cfg", VERIFIED_FULL, True, sha(CFG))
    assert server.hits == Counter({"/w/toy.weights": 1, "/c/toy.cfg": 1})
    weight_calls = [(d, t) for n, d, t in calls if n == "toy.weights"]
    assert weight_calls[0] == (0, len(GOOD)) and weight_calls[-1] == (len(GOOD), len(GOOD))
    assert len(weight_calls) >= 5 and [d for d, _ in weight_calls] == sorted(d for d, _ in weight_calls)
    assert cache_listing(cache) == ["toy.cfg", "toy.weights"]  # no temporary file left behind
    assert locate_weights(spec) == final  # exporters find what fetch placed

    again = fetch(spec, progress=lambda *a: pytest.fail("a verified present file was downloaded again"))
    assert [f.downloaded for f in again.files] == [False, False]
    assert [f.path for f in again.files] == outcome.paths
    assert server.hits == Counter({"/w/toy.weights": 1, "/c/toy.cfg": 1})


def test_corrupted_download_names_both_digests_and_leaves_nothing(server, tmp_path, isolated):
    corrupted = bytearray(GOOD)
    corrupted[123_456] ^= 0xFF
    url = server.add("/w/toy.weights", bytes(corrupted))
    cfg_url = server.add("/c/toy.cfg", CFG)
    spec = registry_of(tmp_path, darknet_entry("toy", url, cfg_url, sha(CFG), sha256=sha(GOOD))).get("toy")

    with pytest.raises(FetchError) as err:
        fetch(spec)
    message = str(err.value)
    assert "sha256 mismatch" in message
    assert f"expected {sha(GOOD)}" in message and f"found {sha(bytes(corrupted))}" in message
    assert url in message and "'toy'" in message and "--weights PATH" in message
    assert not (isolated / "toy.weights").exists()
    assert [n for n in cache_listing(isolated) if n.startswith("toy.weights")] == []


def test_truncated_transfer_is_an_error_and_leaves_nothing(server, tmp_path, isolated):
    half = GOOD[: len(GOOD) // 2]
    url = server.add("/w/toy.weights", half, announce=len(GOOD))
    spec = registry_of(tmp_path, darknet_entry("toy", url, server.base + "/c/toy.cfg", sha(CFG),
                                               sha256=sha(GOOD))).get("toy")

    with pytest.raises(FetchError) as err:
        fetch(spec)
    message = str(err.value)
    assert "truncated" in message and url in message
    assert f"received {len(half)} of the {len(GOOD)} bytes" in message
    assert cache_listing(isolated) == []


def test_http_404_names_the_url_model_and_remedy(server, tmp_path, isolated):
    url = server.base + "/w/missing.weights"
    spec = registry_of(tmp_path, torch_entry("toy-missing", url, sha256=sha(GOOD))).get("toy-missing")

    with pytest.raises(FetchError) as err:
        fetch(spec)
    message = str(err.value)
    assert url in message and "HTTP 404" in message and "'toy-missing'" in message
    assert "--weights PATH" in message and str(isolated / "missing.weights") in message
    assert server.hits["/w/missing.weights"] == 1
    assert cache_listing(isolated) == []


def test_connection_refused_names_the_url(tmp_path, isolated):
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/toy.pth"
    spec = registry_of(tmp_path, torch_entry("toy-offline", url, sha256=sha(GOOD))).get("toy-offline")

    with pytest.raises(FetchError) as err:
        fetch(spec, timeout=5)
    assert url in str(err.value) and "cannot connect" in str(err.value)
    assert cache_listing(isolated) == []


def test_prefix_only_verification_is_reported_as_such(server, tmp_path, isolated):
    # torchvision's naming: the file name carries the first 8 hex digits of the sha256.
    prefix = sha(GOOD)[:8]
    url = server.add(f"/models/toy_coco-{prefix}.pth", GOOD)
    wrong = f"{(int(prefix, 16) ^ 1):08x}"
    bad_url = server.add(f"/models/toy_coco-{wrong}.pth", GOOD)
    registry = registry_of(tmp_path, torch_entry("toy-prefix", url, sha256_prefix=prefix),
                           torch_entry("toy-bad-prefix", bad_url, sha256_prefix=wrong))

    outcome = fetch(registry.get("toy-prefix"))
    (item,) = outcome.files
    assert (item.verified, item.prefix, item.sha256, item.downloaded) == (VERIFIED_PREFIX, prefix, sha(GOOD), True)
    assert item.path.read_bytes() == GOOD

    with pytest.raises(FetchError) as err:
        fetch(registry.get("toy-bad-prefix"))
    assert f"expected {wrong}" in str(err.value) and sha(GOOD) in str(err.value)
    assert not (isolated / f"toy_coco-{wrong}.pth").exists()


def test_present_corrupt_file_is_reported_and_replaced(server, tmp_path, isolated):
    url = server.add("/w/toy.pth", GOOD)
    spec = registry_of(tmp_path, torch_entry("toy", url, sha256=sha(GOOD))).get("toy")
    isolated.mkdir()
    stale = b"half of an old download"
    (isolated / "toy.pth").write_bytes(stale)

    (item,) = fetch(spec).files
    assert item.downloaded and item.path.read_bytes() == GOOD
    assert item.replaced is not None and sha(stale) in item.replaced and sha(GOOD) in item.replaced
    assert server.hits["/w/toy.pth"] == 1
    assert cache_listing(isolated) == ["toy.pth"]


def test_present_corrupt_file_never_stays_under_the_final_name(server, tmp_path, isolated):
    url = server.base + "/w/gone.pth"  # the replacement download fails (404)
    spec = registry_of(tmp_path, torch_entry("toy", url, sha256=sha(GOOD))).get("toy")
    isolated.mkdir()
    (isolated / "gone.pth").write_bytes(b"corrupt")

    with pytest.raises(FetchError) as err:
        fetch(spec)
    assert "HTTP 404" in str(err.value) and "gone.pth" + REJECTED_SUFFIX in str(err.value)
    assert cache_listing(isolated) == ["gone.pth" + REJECTED_SUFFIX]
    assert locate_weights(spec) is None


def test_unpublished_checksum_needs_allow_unverified_and_is_recorded(server, tmp_path, isolated):
    url = server.add("/w/toy.pth", GOOD)
    spec = registry_of(tmp_path, torch_entry("toy", url)).get("toy")

    with pytest.raises(FetchError) as err:
        fetch(spec)
    assert "--allow-unverified" in str(err.value) and url in str(err.value)
    assert server.hits["/w/toy.pth"] == 0  # refused before any download

    (item,) = fetch(spec, allow_unverified=True).files
    assert (item.verified, item.sha256, item.downloaded) == (UNVERIFIED, sha(GOOD), True)
    assert item.sidecar == isolated / ("toy.pth" + SIDECAR_SUFFIX)
    assert item.sidecar.read_text() == f"{sha(GOOD)}  toy.pth\n"  # `sha256sum -c` format

    (again,) = fetch(spec).files  # the recorded digest still matches: kept, no flag needed
    assert (again.downloaded, again.verified) == (False, UNVERIFIED)
    assert server.hits["/w/toy.pth"] == 1


def test_model_without_public_weights_gives_a_note_not_a_crash(tmp_path, isolated):
    spec = registry_of(tmp_path, torch_entry("toy-random", None)).get("toy-random")
    outcome = fetch(spec)
    assert outcome.files == () and outcome.paths == []
    assert "no published weights" in outcome.note and "random initialisation" in outcome.note
    assert not isolated.exists()


def test_cli_fetch_reports_prefix_only_and_failures(server, tmp_path, isolated, monkeypatch):
    from typer.testing import CliRunner

    import cli

    prefix = sha(GOOD)[:8]
    good_url = server.add(f"/models/toy_coco-{prefix}.pth", GOOD)
    registry_of(tmp_path, torch_entry("toy-prefix", good_url, sha256_prefix=prefix),
                torch_entry("toy-missing", server.base + "/nothing.pth", sha256=sha(GOOD)),
                torch_entry("toy-random", None))
    monkeypatch.setenv("DETBENCH_MODELS", str(tmp_path / "models.toml"))
    elsewhere = tmp_path / "elsewhere"
    runner = CliRunner()

    one = runner.invoke(cli.app, ["fetch", "toy-prefix", "--cache-dir", str(elsewhere)])
    assert one.exit_code == 0, one.output
    assert "only the published sha256 prefix" in one.output and prefix in one.output
    assert (elsewhere / f"toy_coco-{prefix}.pth").read_bytes() == GOOD

    everything = runner.invoke(cli.app, ["fetch", "--all", "--cache-dir", str(elsewhere)])
    assert everything.exit_code == FetchError.exit_code
    assert "present at" in everything.output  # toy-prefix: verified, kept
    assert server.base + "/nothing.pth" in everything.output and "HTTP 404" in everything.output
    assert "no published weights" in everything.output  # toy-random: a note, not an error
    assert "1 of 3 model(s) could not be fetched: toy-missing" in everything.output
    assert server.hits[f"/models/toy_coco-{prefix}.pth"] == 1

    unknown = runner.invoke(cli.app, ["fetch", "toy-nope"])
    assert unknown.exit_code == 2 and "toy-prefix" in unknown.output
    assert os.listdir(elsewhere) == [f"toy_coco-{prefix}.pth"]


def test_cli_list_shows_weights_state_within_80_columns(tmp_path, isolated, monkeypatch):
    from rich.console import Console
    from typer.testing import CliRunner

    import cli

    prefix = sha(GOOD)[:8]
    registry_of(tmp_path,
                torch_entry("toy-here", f"http://127.0.0.1:9/toy_here-{prefix}.pth", sha256_prefix=prefix),
                torch_entry("toy-fetchable", "http://127.0.0.1:9/toy_fetchable.pth", sha256=sha(GOOD)),
                torch_entry("toy-random-init-only", None))
    monkeypatch.setenv("DETBENCH_MODELS", str(tmp_path / "models.toml"))
    isolated.mkdir()
    (isolated / f"toy_here-{prefix}.pth").write_bytes(GOOD)
    monkeypatch.setattr(cli, "console", Console(width=80, force_terminal=False))

    result = CliRunner().invoke(cli.app, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    path_line = f"    {isolated / f'toy_here-{prefix}.pth'}"
    assert path_line in lines  # the path stays whole on its own line (it may be longer than the console)
    assert max(len(line.rstrip()) for line in lines if line != path_line) <= 80
    rows = {line.split()[0]: line.split()[-1] for line in lines if line.startswith("toy-")}
    assert rows == {"toy-here": "present", "toy-fetchable": "fetchable", "toy-random-init-only": "random-init"}
    assert lines[lines.index(path_line) - 1] == "  toy-here:"


def test_verified_copy_in_the_shared_data_folder_is_used_and_a_bad_one_is_not(server, tmp_path, isolated,
                                                                              monkeypatch):
    shared = tmp_path / "shared-data"
    (shared / "darknet").mkdir(parents=True)
    (shared / "darknet" / "good.weights").write_bytes(GOOD)
    (shared / "darknet" / "bad.weights").write_bytes(b"not the official file")
    monkeypatch.setenv("DETBENCH_DATA", str(shared))
    good_url = server.add("/w/good.weights", GOOD)
    bad_url = server.add("/w/bad.weights", GOOD)
    registry = registry_of(tmp_path, torch_entry("toy-good", good_url, sha256=sha(GOOD)),
                           torch_entry("toy-bad", bad_url, sha256=sha(GOOD)))

    (kept,) = fetch(registry.get("toy-good")).files
    assert (kept.path, kept.downloaded, kept.verified) == (shared / "darknet" / "good.weights", False, VERIFIED_FULL)
    assert server.hits["/w/good.weights"] == 0

    (fresh,) = fetch(registry.get("toy-bad")).files
    assert (fresh.path, fresh.downloaded) == (isolated / "bad.weights", True)
    assert str(shared / "darknet" / "bad.weights") in fresh.replaced
    assert (shared / "darknet" / "bad.weights").read_bytes() == b"not the official file"  # never touched
    assert locate_weights(registry.get("toy-bad")) == isolated / "bad.weights"  # the cache comes first


def test_real_registry_entry_verifies_the_official_files_in_place(registry, data_dir, monkeypatch, isolated):
    """yolov3-tiny's weights and cfg are in the shared data: fetch verifies them, downloads nothing."""
    monkeypatch.setenv("DETBENCH_DATA", str(data_dir))
    spec = registry.get("yolov3-tiny")
    outcome = fetch(spec, progress=lambda *a: pytest.fail("nothing should be downloaded"))
    assert [(f.kind, f.path, f.downloaded, f.verified) for f in outcome.files] == [
        ("weights", data_dir / "darknet" / "yolov3-tiny.weights", False, VERIFIED_FULL),
        ("cfg", data_dir / "darknet" / "yolov3-tiny.cfg", False, VERIFIED_FULL),
    ]
    assert outcome.files[0].sha256 == spec.weights.sha256 and outcome.files[0].size == 35_434_956
    assert not isolated.exists()


# --------------------------------------------------------------------------- issue 12, rule 5


def _list_output(monkeypatch):
    from rich.console import Console
    from typer.testing import CliRunner

    import cli

    monkeypatch.setattr(cli, "console", Console(width=400, force_terminal=False, color_system=None))
    result = CliRunner().invoke(cli.app, ["list"])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_damaged_cache_copy_does_not_hide_the_verified_one(server, tmp_path, isolated, monkeypatch):
    """The issue's case: the cache (first in the search order) holds a truncated copy, the data
    folder the verified one. list, export's choice and fetch all name the verified copy."""
    from exporters.weights import weights_status

    shared = tmp_path / "shared-data"
    (shared / "darknet").mkdir(parents=True)
    (shared / "darknet" / "toy.weights").write_bytes(GOOD)
    monkeypatch.setenv("DETBENCH_DATA", str(shared))
    isolated.mkdir()
    (isolated / "toy.weights").write_bytes(GOOD[: len(GOOD) // 2])
    url = server.add("/w/toy.weights", GOOD)
    registry = registry_of(tmp_path, torch_entry("toy", url, file="toy.weights", sha256=sha(GOOD)))
    monkeypatch.setenv("DETBENCH_MODELS", str(tmp_path / "models.toml"))
    spec = registry.get("toy")
    verified = shared / "darknet" / "toy.weights"

    status = weights_status(spec)
    assert (status.state, status.path) == ("present", verified)
    assert [path for path, _ in status.rejected] == [isolated / "toy.weights"]
    assert locate_weights(spec) == verified  # what `export` hands to the exporter
    (kept,) = fetch(spec).files
    assert (kept.path, kept.downloaded, kept.verified) == (verified, False, VERIFIED_FULL)
    assert str(isolated / "toy.weights") in kept.replaced and "not used" in kept.replaced
    assert server.hits["/w/toy.weights"] == 0

    listing = _list_output(monkeypatch)
    row = next(line for line in listing.splitlines() if line.startswith("toy "))
    assert row.split()[-1] == "present"
    assert f"    {verified}" in listing.splitlines()
    assert f"ignored a damaged copy ({isolated / 'toy.weights'} has sha256" in listing


def test_a_copy_that_fails_its_sha256_is_never_present(server, tmp_path, isolated, monkeypatch):
    from exporters.weights import weights_status
    from core.errors import WeightsError

    isolated.mkdir()
    (isolated / "toy.weights").write_bytes(b"damaged")
    url = server.add("/w/toy.weights", GOOD)
    registry = registry_of(tmp_path, torch_entry("toy", url, file="toy.weights", sha256=sha(GOOD)))
    monkeypatch.setenv("DETBENCH_MODELS", str(tmp_path / "models.toml"))
    spec = registry.get("toy")

    assert weights_status(spec).state == "corrupt"
    with pytest.raises(WeightsError) as err:
        locate_weights(spec)  # export refuses before any exporter reads the file
    assert str(isolated / "toy.weights") in str(err.value) and "python cli.py fetch toy" in str(err.value)
    listing = _list_output(monkeypatch)
    row = next(line for line in listing.splitlines() if line.startswith("toy "))
    assert row.split()[-1] == "corrupt"
    assert f"corrupt toy: the local weights fail their sha256 check: {isolated / 'toy.weights'}" in listing

    # the advised fix fixes it: fetch sets the damaged copy aside and downloads a verified one
    (fresh,) = fetch(spec).files
    assert fresh.downloaded and fresh.path == isolated / "toy.weights"
    assert weights_status(spec).state == "present" and locate_weights(spec) == isolated / "toy.weights"


def test_an_unverified_fetch_whose_file_changed_is_corrupt(server, tmp_path, isolated, monkeypatch):
    """Own case: no sha256 is published, so the digest recorded at fetch time is the reference."""
    from exporters.weights import weights_status

    url = server.add("/w/free.weights", GOOD)
    registry = registry_of(tmp_path, torch_entry("free", url, file="free.weights"))
    spec = registry.get("free")
    (got,) = fetch(spec, allow_unverified=True).files
    assert weights_status(spec).state == "present" and got.verified == UNVERIFIED
    got.path.write_bytes(GOOD[:-1])  # damaged after the fetch
    status = weights_status(spec)
    assert status.state == "corrupt"
    assert f"was recorded in free.weights{SIDECAR_SUFFIX}" in status.problem
