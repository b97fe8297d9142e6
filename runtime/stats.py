"""Latency statistics that say whether they can be trusted, after MLPerf Inference's LoadGen.

A latency figure is only as good as the sample behind it. Following LoadGen's rules, a
result is VALID only when the timing ran for a minimum duration *and* a minimum number
of queries (runs), and a percentile is only reported when the sample supports it:

*Early-stopping estimate.* Runs are independent draws from the latency distribution F.
For the true q-quantile x_q, the number of runs faster than x_q is Binomial(n, q), so the
k-th smallest sample X_(k) lies below x_q with probability P(Binomial(n, q) >= k). The
reported percentile is the smallest order statistic for which that probability is at most
1 - confidence (99 %): with 99 % confidence the true percentile is not above the reported
value, i.e. the figure errs on the slow side. As in LoadGen, at least one run must lie
above the reported value (the sample maximum, which a single scheduler hiccup sets, is
never the estimate); the sample supports the percentile only when such an order statistic
exists. That gives the minimum run counts LoadGen publishes: 64 for p90 and 662 for p99
(and 11 for p50), computed here by :func:`queries_needed` rather than quoted.

p50 is reported as the sample median (a central value, not a bound), p90 and p99 as the
early-stopping estimates; the plain empirical percentiles are kept beside them.

Per figure, a :class:`Verdict` says VALID or INVALID with every reason that applies to
THAT figure, so a p50 is never voided because a p90 it does not show lacks runs:

- p50: at least :func:`queries_needed` (0.5) = 11 runs, ``p50_min_duration_s`` of timing (so a
  median is never judged from a burst shorter than a few scheduler quanta and warm caches of
  a single moment), and *stability*: the distribution-free ``p50_ci_confidence`` confidence
  interval of the median (order statistics from Binomial(n, 1/2)) lies within
  ``p50_max_ci`` of the median. This is the stability measure of a median: an occasional
  scheduler hiccup inflates the standard deviation but does not move the median or its
  interval, while a bimodal or drifting sample widens the interval and stays INVALID until
  enough runs pin the median down;
- p90/p99: ``min_queries`` runs and ``min_duration_s`` seconds (the upper time bound reached
  first: "capped"), and the early-stopping estimate's own run count (64 / 662);
- mean: ``min_queries`` runs, ``min_duration_s`` and a relative standard deviation within
  ``max_rsd`` (a mean moves with every outlier);
- any figure of a smoke run (``--quick``: sized for speed, never a measurement).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from core.errors import ConfigError

FIGURES = ("mean", "p50", "p90", "p99")
QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


@dataclass(frozen=True)
class ValidityRules:
    """When a latency result is VALID, and how long :func:`time_runs` keeps timing.

    ``min_queries`` runs and ``min_duration_s`` seconds, whichever is later; timing stops at
    ``max_duration_s`` even if they are not met (the result is then INVALID, "capped").
    ``max_rsd``: relative standard deviation (std / mean) above which the mean and p50 are
    INVALID. ``confidence`` and ``above``: the early-stopping estimate's confidence and how
    many runs must lie above a reported percentile (LoadGen: 99 % and 1).
    """

    min_queries: int = 64
    min_duration_s: float = 10.0
    max_duration_s: float = 60.0
    max_rsd: float = 0.10
    confidence: float = 0.99
    above: int = 1
    p50_min_duration_s: float = 1.0
    p50_ci_confidence: float = 0.95
    p50_max_ci: float = 0.05

    def __post_init__(self):
        if self.min_queries < 1:
            raise ConfigError(f"min_queries {self.min_queries}: must be at least 1")
        if self.min_duration_s < 0:
            raise ConfigError(f"min_duration_s {self.min_duration_s}: must be 0 or more")
        if self.max_duration_s < self.min_duration_s:
            raise ConfigError(f"max_duration_s {self.max_duration_s} is below min_duration_s {self.min_duration_s}: "
                              "the time bound must leave room for the minimum duration")
        if self.max_rsd <= 0:
            raise ConfigError(f"max_rsd {self.max_rsd}: must be positive (e.g. 0.10 for 10 %)")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"confidence {self.confidence}: must be in [0.5, 1), e.g. 0.99")
        if self.above < 0:
            raise ConfigError(f"above {self.above}: must be 0 or more")
        if self.p50_min_duration_s < 0:
            raise ConfigError(f"p50_min_duration_s {self.p50_min_duration_s}: must be 0 or more")
        if not 0.5 <= self.p50_ci_confidence < 1:
            raise ConfigError(f"p50_ci_confidence {self.p50_ci_confidence}: must be in [0.5, 1), e.g. 0.95")
        if self.p50_max_ci <= 0:
            raise ConfigError(f"p50_max_ci {self.p50_max_ci}: must be positive (e.g. 0.05 for 5 %)")

    def describe(self) -> str:
        """One sentence for ``--help`` and report notes."""
        return (f"VALID needs at least {self.min_queries} runs and {self.min_duration_s:g} s of timing, whichever is "
                f"later (timing stops at {self.max_duration_s:g} s: INVALID 'capped'); p90/p99 are MLPerf LoadGen "
                f"early-stopping estimates ({100 * self.confidence:g} % upper bounds, reported from "
                f"{queries_needed(0.90, self.confidence, self.above)} / "
                f"{queries_needed(0.99, self.confidence, self.above)} "
                f"runs on); mean needs RSD <= {100 * self.max_rsd:g} %; p50 is VALID from "
                f"{queries_needed(0.5, self.confidence, self.above)} runs and {self.p50_min_duration_s:g} s when the "
                f"{100 * self.p50_ci_confidence:g} % confidence interval of the median is within "
                f"+/-{100 * self.p50_max_ci:g} % of it")

    def to_dict(self) -> dict[str, Any]:
        return {"min_queries": self.min_queries, "min_duration_s": self.min_duration_s,
                "max_duration_s": self.max_duration_s, "max_rsd": self.max_rsd, "confidence": self.confidence,
                "above": self.above, "p50_min_duration_s": self.p50_min_duration_s,
                "p50_ci_confidence": self.p50_ci_confidence, "p50_max_ci": self.p50_max_ci}


# --------------------------------------------------------------------------- the binomial model

def _log_binomial_pmf(n: int, p: float) -> np.ndarray:
    """log P(Binomial(n, p) = j) for j = 0..n (0 < p < 1), by the ratio of successive terms."""
    j = np.arange(n, dtype=np.float64)
    steps = np.log((n - j) / (j + 1)) + math.log(p / (1 - p))
    return np.concatenate(([n * math.log1p(-p)], n * math.log1p(-p) + np.cumsum(steps)))


def upper_tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = _log_binomial_pmf(n, p)[k:]
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def conservative_rank(n: int, q: float, confidence: float = 0.99) -> int | None:
    """Smallest 1-based rank k with P(X_(k) < true q-quantile) <= 1 - confidence, or None.

    P(X_(k) < x_q) = P(Binomial(n, q) >= k): the tail sums from the top down give, for each
    k, that probability; the first k whose tail is small enough is the estimate's rank.
    """
    if n < 1:
        return None
    logs = _log_binomial_pmf(n, q)
    top = logs.max()
    tails = np.cumsum(np.exp(logs - top)[::-1])[::-1] * math.exp(top)  # tails[k] = P(Bin >= k), k = 0..n
    ok = np.nonzero(tails <= 1 - confidence)[0]
    return int(ok[0]) if ok.size else None


@functools.lru_cache(maxsize=64)
def queries_needed(q: float, confidence: float = 0.99, above: int = 1) -> int:
    """Fewest runs whose early-stopping estimate of the q-quantile leaves ``above`` runs above it."""
    n = above + 1
    # P(Binomial(n, q) >= n - above) falls as n grows: walk up to the first n that is small enough
    while upper_tail(n, q, n - above) > 1 - confidence:
        n += 1
    return n


def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int]:
    """1-based ranks (l, n - l + 1) of the distribution-free ``confidence`` interval of the median:
    the largest l with P(Binomial(n, 1/2) <= l - 1) <= (1 - confidence) / 2 (at least 1)."""
    alpha = (1 - confidence) / 2
    logs = _log_binomial_pmf(n, 0.5)
    top = logs.max()
    cdf = np.cumsum(np.exp(logs - top)) * math.exp(top)  # cdf[j] = P(Binomial(n, 1/2) <= j)
    ok = np.nonzero(cdf[: (n + 1) // 2] <= alpha)[0]
    lo = int(ok[-1]) + 1 if ok.size else 1
    return min(lo, (n + 1) // 2), n - min(lo, (n + 1) // 2) + 1


def median_ci_halfwidth(samples, confidence: float = 0.95) -> float:
    """The larger distance from the median to either end of its confidence interval, relative to
    the median (0.05: the true median lies within +/-5 % at that confidence)."""
    ordered = np.sort(np.asarray(list(samples), dtype=np.float64))
    med = float(np.median(ordered))
    if med <= 0:
        return 0.0
    lo, hi = median_ci_ranks(ordered.size, confidence)
    return max(med - ordered[lo - 1], ordered[hi - 1] - med) / med


# --------------------------------------------------------------------------- the figures

@dataclass(frozen=True)
class Verdict:
    valid: bool
    reasons: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "VALID" if self.valid else "INVALID"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def __str__(self) -> str:
        return self.label + (f" ({self.reason})" if self.reasons else "")

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.label, "reason": self.reason}


@dataclass(frozen=True)
class Percentile:
    """One percentile: the sample's empirical value and, when supported, the reported one."""

    q: float
    empirical: float
    reported: float | None  # None: the sample cannot support it
    rank: int | None  # 1-based order statistic behind ``reported`` (the early-stopping estimate's)
    needed: int  # runs needed before this percentile is reported at all

    def to_dict(self) -> dict[str, Any]:
        return {"q": self.q, "empirical": self.empirical, "reported": self.reported, "rank": self.rank,
                "needed": self.needed}


