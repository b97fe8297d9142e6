"""A time budget for timing many (model, backend) pairs: a VALID p50 for every pair first, then p90.

``run`` times every row on every backend. Timing each pair for a fixed time either wastes
the budget on fast pairs or leaves slow ones INVALID; :func:`schedule` spends one budget
(``ScheduleSettings.budget_s``, wall seconds including opening models) in two phases:

The budget counts timing and re-opening; each model's *first* opening (cold start, parity
check, per-layer profile: a fixed cost of the row whatever the budget) extends it.

1. **p50**: rounds over every pair still without a VALID p50 (:mod:`runtime.stats`: 11 runs,
   ``p50_min_duration_s``, the median's confidence interval within its bound), each pair
   running for one slice (``slice_s``, at least one run) per round. It runs in two passes:
   first every pair gets the runs and seconds the rule needs at least (pairs that have them
   wait, and their models may be closed to make room), and only then does the budget buy
   more runs for pairs whose median is not yet stable. Without the first pass, a few fast but
   noisy pairs kept their models open and took runs until their caps while the slowest models,
   opened last, were left with one run each (seen on a full ``run``). The second pass gives each
   pair a whole slice a round and shares time equally (a pair whose run outlasts the slice runs
   every few rounds): a noisy host needs hundreds of runs for a narrow median, cheap for fast
   pairs, and a round of one run each let the slowest models take most of the time. Groups open in
   decreasing ``PairSpec.cost`` (a model's operations), so the slowest start first. Rounds go over the
   pairs of every open model in turn, the models' and the backends' order rotating from round
   to round, so a drift of the machine (other load, clocks) spreads over all pairs alike
   instead of falling on whichever was timed last. A pair stops when its p50 is VALID, or
   gives up with the reason: *too slow for the budget* (its runs still needed, at its own
   speed, exceed what is left), *capped* (timed for the larger of ``pair_cap_s`` and three
   times the runs p50 needs without a VALID p50: unstable, the verdict's reason says how).
2. **p90** with what is left: the pairs whose p90 is cheapest to complete (runs still
   needed for 64 and ``min_duration_s``, at their own speed) first, as many as the left-over
   budget holds (so the count of VALID p90 figures is the largest the budget allows), then
   interleaved in rounds as in phase 1. A pair whose 64 runs would exceed the rules' upper
   bound (``max_duration_s``) is not tried (its p90 would be INVALID "capped" anyway).

**Earlier samples.** A pair may bring the samples of an earlier process (``PairSpec.prior``,
from its bench record): a pair whose earlier p50 is VALID is not timed again in phase 1.
New samples are pooled with earlier ones only when the two processes' medians differ by
at most ``spread`` (default :data:`PROCESS_SPREAD`: the largest process-to-process change of
one configuration's median seen here, the figure ``compare`` uses); otherwise the
earlier samples are dropped and the pair is judged on this process's samples alone
(``PairOutcome.pooling`` says which) — except for a pair whose earlier p50 was VALID (timed
again only for p90): its earlier runs stand. So a second ``run`` with a larger budget completes
what the first left INVALID without mixing two machine states, and never undoes what it had.

**Models kept open.** The pairs of one ``group`` (one ONNX file: its backends side by side)
open and close together (:class:`PairTimer`). Groups open in order while the sum of their
``memory_mb`` stays within ``memory_mb`` (at least one group); a group is closed when it has
nothing left to time in the current phase and another group needs the room. With enough
memory every model stays open across rounds; otherwise the rounds go over a window of
models and opening cost is paid again in phase 2 (it is part of the budget).

The timer and the clock are parameters, so the scheduler is tested with fake pairs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol

from core.errors import ConfigError
from runtime.stats import Latency, ValidityRules, queries_needed

# Largest change of one configuration's median between two processes measured here
# (report/compare.py: 8.5 % between two pooled triples of yolov3-tiny runs).
PROCESS_SPREAD = 0.085


class PairTimer(Protocol):
    def open(self, group: Hashable) -> float:
        """Open every backend of ``group`` (warmed up); returns its resident memory in MB (0 if unknown)."""

    def close(self, group: Hashable) -> None:
        """Release ``group``'s backends."""

    def run(self, key: Hashable, seconds: float) -> list[float]:
        """Run pair ``key`` (its group is open) one call after the other until ``seconds`` have passed
        (at least once); milliseconds of each call."""


@dataclass(frozen=True)
class PairSpec:
    key: Hashable
    group: Hashable
    prior: tuple[float, ...] = ()  # an earlier process's samples (ms)
    memory_mb: float = 0.0  # estimate before the group is opened
    cost: float = 0.0  # any measure of a run's time known before opening (operations): larger opens first


