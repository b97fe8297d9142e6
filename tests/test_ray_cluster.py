"""Ray across nodes: a cluster of several nodes on this machine, a node lost mid-run, a node joining.

The cluster is Ray's own multi-node test utility (``ray.cluster_utils.Cluster``): a head
with no CPU (it runs no actor, as a head that only coordinates) and worker nodes of one
CPU each, every process on the loopback interface (``eval.ray_eval.loopback_only``; the
test checks their listening sockets with `ss`). Each node is a raylet of its own with
its own object store, so a tensor prepared on one node and inferred on the other
crosses the object manager's network path, and killing a raylet with SIGKILL loses
that node as a crashed machine would. The independent side is the single-process
evaluation (``eval.coco.evaluate_model``) on the same images: the 12 statistics and
every detection must be identical. No Ray process outlives the module (checked).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ray_procs import descendants, is_loopback, listeners, wait_gone

IMAGES = 16
BATCH = 2  # small blocks: several in flight on each node when one is lost


class LoopbackCluster:
    """A head without CPUs and worker nodes of 1 CPU (and the bench resource), on 127.0.0.1."""

    def __init__(self, tmp: Path):
        from ray.cluster_utils import Cluster

        from pipeline.ray_run import BENCH_RESOURCE

        self.bench = {BENCH_RESOURCE: 1}
        self.seen: set[int] = set()
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        self.workers: list = []
        self.tmp = tmp

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self):
        node = self.cluster.add_node(num_cpus=1, resources=dict(self.bench))
        self.workers.append(node)
        deadline = time.monotonic() + 180  # a loaded machine starts a raylet slowly
        while node.node_id not in self.alive():  # (a killed node may not be marked dead yet)
            if time.monotonic() > deadline:
                pytest.fail(f"node {node.node_id} did not register with the GCS")
            time.sleep(0.5)
        self.snapshot()
        return node

    def kill_raylet(self, node) -> None:
        """SIGKILL the node's raylet, as a crashed machine loses it; its workers go with it."""
        from ray._private import ray_constants

        self.snapshot()
        node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.send_signal(signal.SIGKILL)

    def drop(self, node) -> None:
        """Forget a node (killing whatever of it is left)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def keep(self, count: int) -> list:
        """Exactly ``count`` live worker nodes (a killed node is forgotten once the GCS has marked it dead)."""
        from ray._private import ray_constants

        alive = self.alive()
        for node in [n for n in self.workers if n.node_id not in alive or
                     n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.poll() is not None]:
            self.drop(node)
        while len(self.workers) > count:
            self.drop(self.workers[-1])
        while len(self.workers) < count:
            self.add()
        self.cluster.wait_for_nodes(timeout=180)
        return list(self.workers)

    def alive(self) -> set[str]:
        return {n["NodeID"] for n in self.cluster.global_state.node_table() if n["Alive"]}

    def snapshot(self) -> None:
        self.seen |= descendants()

    def shutdown(self) -> None:
        self.snapshot()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("the process checks read /proc: Linux only")
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.fail("a Ray instance is already connected in this process; these tests start their own")
    from eval.ray_eval import loopback_only

    # short: Ray puts its Unix sockets under $TMPDIR/ray/session_.../sockets (at most 107 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="dbray-"))
    root = str(Path(__file__).resolve().parent.parent)
    with pytest.MonkeyPatch.context() as mp, loopback_only():
        # what the raylets pass to their workers: this checkout's code, model copies in the test's folder
        mp.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        mp.setenv("TMPDIR", str(tmp))
        # the GCS marks a killed node dead after ~3 s instead of Ray's default ~15-30 s
        mp.setenv("RAY_health_check_period_ms", "1000")
        mp.setenv("RAY_health_check_timeout_ms", "1000")
        mp.setenv("RAY_health_check_failure_threshold", "3")
        made = LoopbackCluster(tmp)
        try:
            made.keep(2)
            yield made
        finally:
            if ray.is_initialized():
                ray.shutdown()
            made.shutdown()
    left = wait_gone(made.seen - {os.getpid()})
    shutil.rmtree(tmp, ignore_errors=True)
    assert left == set(), f"Ray processes left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def tiny(registry, exported):
    from exporters.weights import locate_weights

    weights = locate_weights(registry.get("yolov3-tiny"))
    if weights is None:
        pytest.fail("yolov3-tiny's official weights are not in the shared data folder")
    return exported("yolov3-tiny", weights=weights).path


@pytest.fixture(scope="module")
def local_run(tiny, coco_dir, tmp_path_factory):
    from eval.coco import evaluate_model

    out = tmp_path_factory.mktemp("local-eval")
    return evaluate_model(tiny, coco_dir=coco_dir, limit=IMAGES, results_file=out / "results.json",
                          cache_file=out / "cache.jsonl", store=False)


def _by_image(results_file) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for det in json.loads(Path(results_file).read_text()):
        out.setdefault(det["image_id"], []).append(det)
    return out


def _same_as_local(result, local_run) -> None:
    assert result.images_evaluated == local_run.images_evaluated == IMAGES
    assert result.scores["stats"] == local_run.scores["stats"]  # all 12, exactly
    assert result.scores["map50"] > 0.15  # trained weights: a broken pipeline scores near 0
    assert _by_image(result.results_file) == _by_image(local_run.results_file)


def _evaluate(cluster, tiny, coco_dir, tmp_path, progress=None, actors=None, resume=False):
    from eval.ray_eval import RaySettings, evaluate_model_ray

    return evaluate_model_ray(tiny, coco_dir=coco_dir, limit=IMAGES, results_file=tmp_path / "results.json",
                              cache_file=tmp_path / "cache.jsonl", store=False, progress=progress, resume=resume,
                              threads=1, ray_settings=RaySettings(address=cluster.address, actors=actors,
                                                                  batch_size=BATCH))


def test_the_cluster_listens_on_loopback_only(cluster):
    if shutil.which("ss") is None:
        pytest.skip("`ss` (iproute2) is not installed")
    found = listeners(descendants())
    names = {name for _, _, name in found}
    assert "gcs_server" in names and "raylet" in names, found
    assert [entry for entry in found if not is_loopback(entry[0])] == [], found


def test_images_are_spread_over_both_nodes(cluster, tiny, coco_dir, local_run, tmp_path):
    a, b = cluster.keep(2)
    result = _evaluate(cluster, tiny, coco_dir, tmp_path, actors=2)
    _same_as_local(result, local_run)
    pool = result.settings["ray"]
    # every image is recorded with the node that evaluated it, and both worker nodes did some
    assert set(pool["image_nodes"]) == {a.node_id, b.node_id}, pool["image_nodes"]
    assert sorted(i for ids in pool["image_nodes"].values() for i in ids) == \
        sorted(int(i) for i in _by_image(local_run.results_file)) or \
        sum(len(ids) for ids in pool["image_nodes"].values()) == IMAGES
    assert pool["nodes"] == 3 and pool["reissued_after"] == []


def test_a_node_killed_mid_evaluation_changes_nothing(cluster, tiny, coco_dir, local_run, tmp_path):
    a, b = cluster.keep(2)
    killed: list[int] = []

    def kill_b(p) -> None:
        if not killed and p.done >= 4:
            cluster.kill_raylet(b)
            killed.append(p.done)

    result = _evaluate(cluster, tiny, coco_dir, tmp_path, progress=kill_b, actors=2)
    assert killed and killed[0] < IMAGES, "the run finished before the node could be killed"
    _same_as_local(result, local_run)
    nodes = result.settings["ray"]["image_nodes"]
    # the survivor finished the work; what the lost node had delivered before it died is kept
    assert a.node_id in nodes and sum(len(v) for v in nodes.values()) == IMAGES


def test_a_node_joining_mid_run_takes_over_from_a_lost_one(cluster, tiny, coco_dir, local_run, tmp_path):
    (a,) = cluster.keep(1)
    joined: list = []

    def replace_a(p) -> None:
        if not joined and p.done >= 4:
            cluster.kill_raylet(a)
            joined.append(cluster.add())  # joins while the run is waiting on the lost node

    result = _evaluate(cluster, tiny, coco_dir, tmp_path, progress=replace_a)
    assert joined
    _same_as_local(result, local_run)
    nodes = result.settings["ray"]["image_nodes"]
    # images before the loss on a, the rest on the new node (Ray restarted the actor there, or detbench re-issued)
    assert set(nodes) == {a.node_id, joined[0].node_id}, nodes


def test_no_node_left_stops_with_the_resume_command_and_resume_finishes(cluster, tiny, coco_dir, local_run,
                                                                          tmp_path):
    from core.errors import ClusterLostError

    (a,) = cluster.keep(1)
    killed: list[int] = []

    def kill_last(p) -> None:
        if not killed and p.done >= 4:
            cluster.kill_raylet(a)
            killed.append(p.done)

    outcome: list = []

    def run() -> None:
        try:
            outcome.append(_evaluate(cluster, tiny, coco_dir, tmp_path, progress=kill_last))
        except BaseException as exc:  # handed to the test's thread, which checks it
            outcome.append(exc)

    # on its own thread, so that a run waiting for ever fails the test instead of hanging it
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=300)  # the GCS marks the node dead within ~3 s here, then 10 s with no node
    assert not thread.is_alive(), "the evaluation still waits with no node left"
    assert killed and len(outcome) == 1 and isinstance(outcome[0], ClusterLostError), outcome
    message = str(outcome[0])
    assert "no node left in the cluster can hold an inference actor" in message
    assert f"--ray --resume --cache {tmp_path / 'cache.jsonl'}" in message and cluster.address in message
    gathered = len((tmp_path / "cache.jsonl").read_text().splitlines()) - 1  # minus the header
    assert 4 <= gathered < IMAGES and f"with {IMAGES - gathered} image(s) not evaluated" in message
    cluster.keep(1)  # a node again: --resume finishes with the single-process figures
    result = _evaluate(cluster, tiny, coco_dir, tmp_path, resume=True)
    assert result.images_resumed == gathered
    _same_as_local(result, local_run)


# --------------------------------------------------------------------------- run --ray


def _timed_bench(seconds: float, progress=None):
    """A stand-in for a bench step: where and when it held its node."""
    import ray

    start = time.time()
    time.sleep(seconds)
    return {"node": ray.get_runtime_context().get_node_id(), "start": start, "end": time.time()}, []


def _marked_step(mark: str, seconds: float, progress=None):
    """A step that says on which node it started (a file), then takes ``seconds``."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    with open(mark, "a", encoding="utf-8") as fh:
        fh.write(f"{node} {os.getpid()}\n")
    time.sleep(seconds)
    return node, []


