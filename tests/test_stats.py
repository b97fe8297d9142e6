"""Latency validity (runtime/stats.py) against MLPerf LoadGen's published thresholds, exact
binomial sums, a simulation of the estimate's coverage, and figures worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.errors import ConfigError
from runtime.stats import Latency, ValidityRules, conservative_rank, queries_needed, time_runs, upper_tail


def _exact_tail(n: int, p: float, k: int) -> float:
    # exact rational arithmetic would be overkill: integer binomial coefficients in float are exact enough here
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(max(k, 0), n + 1))


# --------------------------------------------------------------------------- the binomial model

def test_queries_needed_matches_loadgen_published_minimums():
    # MLPerf Inference LoadGen early stopping (no failures): p90 from 64 queries, p99 from 662
    assert queries_needed(0.90) == 64
    assert queries_needed(0.99) == 662
    # with no run required above the estimate (LoadGen's t = 0 case) p99 needs 459
    assert queries_needed(0.99, above=0) == 459


@pytest.mark.parametrize("n,p,k", [(64, 0.9, 63), (64, 0.9, 62), (20, 0.5, 15), (662, 0.99, 661), (300, 0.9, 280)])
def test_upper_tail_equals_the_exact_binomial_sum(n, p, k):
    assert upper_tail(n, p, k) == pytest.approx(_exact_tail(n, p, k), rel=1e-9, abs=1e-15)


def test_conservative_rank_is_the_smallest_rank_with_a_small_tail():
    for n, q in [(64, 0.9), (100, 0.5), (700, 0.99), (1000, 0.9)]:
        k = conservative_rank(n, q)
        assert _exact_tail(n, q, k) <= 0.01 < _exact_tail(n, q, k - 1)
    # by hand: P(Bin(64, .9) >= 63) = .9^64 + 64 * .1 * .9^63 = 0.00956 <= 1 %; P(>= 62) adds 0.0198 -> 0.0294
    assert conservative_rank(64, 0.9) == 63


def test_reported_p90_covers_the_true_percentile_with_99_percent_confidence():
    """Simulation: the estimate is at or above the true p90 in ~99 % of samples; the plain percentile is not."""
    rng = np.random.default_rng(7)
    true_p90 = -math.log(0.1)  # exponential(1): F^-1(0.9)
    trials = 4000
    draws = rng.exponential(1.0, size=(trials, 64)) + 10.0  # + 10 ms so RSD stays moderate; quantile shifts too
    rules = ValidityRules(min_duration_s=0)
    below_estimate = below_empirical = 0
    for row in draws:
        lat = Latency.of(row, rules)
        below_estimate += lat.p90 < true_p90 + 10.0
        below_empirical += lat.percentiles["p90"].empirical < true_p90 + 10.0
    # exact miss probability for rank 63 of 64 is 0.00956; allow ~3.5 standard errors
    assert below_estimate / trials <= 0.0096 + 3.5 * math.sqrt(0.0096 * 0.99 / trials)
    assert below_empirical / trials > 0.3


# --------------------------------------------------------------------------- verdicts

def test_twenty_runs_support_neither_p90_nor_p99():
    samples = [10.0 + 0.1 * i for i in range(20)]
    lat = Latency.of(samples)
    assert lat.p99 is None and lat.p90 is None
    assert not lat.verdicts["p99"].valid and "662 needed" in lat.verdicts["p99"].reason
    assert not lat.verdicts["p90"].valid and "64 needed" in lat.verdicts["p90"].reason
    # p50's verdict is its own: the 64-run rule of p90 never voids it; 20 runs of ~11 ms are too short a timing
    assert "20 runs < 64 required" in lat.verdicts["p90"].reason
    assert "runs <" not in lat.verdicts["p50"].reason and "0.22 s < 1 s required for p50" in lat.verdicts["p50"].reason
    assert not lat.valid
    assert lat.percentiles["p99"].empirical == pytest.approx(np.percentile(samples, 99))  # kept, never reported


def test_long_enough_run_is_valid_for_every_figure():
    rng = np.random.default_rng(1)
    samples = rng.normal(12_000 / 700, 0.4, size=700)  # 700 runs of ~17.1 ms over 12 s
    lat = Latency.of(samples, duration_s=12.0)
    assert all(v.valid for v in lat.verdicts.values()), {k: str(v) for k, v in lat.verdicts.items()}
    assert lat.valid and lat.n == 700 and lat.duration_s == 12.0
    ordered = np.sort(samples)
    assert lat.p99 == ordered[conservative_rank(700, 0.99) - 1] >= lat.percentiles["p99"].empirical
    assert lat.p90 == ordered[conservative_rank(700, 0.90) - 1]
    assert lat.p50 == pytest.approx(np.median(samples))


def test_enough_runs_but_too_short_is_invalid():
    lat = Latency.of([5.0] * 100)  # 100 runs, 0.5 s in all
    assert not lat.verdicts["p90"].valid and "timed 0.5 s < 10 s required" in lat.verdicts["p90"].reason
    assert lat.p90 == 5.0  # supported by the count, still INVALID for the duration


def test_rsd_above_the_bound_voids_the_mean_a_wide_median_interval_the_median():
    samples = [100.0, 140.0] * 50  # mean 120, std 20.1 (ddof 1): RSD 16.8 % > 10 %
    lat = Latency.of(samples, duration_s=12.0)
    assert lat.rsd == pytest.approx(math.sqrt(100 * 20 ** 2 / 99) / 120)
    assert not lat.verdicts["mean"].valid and "RSD 16.8 % > 10 % bound" in lat.verdicts["mean"].reason
    assert not lat.verdicts["p50"].valid and "unstable" in lat.verdicts["p50"].reason  # two modes 40 % apart
    assert lat.verdicts["p90"].valid and lat.p90 == 140.0
    loose = Latency.of(samples, ValidityRules(max_rsd=0.2, p50_max_ci=0.2), duration_s=12.0)
    assert loose.verdicts["mean"].valid and loose.valid


def test_smoke_runs_are_never_valid():
    rng = np.random.default_rng(2)
    lat = Latency.of(rng.normal(17.0, 0.3, size=700), duration_s=12.0, smoke=True)
    assert lat.smoke and not lat.valid
    assert all(not v.valid and "smoke run" in v.reason for v in lat.verdicts.values())
    assert lat.to_dict()["smoke"] is True and lat.to_dict()["verdicts"]["p50"]["verdict"] == "INVALID"


def test_hand_computed_figures():
    lat = Latency.of([10.0, 20.0, 30.0, 40.0])
    assert lat.n == 4 and lat.mean == 25.0 and lat.min == 10.0 and lat.max == 40.0
    assert lat.std == pytest.approx(math.sqrt((15 ** 2 + 5 ** 2 + 5 ** 2 + 15 ** 2) / 3))  # 12.91
    assert lat.rsd == pytest.approx(lat.std / 25.0)
    assert lat.duration_s == pytest.approx(0.1)  # sum of samples when the wall time is not given
    assert lat.p50 is None  # 4 runs: no order statistic bounds the median at 99 % (11 needed)
    eleven = Latency.of(list(range(1, 12)))
    assert eleven.p50 == 6.0  # median of 1..11
    ramp = Latency.of([float(i) for i in range(1, 65)], ValidityRules(min_duration_s=0))
    assert ramp.p90 == 63.0  # rank 63 of 64, worked out above
    assert ramp.verdicts["p90"].valid and ramp.p99 is None


def test_record_keeps_raw_samples():
    samples = [3.0, 1.0, 2.0]
    d = Latency.of(samples).to_dict(samples=True)
    assert d["samples_ms"] == samples  # run order, not sorted
    assert d["p90"] is None and d["verdicts"]["p90"]["verdict"] == "INVALID"


def test_bad_input_is_refused():
    with pytest.raises(ConfigError):
        Latency.of([])
    with pytest.raises(ConfigError):
        Latency.of([1.0, float("nan")])
    with pytest.raises(ConfigError, match="max_duration_s"):
        ValidityRules(min_duration_s=30, max_duration_s=10)


# --------------------------------------------------------------------------- timing until the rules hold

class _FakeClock:
    """A clock that only moves when the timed call runs, so the test never depends on wall time."""

    def __init__(self, step: float):
        self.t = 0.0
        self.step = step
        self.calls = 0

    def __call__(self) -> float:
        return self.t

    def run(self) -> None:
        self.calls += 1
        self.t += self.step


def test_time_runs_stops_when_runs_and_duration_are_both_met():
    fast = _FakeClock(0.2)  # 64 runs take 12.8 s: the run count is met last
    timing = time_runs(fast.run, clock=fast, warmup=3)
    assert len(timing.samples_ms) == 64 and fast.calls == 67 and not timing.capped
    assert timing.duration_s == pytest.approx(12.8)
    assert timing.samples_ms == pytest.approx([200.0] * 64)
    quick = _FakeClock(1 / 64)  # 10 s are met last: 640 runs (1/64 s is exact in binary floating point)
    assert len(time_runs(quick.run, clock=quick).samples_ms) == 640


def test_time_runs_caps_a_slow_model_and_says_so():
    slow = _FakeClock(1.0)  # 64 runs would take 64 s > 60 s bound
    timing = time_runs(slow.run, clock=slow)
    assert timing.capped and len(timing.samples_ms) == 60
    lat = timing.latency()
    assert lat.capped and not lat.valid and "capped" in lat.verdicts["p90"].reason
    assert lat.verdicts["p50"].valid  # 60 steady runs over 60 s: the median holds whatever the p90 lacks
    assert lat.duration_s == pytest.approx(60.0)


def test_time_runs_explicit_runs_and_seconds():
    c = _FakeClock(0.3)
    assert len(time_runs(c.run, runs=5, clock=c).samples_ms) == 5
    c = _FakeClock(0.3)
    assert len(time_runs(c.run, seconds=1.0, clock=c).samples_ms) == 4  # 0.3, 0.6, 0.9, 1.2 s
    with pytest.raises(ConfigError):
        time_runs(c.run, runs=5, seconds=1.0, clock=c)
    with pytest.raises(ConfigError):
        time_runs(c.run, runs=0, clock=c)


# --------------------------------------------------------------------------- p50's own rules

def test_median_confidence_interval_ranks_match_the_binomial_table():
    """Ranks of the distribution-free 95 % interval of the median, as tabulated (e.g. Conover,
    Practical Nonparametric Statistics, table A3): n=11 -> (2, 10), n=20 -> (6, 15), n=64 -> (24, 41)."""
    from runtime.stats import median_ci_ranks

    assert median_ci_ranks(11, 0.95) == (2, 10)
    assert median_ci_ranks(20, 0.95) == (6, 15)
    assert median_ci_ranks(64, 0.95) == (24, 41)
    assert median_ci_ranks(11, 0.99) == (1, 11)


def test_p50_valid_at_eleven_steady_runs_despite_one_hiccup():
    samples = [50.0, 50.5, 49.8, 50.2, 50.1, 49.9, 50.3, 150.0, 50.0, 49.7, 50.4]  # one 3x scheduler hiccup
    lat = Latency.of(samples, duration_s=1.5)
    assert lat.verdicts["p50"].valid, lat.verdicts["p50"].reason
    assert not lat.verdicts["mean"].valid  # the hiccup moves the mean (RSD > 10 %), not the median
    assert not lat.verdicts["p90"].valid and lat.p90 is None


def test_p50_invalid_below_eleven_runs_and_when_bimodal():
    assert not Latency.of([50.0] * 10, duration_s=5.0).verdicts["p50"].valid
    bimodal = Latency.of([40.0, 60.0] * 10)
    assert "unstable" in bimodal.verdicts["p50"].reason
