"""Paired comparisons of two methods scored on the same units (test pair × training seed), and values read off a
λ curve at a given smoothness.

For paired scores a_i, b_i (i = 1..n) with differences d_i = a_i − b_i:

    mean d̄,  95 % CI  d̄ ± t_{0.975, n−1} · s_d / √n   (Student t; s_d the sample standard deviation),

a paired t-test (H0: E d = 0) and the Wilcoxon signed-rank test (zero differences dropped — scipy's "wilcox"
rule; exact null distribution for small n without ties, normal approximation otherwise, scipy's choice). With
every d_i = 0 both tests return p = 1. Units are not independent when the same test pairs are scored for several
training seeds: the tests then treat (pair, seed) as the unit, which the report states.
"""
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats as sps


@dataclasses.dataclass(frozen=True)
class PairedDiff:
    n: int
    mean: float
    ci_low: float
    ci_high: float
    t_p: float
    wilcoxon_p: float

    def cells(self, spec=".3f"):
        """Markdown cells: mean [CI], t-test p, Wilcoxon p."""
        return [f"{self.mean:+{spec}} [{self.ci_low:+{spec}}, {self.ci_high:+{spec}}]", _p(self.t_p),
                _p(self.wilcoxon_p)]


def _p(p):
    return "–" if math.isnan(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Mean of a − b with its ``confidence`` t-interval, paired t-test and Wilcoxon signed-rank p (two-sided)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired statistics need equally many values, got {a.size} and {b.size}")
    if a.size < 2:
        raise ValueError(f"paired statistics need at least 2 pairs of values, got {a.size}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired statistics: the scores contain NaN or Inf")
    d = a - b
    n, mean = d.size, float(d.mean())
    if np.all(d == d[0]):          # no spread: the interval is the point, the tests say nothing or everything
        p = 1.0 if d[0] == 0 else 0.0
        return PairedDiff(n, mean, mean, mean, p, 1.0 if d[0] == 0 else float(sps.wilcoxon(d).pvalue))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    t_p = float(sps.ttest_1samp(d, 0.0).pvalue)
    return PairedDiff(n, mean, mean - half, mean + half, t_p, float(sps.wilcoxon(d).pvalue))


def crossing(x: Sequence[float], y: Sequence[float], target: float) -> Optional[tuple]:
    """Where the piecewise-linear curve y(x) first reaches ``target``, scanning x upwards: ``(i, w)`` with
    x* = (1 − w)·x_i + w·x_{i+1}; None when ``target`` lies outside the curve's range."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    for i in range(len(x) - 1):
        lo, hi = sorted((y[i], y[i + 1]))
        if lo <= target <= hi:
            w = 0.0 if y[i + 1] == y[i] else (target - y[i]) / (y[i + 1] - y[i])
            return i, float(w)
    if len(x) == 1 and y[0] == target:
        return 0, 0.0
    return None


def at_crossing(values: np.ndarray, where: tuple) -> np.ndarray:
    """Rows ``values[i]`` and ``values[i + 1]`` (e.g. per-pair Dice at two λ) mixed with the weight of
    :func:`crossing`."""
    i, w = where
    values = np.asarray(values, np.float64)
    return values[i] if w == 0.0 else (1 - w) * values[i] + w * values[i + 1]