@dataclass(frozen=True)
class Latency:
    """Milliseconds per run over ``n`` timed runs, with a verdict per figure (module docstring).

    ``p50`` is the sample median; ``p90``/``p99`` are early-stopping estimates; each is None
    when the sample cannot support it. ``duration_s``: the timing's wall time (the sum of the
    samples when not given). ``samples_ms``: the raw per-run times, in run order.
    """

    n: int
    mean: float
    std: float
    rsd: float
    min: float
    max: float
    p50: float | None
    p90: float | None
    p99: float | None
    duration_s: float
    smoke: bool
    capped: bool
    rules: ValidityRules
    verdicts: dict[str, Verdict]
    percentiles: dict[str, Percentile]
    samples_ms: tuple[float, ...] = field(repr=False, default=())

    @classmethod
    def of(cls, samples_ms, rules: ValidityRules | None = None, *, duration_s: float | None = None,
           smoke: bool = False, capped: bool = False) -> "Latency":
        rules = rules or ValidityRules()
        arr = np.asarray(list(samples_ms), dtype=np.float64)
        if arr.size == 0:
            raise ConfigError("no latency samples: time at least one run")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ConfigError("latency samples must be finite, non-negative milliseconds")
        n = int(arr.size)
        mean = float(arr.mean())
        std = float(arr.std(ddof=1)) if n > 1 else 0.0
        rsd = std / mean if mean > 0 else 0.0
        duration = float(arr.sum() / 1e3) if duration_s is None else float(duration_s)
        ordered = np.sort(arr)

        percentiles: dict[str, Percentile] = {}
        for name, q in QUANTILES.items():
            needed = queries_needed(q, rules.confidence, rules.above)
            rank = conservative_rank(n, q, rules.confidence)
            supported = rank is not None and rank <= n - rules.above
            if not supported:
                reported = None
            elif name == "p50":
                reported = float(np.median(arr))
            else:
                reported = float(ordered[rank - 1])
            percentiles[name] = Percentile(q=q, empirical=float(np.percentile(arr, 100 * q)), reported=reported,
                                           rank=rank if supported else None, needed=needed)

        smoke_reason = ["smoke run (--quick): sized for speed, not a measurement"] if smoke else []
        # the long-run rules: the tail percentiles and the mean
        common: list[str] = []
        if capped:
            common.append(f"capped: timing stopped at the {rules.max_duration_s:g} s bound after {n} runs")
        if n < rules.min_queries:
            common.append(f"{n} runs < {rules.min_queries} required")
        if duration < rules.min_duration_s:
            common.append(f"timed {duration:.1f} s < {rules.min_duration_s:g} s required")
        dispersed = f"RSD {100 * rsd:.1f} % > {100 * rules.max_rsd:g} % bound" if rsd > rules.max_rsd else None

        verdicts: dict[str, Verdict] = {}
        for figure in FIGURES:
            reasons = list(smoke_reason) + ([] if figure == "p50" else list(common))
            if figure in percentiles and percentiles[figure].reported is None:
                reasons.append(f"{n} runs cannot support {figure}: {percentiles[figure].needed} needed "
                               f"(early-stopping estimate at {100 * rules.confidence:g} % confidence)")
            if figure == "p50":
                if duration < rules.p50_min_duration_s:
                    reasons.append(f"timed {duration:.2f} s < {rules.p50_min_duration_s:g} s required for p50")
                if percentiles["p50"].reported is not None:
                    ci = median_ci_halfwidth(arr, rules.p50_ci_confidence)
                    if ci > rules.p50_max_ci:
                        reasons.append(f"unstable: the {100 * rules.p50_ci_confidence:g} % confidence interval of the "
                                       f"median spans +/-{100 * ci:.1f} % > {100 * rules.p50_max_ci:g} % bound")
            if dispersed and figure == "mean":
                reasons.append(dispersed)
            verdicts[figure] = Verdict(valid=not reasons, reasons=tuple(reasons))

        return cls(n=n, mean=mean, std=std, rsd=rsd, min=float(ordered[0]), max=float(ordered[-1]),
                   p50=percentiles["p50"].reported, p90=percentiles["p90"].reported,
                   p99=percentiles["p99"].reported, duration_s=duration, smoke=smoke, capped=capped, rules=rules,
                   verdicts=verdicts, percentiles=percentiles, samples_ms=tuple(float(x) for x in arr))

    @property
    def valid(self) -> bool:
        """The figures the defaults are sized for (mean, p50, p90) are all VALID."""
        return all(self.verdicts[f].valid for f in ("mean", "p50", "p90"))

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        """Plain JSON for a store record (``samples=True`` adds ``samples_ms``)."""
        out: dict[str, Any] = {
            "n": self.n, "mean": self.mean, "std": self.std, "rsd": self.rsd, "min": self.min, "max": self.max,
            "p50": self.p50, "p90": self.p90, "p99": self.p99, "duration_s": self.duration_s, "smoke": self.smoke,
            "capped": self.capped, "valid": self.valid,
            "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()},
            "percentiles": {k: v.to_dict() for k, v in self.percentiles.items()},
            "rules": self.rules.to_dict(),
            "definitions": "p50 = sample median; p90/p99 = MLPerf LoadGen early-stopping estimates (smallest order "
                           "statistic that is an upper bound of the true percentile at the stated confidence, with "
                           "at least `above` runs above it); None = the sample cannot support it",
        }
        if samples:
            out["samples_ms"] = list(self.samples_ms)
        return out


