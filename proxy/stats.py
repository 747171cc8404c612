"""Small-sample statistics for the A/B report, in pure Python (no scipy in the proxy's install)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

Z_95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class TestResult:
    """A two-sided test of treatment minus control."""

    test: str  # "two-proportion z-test" | "Welch's t-test"
    difference: float
    interval: Interval
    statistic: float
    p_value: float
    df: float | None = None


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of ``t_cdf`` for p in (0, 1), by bisection (monotone, 200 halvings reach float precision)."""
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2.0


def mean_interval(values: Sequence[float]) -> Interval | None:
    """95% t-interval of the mean; None below two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    half = t_quantile(0.975, n - 1) * sample_sd(values) / math.sqrt(n)
    return Interval(mean - half, mean + half)


def sample_sd(values: Sequence[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def wilson_interval(successes: int, n: int) -> Interval | None:
    """95% Wilson score interval of a proportion (sane at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return None
    p = successes / n
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Interval(centre - half, centre + half)


def two_proportion_z_test(x1: int, n1: int, x2: int, n2: int) -> TestResult | None:
    """H0: p1 == p2, pooled standard error; the interval uses the unpooled one."""
    if n1 == 0 or n2 == 0:
        return None
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    diff = p1 - p2
    z, p_value = _z_and_p(diff, se_pooled)
    return TestResult("two-proportion z-test", diff, Interval(diff - Z_95 * se, diff + Z_95 * se), z, p_value)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> TestResult | None:
    """H0: mean(a) == mean(b), unequal variances, Welch-Satterthwaite degrees of freedom."""
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        return None
    m1, m2 = sum(a) / n1, sum(b) / n2
    v1, v2 = sample_sd(a) ** 2 / n1, sample_sd(b) ** 2 / n2
    se = math.sqrt(v1 + v2)
    diff = m1 - m2
    if se == 0.0:
        return TestResult("Welch's t-test", diff, Interval(diff, diff), 0.0 if diff == 0 else math.copysign(
            math.inf, diff), 1.0 if diff == 0 else 0.0, None)
    df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    t = diff / se
    p_value = 2.0 * (1.0 - t_cdf(abs(t), df))
    half = t_quantile(0.975, df) * se
    return TestResult("Welch's t-test", diff, Interval(diff - half, diff + half), t, p_value, df)


def _z_and_p(diff: float, se: float) -> tuple[float, float]:
    if se == 0.0:
        return (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    z = diff / se
    return z, 2.0 * (1.0 - normal_cdf(abs(z)))
