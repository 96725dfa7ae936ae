"""Paired comparisons of two initialisations over the same test cases.

Each initialisation gives one Dice per test case (averaged over the training seeds). For T-IMM
against another initialisation the report states

* the mean paired difference over the cases,
* a 95 % percentile-bootstrap confidence interval of that mean (the cases are resampled with
  replacement, ``n_boot`` times, with a fixed seed), and
* the two-sided Wilcoxon signed-rank p-value of the differences (:func:`scipy.stats.wilcoxon`).

:func:`verdict` turns an interval into the words the report uses, with the rule fixed before any
run: a claim "A > B" is *supported* when the interval of A − B lies above 0, *contradicted* when
it lies below 0, and *cannot tell* otherwise. A claim "A ≥ B" (non-inferiority) is supported when
the interval lies above −``margin``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["Comparison", "bootstrap_ci", "compare", "verdict", "wilcoxon_p"]

#: Non-inferiority margin of "≥" claims, in Dice (fixed before the grid ran).
MARGIN = 0.01


def bootstrap_ci(diff, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(diff)``, resampling the cases with replacement."""
    diff = np.asarray(diff, np.float64).reshape(-1)
    if diff.size == 0:
        raise ValueError("bootstrap_ci: no differences")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def wilcoxon_p(diff) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (1.0 if all are zero)."""
    diff = np.asarray(diff, np.float64).reshape(-1)
    if not np.any(diff != 0):
        return 1.0
    return float(stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b`` over paired cases."""

    a: str
    b: str
    n_cases: int
    n_seeds: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_wilcoxon: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare(a: str, b: str, values_a, values_b, *, n_seeds: int, seed: int = 0) -> Comparison:
    """Paired comparison of per-case values (same cases, same order)."""
    va, vb = (np.asarray(v, np.float64).reshape(-1) for v in (values_a, values_b))
    if va.shape != vb.shape:
        raise ValueError(f"compare: {a} has {va.size} cases, {b} has {vb.size}")
    diff = va - vb
    lo, hi = bootstrap_ci(diff, seed=seed)
    return Comparison(
        a=a,
        b=b,
        n_cases=int(va.size),
        n_seeds=int(n_seeds),
        mean_a=float(va.mean()),
        mean_b=float(vb.mean()),
        mean_diff=float(diff.mean()),
        ci_low=lo,
        ci_high=hi,
        p_wilcoxon=wilcoxon_p(diff),
    )


def verdict(ci_low: float, ci_high: float, *, at_least: bool = False, margin: float = MARGIN) -> str:
    """``"supported"``, ``"contradicted"`` or ``"cannot tell"`` for "A > B" (or "A ≥ B" with
    ``at_least``) from the interval of A − B."""
    if at_least:
        if ci_low > -margin:
            return "supported"
        if ci_high < -margin:
            return "contradicted"
        return "cannot tell"
    if ci_low > 0:
        return "supported"
    if ci_high < 0:
        return "contradicted"
    return "cannot tell"
