"""Statistics over seeds on known numbers: the exact sign-flip p-value against a hand enumeration of
every sign pattern, the percentile bootstrap interval against its exact distribution, verdicts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vaedyn_cli import seedstats


def enumerated_p(diffs: list[float]) -> float:
    """Two-sided p by hand: the mean of every one of the 2^n sign patterns; min(1, 2 * smaller tail)."""
    d = np.asarray(diffs, dtype=np.float64)
    t = d.mean()
    null = np.array([np.mean(d * np.array(signs)) for signs in itertools.product((1, -1), repeat=len(d))])
    eps = 1e-12 * max(1.0, abs(t))
    return min(1.0, 2 * min(np.mean(null >= t - eps), np.mean(null <= t + eps)))


@pytest.mark.parametrize("diffs", [
    [0.1, 0.2, 0.3],
    [0.1, -0.2, 0.3, 0.4],
    [-1.0, -2.0, 0.5, -0.25, -3.0],
    [1.0, 1.0, -1.0, 2.0, 0.0, 1.5],
    [3.0, -3.0],
])
def test_sign_flip_p_equals_hand_enumeration(diffs: list[float]) -> None:
    assert seedstats.sign_flip_p(diffs) == pytest.approx(enumerated_p(diffs), abs=1e-12)


def test_sign_flip_p_known_values() -> None:
    # 3 positive differences: only the all-plus pattern reaches the mean, and only all-minus its negative
    assert seedstats.sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)
    # [0.1, -0.2, 0.3, 0.4] sums to 0.6; a pattern sums to 1.0 - 2 x (the magnitudes it negates), so
    # sum >= 0.6 negates none, 0.1 or 0.2: 3 of the 16 patterns, and 3 more on the other side -> 6/16
    assert seedstats.sign_flip_p([0.1, -0.2, 0.3, 0.4]) == pytest.approx(6 / 16)
    assert seedstats.sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert seedstats.sign_flip_p([2.0, 2.0]) == pytest.approx(0.5)


def test_min_p_value() -> None:
    assert seedstats.min_p_value(2) == 0.5
    assert seedstats.min_p_value(3) == 0.25
    assert seedstats.min_p_value(6) == pytest.approx(2 / 64)
    for n in (2, 3, 4, 5):  # reached exactly when every difference has the same sign
        assert seedstats.sign_flip_p(list(np.arange(1, n + 1) * 0.1)) == pytest.approx(seedstats.min_p_value(n))


def test_bootstrap_interval_with_two_or_three_seeds_is_their_range() -> None:
    two = seedstats.mean_ci([1.0, 3.0])
    assert (two.mean, two.low, two.high, two.n) == (2.0, 1.0, 3.0, 2)
    three = seedstats.mean_ci([4.0, 1.0, 2.0])
    assert three.mean == pytest.approx(7 / 3) and (three.low, three.high) == (1.0, 4.0)
    # scipy >= 1.17 interpolates its quantile between two equal bootstrap means one ulp off them
    # (0.14588408202176872 here): the range is exact all the same
    odd = [0.11096235489995737, 0.1458840820217687]
    odd_ci = seedstats.mean_ci(odd)
    assert (odd_ci.low, odd_ci.high) == (odd[0], odd[1])
    same = seedstats.mean_ci([0.5, 0.5, 0.5])
    assert (same.mean, same.low, same.high) == (0.5, 0.5, 0.5)
    one = seedstats.mean_ci([0.7])
    assert (one.low, one.high, one.n) == (None, None, 1)
    assert one.to_json() == {"mean": 0.7, "n": 1, "values": [0.7], "ci": [None, None]}


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    means = np.array([x[list(idx)].mean() for idx in itertools.product(range(5), repeat=5)])  # all 5^5 resamples
    low, high = np.quantile(means, [0.025, 0.975])
    ci = seedstats.mean_ci(x)
    assert ci.low == pytest.approx(low, abs=0.21) and ci.high == pytest.approx(high, abs=0.21)  # grid step 0.2
    assert seedstats.mean_ci(x) == ci  # fixed rng: the same interval every time


def test_paired_difference_interval_p_and_verdicts() -> None:
    p = seedstats.paired([1.1, 1.2, 1.3], [1.0, 1.0, 1.0])
    assert p.diff.mean == pytest.approx(0.2)
    assert (p.diff.low, p.diff.high) == pytest.approx((0.1, 0.3))
    assert p.p_value == pytest.approx(0.25) and p.excludes_zero and p.sign == 1
    assert seedstats.verdict(p, lower_is_better=True) == "worse"
    assert seedstats.verdict(p, lower_is_better=False) == "better"
    assert seedstats.direction(p) == "more"
    mixed = seedstats.paired([1.1, 0.9, 1.3], [1.0, 1.0, 1.0])
    assert not mixed.excludes_zero and mixed.sign == 0
    assert seedstats.verdict(mixed, lower_is_better=True) == "no difference detected (3 seeds)"
    assert seedstats.direction(mixed) == "no difference detected (3 seeds)"
    assert seedstats.describe(p) == "+0.2 (95% CI [0.1, 0.3], p = 0.25, n = 3)"
    with pytest.raises(ValueError, match="same seeds"):
        seedstats.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        seedstats.mean_ci([1.0, float("nan")])
