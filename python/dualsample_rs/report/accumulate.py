"""Fixed-size accumulators: what a report keeps while it streams a file.

Each one takes numpy arrays a chunk at a time and never grows with the number of records
or tokens: histograms over fixed bins, exact moments merged chunk by chunk, sums by
position up to a cap, exact counts of small integers up to a cap, a reservoir sample of
fixed size, and log-sum-exp sums of sequence weights.
"""

from __future__ import annotations

import math

import numpy as np


class Moments:
    """Count, mean, variance, min and max of the finite values seen (Chan's merge of
    per-chunk moments, so that a mean of 64M tokens does not drift)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_ = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, values: np.ndarray) -> None:
        v = values[np.isfinite(values)]
        if v.size == 0:
            return
        n, mean = v.size, float(v.mean())
        m2 = float(((v - mean) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean_
        self.mean_ += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    @property
    def mean(self) -> float:
        return self.mean_ if self.n else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan


class Histogram:
    """Counts in `bins` equal bins over [lo, hi] (hi in the last bin), counts below and
    above, the number of non-finite values, and the finite values' exact moments.

    Args:
        lo, hi: the binned range.
        bins: how many bins.
    """

    def __init__(self, lo: float, hi: float, bins: int) -> None:
        self.lo, self.hi, self.bins = lo, hi, bins
        self.edges = np.linspace(lo, hi, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.below = 0
        self.above = 0
        self.nonfinite = 0
        self.moments = Moments()

    def add(self, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        self.nonfinite += int(values.size - np.count_nonzero(finite))
        v = values[finite]
        self.moments.add(v)
        index = np.floor((v - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.int64)
        index[v == self.hi] = self.bins - 1
        self.below += int(np.count_nonzero(index < 0))
        self.above += int(np.count_nonzero(index >= self.bins))
        inside = index[(index >= 0) & (index < self.bins)]
        self.counts += np.bincount(inside, minlength=self.bins)

    @property
    def n(self) -> int:
        """Finite values seen (inside the range or not)."""
        return self.moments.n

    def quantile(self, q: float) -> float:
        """The q-quantile, interpolated within its bin; ``lo``/``hi`` when it falls below or
        above the range (the text marks those), NaN when nothing was seen."""
        n = self.n
        if n == 0:
            return math.nan
        target = q * n
        if target <= self.below:
            return self.lo
        cumulative = self.below + np.cumsum(self.counts)
        i = int(np.searchsorted(cumulative, target))
        if i >= self.bins:
            return self.hi
        before = cumulative[i] - self.counts[i]
        share = (target - before) / self.counts[i] if self.counts[i] else 0.0
        return float(self.edges[i] + share * (self.edges[i + 1] - self.edges[i]))


class IntCounts:
    """Exact counts of non-negative integers below `cap`, and how many were at or above
    it (their largest kept): exact quantiles of lengths without keeping the lengths."""

    def __init__(self, cap: int) -> None:
        self.counts = np.zeros(cap, dtype=np.int64)
        self.overflow = 0
        self.max = -1

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        self.max = max(self.max, int(values.max()))
        cap = self.counts.size
        over = values >= cap
        self.overflow += int(np.count_nonzero(over))
        self.counts += np.bincount(values[~over], minlength=cap)

    @property
    def n(self) -> int:
        return int(self.counts.sum()) + self.overflow

    @property
    def mean(self) -> float:
        # overflow values are counted at the cap; the text says when there are any
        n = self.n
        if n == 0:
            return math.nan
        cap = self.counts.size
        return float((self.counts * np.arange(cap)).sum() + self.overflow * cap) / n

    def quantile(self, q: float) -> float:
        n = self.n
        if n == 0:
            return math.nan
        cumulative = np.cumsum(self.counts)
        i = int(np.searchsorted(cumulative, math.ceil(q * n)))
        return float(i) if i < self.counts.size else float(self.max)


class PositionMeans:
    """Mean of a per-token value by position in its sequence, positions below `cap`."""

    def __init__(self, cap: int) -> None:
        self.sums = np.zeros(cap)
        self.counts = np.zeros(cap, dtype=np.int64)
        self.beyond = 0

    def add(self, positions: np.ndarray, values: np.ndarray) -> None:
        keep = np.isfinite(values)
        positions, values = positions[keep], values[keep]
        cap = self.sums.size
        inside = positions < cap
        self.beyond += int(positions.size - np.count_nonzero(inside))
        self.sums += np.bincount(positions[inside], weights=values[inside], minlength=cap)
        self.counts += np.bincount(positions[inside], minlength=cap)

    def means(self) -> np.ndarray:
        """Mean at each position up to the last one seen (NaN where none)."""
        seen = np.flatnonzero(self.counts)
        last = int(seen[-1]) + 1 if seen.size else 0
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums[:last] / self.counts[:last]


class Reservoir:
    """A uniform sample of at most `size` of the values seen (Vitter's algorithm R, seeded
    so that a report is reproducible), beside exact moments of all of them."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.sample = np.empty(size)
        self.seen = 0
        self.moments = Moments()
        self._rng = np.random.default_rng(seed)

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        self.moments.add(values)
        size = self.sample.size
        fill = min(max(size - self.seen, 0), values.size)
        self.sample[self.seen : self.seen + fill] = values[:fill]
        rest = values[fill:]
        if rest.size:
            # the i-th value seen (0-based) replaces a random slot with probability size/(i+1);
            # numpy's fancy assignment keeps the last of repeated slots, as the serial loop would
            index = self.seen + fill + np.arange(rest.size)
            slot = self._rng.integers(0, index + 1)
            take = slot < size
            self.sample[slot[take]] = rest[take]
        self.seen += values.size

    def values(self) -> np.ndarray:
        return self.sample[: min(self.seen, self.sample.size)]


class LogSumExp:
    """log Σ exp(x) over every x seen, and log Σ exp(2x): the effective sample size of
    weights exp(x) whatever their scale (a sequence weight may be e^±500)."""

    def __init__(self) -> None:
        self.n = 0
        self.lse = -math.inf
        self.lse2 = -math.inf

    def add(self, x: np.ndarray) -> None:
        x = x[~np.isnan(x)]
        if x.size == 0:
            return
        self.n += x.size
        self.lse = float(np.logaddexp(self.lse, np.logaddexp.reduce(x)))
        self.lse2 = float(np.logaddexp(self.lse2, np.logaddexp.reduce(2 * x)))

    def ess_fraction(self) -> float:
        """(Σw)² / (n Σw²), in (0, 1]; NaN before any weight."""
        if self.n == 0 or self.lse == -math.inf:
            return math.nan
        return math.exp(2 * self.lse - self.lse2) / self.n
