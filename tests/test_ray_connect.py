"""Ray is reached only where the user says, fails fast, and a local instance listens on loopback only.

The listening sockets are read with `ss -ltnp` (skipped where it is missing) for the
processes below this test's process: the GCS, raylet, workers and the driver itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from ray_procs import descendants, is_loopback, listeners, wait_gone

ROOT = Path(__file__).resolve().parent.parent


def test_loopback_addresses_are_told_apart():
    assert is_loopback("127.0.0.1:6379") and is_loopback("[::ffff:127.0.0.1]:5") and is_loopback("[::1]:80")
    assert not is_loopback("*:6379") and not is_loopback("0.0.0.0:1") and not is_loopback("192.0.2.2:6379")
    assert not is_loopback("[::]:22")


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections (the kernel's backlog) and never answers: a black hole."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.fixture
def http_port():
    """A port where something that is not Ray answers (an HTTP/1.1 server)."""
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    server = HTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_nothing_listening_is_refused_at_once_naming_the_address():
    pytest.importorskip("ray")
    from eval.ray_eval import ray_instance

    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"--ray-address {address}: no Ray cluster there") as err:
        with ray_instance(address):
            pass
    assert time.monotonic() - started < 5
    assert "192." not in str(err.value)  # the address as given, not rewritten to an interface


def test_a_listener_that_is_not_ray_is_refused(http_port):
    pytest.importorskip("ray")
    from eval.ray_eval import ray_instance

    with pytest.raises(ConfigError, match="not a Ray cluster's GCS"):
        with ray_instance(f"127.0.0.1:{http_port}", connect_timeout=5):
            pass


def test_an_address_that_never_answers_stops_after_the_timeout(silent_port):
    pytest.importorskip("ray")
    from eval.ray_eval import ray_instance

    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"nothing answered there within 1\.5 s \(--ray-timeout\)"):
        with ray_instance(f"localhost:{silent_port}", connect_timeout=1.5):
            pass
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("bad", ["nohost", "127.0.0.1:0", "127.0.0.1:http", ":6379"])
def test_a_malformed_address_is_refused(bad):
    pytest.importorskip("ray")
    from eval.ray_eval import ray_instance

    with pytest.raises(ConfigError, match="give auto or HOST:PORT"):
        with ray_instance(bad):
            pass


def test_the_timeout_must_be_a_positive_number():
    from eval.ray_eval import RaySettings
    from pipeline.ray_run import RayRun

    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="--ray-timeout"):
            RaySettings(connect_timeout=bad)
        with pytest.raises(ConfigError, match="--ray-timeout"):
            RayRun(connect_timeout=bad)


def test_ctrl_c_ends_a_connection_that_hangs(silent_port, tmp_path):
    """The command line, as a user runs it: SIGINT while waiting on an address that never answers."""
    pytest.importorskip("ray")
    from eval_fixtures import bright_box_detector, synthetic_coco

    coco = synthetic_coco(tmp_path / "coco")
    model = bright_box_detector(tmp_path / "bright-box.onnx", height=96, width=128)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "eval", str(model), "--ray-address",
                             f"127.0.0.1:{silent_port}", "--ray-timeout", "120", "--coco", str(coco),
                             "--cache", str(tmp_path / "cache.jsonl"), "--out", str(tmp_path / "results.json")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)  # imports, then the wait at the address
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_a_local_instance_listens_on_loopback_only():
    if sys.platform != "linux":
        pytest.skip("reads /proc and `ss`: Linux only")
    import shutil

    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed")
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.fail("a Ray instance is already connected in this process")
    from eval.ray_eval import ray_instance

    outside = os.environ.get("RAY_USAGE_STATS_ENABLED")

    @ray.remote(num_cpus=0)
    def worker_env(name):
        return os.environ.get(name)

    with ray_instance(None, resources={"probe": 1}) as resources:
        assert resources.get("probe") == 1

        @ray.remote(num_cpus=0)
        def worker_pid():
            return os.getpid()

        pids = set(ray.get([worker_pid.remote() for _ in range(2)]))  # a worker process or two exists now
        mine = descendants() | pids | {os.getpid()}
        found = listeners(mine)
        names = {name for _, _, name in found}
        assert {"gcs_server", "raylet"} <= names, found  # the instance's servers are among those checked
        assert [entry for entry in found if not is_loopback(entry[0])] == [], found
        assert ray._private.worker.global_worker.node.node_ip_address == "127.0.0.1"
        # no usage statistics leave the machine, from the driver or from what it started
        from ray._common.usage.usage_lib import usage_stats_enabled

        assert not usage_stats_enabled()
        assert ray.get(worker_env.remote("RAY_USAGE_STATS_ENABLED")) == "0"
    assert not ray.is_initialized()
    assert os.environ.get("RAY_USAGE_STATS_ENABLED") == outside  # the process's own setting is back
    assert wait_gone(mine - {os.getpid()}) == set()  # the instance's processes are gone


def test_disconnecting_waits_for_the_threads_the_block_started():
    """A thread still inside Ray when the driver disconnects aborts the process: settle_threads
    waits for those the block started, and names the ones that outlive its timeout."""
    import threading

    from eval.ray_eval import settle_threads

    before = {t.ident for t in threading.enumerate()}
    release = threading.Event()
    short = threading.Thread(target=time.sleep, args=(0.3,), name="short-lived")
    stuck = threading.Thread(target=release.wait, name="stuck-reader", daemon=True)
    short.start()
    stuck.start()
    try:
        assert settle_threads(before, timeout=1.0) == ["stuck-reader"]
        assert not short.is_alive()  # joined, not merely outlived
    finally:
        release.set()
        stuck.join()
    assert settle_threads(before, timeout=1.0) == []
