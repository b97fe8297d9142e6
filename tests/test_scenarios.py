"""Offline and Server scenarios (runtime.scenarios): the Poisson schedule, latency from scheduled
arrival, the QPS search, LoadGen's early-stopping verdict, and records of real (tiny) runs.

No wall-clock figure is asserted as such: queueing is checked through lower bounds that a
sleep guarantees (a sleep never returns early), the search on a pass/fail oracle of known
capacity, early stopping against scipy's binomial distribution.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from core import store
from core.errors import ConfigError
from runtime.bench import BenchSettings
from runtime.scenarios import OFFLINE, SERVER, ScenarioSettings, bench_scenario
from runtime.scenarios.common import Config, candidate_configs
from runtime.scenarios.loadgen import issue_all, issue_scheduled, poisson_schedule
from runtime.scenarios.server import Trial, early_stopping, search_qps
from tests.test_bench import tiny_detector


# --------------------------------------------------------------------------- the Poisson schedule

def test_poisson_schedule_rate_dispersion_and_seed():
    qps, n = 50.0, 20000
    arrivals = poisson_schedule(qps, n, seed=3)
    gaps = np.diff(np.concatenate(([0.0], arrivals)))
    # mean gap 1/qps: standard error of the mean of n exponentials is (1/qps)/sqrt(n), i.e. 0.7 %
    assert gaps.mean() == pytest.approx(1 / qps, rel=0.03)
    assert np.all(gaps > 0) and np.all(np.diff(arrivals) > 0)
    # exponential gaps: coefficient of variation 1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    # Poisson counts per 1-s window: variance / mean (index of dispersion) 1, mean = qps
    counts = np.bincount(arrivals.astype(int))[:-1]
    assert counts.mean() == pytest.approx(qps, rel=0.03)
    assert counts.var(ddof=1) / counts.mean() == pytest.approx(1.0, abs=0.25)
    assert np.array_equal(arrivals, poisson_schedule(qps, n, seed=3))  # fixed seed: the same schedule
    assert not np.array_equal(arrivals, poisson_schedule(qps, n, seed=4))


@pytest.mark.parametrize("qps,count", [(0.0, 10), (-1.0, 10), (5.0, 0)])
def test_poisson_schedule_rejects_bad_input(qps, count):
    with pytest.raises(ConfigError):
        poisson_schedule(qps, count, seed=0)


# --------------------------------------------------------------------------- latency from scheduled arrival

def _slow(seconds: float, log: list | None = None):
    def call():
        if log is not None:
            log.append(threading.get_ident())
        time.sleep(seconds)
    return call


def test_latency_counts_queueing_from_scheduled_arrival():
    service = 0.02
    # five queries scheduled at once on one stream: query k waits for the k before it
    issued = issue_scheduled([_slow(service)], np.zeros(5))
    lat = issued.latencies_ms
    for k in range(5):
        assert lat[k] >= (k + 1) * service * 1e3 - 0.5  # its own service plus k services of queueing
    assert np.all(np.diff(lat) >= service * 1e3 - 0.5)
    # two streams halve the queue: query k waits for floor(k / 2) services
    two = issue_scheduled([_slow(service), _slow(service)], np.zeros(6)).latencies_ms
    assert issued.per_stream == (5,)
    assert two[5] >= 3 * service * 1e3 - 0.5
    assert np.all(np.isfinite(two))


def test_latency_starts_at_the_scheduled_arrival_not_at_the_issue():
    # arrivals spaced wider than the service: no queueing, and each query waits for its own arrival
    arrivals = np.array([0.0, 0.05, 0.10])
    begun = time.perf_counter()
    issued = issue_scheduled([_slow(0.005)], arrivals)
    assert time.perf_counter() - begun >= 0.105  # the last query could not start before its arrival
    assert np.all(issued.latencies_ms >= 5.0 - 0.5)
    assert issued.samples == 3 and issued.per_stream == (3,)


def test_issue_all_reaches_the_sample_count_and_counts_batches():
    issued = issue_all([_slow(0.001), _slow(0.001)], min_samples=20, min_seconds=0.0, max_seconds=10.0, per_call=2)
    assert issued.samples >= 20 and issued.samples % 2 == 0
    assert sum(issued.per_stream) == issued.samples and len(issued.latencies_ms) == issued.samples // 2


def test_a_failing_stream_is_reported_not_swallowed():
    def boom():
        raise RuntimeError("stream broke")
    with pytest.raises(RuntimeError, match="stream broke"):
        issue_scheduled([boom], np.zeros(3))
    with pytest.raises(RuntimeError, match="stream broke"):
        issue_all([boom], min_samples=3, min_seconds=0.0, max_seconds=1.0)


# --------------------------------------------------------------------------- the QPS search

@pytest.mark.parametrize("capacity,start", [(137.0, 120.0), (137.0, 400.0), (3.3, 2.0), (55.0, 55.0)])
def test_qps_search_finds_a_known_capacity_within_ten_percent(capacity, start):
    tried = []

    def oracle(qps: float) -> Trial:  # a fake runner: its tail stays under the bound up to its capacity
        tried.append(qps)
        return Trial(qps, 1.0 if qps <= capacity else 1e9, qps <= capacity)

    found, trials = search_qps(oracle, start, tolerance=0.03, max_trials=12)
    assert found is not None and 0.9 * capacity <= found <= capacity
    assert len(trials) == len(tried) <= 12


def test_qps_search_never_goes_above_its_ceiling():
    tried = []

    def oracle(qps: float) -> Trial:  # a short trial that passes everything (the queue has not built up yet)
        tried.append(qps)
        return Trial(qps, 1.0, True)

    found, _ = search_qps(oracle, 10.0, ceiling=25.0)
    assert found == 25.0 and max(tried) == 25.0


def test_qps_search_says_none_when_nothing_passes():
    found, trials = search_qps(lambda q: Trial(q, 1e9, False), 10.0, tolerance=0.1, max_trials=6)
    # gives up once the upper end is below tolerance x the start (nothing that slow is worth serving)
    assert found is None and 2 <= len(trials) <= 6 and trials[-1].qps < 0.1 * 10.0 * 2


# --------------------------------------------------------------------------- early stopping

def _binomial_sf(k: int, n: int, q: float) -> float:
    """P(Binomial(n, q) >= k), summed term by term with exact binomial coefficients."""
    return sum(math.comb(n, j) * q ** j * (1 - q) ** (n - j) for j in range(k, n + 1))


def test_early_stopping_matches_the_binomial_upper_bound():
    n, q, conf = 1000, 0.99, 0.99
    # independent: the estimate is the order statistic X_(k) with the smallest k such that
    # P(Binomial(n, q) >= k) <= 1 - conf (X_(k) falls below the true quantile that rarely)
    k = next(k for k in range(985, n + 1) if _binomial_sf(k, n, q) <= 1 - conf)
    assert _binomial_sf(k - 1, n, q) > 1 - conf
    lat = np.arange(1, n + 1, dtype=float)  # X_(i) = i ms
    verdict = early_stopping(lat, bound_ms=float(k), q=q, confidence=conf)
    assert verdict["rank"] == k and verdict["estimate_ms"] == float(k) and verdict["supported"]
    assert verdict["over_bound"] == n - k
    assert not early_stopping(lat, bound_ms=k - 1.0, q=q, confidence=conf)["supported"]


def test_early_stopping_needs_enough_queries_for_p99():
    verdict = early_stopping(np.ones(300), bound_ms=10.0)
    assert not verdict["supported"] and verdict["estimate_ms"] is None and "662 needed" in verdict["reason"]
    assert early_stopping(np.ones(662), bound_ms=10.0)["supported"]


# --------------------------------------------------------------------------- knobs and settings

def test_candidate_configs_split_cores_between_streams():
    s = ScenarioSettings(scenario=OFFLINE)
    assert candidate_configs(s, False, 2) == [Config(1, 2, 1), Config(2, 1, 1)]
    assert candidate_configs(s, False, 6) == [Config(1, 6, 1), Config(2, 3, 1), Config(4, 1, 1), Config(6, 1, 1)]
    assert [c.batch for c in candidate_configs(s, True, 1)] == [1, 2, 4]
    fixed = ScenarioSettings(scenario=OFFLINE, streams=3, threads_per_stream=2)
    assert candidate_configs(fixed, False, 8) == [Config(3, 2, 1)]


@pytest.mark.parametrize("kwargs", [dict(scenario="multistream"), dict(streams=0), dict(p99_ms=-1.0),
                                    dict(p99_factor=1.0), dict(batches=(0,)), dict(percentile=1.0),
                                    dict(server_max_load=0.0), dict(server_max_load=1.5)])
def test_scenario_settings_reject_bad_options(kwargs):
    with pytest.raises(ConfigError):
        ScenarioSettings(**kwargs)


# --------------------------------------------------------------------------- real runs, recorded

@pytest.fixture(scope="module")
def tiny_batchable(tmp_path_factory):
    return tiny_detector(tmp_path_factory.mktemp("scen") / "tiny-n.onnx", symbolic_batch=True)


def test_offline_and_server_records_on_a_tiny_model(tiny_batchable):
    timing = BenchSettings(runs=200, rounds=2, peak=False, parity=False)
    single = bench_scenario([tiny_batchable], ["cpu"], ScenarioSettings(), timing)[0]
    offline = bench_scenario([tiny_batchable], ["cpu"], ScenarioSettings.scaled_down(OFFLINE), timing)[0]
    server = bench_scenario([tiny_batchable], ["cpu"], ScenarioSettings.scaled_down(SERVER, percentile=0.9,
                                                                                      seed=11), timing)[0]
    records = [r for r in store.load().records if r["kind"] == "bench" and r["model_sha256"] == single.model_sha256]
    by_scenario = {r["data"]["scenario"]: r for r in records}
    assert set(by_scenario) == {"single-stream", "offline", "server"}
    off = by_scenario["offline"]["data"]
    assert off["batch_axis"]["batchable"] and {t["batch"] for t in off["trials"]} == {1, 2, 4}
    assert off["images_per_s"] == pytest.approx(off["samples"] / off["duration_s"])
    assert off["images_per_s_per_core"] == pytest.approx(off["images_per_s"] / off["cores"])
    assert off["config"] in [{k: t[k] for k in ("streams", "threads_per_stream", "batch")} for t in off["trials"]]
    assert by_scenario["server"]["settings"]["seed"] == 11 and by_scenario["server"]["data"]["seed"] == 11
    srv = server.figures
    assert srv["bound_ms"] == pytest.approx(10 * srv["singlestream_p50_ms"])
    # the search stays below the capacity, where the queue is stable (settings.server_max_load)
    assert srv["search"] and max(t["qps"] for t in srv["search"]) <= 0.9 * srv["capacity_ips"] * (1 + 1e-9)
    for c in srv["confirmations"]:
        assert c["queries"] >= 64  # the early-stopping estimate of p90 needs 64
    assert offline.figures["validity"]["verdict"] in ("VALID", "INVALID")


def test_native_backend_is_refused_outside_single_stream(tiny_batchable):
    with pytest.raises(ConfigError, match="SingleStream only"):
        bench_scenario([tiny_batchable], ["native"], ScenarioSettings.scaled_down(OFFLINE), BenchSettings())


# --------------------------------------------------------------------------- report and compare

def _rec(scenario: str, provider: str, **data):
    return {"kind": "bench", "model": "m", "model_sha256": "abc", "provider": provider,
            "settings": {"scenario": scenario} if scenario != "single-stream" else {"batch": 1},
            "data": {"scenario": scenario, **data}}


def test_offline_relation_and_like_with_like_comparison():
    from report.compare import bench_sides
    from report.scenario_tables import offline_vs_single_stream

    records = [_rec("single-stream", "cpu", latency_ms={"p50": 40.0}, samples_ms=[40.0, 41.0]),
               _rec("offline", "cpu", images_per_s=60.0, config={"streams": 2, "threads_per_stream": 1, "batch": 1}),
               _rec("server", "cpu", qps=20.0)]
    [pair] = offline_vs_single_stream(records)
    assert pair["single_stream_ips"] == pytest.approx(25.0) and pair["ratio"] == pytest.approx(60.0 * 40.0 / 1000)
    sides = bench_sides(records)  # only the SingleStream record has latency samples to compare
    assert len(sides) == 1 and next(iter(sides.values())).samples_ms == [40.0, 41.0]


def test_report_tables_show_offline_and_server_per_backend():
    from types import SimpleNamespace

    from report.scenario_tables import scenario_markdown

    offline = {"images_per_s": 12.5, "images_per_s_per_core": 6.25, "validity": {"verdict": "VALID"},
               "config": {"streams": 2, "threads_per_stream": 1, "batch": 1}, "parity_verdict": "agree"}
    server = {"qps": None, "bound_ms": 300.0, "validity": {"verdict": "INVALID", "reason": "no QPS passed"}}
    rows = [SimpleNamespace(label="m", offline={"openvino": offline}, server={"cpu": server})]
    text = scenario_markdown(rows)
    assert "| network | openvino |" in text and "12.50 img/s (6.25/core; 2s x 1t x b1)" in text
    assert "| network | cpu |" in text and "— (bound 300 ms: no QPS passed)" in text


def test_offline_is_at_least_single_stream_rate_on_recorded_data():
    # bench records of the official yolov3-tiny on this project's 2-core test machine (heavily loaded at the
    # time: both figures are far below an idle machine's), SingleStream and Offline of the same file
    import json
    from pathlib import Path

    from report.scenario_tables import offline_vs_single_stream

    path = Path(__file__).parent / "data" / "scenario_records_yolov3_tiny.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pairs = offline_vs_single_stream(records)
    assert {p["provider"] for p in pairs} == {"cpu", "openvino"}
    for p in pairs:
        assert p["offline_ips"] >= p["single_stream_ips"], p


# --------------------------------------------------------------------------- run's scenario steps

def _pipeline(settings, registry, names):
    from pipeline.run import _Pipeline, targets_of

    return _Pipeline(targets_of([registry.get(n) for n in names], settings), settings, None, None, None, True)


def test_run_measures_a_few_cheap_scenarios_by_default_and_none_when_quick(registry):
    import dataclasses

    from pipeline.run import RunSettings

    backends = {"cpu": "", "openvino": "", "openvino-bf16": "", "cuda": "no GPU"}
    rows = _pipeline(RunSettings(), registry, ["yolov3-tiny", "ssd300"]).scenario_rows(backends)
    # the registered-size float row of yolov3-tiny only (not its other sizes, its INT8 row, nor ssd300)
    assert [(t.label, s, b) for t, s, b in rows] == [
        ("yolov3-tiny", "offline", "cpu"), ("yolov3-tiny", "offline", "openvino-bf16"),
        ("yolov3-tiny", "server", "cpu")]
    # no bf16 unit: OpenVINO f32 instead; no OpenVINO at all: still a row, recorded skipped with the reason
    no_bf16 = {**backends, "openvino-bf16": "no bf16 here"}
    assert [b for _, _, b in _pipeline(RunSettings(), registry, ["yolov3-tiny"]).scenario_rows(no_bf16)] == [
        "cpu", "openvino", "cpu"]
    none = {**no_bf16, "openvino": "not installed"}
    assert [b for _, _, b in _pipeline(RunSettings(), registry, ["yolov3-tiny"]).scenario_rows(none)] == [
        "cpu", "openvino-bf16", "cpu"]
    assert _pipeline(RunSettings.quick(), registry, ["yolov3-tiny"]).scenario_rows(backends) == []
    every = dataclasses.replace(RunSettings(), scenario_models=None, scenarios=("server",),
                                server_backends=("cpu", "openvino"))
    assert {(t.label, s, b) for t, s, b in _pipeline(every, registry, ["yolov3-tiny", "ssd300"]).scenario_rows(
        backends)} == {(m, "server", b) for m in ("yolov3-tiny", "ssd300") for b in ("cpu", "openvino")}
    with pytest.raises(ConfigError, match="not backend names"):
        from pipeline.run import RunRequest, run_pipeline

        run_pipeline(RunRequest(["yolov3-tiny"]), dataclasses.replace(RunSettings(), server_backends=("cpuu",)))
    # run's scenario settings shorten the search only: the validity rules are bench --scenario's
    short, full = RunSettings().scenario_settings(SERVER), ScenarioSettings(scenario=SERVER)
    for rule in ("offline_min_samples", "offline_min_seconds", "offline_max_seconds", "server_min_seconds",
                 "percentile", "confidence", "p99_factor"):
        assert getattr(short, rule) == getattr(full, rule), rule
    assert short.trial_seconds < full.trial_seconds and short.server_trial_queries < full.server_trial_queries


@pytest.mark.parametrize("option, models, scenarios, server", [
    (["--scenarios", "none"], (), ("offline", "server"), ("cpu",)),
    (["--scenarios", "all"], None, ("offline", "server"), ("cpu",)),
    (["--scenarios", "ssd300,offline"], ("ssd300",), ("offline",), ("cpu",)),
    (["--scenarios", "server", "--server-backends", "all"], ("yolov3-tiny",), ("server",),
     ("cpu", "openvino-bf16|openvino")),
    (["--server-backends", "cpu,openvino"], ("yolov3-tiny",), ("offline", "server"), ("cpu", "openvino")),
    ([], ("yolov3-tiny",), ("offline", "server"), ("cpu",)),
])
def test_run_scenario_options(option, models, scenarios, server, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import cli
    import pipeline.run
    from pipeline.run import RunSummary

    seen = {}

    def fake_run(names, settings, **kwargs):
        seen["settings"] = settings
        return RunSummary(results_dir=tmp_path)

    monkeypatch.setattr(pipeline.run, "run_pipeline", fake_run)
    result = CliRunner().invoke(cli.app, ["run", "--no-report", *option])
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.scenario_models, s.scenarios, s.server_backends) == (models, scenarios, server)


def test_run_refuses_unknown_scenario_models(registry, tmp_path, monkeypatch):
    import dataclasses

    from pipeline.run import RunRequest, RunSettings, run_pipeline

    monkeypatch.setenv("DETBENCH_RESULTS", str(tmp_path))
    with pytest.raises(ConfigError, match="--scenarios no-such-model"):
        run_pipeline(RunRequest(["yolov3-tiny"]), dataclasses.replace(RunSettings(), scenario_models=("no-such-model",)))