@dataclass(frozen=True)
class ScheduleSettings:
    budget_s: float
    rules: ValidityRules = field(default_factory=ValidityRules)
    slice_s: float = 0.5
    pair_cap_s: float = 30.0
    memory_mb: float | None = None  # None: every group may stay open
    spread: float = PROCESS_SPREAD
    p90: bool = True

    def __post_init__(self):
        if self.budget_s <= 0:
            raise ConfigError(f"--budget {self.budget_s / 60:g}: must be positive (minutes of timing)")
        if self.slice_s <= 0 or self.pair_cap_s <= 0:
            raise ConfigError("slice_s and pair_cap_s must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "slice_s": self.slice_s, "pair_cap_s": self.pair_cap_s,
                "memory_mb": self.memory_mb, "spread": self.spread, "p90": self.p90, "rules": self.rules.to_dict()}


@dataclass
class PairOutcome:
    key: Hashable
    samples: list[float]  # what the pair is judged on (pooled or this process's)
    new_samples: list[float]
    prior_n: int
    pooling: str  # "none" (no earlier samples) | "pooled" | "not pooled: ..." | "earlier only"
    p50_valid: bool
    p90_valid: bool
    reason: str = ""  # why p50 (or, with p50 VALID, p90) is not VALID, in words
    rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"n": len(self.samples), "new_runs": len(self.new_samples), "earlier_runs": self.prior_n,
                "pooling": self.pooling, "p50_valid": self.p50_valid, "p90_valid": self.p90_valid,
                "reason": self.reason, "rounds": self.rounds}


@dataclass
class _Pair:
    spec: PairSpec
    new: list[float] = field(default_factory=list)
    rounds: int = 0
    gave_up: str = ""
    p90_note: str = ""

    @property
    def timed_s(self) -> float:
        return sum(self.new) / 1e3


def combine(prior, new, spread: float = PROCESS_SPREAD) -> tuple[list[float], str]:
    """The samples a pair is judged on, and how: earlier and new samples pooled when their medians
    agree within ``spread``, else the new ones alone."""
    prior, new = list(prior), list(new)
    if not prior:
        return new, "none"
    if not new:
        return prior, "earlier only"
    a, b = statistics.median(prior), statistics.median(new)
    change = abs(b - a) / a if a > 0 else 0.0
    if change <= spread:
        return prior + new, f"pooled: medians {a:.3g} / {b:.3g} ms differ by {100 * change:.1f} % <= {100 * spread:g} %"
    return new, (f"not pooled: medians {a:.3g} / {b:.3g} ms differ by {100 * change:.1f} % > {100 * spread:g} % "
                 "(the process-to-process spread): judged on this process's runs only")