# --------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Timing:
    """What :func:`time_runs` measured: raw milliseconds per run and how the timing ended."""

    samples_ms: list[float]
    duration_s: float
    capped: bool
    stopped: str  # why timing stopped, in words

    def latency(self, rules: ValidityRules | None = None, *, smoke: bool = False) -> Latency:
        return Latency.of(self.samples_ms, rules, duration_s=self.duration_s, smoke=smoke, capped=self.capped)


def time_runs(run: Callable[[], Any], rules: ValidityRules | None = None, *, warmup: int = 0,
              runs: int | None = None, seconds: float | None = None,
              clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time calls of ``run`` one by one (milliseconds each) after ``warmup`` untimed calls.

    By default timing goes on until ``rules`` are met (``min_queries`` runs and
    ``min_duration_s``, whichever is later) or ``max_duration_s`` has passed (``capped``).
    ``runs`` asks for exactly that many runs, ``seconds`` for as many as start within that
    budget (at least one); the verdicts then say whether that was enough.
    """
    rules = rules or ValidityRules()
    if warmup < 0:
        raise ConfigError(f"--warmup {warmup}: must be 0 or more")
    if runs is not None and seconds is not None:
        raise ConfigError("give --runs or --seconds, not both")
    if runs is not None and runs < 1:
        raise ConfigError(f"--runs {runs}: must be at least 1")
    if seconds is not None and not 0 < seconds < math.inf:  # NaN too: `clock() >= end` would never hold
        raise ConfigError(f"--seconds {seconds}: must be a positive finite number of seconds")
    for _ in range(warmup):
        run()
    samples: list[float] = []
    capped = False
    began = clock()
    while True:
        start = clock()
        run()
        end = clock()
        samples.append((end - start) * 1e3)
        elapsed = end - began
        if runs is not None:
            if len(samples) >= runs:
                stopped = f"{runs} runs as asked"
                break
        elif seconds is not None:
            if elapsed >= seconds:
                stopped = f"{seconds:g} s budget as asked"
                break
        elif len(samples) >= rules.min_queries and elapsed >= rules.min_duration_s:
            stopped = f"rules met: {len(samples)} runs >= {rules.min_queries} and {elapsed:.1f} s >= " \
                      f"{rules.min_duration_s:g} s"
            break
        elif elapsed >= rules.max_duration_s:
            capped = True
            stopped = f"capped at the {rules.max_duration_s:g} s bound with {len(samples)} runs"
            break
    return Timing(samples_ms=samples, duration_s=elapsed, capped=capped, stopped=stopped)


__all__ = ["FIGURES", "Latency", "Percentile", "Timing", "ValidityRules", "Verdict", "conservative_rank",
           "median_ci_halfwidth", "median_ci_ranks", "queries_needed", "time_runs", "upper_tail"]
