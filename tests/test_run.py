"""`python cli.py run --quick` end to end (part of CI), re-runs, interruption and skips.

Two models, chosen from the registry: the first paper configuration whose official
weights are present in the shared data (trained: exported with them and evaluated on
COCO images) and the cheapest model of the same framework without local weights
(random-init: exported, profiled and benched, accuracy published, never measured).
Numbers in the report are checked against the results store and, where the registry
has them, against published figures (Darknet's BFLOPs, the paper's parameter counts).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import store

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(registry):
    from exporters.weights import locate_weights

    trained = next((s for s in registry if s.paper and locate_weights(s) is not None), None)
    if trained is None:
        pytest.fail("no paper configuration has official weights in the shared data folder (DETBENCH_DATA)")
    candidates = [s for s in registry if s.framework == trained.framework and locate_weights(s) is None
                  and "gflops" in s.published]
    random_init = min(candidates, key=lambda s: s.published["gflops"].value)
    return trained, random_init


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, models):
    """`python cli.py run --quick --models T,R` into a fresh results folder (a subprocess, as CI runs it)."""
    root = tmp_path_factory.mktemp("run-quick")
    env = {**os.environ, "DETBENCH_RESULTS": str(root)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "cli.py", "run", "--quick", "--models", ",".join(s.name for s in models)],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc.stdout, wall


def _records(root, kind, model, provider=None, size=None):
    """Records of ``model`` (of one provider, and at one input size when given)."""
    def at(r):
        c = r.get("contract") or {}
        return size is None or (int(c.get("detbench.input_height", 0)), int(c.get("detbench.input_width", 0))) == size

    return [r for r in store.load(kind, model, root=root).records
            if (provider is None or r["provider"] == provider) and at(r)]


def _single_row(**changes):
    """Quick settings for one report row per model (no extra sizes, no INT8 row)."""
    import dataclasses

    from pipeline.run import RunSettings

    return dataclasses.replace(RunSettings.quick(), sizes=False, int8_models=(), **changes)


def _csv(root) -> dict[str, dict[str, str]]:
    with open(root / "report" / "table.csv", newline="", encoding="utf-8") as fh:
        return {row["network"]: row for row in csv.DictReader(fh)}


def test_quick_run_writes_the_report(quick_run, registry):
    root, stdout, wall = quick_run
    files = {p.name for p in (root / "report").iterdir()}
    assert {"table.csv", "table.md", "report.html"} <= files
    from report import CHARTS

    assert {f"{stem}.png" for stem, *_ in CHARTS} <= files
    table = _csv(root)
    assert [s.name for s in registry if s.paper] == [n for n, row in table.items() if row["paper"] == "yes"]
    assert "run finished in" in " ".join(stdout.split())
    from core.manifest import load

    (last,) = load(root)["runs"]
    assert last["settings"]["eval_limit"] == 8 and last["settings"]["bench_runs"] == 3
    assert last["outcomes"]["failed"] == 0 and 0 < last["wall_seconds"] < wall
    print(f"run --quick wall time: {wall:.1f} s")


def test_trained_model_numbers_match_store_and_published(quick_run, models):
    root, _, _ = quick_run
    trained, _ = models
    row = _csv(root)[trained.name]
    export = _records(root, "export", trained.name)[-1]
    assert export["contract"]["detbench.weights"].startswith("sha256:")
    sha = [r for r in _records(root, "export", trained.name, size=trained.input_size)][-1]["model_sha256"]
    profile = [r for r in _records(root, "profile", trained.name) if r["model_sha256"] == sha][-1]["data"]
    bench = [r for r in _records(root, "bench", trained.name, "cpu") if r["model_sha256"] == sha][-1]["data"]
    evaluation = [r for r in _records(root, "eval", trained.name, "cpu") if r["model_sha256"] == sha
                  and r["settings"].get("image_ids") is None][-1]["data"]
    assert float(row["GOps (2xMACs, all ops)"]) == pytest.approx(profile["flops"] / 1e9, rel=1e-12)
    assert float(row["p50 latency cpu (ms)"]) == pytest.approx(bench["latency_ms"]["p50"], rel=1e-12)
    assert bench["providers_ran"][0] == "CPUExecutionProvider"
    assert row["mAP@0.5 status"] == "measured"
    assert float(row["mAP@0.5 (%)"]) == pytest.approx(100 * evaluation["map50"], rel=1e-12)
    assert float(row["mAP@[.5:.95] (%)"]) == pytest.approx(100 * evaluation["map"], rel=1e-12)
    assert evaluation["images_evaluated"] == 8 and row["eval images"] == "8"
    assert 0.05 < evaluation["map50"] < 0.9  # trained weights on real COCO images detect things
    # independent of the pipeline: Darknet's own BFLOPs (convolutions only) and the paper's parameter count
    assert float(row["GOps conv-only (Darknet BFLOPs convention)"]) == pytest.approx(
        trained.published["gflops"].value, abs=0.006)
    if "params" in trained.published:
        assert float(row["MParams"]) == pytest.approx(trained.published["params"].value / 1e6, rel=2e-3)


def test_random_init_model_has_cost_and_latency_but_published_accuracy(quick_run, models):
    root, _, _ = quick_run
    _, random_init = models
    row = _csv(root)[random_init.name]
    assert _records(root, "export", random_init.name)[-1]["contract"]["detbench.weights"] == "random-init"
    assert row["weights"] == "random-init"
    assert _records(root, "eval", random_init.name) == []
    assert "random-init weights: accuracy is not measured" in row["not measured (reasons)"]
    pub = random_init.published.get("map50")
    assert (row["mAP@0.5 status"], float(row["mAP@0.5 (%)"])) == ("published", pub.value)
    assert row["mAP@0.5 source"] == pub.source
    assert float(row["GOps conv-only (Darknet BFLOPs convention)"]) == pytest.approx(
        random_init.published["gflops"].value, abs=0.006)
    assert float(row["p50 latency cpu (ms)"]) > 0


def test_unavailable_providers_are_skipped_never_faked(quick_run, models):
    import onnxruntime as ort

    from core.manifest import load
    from runtime.backends import get_backend, provider_usable

    root, _, _ = quick_run
    entries = load(root)["entries"].values()
    rows = {(e["model"], tuple(e["input_size"])) for e in entries}  # every report row the run measured
    for full in ort.get_available_providers():
        p = get_backend(full).name
        ok, reason = provider_usable(p)
        benches = [r for s in models for r in _records(root, "bench", s.name, p, size=s.input_size)]
        if ok:
            assert len(benches) == 2 and all(r["data"]["providers_ran"][0] == full for r in benches)
        else:
            assert benches == [] and not any(r["provider"] == p for r in store.load("bench", root=root).records)
            skipped = [e for e in entries if e["step"] == "bench" and e["provider"] == p]
            assert len(skipped) == len(rows) and all(e["status"] == "skipped" and e["reason"] == reason
                                                     for e in skipped)


def test_rerun_reuses_every_unchanged_step(quick_run, models, monkeypatch):
    from pipeline.run import RunRequest, run_pipeline

    root, _, _ = quick_run
    monkeypatch.setenv("DETBENCH_RESULTS", str(root))
    before = len(store.load(root=root).records)
    summary = run_pipeline(RunRequest([s.name for s in models], quick=True, strict=True))
    benched = next(o.provider for o in summary.outcomes if o.step == "bench" and o.status == "reused")
    # (a step re-done here means its inputs changed: in a shared working tree, someone edited
    # the step's source between the two runs, which is what the code version in the key is for)
    statuses = {(o.model, o.step, o.provider): o.status for o in summary.outcomes if o.step != "report"}
    trained, random_init = models
    expected = {(s.name, step, p): "reused" for s in models for step, p in (("export", None), ("profile", None),
                                                                             ("bench", benched), ("images", "cpu"))}
    expected[(trained.name, "eval", "cpu")] = "reused"
    expected[(f"{trained.name}@int8", "quantize", None)] = "reused"
    expected[(f"{trained.name} @320x320", "eval", "cpu")] = "reused"
    expected[(random_init.name, "eval", "cpu")] = "skipped"
    assert {k: statuses[k] for k in expected} == expected
    assert len(store.load(root=root).records) == before
    assert summary.failures == []


def test_interrupted_run_continues(tmp_path, models, monkeypatch, quick_run):
    """Interrupt inside the evaluation; the next run reuses export, profile and bench and
    resumes the evaluation where it stopped, with the uninterrupted run's numbers."""
    from pipeline.run import RunRequest, run_pipeline

    trained, _ = models
    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path))

    def interrupt(event):
        if event.step == "eval" and event.kind == "update" and (event.completed or 0) >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(RunRequest([trained.name], providers=["cpu"], strict=True), _single_row(), progress=interrupt)
    assert _records(tmp_path, "eval", trained.name) == []
    summary = run_pipeline(RunRequest([trained.name], providers=["cpu"], strict=True), _single_row())
    statuses = {o.step: o.status for o in summary.outcomes}
    assert statuses == {"export": "reused", "profile": "reused", "bench": "reused", "images": "reused",
                        "eval": "done", "report": "done"}
    (evaluation,) = _records(tmp_path, "eval", trained.name)
    assert evaluation["data"]["images_resumed"] >= 3 and evaluation["data"]["images_evaluated"] == 8
    assert len(_records(tmp_path, "export", trained.name)) == 1
    # the evaluation of the whole (limited) folder, not the float model's rerun on its INT8 row's images
    reference = [r for r in _records(quick_run[0], "eval", trained.name, "cpu", size=trained.input_size)
                 if r["settings"].get("image_ids") is None][-1]
    assert evaluation["model_sha256"] == reference["model_sha256"]
    assert evaluation["data"]["stats"] == reference["data"]["stats"]


