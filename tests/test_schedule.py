"""The timing scheduler of ``run --budget`` (runtime.schedule) with fake pairs and a fake clock:
what it times, in which order, when it stops, and how a second run reuses the first one's samples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from runtime.schedule import PairSpec, ScheduleSettings, combine, schedule
from runtime.stats import Latency, ValidityRules


class FakeTimer:
    """Pairs with a latency function of the call index; the clock advances by what they 'run'."""

    def __init__(self, latency_ms: dict, open_s: float = 0.0, memory: dict | None = None):
        self.now = 0.0
        self.latency_ms = latency_ms
        self.calls = {k: itertools.count() for k in latency_ms}
        self.open_s, self.memory = open_s, memory or {}
        self.log: list = []  # ("open"|"close", group) and ("run", key)
        self.open_now: set = set()
        self.max_open = 0

    def clock(self) -> float:
        return self.now

    def open(self, group):
        self.now += self.open_s
        self.log.append(("open", group))
        self.open_now.add(group)
        self.max_open = max(self.max_open, len(self.open_now))
        return self.memory.get(group, 0.0)

    def close(self, group):
        self.log.append(("close", group))
        self.open_now.discard(group)

    def run(self, key, seconds):
        assert key[0] in self.open_now, f"{key} run while its model is closed"
        out, spent = [], 0.0
        while True:
            ms = self.latency_ms[key](next(self.calls[key]))
            out.append(ms)
            spent += ms / 1e3
            if spent >= seconds:
                break
        self.now += spent
        self.log.append(("run", key))
        return out


def _pairs(timer, **prior):
    return [PairSpec(key=k, group=k[0], prior=tuple(prior.get(f"{k[0]}_{k[1]}", ()))) for k in timer.latency_ms]


def steady(ms):
    return lambda i: ms


def test_fast_and_slow_pairs_all_reach_a_valid_p50_then_p90_for_the_cheap_ones():
    timer = FakeTimer({("a", "cpu"): steady(10.0), ("a", "ov"): steady(8.0),
                       ("b", "cpu"): steady(900.0), ("b", "ov"): steady(800.0)})
    out = schedule(_pairs(timer), timer, ScheduleSettings(budget_s=60.0), clock=timer.clock)
    assert all(o.p50_valid for o in out.values()), {k: o.reason for k, o in out.items()}
    # p50 rule: 11 runs and 1 s; the slow pair stops at its 11th run (no run wasted past validity in a slice)
    assert len(out[("b", "cpu")].samples) == 11
    assert len(out[("a", "cpu")].samples) >= 100  # 1 s at 10 ms
    # p90 for the fast model (64 runs + 10 s = ~10 s each), not for the slow one (64 x 0.9 s = 58 s > left-over)
    assert out[("a", "cpu")].p90_valid and out[("a", "ov")].p90_valid
    assert not out[("b", "cpu")].p90_valid and "p90 not attempted" in out[("b", "cpu")].reason
    assert timer.now <= 60.0 + 1.0  # one slice of overrun at most


def test_rounds_interleave_models_and_rotate_the_backends():
    timer = FakeTimer({("a", "cpu"): steady(200.0), ("a", "ov"): steady(200.0),
                       ("b", "cpu"): steady(200.0), ("b", "ov"): steady(200.0)})
    schedule(_pairs(timer), timer, ScheduleSettings(budget_s=30.0, slice_s=0.2, p90=False), clock=timer.clock)
    runs = [e[1] for e in timer.log if e[0] == "run"]
    first_round, second_round = runs[:4], runs[4:8]
    assert {k[0] for k in first_round} == {"a", "b"} and len(set(first_round)) == 4
    assert first_round[0][0] != second_round[0][0]  # the models' order rotates
    assert [k for k in first_round if k[0] == "a"] != [k for k in second_round if k[0] == "a"]  # and the backends'
    assert timer.max_open == 2  # memory unlimited: both models stay open
    assert [e for e in timer.log if e[0] == "open"] == [("open", "a"), ("open", "b")]  # opened once each


def test_noisy_pair_is_capped_with_the_reason_and_the_others_stay_valid():
    rng = np.random.default_rng(0)
    timer = FakeTimer({("calm", "cpu"): steady(20.0),
                       ("noisy", "cpu"): lambda i: float(rng.choice([20.0, 40.0]))})  # bimodal: the median never settles
    out = schedule(_pairs(timer), timer, ScheduleSettings(budget_s=120.0, pair_cap_s=5.0, p90=False),
                   clock=timer.clock)
    assert out[("calm", "cpu")].p50_valid
    noisy = out[("noisy", "cpu")]
    assert not noisy.p50_valid and noisy.reason.startswith("capped") and "unstable" in noisy.reason
    assert sum(noisy.new_samples) / 1e3 == pytest.approx(5.0, abs=0.6)  # stopped at the cap


def test_budget_too_small_says_too_slow_and_never_overruns():
    timer = FakeTimer({("fast", "cpu"): steady(5.0), ("huge", "cpu"): steady(4000.0)})
    out = schedule(_pairs(timer), timer, ScheduleSettings(budget_s=10.0), clock=timer.clock)
    assert out[("fast", "cpu")].p50_valid
    huge = out[("huge", "cpu")]
    assert not huge.p50_valid and huge.reason.startswith("too slow for the budget")
    assert len(huge.new_samples) <= 2  # one run to learn its speed (4 s), then it gives up
    assert timer.now <= 10.0 + 4.0


def test_memory_limit_keeps_a_window_of_models_open():
    timer = FakeTimer({(g, "cpu"): steady(100.0) for g in "abc"}, memory={g: 600.0 for g in "abc"})
    pairs = [PairSpec(k, k[0], memory_mb=600.0) for k in timer.latency_ms]
    out = schedule(pairs, timer, ScheduleSettings(budget_s=60.0, memory_mb=1300.0, p90=False), clock=timer.clock)
    assert all(o.p50_valid for o in out.values())
    assert timer.max_open == 2  # 3 x 600 MB > 1300 MB: two at a time
    assert ("close", "a") in timer.log or ("close", "b") in timer.log


def test_second_run_with_a_larger_budget_completes_what_the_first_left_invalid():
    # first process: too little budget for the slow pair
    first = FakeTimer({("m", "cpu"): steady(300.0), ("m", "ov"): steady(250.0)})
    out1 = schedule(_pairs(first), first, ScheduleSettings(budget_s=2.0, p90=False), clock=first.clock)
    assert not out1[("m", "cpu")].p50_valid and 0 < len(out1[("m", "cpu")].samples) < 11
    # second process, same speed (within the spread): the earlier runs are pooled, only the missing ones are timed
    second = FakeTimer({("m", "cpu"): steady(306.0), ("m", "ov"): steady(255.0)})
    prior = {"m_cpu": out1[("m", "cpu")].samples, "m_ov": out1[("m", "ov")].samples}
    out2 = schedule(_pairs(second, **prior), second, ScheduleSettings(budget_s=30.0, p90=False), clock=second.clock)
    cpu = out2[("m", "cpu")]
    assert cpu.p50_valid and cpu.pooling.startswith("pooled")
    assert cpu.prior_n == len(out1[("m", "cpu")].samples)
    assert len(cpu.samples) == 11 and len(cpu.new_samples) == 11 - cpu.prior_n
    # a pair already VALID in the first process is not timed again
    done = FakeTimer({("m", "cpu"): steady(300.0)})
    out3 = schedule(_pairs(done, m_cpu=cpu.samples), done, ScheduleSettings(budget_s=30.0, p90=False),
                    clock=done.clock)
    assert out3[("m", "cpu")].p50_valid and out3[("m", "cpu")].new_samples == [] and done.log == []


def test_samples_of_two_processes_whose_medians_differ_beyond_the_spread_are_not_pooled():
    samples, how = combine([100.0] * 8, [120.0] * 5)
    assert samples == [120.0] * 5 and how.startswith("not pooled") and "20.0 %" in how
    samples, how = combine([100.0] * 8, [105.0] * 5)
    assert len(samples) == 13 and how.startswith("pooled")
    # the pooled sample is judged by the ordinary rules: 13 steady runs over 1.3 s make a VALID p50
    assert Latency.of(samples, ValidityRules()).verdicts["p50"].valid


def test_first_opening_is_off_the_budget_reopening_on_it():
    timer = FakeTimer({("a", "cpu"): steady(10.0)}, open_s=100.0)  # a slow first open (compile, parity, profile)
    out = schedule(_pairs(timer), timer, ScheduleSettings(budget_s=5.0, p90=False), clock=timer.clock)
    assert out[("a", "cpu")].p50_valid  # the 100 s opening did not eat the 5 s of timing


def test_every_pair_gets_its_minimum_before_noisy_pairs_buy_stability():
    """Seen on a full ``run``: fast pairs whose median never settles kept their models open and
    took runs until their caps, while the slowest model, opened last for lack of memory, was left
    with one run per backend ("too slow for the budget"). Every pair's 11 runs and 1 s fit in the
    budget here (4 x 1 s + 2 x 11 x 2 s = 48 s of 60 s), so the slow pairs must reach a VALID p50;
    the noisy ones are INVALID with their reason."""
    def noisy(i):  # alternates 10 / 15 ms: the median's interval never gets within +/-5 %
        return 10.0 if i % 2 else 15.0

    latency = {(g, b): noisy for g in ("f1", "f2") for b in ("cpu", "ov")}
    latency.update({("slow", "cpu"): steady(2000.0), ("slow", "ov"): steady(2000.0)})
    timer = FakeTimer(latency, memory={"f1": 1.0, "f2": 1.0, "slow": 1.0})
    pairs = [PairSpec(key=k, group=k[0], memory_mb=1.0, cost={"slow": 100.0}.get(k[0], 1.0)) for k in latency]
    out = schedule(pairs, timer, ScheduleSettings(budget_s=60.0, memory_mb=2.0, p90=False), clock=timer.clock)
    assert out[("slow", "cpu")].p50_valid and out[("slow", "ov")].p50_valid, \
        {k: o.reason for k, o in out.items()}
    assert not any(out[(g, b)].p50_valid for g in ("f1", "f2") for b in ("cpu", "ov"))
    assert all(out[(g, b)].reason for g in ("f1", "f2") for b in ("cpu", "ov"))
    # the slowest model opened first (its cost is the largest)
    assert [e for e in timer.log if e[0] == "open"][0] == ("open", "slow")


def test_minimum_first_holds_without_cost_hints():
    """The same situation with the slow model listed last and no cost: pass one still gives it its runs."""
    def noisy(i):
        return 10.0 if i % 2 else 15.0

    latency = {(g, b): noisy for g in ("f1", "f2") for b in ("cpu", "ov")}
    latency.update({("slow", "cpu"): steady(2000.0), ("slow", "ov"): steady(2000.0)})
    timer = FakeTimer(latency, memory={"f1": 1.0, "f2": 1.0, "slow": 1.0})
    pairs = [PairSpec(key=k, group=k[0], memory_mb=1.0) for k in latency]
    out = schedule(pairs, timer, ScheduleSettings(budget_s=60.0, memory_mb=2.0, p90=False), clock=timer.clock)
    assert out[("slow", "cpu")].p50_valid and out[("slow", "ov")].p50_valid, \
        {k: o.reason for k, o in out.items()}


def test_an_earlier_valid_p50_stands_when_a_p90_attempt_cannot_be_pooled():
    """A second run on a loaded machine: the pair's earlier p50 was VALID at 100 ms; this process's
    p90 runs take 130 ms (beyond the 8.5 % process spread), so they cannot be pooled — and must not
    replace 11 VALID runs by a few INVALID ones (seen: 7 VALID p50s turned INVALID that way)."""
    earlier = [100.0] * 11
    timer = FakeTimer({("m", "cpu"): steady(130.0)})
    out = schedule(_pairs(timer, m_cpu=earlier), timer, ScheduleSettings(budget_s=30.0), clock=timer.clock)
    o = out[("m", "cpu")]
    assert o.new_samples, "phase 2 did not try p90: the case was not exercised"
    assert o.p50_valid and o.samples == earlier
    assert o.pooling.startswith("earlier only") and "30.0 %" in o.pooling and "VALID runs stand" in o.pooling
    # a pair whose earlier runs were not VALID is still judged on this process's runs alone
    timer = FakeTimer({("m", "cpu"): steady(130.0)})
    out = schedule(_pairs(timer, m_cpu=[100.0] * 5), timer, ScheduleSettings(budget_s=5.0, p90=False),
                   clock=timer.clock)
    assert out[("m", "cpu")].pooling.startswith("not pooled") and out[("m", "cpu")].p50_valid


def test_stability_is_bought_in_equal_time_shares():
    """Pass two (pairs with their 11 runs but an unstable median): a pair whose single run outlasts
    the slice runs every few rounds, not every round, so the fast noisy pairs of a shared host get
    the many runs their median needs. Time-per-round gave a 2 s pair 4x each fast pair's time (a full
    run left yolov3-tiny with 26 runs and an unstable median while the slowest models ran on)."""
    def noisy(fast, slow_calls, period):  # a slow phase on some calls: the median needs many runs
        return lambda i: fast * (1.6 if i % period < slow_calls else 1.0)

    timer = FakeTimer({("fast", "cpu"): noisy(20.0, 2, 5), ("fast", "ov"): noisy(20.0, 2, 5),
                       ("slow", "cpu"): noisy(2000.0, 1, 2)})
    out = schedule(_pairs(timer), timer, ScheduleSettings(budget_s=40.0, slice_s=0.5, p90=False),
                   clock=timer.clock)
    assert out[("fast", "cpu")].p50_valid and out[("fast", "ov")].p50_valid, {k: o.reason for k, o in out.items()}
    assert len(out[("fast", "cpu")].samples) > 60  # 40 % slow calls: a narrow median needs ~100 runs
    assert not out[("slow", "cpu")].p50_valid and len(out[("slow", "cpu")].samples) >= 11