@pytest.fixture
def ray_run(cluster):
    from ray import cloudpickle  # Ray pickles with its own copy

    from pipeline.ray_run import RayRun

    # the workers cannot import this test module: its step functions travel by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run = RayRun(address=cluster.address)
    try:
        with run.connected():
            yield run
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_run_benches_never_share_a_node(cluster, ray_run):
    a, b = cluster.keep(2)
    results: list[dict] = []

    def bench():
        value, _, _ = ray_run.call(_timed_bench, (1.5,), {}, model=None, produces=None, exclusive=True)
        results.append(value)

    threads = [threading.Thread(target=bench) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4
    assert {r["node"] for r in results} == {a.node_id, b.node_id}  # both bench nodes timed
    for node in (a.node_id, b.node_id):
        spans = sorted((r["start"], r["end"]) for r in results if r["node"] == node)
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans


def test_a_run_step_whose_node_died_runs_again_elsewhere(cluster, ray_run, tmp_path):
    nodes = {n.node_id: n for n in cluster.keep(2)}
    mark = tmp_path / "started-on.txt"
    out: list = []
    thread = threading.Thread(target=lambda: out.append(
        ray_run.call(_marked_step, (str(mark), 6.0), {}, model=None, produces=None, exclusive=True)))
    thread.start()
    deadline = time.monotonic() + 60
    while not (mark.exists() and mark.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    first, pid = mark.read_text().split()[:2]
    # a machine lost: its raylet and the worker running the step (which would otherwise still
    # hand its value to the driver directly)
    cluster.kill_raylet(nodes[first])
    os.kill(int(pid), signal.SIGKILL)
    thread.join(timeout=120)
    assert out, "the step did not return"
    value, records, host = out[0]
    started = [line.split()[0] for line in mark.read_text().splitlines()]
    assert started[0] == first and value != first and value in nodes  # run again, on the node that remained
    assert started[-1] == value
    assert records == [] and host["hostname"]


def test_a_run_step_no_node_can_take_stops_the_run(cluster, ray_run, tmp_path):
    from core.errors import ClusterLostError

    (a,) = cluster.keep(1)
    mark = tmp_path / "started-on.txt"
    errors: list = []

    def step():
        try:
            ray_run.call(_marked_step, (str(mark), 30.0), {}, model=None, produces=None, exclusive=True)
        except ClusterLostError as exc:
            errors.append(exc)

    thread = threading.Thread(target=step)
    thread.start()
    deadline = time.monotonic() + 60
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    cluster.kill_raylet(a)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the step waited on after its last node died"
    assert errors and "no node left in the Ray cluster offers what it needs" in str(errors[0])
    assert "run the same `run` command" in str(errors[0])


def test_a_node_that_lacks_the_images_is_named(cluster, tmp_path):
    """The images must be at the driver's paths on every node: a path only the driver's process can
    open (its own file descriptor under /proc/self/fd) stands for a folder the nodes did not mount."""
    import ray

    from core.errors import DatasetError
    from eval.dataset import CocoImage
    from eval.ray_eval import _check_images_on_nodes, ray_instance

    a, b = cluster.keep(2)
    image = tmp_path / "000000000139.jpg"
    image.write_bytes(b"only the driver holds this file open")
    fd = os.open(image, os.O_RDONLY)
    high = os.dup2(fd, 987)  # a number the workers' processes do not have open
    os.close(fd)
    try:
        only_here = CocoImage(139, image.name, 4, 4, Path(f"/proc/self/fd/{high}"))
        shared = CocoImage(139, image.name, 4, 4, image)
        with ray_instance(cluster.address):
            nodes = {a.node_id, b.node_id}
            _check_images_on_nodes([shared], nodes)  # the same path on every node: accepted
            with pytest.raises(DatasetError) as err:
                _check_images_on_nodes([only_here], nodes)
            assert ray.is_initialized()
    finally:
        os.close(high)
    message = str(err.value)
    assert f"Ray node {min(nodes)[:12]}" in message and "127.0.0.1" in message
    assert f"lacks 1 of the 1 images at the driver's paths (first: /proc/self/fd/{high})" in message