def schedule(pairs: list[PairSpec], timer: PairTimer, settings: ScheduleSettings,
             clock: Callable[[], float] = time.perf_counter,
             progress: Callable[[str], None] | None = None) -> dict[Hashable, PairOutcome]:
    """Spend ``settings.budget_s`` timing ``pairs`` (module docstring); one outcome per pair."""
    say = progress or (lambda _m: None)
    rules = settings.rules
    deadline = clock() + settings.budget_s
    state = {p.key: _Pair(p) for p in pairs}
    groups: dict[Hashable, list[_Pair]] = {}
    for p in sorted(state.values(), key=lambda q: -q.spec.cost):  # stable: equal costs keep their order
        groups.setdefault(p.spec.group, []).append(p)
    opened: dict[Hashable, float] = {}  # group -> memory MB
    failed: dict[Hashable, str] = {}  # group -> why it could not be opened
    first_opened: set = set()
    n50 = queries_needed(0.5, rules.confidence, rules.above)
    n90 = max(rules.min_queries, queries_needed(0.90, rules.confidence, rules.above))

    cache: dict[Hashable, tuple[int, Latency]] = {}
    # A pair an earlier process left with a VALID p50 is timed again only for p90; if this process's
    # runs cannot be pooled with the earlier ones (another machine state), the earlier VALID runs stand
    # rather than a handful of new ones (seen: a loaded second run turned 7 VALID p50s INVALID).
    prior_valid = {p.spec.key for p in state.values()
                   if p.spec.prior and Latency.of(list(p.spec.prior), rules).verdicts["p50"].valid}

    def judged_samples(p: _Pair) -> tuple[list[float], str]:
        samples, pooling = combine(p.spec.prior, p.new, settings.spread)
        if p.spec.key in prior_valid and pooling.startswith("not pooled"):
            detail = pooling.split(":", 1)[1].split(" (the process", 1)[0].strip()
            return list(p.spec.prior), f"earlier only: this process's runs not pooled ({detail}); the earlier VALID runs stand"
        return samples, pooling

    def judged(p: _Pair) -> Latency:
        hit = cache.get(p.spec.key)
        if hit is None or hit[0] != len(p.new):  # samples only ever grow: their count identifies them
            hit = cache[p.spec.key] = (len(p.new), Latency.of(judged_samples(p)[0], rules))
        return hit[1]

    def has_samples(p: _Pair) -> bool:
        return bool(p.spec.prior or p.new)

    def p50_ok(p: _Pair) -> bool:
        return has_samples(p) and judged(p).verdicts["p50"].valid

    def p90_ok(p: _Pair) -> bool:
        return has_samples(p) and judged(p).verdicts["p90"].valid

    def per_run_s(p: _Pair) -> float | None:
        own = p.new or list(p.spec.prior)
        return statistics.median(own) / 1e3 if own else None

    def memory(group) -> float:
        return opened.get(group) or max((p.spec.memory_mb for p in groups[group]), default=0.0)

    def admit(group, pending) -> bool:
        """Open ``group`` if memory allows, closing open groups without pending work first."""
        if group in opened:
            return True
        if settings.memory_mb is not None:
            for g in [g for g in opened if g not in pending]:
                if sum(memory(o) for o in opened) + memory(group) <= settings.memory_mb:
                    break
                timer.close(g)
                del opened[g]
            if opened and sum(memory(o) for o in opened) + memory(group) > settings.memory_mb:
                return False
        nonlocal deadline
        began = clock()
        try:
            opened[group] = timer.open(group) or memory(group)
            if group not in first_opened:  # a model's first opening (cold start, parity, per-layer
                first_opened.add(group)    # profile) is the row's fixed cost, not timing: off the budget
                deadline += clock() - began
        except Exception as exc:  # noqa: BLE001 — one model that cannot open must not stop the others' timing
            failed[group] = f"failed to open: {type(exc).__name__}: {exc}"
            for p in groups[group]:
                p.gave_up = failed[group]
            return False
        return True

    def slice_for(p: _Pair, runs_needed: int, seconds_needed: float) -> float:
        """One slice, shortened to what the pair still lacks so that no run is timed past validity."""
        run_s = per_run_s(p)
        if not run_s or (runs_needed <= 0 and seconds_needed <= 0):
            # counts met but the median not yet stable: how many more runs it needs is not known, so
            # a whole slice (this was one run a round: 26 runs of yolov3-tiny in a full run's budget)
            return settings.slice_s
        return min(settings.slice_s, max((runs_needed - 0.5) * run_s, seconds_needed, 1e-9))

    def rounds(work: Callable[[_Pair], bool], stop: Callable[[_Pair], str], phase: str, fair: bool = False) -> None:
        """Rounds over the pairs for which ``work`` holds until none is left or the budget is spent;
        ``stop(pair)`` after each slice: "" to go on, else why the pair stops. ``fair``: every pair
        earns one slice of time a round and runs once its credit covers a run, so a pair whose
        single run outlasts the slice runs every few rounds instead of taking that long every round."""
        k = 0
        credit: dict[Hashable, float] = {}
        while True:
            pending = [g for g in groups if any(work(p) for p in groups[g])]
            if not pending:
                return
            window = [g for g in pending if g in opened]
            for g in pending:
                if g not in opened and admit(g, pending):
                    window.append(g)
            pending = [g for g in pending if g not in failed]
            if not pending:
                return
            if not window:  # nothing fits beside what is open: free everything, take the first
                for g in list(opened):
                    timer.close(g)
                    del opened[g]
                if not admit(pending[0], pending):
                    continue
                window = [pending[0]]
            order = [g for g in pending if g in window]
            for g in order[k % len(order):] + order[:k % len(order)]:
                members = [p for p in groups[g] if work(p)]
                for p in members[k % len(members):] + members[:k % len(members)]:
                    left = deadline - clock()
                    if left <= 0:
                        for q in state.values():
                            if work(q):
                                why = judged(q).verdicts[phase].reason if has_samples(q) else "never timed"
                                q.gave_up = q.gave_up or f"budget spent before its {phase} was VALID ({why})"
                        return
                    lat = judged(p) if has_samples(p) else None
                    if fair and lat is not None:
                        credit[p.spec.key] = credit.get(p.spec.key, 0.0) + settings.slice_s
                        if credit[p.spec.key] < (per_run_s(p) or 0.0):
                            continue
                    n, timed = (lat.n, lat.duration_s) if lat else (0, 0.0)
                    need = (n50, rules.p50_min_duration_s) if phase == "p50" else (n90, rules.min_duration_s)
                    got = timer.run(p.spec.key, min(slice_for(p, need[0] - n, need[1] - timed), left))
                    p.new += got
                    if fair:
                        credit[p.spec.key] = max(credit.get(p.spec.key, 0.0) - sum(got) / 1e3, 0.0)
                    p.rounds += 1
                    why = stop(p)
                    if why:
                        p.gave_up = why
                        say(f"{p.spec.key}: {why}")
            k += 1

    # ---- phase 1: p50
    def needs_p50(p: _Pair) -> bool:
        return not p.gave_up and not p50_ok(p)

    def lacks_minimum(p: _Pair) -> bool:
        """Fewer runs or seconds than the p50 rule needs whatever the spread (pass one)."""
        if not needs_p50(p):
            return False
        if not has_samples(p):
            return True
        lat = judged(p)
        return lat.n < n50 or lat.duration_s < rules.p50_min_duration_s

    def p50_stop(p: _Pair) -> str:
        if p50_ok(p):
            return ""
        lat = judged(p)
        run_s = per_run_s(p) or 0.0
        cap = max(settings.pair_cap_s, 3 * n50 * run_s)  # a slow pair may take 3x the runs p50 needs
        if p.timed_s >= cap:
            return (f"capped: {p.timed_s:.1f} s of timing (bound: {cap:.0f} s, the larger of {settings.pair_cap_s:g} s "
                    f"and 3 x {n50} runs) without a VALID p50: " + lat.verdicts["p50"].reason)
        more = max((n50 - lat.n) * run_s, rules.p50_min_duration_s - p.timed_s, 0.0)
        left = deadline - clock()
        if more > 0 and more > left:  # (with nothing more needed but stability, the pair goes on until its cap)
            return (f"too slow for the budget: ~{more:.1f} s more timing needed at {1e3 * run_s:.0f} ms a run, "
                    f"{max(left, 0):.1f} s of the budget left")
        return ""

    rounds(lacks_minimum, p50_stop, "p50")
    # pass two buys stability in equal time shares: a noisy host needs many runs for a narrow median,
    # which fast pairs get cheaply, while a 3 s pair timed every round took 6x a fast pair's time
    rounds(needs_p50, p50_stop, "p50", fair=True)

    # ---- phase 2: p90 for the cheapest pairs the left-over budget holds
    if settings.p90:
        costs = {}
        for p in state.values():
            if p.gave_up or not p50_ok(p) or p90_ok(p):
                continue
            lat, run_s = judged(p), per_run_s(p) or 0.0
            timed = lat.duration_s
            if n90 * run_s > rules.max_duration_s:
                p.p90_note = (f"p90 not attempted: {n90} runs at {1e3 * run_s:.0f} ms exceed the "
                              f"{rules.max_duration_s:g} s bound")
                continue
            costs[p.spec.key] = max((n90 - lat.n) * run_s, rules.min_duration_s - timed, 0.0)
        left = deadline - clock()
        chosen = set()
        for key in sorted(costs, key=costs.get):
            if costs[key] * 1.1 <= left:  # 10 % for the rounds' overhead
                chosen.add(key)
                left -= costs[key] * 1.1
            else:
                state[key].p90_note = (f"p90 not attempted: ~{costs[key]:.0f} s more timing needed, the budget's "
                                       "remainder went to cheaper pairs")

        def needs_p90(p: _Pair) -> bool:
            return p.spec.key in chosen and not p.p90_note and not p90_ok(p)

        def stop90(p: _Pair) -> str:
            lat = judged(p)
            if lat.duration_s >= rules.max_duration_s and not p90_ok(p):
                p.p90_note = "p90: " + lat.verdicts["p90"].reason
            return ""

        rounds(lambda p: needs_p90(p) and not p.p90_note, stop90, "p90")
        for p in state.values():  # a budget-spent note of phase 2 is a p90 note, not a p50 failure
            if p.gave_up.startswith("budget spent before its p90"):
                p.p90_note, p.gave_up = p.gave_up, ""
    for g in list(opened):
        timer.close(g)

    out = {}
    for key, p in state.items():
        samples, pooling = judged_samples(p)
        v50 = bool(samples) and Latency.of(samples, rules).verdicts["p50"].valid
        v90 = bool(samples) and Latency.of(samples, rules).verdicts["p90"].valid
        reason = p.gave_up if not v50 else ("" if v90 else (p.p90_note or "p90 not attempted (phase 2 off)"))
        if not v50 and not reason:
            reason = "no samples" if not samples else Latency.of(samples, rules).verdicts["p50"].reason
        out[key] = PairOutcome(key, samples, list(p.new), len(p.spec.prior), pooling, v50, v90, reason, p.rounds)
    return out


__all__ = ["PROCESS_SPREAD", "PairOutcome", "PairSpec", "PairTimer", "ScheduleSettings", "combine", "schedule"]
