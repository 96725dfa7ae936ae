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

__all__ = [
    "Comparison",
    "bootstrap_ci",
    "compare",
    "hierarchical_bootstrap",
    "hierarchical_indices",
    "verdict",
    "wilcoxon_p",
]

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


def hierarchical_indices(n_a: int, n_b: int, n_cases: int, n_boot: int, seed: int = 0):
    """The resampling of :func:`hierarchical_bootstrap`: per draw, ``n_a`` replicates of arm A and
    ``n_b`` of arm B (each arm's own, with replacement) and ``n_cases`` test cases (with replacement,
    shared by both arms: the cases are paired)."""
    rng = np.random.default_rng(seed)
    ra = rng.integers(0, n_a, size=(n_boot, n_a))
    rb = rng.integers(0, n_b, size=(n_boot, n_b))
    cases = rng.integers(0, n_cases, size=(n_boot, n_cases))
    return ra, rb, cases


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((idx.shape[0], n), np.float64)
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return out


def hierarchical_bootstrap(
    a, b, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, np.ndarray]:
    """Percentile interval of ``mean(A) − mean(B)`` resampling replicates *and* test cases.

    ``a`` is (replicates of A, cases), ``b`` (replicates of B, cases): the Dice of each replicate
    (its own training subset and seed) on each test case. Each bootstrap draw resamples the
    replicates of each arm independently, with replacement (their seed-and-subset spread is in the
    interval), and the test cases once for both arms (paired). The statistic of a draw is the mean
    over its replicates and cases of A minus that of B. Returns ``(low, high, draws)``.
    """
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not a.size or not b.size:
        raise ValueError(
            f"hierarchical_bootstrap: want (replicates, cases) of equal cases, got {a.shape}, {b.shape}"
        )
    ra, rb, cases = hierarchical_indices(a.shape[0], b.shape[0], a.shape[1], n_boot, seed)
    wc = _counts(cases, a.shape[1])
    mean_a = np.einsum("br,rc,bc->b", _counts(ra, a.shape[0]), a, wc) / (a.shape[0] * a.shape[1])
    mean_b = np.einsum("br,rc,bc->b", _counts(rb, b.shape[0]), b, wc) / (b.shape[0] * b.shape[1])
    draws = mean_a - mean_b
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(lo), float(hi), draws


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
