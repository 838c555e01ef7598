"""Statistics over seeds: is a difference between conditions larger than seed noise?

Pure functions on small arrays (one value per seed), used by `vaedyn study`:

- `mean_ci`: the mean over seeds and its 95 % percentile bootstrap interval
  (`scipy.stats.bootstrap`, `method="percentile"`, a fixed `rng`, BOOTSTRAP_RESAMPLES resamples).
  With n <= 3 seeds that interval is exactly the range of the seed values: the all-equal
  resamples (each has probability 1/n^n >= 1/27 > 2.5 %) are the extremes of the bootstrap
  distribution. The percentile method is used because BCa degenerates for such n. The bounds are
  clipped to the values' range, which no resample's mean can leave (scipy's quantile can, by an ulp).
- `sign_flip_p`: the exact two-sided sign-flip permutation p-value of a mean paired difference
  (`scipy.stats.permutation_test`, `permutation_type="samples"` on one sample of differences,
  every one of the 2^n sign patterns when 2^n <= EXACT_LIMIT, else that many random ones).
  Its smallest possible value is 2 / 2^n (0.25 for 3 seeds): `min_p_value`.
- `paired`: the two together on per-seed differences, and a verdict that calls a difference
  only where its interval excludes 0 (`NO_DIFFERENCE` otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
EXACT_LIMIT = 2**16  # sign patterns enumerated exactly up to 16 seeds
NO_DIFFERENCE = "no difference detected"


@dataclass(frozen=True)
class Interval:
    """Mean over seeds with its bootstrap interval (low/high None with a single seed)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    values: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = [d.pop("low"), d.pop("high")]
        d["values"] = list(self.values)
        return d


@dataclass(frozen=True)
class Paired:
    """Mean paired difference (condition minus reference, seed by seed), its interval and p-value."""

    diff: Interval
    p_value: float | None
    excludes_zero: bool
    sign: int  # +1 / -1 where the interval excludes 0 above / below, else 0

    def to_json(self) -> dict[str, Any]:
        return {**self.diff.to_json(), "p_value": self.p_value, "ci_excludes_0": self.excludes_zero}


def _as_array(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("expected a non-empty list of per-seed values")
    if not np.isfinite(x).all():
        raise ValueError(f"per-seed values must be finite, got {x.tolist()}")
    return x


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Mean of per-seed values and its percentile bootstrap interval (None bounds for one seed)."""
    from scipy.stats import bootstrap

    x = _as_array(values)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, None, None, 1, (float(x[0]),))
    if np.all(x == x[0]):  # every resample has this mean; scipy would warn about a degenerate distribution
        low = high = mean
    else:
        res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                        method="percentile", rng=np.random.default_rng(seed))
        ci = np.clip([res.confidence_interval.low, res.confidence_interval.high], x.min(), x.max())  # docstring: why
        low, high = float(ci[0]), float(ci[1])
    return Interval(mean, low, high, len(x), tuple(float(v) for v in x))


def min_p_value(n: int) -> float:
    """The smallest two-sided p the exact sign-flip test can give with n paired seeds: 2 / 2^n."""
    return min(1.0, 2.0 / 2.0**n)


def sign_flip_p(diffs: Sequence[float], seed: int = BOOTSTRAP_SEED) -> float:
    """Two-sided sign-flip permutation p-value of mean(diffs) against 0.

    The null distribution holds the mean of every sign pattern of the differences (exact for
    2^n <= EXACT_LIMIT); p = min(1, 2 * min(P(T >= t), P(T <= t))), scipy's two-sided rule.
    """
    from scipy.stats import permutation_test

    d = _as_array(diffs)
    if np.all(d == 0):
        return 1.0
    exact = 2.0 ** len(d) <= EXACT_LIMIT
    res = permutation_test((d,), np.mean, permutation_type="samples", alternative="two-sided", vectorized=True,
                           n_resamples=np.inf if exact else EXACT_LIMIT, rng=np.random.default_rng(seed))
    return float(res.pvalue)


def paired(values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> Paired:
    """Condition minus reference, seed by seed (the two lists are in the same seed order)."""
    x, r = _as_array(values), _as_array(reference)
    if len(x) != len(r):
        raise ValueError(f"paired comparison needs the same seeds on both sides ({len(x)} vs {len(r)} values)")
    diff = mean_ci(x - r, confidence)
    p = sign_flip_p(x - r) if len(x) >= 2 else None
    sign = 0
    if diff.low is not None and diff.high is not None:
        sign = 1 if diff.low > 0 else -1 if diff.high < 0 else 0
    return Paired(diff, p, sign != 0, sign)


def verdict(result: Paired, lower_is_better: bool) -> str:
    """`better` / `worse` where the interval of the difference excludes 0, else NO_DIFFERENCE (n seeds)."""
    if not result.sign:
        return f"{NO_DIFFERENCE} ({result.diff.n} seeds)"
    improved = (result.sign < 0) == lower_is_better
    return "better" if improved else "worse"


def direction(result: Paired, more: str = "more", fewer: str = "fewer") -> str:
    """For quantities without a better side (channel counts, costs): `more` / `fewer` / NO_DIFFERENCE."""
    if not result.sign:
        return f"{NO_DIFFERENCE} ({result.diff.n} seeds)"
    return more if result.sign > 0 else fewer


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, `-` for None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def describe(result: Paired, digits: int = 3) -> str:
    """`+0.012 (95% CI [0.004, 0.02], p = 0.25, n = 3)`: the numbers behind a verdict, for prose."""
    d = result.diff
    ci = f"[{fmt(d.low, digits)}, {fmt(d.high, digits)}]"
    p = "-" if result.p_value is None else f"{result.p_value:.3g}"
    return f"{d.mean:+.{digits}g} (95% CI {ci}, p = {p}, n = {d.n})"
