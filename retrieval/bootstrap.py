"""95% bootstrap intervals for the real-data tables (tens to hundreds of test images): one home for them.

`interval(values)`: the mean of per-query values (P@5 of each query, a hit or miss) with its percentile bootstrap
interval (scipy.stats.bootstrap, queries resampled with replacement). `auroc_interval(positives, negatives)`: the
AUROC of "positives score higher" with both groups resampled independently. `resampled(n, statistic)`: a statistic
of n items that is not a mean of per-item values (a corpus BLEU-4, or the difference of two systems' on the same
items, a paired bootstrap), with the items resampled. `Estimate.text()` prints
`0.412 [0.350, 0.471]`. Percentile intervals, not BCa: BCa fails on the degenerate resamples small sets give
(every query a hit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval and the number of items it rests on."""

    value: float
    low: float
    high: float
    n: int

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def record(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}

    def above(self, other: Estimate) -> bool:
        """This interval lies wholly above `other`'s."""
        return self.low > other.high


def _bootstrap(samples: tuple[np.ndarray, ...], statistic: Callable, seed: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    res = bootstrap(samples, statistic, n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                    vectorized=False, paired=False, random_state=np.random.default_rng(seed))  # fmt: skip
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return low, high


def interval(values: Sequence[float] | np.ndarray, seed: int = 0) -> Estimate:
    """Mean of `values` (one per query) with its 95% percentile bootstrap interval (NaN values dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if len(v) < 2 or np.all(v == v[0]):
        return Estimate(mean, mean, mean, len(v))
    low, high = _bootstrap((v,), np.mean, seed)
    return Estimate(mean, low, high, len(v))


def resampled(n: int, statistic: Callable[[np.ndarray], float], seed: int = 0) -> Estimate:
    """`statistic(indices)` over all `n` items, with its 95% percentile bootstrap interval over resamples of the items
    (`statistic` gets the resampled item indices, repeats included; for a paired comparison it scores both systems
    on the same indices)."""
    value = float(statistic(np.arange(n)))
    if n < 2:
        return Estimate(value, value, value, n)
    low, high = _bootstrap((np.arange(n),), statistic, seed)
    return Estimate(value, min(low, value), max(high, value), n)


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney form of the ROC area)."""
    p = np.asarray(positives, dtype=np.float64)[:, None]
    n = np.asarray(negatives, dtype=np.float64)[None, :]
    return float(np.mean((p > n) + 0.5 * (p == n)))


def auroc_interval(positives: Sequence[float], negatives: Sequence[float], seed: int = 0) -> Estimate:
    """AUROC of `positives` over `negatives` with a 95% bootstrap interval (each group resampled on its own)."""
    p, n = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    value = auroc(p, n)
    if len(p) < 2 or len(n) < 2:
        return Estimate(value, float("nan"), float("nan"), len(p) + len(n))
    low, high = _bootstrap((p, n), auroc, seed)
    return Estimate(value, min(low, value), max(high, value), len(p) + len(n))
