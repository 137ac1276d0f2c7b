"""Tests for s2t.stats: bootstrap intervals and paired tests against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from s2t.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap, ratio_bootstrap_ci


def test_bootstrap_ci_contains_mean_and_narrows_with_more_problems() -> None:
    rng = np.random.default_rng(1)
    small = rng.random(50) < 0.6
    large = rng.random(2000) < 0.6
    mean_s, low_s, high_s = bootstrap_ci(small, n_resamples=2000)
    mean_l, low_l, high_l = bootstrap_ci(large, n_resamples=2000)
    assert low_s <= mean_s <= high_s
    assert low_l <= mean_l <= high_l
    assert mean_s == pytest.approx(small.mean())
    assert (high_l - low_l) < (high_s - low_s) / 3


def test_bootstrap_ci_all_correct_is_degenerate() -> None:
    assert tuple(bootstrap_ci([True] * 20)) == (1.0, 1.0, 1.0)


def test_bootstrap_ci_is_deterministic_for_a_seed() -> None:
    data = [True, False, True, True, False]
    assert bootstrap_ci(data, seed=3) == bootstrap_ci(data, seed=3)


def test_bootstrap_ci_rejects_empty_and_bad_confidence() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([True], confidence=1.5)


@pytest.mark.parametrize(
    ("n01", "n10", "expected"),
    # Two-sided binomial(n01 + n10, 1/2): p = 2 * P(X <= min(n01, n10)), e.g. 2 * (C(5,0) + C(5,1)) / 32.
    [(0, 5, 2 * 0.5**5), (5, 0, 2 * 0.5**5), (1, 4, 2 * (1 + 5) / 32), (3, 3, 1.0)],
)
def test_mcnemar_exact_matches_hand_computation(n01: int, n10: int, expected: float) -> None:
    # Concordant pairs (both right / both wrong) must not change the result.
    a = [False] * n01 + [True] * n10 + [True, True, False]
    b = [True] * n01 + [False] * n10 + [True, True, False]
    result = mcnemar_exact(a, b)
    assert (result.n01, result.n10) == (n01, n10)
    assert result.p_value == pytest.approx(expected)


def test_mcnemar_no_discordant_pairs_gives_one() -> None:
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0


def test_mcnemar_length_mismatch() -> None:
    with pytest.raises(ValueError, match="equal length"):
        mcnemar_exact([True], [True, False])


def test_paired_bootstrap_identical_arrays() -> None:
    a = [True, False, True, True]
    mean_diff, low, high, p_value = paired_bootstrap(a, a, n_resamples=500)
    assert (mean_diff, low, high, p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_detects_a_clear_difference() -> None:
    a = [True] * 80 + [False] * 20
    b = [True] * 40 + [False] * 60
    result = paired_bootstrap(a, b, n_resamples=2000)
    assert result.mean_diff == pytest.approx(0.4)
    assert result.low <= 0.4 <= result.high
    assert result.low > 0
    assert result.p_value < 0.01


def test_paired_bootstrap_length_mismatch() -> None:
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_ratio_bootstrap_estimate_is_pooled_ratio() -> None:
    hits = [3, 0, 5, 1]
    points = [4, 2, 5, 1]
    estimate, low, high = ratio_bootstrap_ci(hits, points, n_resamples=2000)
    assert estimate == pytest.approx(9 / 12)
    assert 0.0 <= low <= estimate <= high <= 1.0


def test_ratio_bootstrap_rejects_zero_total_denominator() -> None:
    with pytest.raises(ValueError, match="zero"):
        ratio_bootstrap_ci([0, 0], [0, 0])


def test_gap_recovered_is_the_share_of_the_low_to_high_gap():
    from s2t.stats import gap_recovered_ci

    low = [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]  # 20%
    high = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]  # 60%
    method = [1, 1, 0, 0, 1, 1, 0, 0, 0, 0]  # 40%: half the gap
    ci = gap_recovered_ci(method, low, high, seed=0)
    assert ci.estimate == pytest.approx(0.5)
    assert ci.low <= 0.5 <= ci.high
    assert gap_recovered_ci(high, low, high).estimate == pytest.approx(1.0)
    assert gap_recovered_ci(low, low, high).low == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no gap"):
        gap_recovered_ci(method, low, low)
    with pytest.raises(ValueError, match="differ in length"):
        gap_recovered_ci(method[:-1], low, high)
