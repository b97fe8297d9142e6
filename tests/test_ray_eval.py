"""COCO evaluation on Ray (eval/ray_eval.py) against the local evaluation, on real data.

The independent side is ``eval.coco.evaluate_model``'s single-process loop: the Ray
pipeline must give the same 12 COCOeval statistics to the last digit and the same
detections per image, on yolov3-tiny with its official weights, also when an
inference actor's process is killed mid-run and when the driver is interrupted and
resumed. A local Ray instance (2 CPUs, no dashboard, node address 127.0.0.1) is
started once for the module and shut down at its end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from eval.coco import evaluate_model
from eval.ray_eval import RaySettings, evaluate_model_ray

IMAGES = 32  # of the subset's 144: enough for every pipeline stage to hold several batches at once


@pytest.fixture(scope="module")
def actor_pids(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-hook") / "actor-pids.txt"


@pytest.fixture(scope="module")
def ray_local(actor_pids):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.fail("a Ray instance is already connected in this process; these tests start their own")
    root = str(Path(__file__).resolve().parent.parent)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="WARNING",
             # the actors record their pid where the fault test can find the processes to kill
             runtime_env={"env_vars": {"PYTHONPATH": root, "DETBENCH_RAY_ACTOR_PIDS": str(actor_pids),
                                       # the node-local model copies go into the test's folder, not /tmp
                                       "TMPDIR": str(actor_pids.parent)}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny(registry, exported):
    from exporters.weights import locate_weights

    weights = locate_weights(registry.get("yolov3-tiny"))
    if weights is None:
        pytest.fail("yolov3-tiny's official weights are not in the shared data folder")
    return exported("yolov3-tiny", weights=weights).path


@pytest.fixture(scope="module")
def local_run(tiny, coco_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-eval")
    return evaluate_model(tiny, coco_dir=coco_dir, limit=IMAGES, results_file=out / "results.json",
                          cache_file=out / "cache.jsonl", store=False)


def _by_image(results_file) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for det in json.loads(Path(results_file).read_text()):
        out.setdefault(det["image_id"], []).append(det)
    return out


def _assert_same_as_local(result, local_run):
    assert result.images_evaluated == local_run.images_evaluated == IMAGES
    assert result.images_skipped == []
    assert result.scores["stats"] == local_run.scores["stats"]  # all 12, exactly
    assert result.scores["map50"] > 0.15  # trained weights: a broken pipeline scores near 0
    assert _by_image(result.results_file) == _by_image(local_run.results_file)


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _wait_for_free_cpus(ray, cpus: float, seconds: float = 60.0) -> float:
    deadline = time.monotonic() + seconds
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= cpus or time.monotonic() > deadline:
            return free
        time.sleep(0.5)


def test_ray_gives_the_local_statistics_and_detections(ray_local, tiny, coco_dir, local_run, actor_pids,
                                                       tmp_path):
    actor_pids.write_text("")
    result = evaluate_model_ray(tiny, coco_dir=coco_dir, limit=IMAGES, results_file=tmp_path / "results.json",
                                cache_file=tmp_path / "cache.jsonl", store=False,
                                threads=1, ray_settings=RaySettings(actors=2, batch_size=4))
    _assert_same_as_local(result, local_run)
    assert len(set(_pids(actor_pids))) == 2  # one session per actor, created once
    assert result.settings["ray"]["actors"] == 2 and result.settings["ray"]["hosts"]
    assert result.session_seconds > 0
    # the cache keeps its meaning: the local evaluation resumes it and has nothing left to run
    resumed = evaluate_model(tiny, coco_dir=coco_dir, limit=IMAGES, resume=True, results_file=tmp_path / "again.json",
                             cache_file=tmp_path / "cache.jsonl", store=False)
    assert resumed.images_resumed == IMAGES and resumed.session_seconds == 0
    assert resumed.scores["stats"] == local_run.scores["stats"]
    assert _wait_for_free_cpus(ray_local, 2) == 2  # the actor pool is gone once the run returns


def test_a_killed_inference_actor_is_restarted_and_the_result_is_unchanged(ray_local, tiny, coco_dir, local_run,
                                                                            actor_pids, tmp_path):
    actor_pids.write_text("")
    killed: list[int] = []

    def kill_one_actor(p) -> None:
        if not killed and p.done >= 8:
            pid = _pids(actor_pids)[0]
            os.kill(pid, signal.SIGKILL)  # an actor process of this test's own Ray instance
            killed.append(pid)

    result = evaluate_model_ray(tiny, coco_dir=coco_dir, limit=IMAGES, results_file=tmp_path / "results.json",
                                cache_file=tmp_path / "cache.jsonl", store=False, progress=kill_one_actor,
                                threads=1, ray_settings=RaySettings(actors=2, batch_size=4))
    assert killed, "the run finished before an actor could be killed"
    _assert_same_as_local(result, local_run)
    # Ray restarted the killed actor: a third process opened a session
    pids = _pids(actor_pids)
    assert killed[0] in pids and len(set(pids)) >= 3, pids


def test_an_interrupted_driver_resumes_to_the_same_result(ray_local, tiny, coco_dir, local_run, tmp_path):
    def interrupt(p) -> None:
        if p.done >= 12:
            raise KeyboardInterrupt

    paths = dict(results_file=tmp_path / "results.json", cache_file=tmp_path / "cache.jsonl", store=False,
                 threads=1, ray_settings=RaySettings(actors=2, batch_size=4))
    with pytest.raises(KeyboardInterrupt):
        evaluate_model_ray(tiny, coco_dir=coco_dir, limit=IMAGES, progress=interrupt, **paths)
    # the interrupted pipeline let go of the actors' CPUs, or the resumed run could not start its pool
    assert _wait_for_free_cpus(ray_local, 2) == 2
    cached = len((tmp_path / "cache.jsonl").read_text().splitlines()) - 1  # minus the header line
    assert 12 <= cached < IMAGES
    result = evaluate_model_ray(tiny, coco_dir=coco_dir, limit=IMAGES, resume=True, **paths)
    assert result.images_resumed == cached
    _assert_same_as_local(result, local_run)


def test_the_default_pool_fills_the_cpus_at_the_threads_each_actor_reserves():
    from core.errors import ProviderUnavailableError
    from eval.ray_eval import _pool_size

    two_cpus = {"CPU": 2.0, "memory": 1e9}
    assert _pool_size(RaySettings(), 1, two_cpus, gpu=False) == 2
    assert _pool_size(RaySettings(), 2, two_cpus, gpu=False) == 1
    assert _pool_size(RaySettings(), 4, two_cpus, gpu=False) == 1  # one actor even when it oversubscribes
    assert _pool_size(RaySettings(actors=3), 1, two_cpus, gpu=False) == 3
    assert _pool_size(RaySettings(), 1, {"CPU": 8.0, "GPU": 2.0}, gpu=True) == 2
    with pytest.raises(ProviderUnavailableError):
        _pool_size(RaySettings(), 1, two_cpus, gpu=True)


def test_the_eval_command_runs_on_ray_with_the_local_figures(ray_local, tiny, coco_dir, local_run, tmp_path):
    from typer.testing import CliRunner

    import cli

    out = CliRunner().invoke(cli.app, ["eval", str(tiny), "--coco", str(coco_dir), "--limit", str(IMAGES), "--ray",
                                       "--ray-actors", "2", "--out", str(tmp_path / "results.json"),
                                       "--cache", str(tmp_path / "cache.jsonl")])
    assert out.exit_code == 0, out.output
    assert f"{IMAGES} of {IMAGES} images evaluated" in out.output
    assert "ray: 2 actor(s) x 1 thread(s)" in out.output
    # the printed headline is the local run's, and so is every detection
    assert f"mAP@0.5 = {100 * local_run.scores['map50']:.2f}" in out.output
    assert _by_image(tmp_path / "results.json") == _by_image(local_run.results_file)


@pytest.fixture(scope="module")
def damaged_synthetic(tmp_path_factory):
    from eval_fixtures import bright_box_detector, synthetic_coco

    root = synthetic_coco(tmp_path_factory.mktemp("synthetic-coco"))
    (root / "val2017" / f"{3:012d}.png").write_bytes(b"not a png")  # this image cannot be decoded
    return root, bright_box_detector(root / "bright-box.onnx", height=96, width=128)


def test_an_image_that_does_not_decode_is_skipped_as_locally(ray_local, damaged_synthetic, tmp_path):
    root, model = damaged_synthetic
    local = evaluate_model(model, coco_dir=root, results_file=tmp_path / "l.json", cache_file=tmp_path / "l.jsonl",
                           store=False)
    ray_run = evaluate_model_ray(model, coco_dir=root, results_file=tmp_path / "r.json",
                                 cache_file=tmp_path / "r.jsonl", store=False, ray_settings=RaySettings(actors=1))
    assert [s["image_id"] for s in ray_run.images_skipped] == [3]
    assert ray_run.images_skipped == local.images_skipped
    assert ray_run.scores["stats"] == local.scores["stats"]
    assert _by_image(ray_run.results_file) == _by_image(local.results_file)


def test_a_detbench_error_in_an_actor_reaches_the_caller_as_itself(ray_local, damaged_synthetic, tmp_path):
    from core.errors import ContractError

    root, model = damaged_synthetic
    # the detector labels in coco80; told its labels are coco91 ids, its label 0 is not a category
    with pytest.raises(ContractError, match="emitted label 0") as local:
        evaluate_model(model, coco_dir=root, overrides={"label_space": "coco91"}, results_file=tmp_path / "l.json",
                       cache_file=tmp_path / "l.jsonl", store=False)
    with pytest.raises(ContractError, match="emitted label 0") as remote:
        evaluate_model_ray(model, coco_dir=root, overrides={"label_space": "coco91"},
                           results_file=tmp_path / "r.json", cache_file=tmp_path / "r.jsonl", store=False,
                           ray_settings=RaySettings(actors=1))
    # the same error, named for whichever red image (1, 5 or 8) an actor reached first
    assert re.search(r"on 0+(1|5|8)\.png", str(remote.value))
    assert re.sub(r"on \S+\.png", "", str(remote.value)) == re.sub(r"on \S+\.png", "", str(local.value))
    assert _wait_for_free_cpus(ray_local, 2) == 2
