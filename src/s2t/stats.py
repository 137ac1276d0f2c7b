"""Per-task statistics: bootstrap confidence intervals and paired significance tests.

Problems are the unit of resampling everywhere: accuracy and per-problem ratios (e.g. hit@K
over the divergence points of each problem) are resampled by problem, so correlated items
inside one problem are not treated as independent. Comparisons between two methods are paired
on the same problems (McNemar's exact test, paired bootstrap).

All functions are deterministic for a given ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.stats import binomtest

# Cap on resampled index entries held at once (about 32 MB of int64), so 10k resamples of a
# few thousand problems do not allocate hundreds of megabytes.
_MAX_CHUNK_ELEMENTS = 4_000_000


class ConfidenceInterval(NamedTuple):
    """A point estimate with a percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float


class McNemarResult(NamedTuple):
    """Discordant pair counts and the exact two-sided p-value.

    ``n01``: problems only ``b`` got right; ``n10``: problems only ``a`` got right.
    """

    n01: int
    n10: int
    p_value: float


class PairedBootstrapResult(NamedTuple):
    """Mean of ``a - b`` over problems, its bootstrap interval, and a two-sided p-value."""

    mean_diff: float
    low: float
    high: float
    p_value: float


def _as_1d(values: Sequence[bool | float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _resampled_sums(columns: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Column sums over ``n_resamples`` resamples of the rows (problems), with replacement.

    ``columns`` has shape (n_problems, n_columns); the result has shape (n_resamples, n_columns).
    Every column is resampled with the same rows, which is what pairs them.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    n_rows = columns.shape[0]
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n_rows)
    sums = np.empty((n_resamples, columns.shape[1]))
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        indices = rng.integers(0, n_rows, size=(stop - start, n_rows))
        sums[start:stop] = columns[indices].sum(axis=1)
    return sums


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.nanquantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    correct: Sequence[bool | float], n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> ConfidenceInterval:
    """Mean of ``correct`` (e.g. per-problem 0/1 accuracy) with a percentile-bootstrap interval."""
    _check_confidence(confidence)
    values = _as_1d(correct, "correct")
    means = _resampled_sums(values[:, None], n_resamples, seed)[:, 0] / values.size
    return ConfidenceInterval(float(values.mean()), *_percentiles(means, confidence))


def ratio_bootstrap_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """A pooled ratio ``sum(numerators) / sum(denominators)`` with a problem-level bootstrap interval.

    Entry ``i`` is problem ``i``'s numerator and denominator (e.g. hits and divergence points), so
    problems with many items weigh more in the estimate but are resampled as one unit. Resamples
    whose denominators sum to zero are left out of the interval.
    """
    _check_confidence(confidence)
    num = _as_1d(numerators, "numerators")
    den = _as_1d(denominators, "denominators")
    if num.size != den.size:
        raise ValueError(f"numerators and denominators differ in length: {num.size} != {den.size}")
    if np.any(den < 0):
        raise ValueError("denominators must be >= 0")
    if den.sum() <= 0:
        raise ValueError("denominators sum to zero; the ratio is undefined")
    sums = _resampled_sums(np.stack([num, den], axis=1), n_resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1], np.nan)
    return ConfidenceInterval(float(num.sum() / den.sum()), *_percentiles(ratios, confidence))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemarResult:
    """McNemar's exact test: a two-sided binomial test (p = 0.5) on the discordant pairs.

    ``a[i]`` and ``b[i]`` are whether methods A and B solved problem ``i``. The p-value is 1.0
    when there are no discordant pairs.
    """
    a_arr = np.asarray(a, dtype=bool)
    b_arr = np.asarray(b, dtype=bool)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise ValueError(
            f"a and b must be 1-D and of equal length, got shapes {a_arr.shape} and {b_arr.shape}"
        )
    n01 = int(np.sum(~a_arr & b_arr))
    n10 = int(np.sum(a_arr & ~b_arr))
    if n01 + n10 == 0:
        return McNemarResult(n01, n10, 1.0)
    p_value = binomtest(n10, n01 + n10, p=0.5, alternative="two-sided").pvalue
    return McNemarResult(n01, n10, float(min(1.0, p_value)))


def paired_bootstrap(
    a: Sequence[bool | float],
    b: Sequence[bool | float],
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedBootstrapResult:
    """Paired bootstrap of ``mean(a) - mean(b)`` over problems.

    The interval is the percentile interval of the resampled differences. The two-sided p-value
    tests "no difference" by centring the bootstrap distribution on zero: the share of
    resampled differences at least as far from the observed one as the observed one is from
    zero, with a +1 correction so it is never exactly 0 (identical inputs give 1.0).
    """
    _check_confidence(confidence)
    a_arr = _as_1d(a, "a")
    b_arr = _as_1d(b, "b")
    if a_arr.size != b_arr.size:
        raise ValueError(f"a and b differ in length: {a_arr.size} != {b_arr.size}")
    diffs = a_arr - b_arr
    observed = float(diffs.mean())
    resampled = _resampled_sums(diffs[:, None], n_resamples, seed)[:, 0] / diffs.size
    # Tolerance: floating-point sums of identical differences must count as "as extreme".
    extreme = np.abs(resampled - observed) >= abs(observed) - 1e-12
    p_value = (1 + int(extreme.sum())) / (1 + n_resamples)
    return PairedBootstrapResult(observed, *_percentiles(resampled, confidence), p_value)


def gap_recovered_ci(
    method: Sequence[bool | float],
    low: Sequence[bool | float],
    high: Sequence[bool | float],
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """The share of the gap from ``low`` to ``high`` that ``method`` recovers, paired over problems.

    ``(mean(method) - mean(low)) / (mean(high) - mean(low))``, e.g. S2T between the SLM alone
    (``low``) and the LLM alone (``high``): 0 is no gain, 1 is the LLM's accuracy. All three are
    resampled with the same problems; resamples where the gap vanishes are left out of the interval.
    """
    _check_confidence(confidence)
    columns = [_as_1d(x, name) for x, name in ((method, "method"), (low, "low"), (high, "high"))]
    if len({c.size for c in columns}) != 1:
        raise ValueError(f"method, low and high differ in length: {[c.size for c in columns]}")
    m, lo, hi = columns
    if hi.mean() == lo.mean():
        raise ValueError("low and high have the same mean: there is no gap to recover")
    sums = _resampled_sums(np.stack(columns, axis=1), n_resamples, seed)
    gap = sums[:, 2] - sums[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(gap != 0, (sums[:, 0] - sums[:, 1]) / gap, np.nan)
    estimate = float((m.mean() - lo.mean()) / (hi.mean() - lo.mean()))
    return ConfidenceInterval(estimate, *_percentiles(shares, confidence))
