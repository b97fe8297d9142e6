"""`compare`: verdicts on synthetic stores with known shifts (worked out by hand), the rank
test against scipy's, and the acceptance on real benchmarks (2 threads vs 1, a run vs a repeat)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from core import store
from core.errors import ConfigError
from report.compare import (compare_accuracy, compare_latency, compare_stores, mann_whitney_greater,
                            parse_fraction)

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = {"detbench.name": "toy", "detbench.input_height": "416", "detbench.input_width": "416"}


def _bench(root: Path, samples, *, model="toy", threads=2, sha="a" * 64, provider="cpu"):
    store.append("bench", {"samples_ms": list(samples), "latency_ms": {"p50": float(np.median(samples))}},
                 model=model, model_sha256=sha, provider=provider,
                 settings={"provider": provider, "threads": threads, "runs": len(samples), "warmup": 1},
                 contract={**CONTRACT, "detbench.name": model}, root=root)


def _eval(root: Path, map50: float, map_: float, *, model="toy", images=144, ann="f" * 64):
    store.append("eval", {"map50": map50, "map": map_, "images_evaluated": images, "annotations_sha256": ann},
                 model=model, model_sha256="a" * 64, provider="cpu", settings={"limit": None},
                 contract={**CONTRACT, "detbench.name": model}, root=root)


def _profile(root: Path, params: int, macs: int, *, model="toy"):
    store.append("profile", {"mode": "static", "params": params, "macs": macs, "conv_macs": macs},
                 model=model, model_sha256="a" * 64, settings={"shapes": "static"},
                 contract={**CONTRACT, "detbench.name": model}, root=root)


# --------------------------------------------------------------------------- the rank test

def test_mann_whitney_by_hand():
    # x = [3, 4] beats y = [1, 2] in all 4 pairs: U = 4; mean 2, variance 2*2/12*(4+1) = 5/3
    u, p = mann_whitney_greater([3, 4], [1, 2])
    assert u == 4.0
    assert p == pytest.approx(0.5 * math.erfc((4 - 2 - 0.5) / math.sqrt(5 / 3) / math.sqrt(2)))  # 0.1226
    # ties count one half: pairs (1,1) .5, (1,2) 0, (2,1) 1, (2,2) .5 -> U = 2 = the null mean
    u, p = mann_whitney_greater([1, 2], [1, 2])
    assert u == 2.0 and p > 0.5


def test_mann_whitney_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = np.round(rng.gamma(20, 1.0, size=int(rng.integers(10, 80))), 1)  # rounding makes ties
        y = np.round(rng.gamma(19, 1.0, size=int(rng.integers(10, 80))), 1)
        ours_u, ours_p = mann_whitney_greater(x, y)
        ref = stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic", use_continuity=True)
        assert ours_u == pytest.approx(ref.statistic) and ours_p == pytest.approx(ref.pvalue, rel=1e-9)


# --------------------------------------------------------------------------- latency verdicts

def test_doubled_latency_is_slower():
    a = 10 + 0.01 * np.arange(40)  # 10.00 .. 10.39 ms, median 10.195
    c = compare_latency(a, 2 * a)
    assert c.verdict == "slower" and c.ratio == pytest.approx(2.0)
    # every B sample (>= 20) exceeds every A x 1.05 (<= 10.91): U = 40 * 40
    assert c.u == 1600.0 and c.p_slower < 1e-10
    assert c.ci[0] <= 2.0 <= c.ci[1]


def test_small_significant_shift_within_the_threshold_is_not_flagged():
    rng = np.random.default_rng(5)
    a = rng.normal(30.0, 0.5, size=2000)
    b = rng.normal(30.0 * 1.03, 0.5, size=2000)  # 3 % slower: real, but within 5 %
    assert mann_whitney_greater(b, a)[1] < 1e-12  # significance alone would flag it
    c = compare_latency(a, b)
    assert c.verdict == "unchanged" and 1.02 < c.ratio < 1.04


def test_large_but_noisy_shift_is_not_flagged_without_significance():
    a = np.array([10.0, 30.0] * 5)  # median 20
    b = np.array([10.0, 33.0] * 5)  # median 21.5: x1.075, but half of the runs did not change at all
    c = compare_latency(a, b)
    assert c.ratio == pytest.approx(21.5 / 20) and c.p_slower > 0.01 and c.verdict == "unchanged"


def test_faster_and_too_few():
    a = 10 + 0.01 * np.arange(40)
    assert compare_latency(a, 0.5 * a).verdict == "faster"
    few = compare_latency(a[:5], a[:5] * 3)
    assert few.verdict == "not judged" and "needs 8" in few.note


def test_accuracy_verdicts():
    base = {"map50": 0.40, "map": 0.20, "images_evaluated": 144, "annotations_sha256": "x"}
    drop = compare_accuracy(base, {**base, "map50": 0.398})  # -0.2 points
    assert drop.verdict == "less accurate" and drop.note == "mAP@0.5"
    assert drop.delta_map50_points == pytest.approx(-0.2)
    assert compare_accuracy(base, {**base, "map": 0.1995}).verdict == "unchanged"  # -0.05 points
    other = compare_accuracy(base, {**base, "map50": 0.30, "images_evaluated": 10})
    assert other.verdict == "not comparable" and "144" in other.note


def test_parse_fraction():
    assert parse_fraction("5%", "--max-slowdown") == pytest.approx(0.05)
    assert parse_fraction("0.1", "--max-slowdown") == pytest.approx(0.1)
    for bad in ("5", "fast", "-1%"):
        with pytest.raises(ConfigError, match="--max-slowdown"):
            parse_fraction(bad, "--max-slowdown")


# --------------------------------------------------------------------------- stores

def test_stores_with_known_shifts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = 20 + 0.05 * np.arange(64)
    _bench(a, base, model="toy")
    _bench(b, base * 1.5, model="toy", threads=1)  # 50 % slower
    _bench(a, base, model="steady")
    _bench(b, base * 1.01, model="steady")  # 1 % slower: within the threshold
    _bench(a, base, model="gone")
    _eval(a, 0.400, 0.200, model="steady")
    _eval(b, 0.395, 0.200, model="steady")  # -0.5 mAP@0.5 points
    _profile(a, 1000, 5000, model="toy")
    _profile(b, 1200, 5000, model="toy")
    result = compare_stores(a, b)
    by_model = {r.key.model: r for r in result.rows}
    assert by_model["toy"].latency.verdict == "slower"
    assert by_model["toy"].latency.settings_changed == {"threads": (2, 1)}
    assert by_model["toy"].size_changes == {"params (static shapes)": (1000, 1200)}
    assert by_model["steady"].latency.verdict == "unchanged"
    assert by_model["steady"].accuracy.verdict == "less accurate"
    assert [k.model for k in result.only_in_a] == ["gone"]
    assert len(result.regressions) == 2
    toy = by_model["toy"].latency
    # medians by hand: 20 + 0.05 x 31.5 = 21.575 ms, and 1.5 x that = 32.3625 ms
    assert toy.median_a == pytest.approx(21.575) and toy.median_b == pytest.approx(32.3625)
    assert any(r.startswith("toy 416x416 f32 on cpu: slower, p50 21.58 -> 32.36 ms") and "x1.500" in r
               for r in result.regressions)
    assert any(r.startswith("steady 416x416 f32 on cpu: less accurate, mAP@0.5 40.00 -> 39.50")
               for r in result.regressions)

    runner = CliRunner()
    import cli

    out = runner.invoke(cli.app, ["compare", str(a), str(b)])
    assert out.exit_code == 1, out.output
    assert "2 regression(s)" in out.output and "toy 416x416 f32 on cpu: slower" in out.output
    loose = runner.invoke(cli.app, ["compare", str(a), str(b / "results.jsonl"), "--max-slowdown", "60%",
                                    "--max-map-drop", "1", "--json"])
    assert loose.exit_code == 0, loose.output
    doc = json.loads(loose.output)
    assert doc["regressed"] is False and {r["model"] for r in doc["rows"]} == {"toy", "steady"}
    assert doc["max_slowdown"] == pytest.approx(0.6)


def test_repeats_of_one_configuration_are_pooled(tmp_path):
    a = tmp_path / "a"
    _bench(a, [10.0] * 20)
    _bench(a, [11.0] * 30)
    _bench(a, [12.0] * 10, sha="b" * 64)  # another model file: a new configuration replaces the old
    result = compare_stores(a, a)
    assert result.rows[0].latency.n_a == 10
    _bench(a, [12.5] * 15, sha="b" * 64)
    assert compare_stores(a, a).rows[0].latency.n_a == 25


def test_missing_store_is_a_config_error(tmp_path):
    import cli

    out = CliRunner().invoke(cli.app, ["compare", str(tmp_path / "nowhere"), str(tmp_path)])
    assert out.exit_code == ConfigError.exit_code and "no such results folder" in out.output


# --------------------------------------------------------------------------- acceptance on real runs

def _cli_bench(model: Path, results: Path, threads: int, runs: int) -> None:
    env = {**os.environ, "DETBENCH_RESULTS": str(results)}
    proc = subprocess.run([sys.executable, "cli.py", "bench", str(model), "--threads", str(threads), "--runs",
                           str(runs), "--warmup", "3", "--no-peak"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _pooled_median(results: Path) -> float:
    samples = [x for r in store.load("bench", root=results).records for x in r["data"]["samples_ms"]]
    return float(np.median(samples))


@pytest.fixture(scope="module")
def benched(exported, darknet_dir, tmp_path_factory):
    """yolov3-tiny (official weights) benched through the CLI: A and A2 with 2 threads, B with 1.

    The three stores are filled in interleaved rounds (order rotated each round) so that
    whatever else the machine is doing weighs on all three alike.
    """
    model = exported("yolov3-tiny", weights=darknet_dir / "yolov3-tiny.weights").path
    root = tmp_path_factory.mktemp("compare")
    stores = {"A": (root / "A", 2), "B": (root / "B", 1), "A2": (root / "A2", 2)}
    order = ["A", "B", "A2"]
    for round_ in range(3):
        for name in order[round_:] + order[:round_]:
            folder, threads = stores[name]
            _cli_bench(model, folder, threads, runs=32)
    return {name: folder for name, (folder, _) in stores.items()}


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", "compare", str(a), str(b)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_one_thread_against_two_is_flagged_as_a_slowdown(benched):
    ratio = _pooled_median(benched["B"]) / _pooled_median(benched["A"])
    if ratio < 1.3:
        # On a 2-core machine busy with other work, a second intra-op thread has no free core and can even
        # cost time: the premise (1 thread is clearly slower) does not hold, so there is nothing to detect.
        pytest.skip(f"1 thread was not clearly slower than 2 on this machine right now (median ratio {ratio:.2f}, "
                    f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    proc = _compare(benched["A"], benched["B"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = " ".join(proc.stdout.split())
    assert "yolov3-tiny 416x416 f32 on cpu: slower" in text and "threads 2 -> 1" in text


def test_a_repeat_of_the_same_configuration_is_not_flagged(benched):
    proc = _compare(benched["A"], benched["A2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no regression" in proc.stdout


def test_a_change_within_the_run_to_run_spread_is_not_a_regression():
    """Worked by hand: A's two runs have medians 10 and 11 ms (spread 10 %); B at 11.3 ms is more
    than 5 % slower than A's 10 ms run but within what A's two runs already differ by: unchanged.
    The same B against a single 10 ms run of A (no spread known) is slower, and B at 13 ms is
    slower whatever the spread."""
    from report.compare import BenchSide, compare_latency

    rng = np.random.default_rng(0)
    run1, run2 = 10 + 0.05 * rng.standard_normal(64), 11 + 0.05 * rng.standard_normal(64)
    side = BenchSide(list(run1) + list(run2), 2, {}, None, [float(np.median(run1)), float(np.median(run2))])
    assert side.run_spread == pytest.approx(0.10, abs=0.01)
    b = list(11.3 + 0.05 * rng.standard_normal(128))
    near = compare_latency(side.samples_ms, b, run_spread=side.run_spread)
    assert near.verdict == "unchanged" and "threshold raised" in near.note
    assert compare_latency(list(run1), b).verdict == "slower"
    far = compare_latency(side.samples_ms, list(13 + 0.05 * rng.standard_normal(128)), run_spread=side.run_spread)
    assert far.verdict == "slower"
