"""`run --ray`: the run matrix as Ray tasks gives the report rows a local run gives.

Two quick runs of yolov3-tiny (official weights: exported, profiled, benched, evaluated on
8 COCO images) and ssd300 (TensorFlow, random-init: exported, profiled, benched), one local,
one on a local Ray instance the module starts (2 CPUs, no dashboard, node address
127.0.0.1, the bench resource) and shuts down. To stay near 4 minutes: one row per model
(no extra input sizes, no INT8 row) and the cpu backend only; the command-line run over
every backend here (cpu, openvino, openvino-bf16) is in docs/scale.md.
"""

from __future__ import annotations

import csv
import dataclasses
import socket
from pathlib import Path

import pytest

from core import manifest, store

MODELS = ["yolov3-tiny", "ssd300"]
# Columns that depend on timing, or on the export process rather than on what is measured (see
# test_same_rows): everything else in a row must be identical.
TIMING = ("p50 latency ", "p50 verdict ")
EXPORT_BYTES = "onnx sha256"


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.fail("a Ray instance is already connected in this process; these tests start their own")
    from pipeline.ray_run import BENCH_RESOURCE

    root = str(Path(__file__).resolve().parent.parent)
    tmp = tmp_path_factory.mktemp("ray-run-tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             resources={BENCH_RESOURCE: 1}, log_to_driver=False, logging_level="WARNING",
             # the node-local model copies go into the test's folder, not /tmp
             runtime_env={"env_vars": {"PYTHONPATH": root, "TMPDIR": str(tmp)}})
    try:
        yield ray
    finally:
        ray.shutdown()


def _settings():
    from pipeline.run import RunSettings

    return dataclasses.replace(RunSettings.quick(), sizes=False, int8_models=())


def _run(root: Path, monkeypatch, ray=None):
    from pipeline.run import RunRequest, run_pipeline

    monkeypatch.setenv("DETBENCH_RESULTS", str(root))
    return run_pipeline(RunRequest(MODELS, providers=["cpu"]), _settings(), ray=ray)


@pytest.fixture(scope="module")
def both_runs(ray_local, tmp_path_factory):
    from pipeline.ray_run import RayRun

    with pytest.MonkeyPatch.context() as mp:
        base = tmp_path_factory.mktemp("ray-run")
        local = _run(base / "local", mp)
        remote = _run(base / "ray", mp, ray=RayRun())
    return local, remote


def _rows(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "report" / "table.csv", newline="", encoding="utf-8") as fh:
        return {row["network"]: row for row in csv.DictReader(fh)}


def test_same_rows(both_runs):
    local, remote = both_runs
    assert not local.failures and not remote.failures, (local.failures, remote.failures)
    # the models run side by side under Ray: the same steps with the same outcomes, in another order
    assert sorted((o.model, o.step, o.provider or "", o.status) for o in remote.outcomes) == \
        sorted((o.model, o.step, o.provider or "", o.status) for o in local.outcomes)
    a, b = _rows(remote.results_dir), _rows(local.results_dir)
    assert set(MODELS) <= set(a) and set(a) == set(b)
    for name in a:
        # tf2onnx names folded constants from a per-process counter, so ssd300's file differs in bytes
        # between two exporting processes; its parameters and operations (compared here) do not.
        same = [c for c in a[name] if not c.startswith(TIMING) and c != EXPORT_BYTES]
        assert {c: a[name][c] for c in same} == {c: b[name][c] for c in same}, name
    tiny = a["yolov3-tiny"]
    assert tiny["mAP@0.5 status"] == "measured" and float(tiny["mAP@0.5 (%)"]) > 5
    assert tiny[EXPORT_BYTES] == b["yolov3-tiny"][EXPORT_BYTES]  # the Darknet export is byte-identical
    for row in (a["yolov3-tiny"], a["ssd300"]):
        assert float(row["p50 latency cpu (ms)"]) > 0 and float(row["GOps (2xMACs, all ops)"]) > 0


def test_every_record_names_its_host(both_runs):
    _, remote = both_runs
    records = store.load(root=remote.results_dir).records
    kinds = {r["kind"] for r in records}
    assert {"export", "profile", "bench", "images", "eval"} <= kinds
    # one node here: the worker's host is this machine
    assert all(r["host"]["hostname"] == socket.gethostname() and r["host"]["cores"] for r in records)
    # records name the driver's files, not the worker's temporary or node-local copies
    paths = [r["data"]["path"] for r in records if r["kind"] in ("export", "bench")]
    assert paths and all(Path(p).parent == remote.results_dir / "onnx" for p in paths)


def test_rerun_on_ray_reuses_every_step(both_runs, monkeypatch):
    from pipeline.ray_run import RayRun

    _, remote = both_runs
    before = len(store.load(root=remote.results_dir).records)
    again = _run(remote.results_dir, monkeypatch, ray=RayRun())
    steps = [o for o in again.outcomes if o.step != "report"]
    assert steps and all(o.status in ("reused", "skipped") for o in steps)
    assert [o for o in steps if o.status == "reused"]
    assert len(store.load(root=remote.results_dir).records) == before
    entries = manifest.load(remote.results_dir)["entries"].values()
    assert all(e["status"] in ("done", "skipped") for e in entries)