def test_missing_module_is_skipped_with_its_reason(quick_run, models, tmp_path, monkeypatch):
    from pipeline.run import RunRequest, run_pipeline

    root = tmp_path / "results"
    shutil.copytree(quick_run[0], root)
    monkeypatch.setenv("DETBENCH_RESULTS", str(root))
    monkeypatch.setitem(sys.modules, "counting", None)  # as if the analyzer were not in this checkout
    trained, _ = models
    summary = run_pipeline(RunRequest([trained.name], providers=["cpu"], strict=True), _single_row())
    outcome = {o.step: o for o in summary.outcomes}
    assert outcome["export"].status == "reused"
    assert outcome["profile"].status == "skipped"
    assert "counting.profile_model is not available" in outcome["profile"].reason
    assert outcome["bench"].status == "done"  # latency is measured without the analyzer, nodes left out
    bench = _records(root, "bench", trained.name, "cpu")[-1]["data"]
    assert bench["nodes"] is None
    assert summary.failures == []


def test_bad_options_are_typed_errors(tmp_path, monkeypatch):
    from pipeline.run import RunRequest, run_pipeline
    from core.errors import ConfigError, RegistryError

    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path))
    with pytest.raises(RegistryError, match="no-such-model"):
        run_pipeline(RunRequest(["no-such-model"], quick=True))
    with pytest.raises(ConfigError, match="--coco"):
        run_pipeline(RunRequest(None, quick=True, coco_dir=tmp_path / "missing"))


def test_budget_run_continues_from_an_earlier_smaller_budget(quick_run, models, tmp_path, monkeypatch):
    """`run --budget` twice: the first budget is too small for a VALID p50 (it says so), the second
    completes it, judging the earlier runs with the new ones when the two processes' medians agree."""
    from pipeline.run import RunRequest, run_pipeline

    root = tmp_path / "results"
    shutil.copytree(quick_run[0], root)
    monkeypatch.setenv("DETBENCH_RESULTS", str(root))
    trained, _ = models

    def settings(minutes):
        return _single_row(bench_runs=None, budget_minutes=minutes, smoke=False, nodes=False, per_image=0,
                           eval_limit=8, threads=1)

    first = run_pipeline(RunRequest([trained.name], providers=["cpu"], report=False, strict=True), settings(0.005))
    (bench1,) = [o for o in first.outcomes if o.step == "bench"]
    assert bench1.status == "done" and "p50 INVALID" in bench1.reason and "budget" in bench1.reason
    rec1 = _records(root, "bench", trained.name, "cpu", size=trained.input_size)[-1]
    assert rec1["data"]["latency_validity"]["verdicts"]["p50"]["verdict"] == "INVALID"
    assert rec1["data"]["threads"] == 1 and rec1["settings"]["threads"] == 1  # the count that ran, stated

    second = run_pipeline(RunRequest([trained.name], providers=["cpu"], report=False, strict=True), settings(0.5))
    (bench2,) = [o for o in second.outcomes if o.step == "bench"]
    rec2 = _records(root, "bench", trained.name, "cpu", size=trained.input_size)[-1]
    sched = rec2["data"]["schedule"]
    valid = rec2["data"]["latency_validity"]["verdicts"]["p50"]["verdict"] == "VALID"
    # a quiet machine makes it VALID (11 runs of ~0.1 s); a loaded one may not: then the record says why
    assert ("cpu: p50 VALID" in bench2.reason) == valid and sched["p50_valid"] == valid
    assert valid or sched["reason"]
    assert sched["earlier_runs"] == rec1["data"]["runs"] and sched["new_runs"] >= 1
    if sched["pooling"].startswith("pooled"):
        assert rec2["data"]["samples_ms"][:sched["earlier_runs"]] == rec1["data"]["samples_ms"]
        assert rec2["data"]["runs"] == sched["earlier_runs"] + sched["new_runs"]
    else:  # the machine changed between the two processes beyond the measured spread: not mixed
        assert sched["pooling"].startswith("not pooled") and rec2["data"]["runs"] == sched["new_runs"]
