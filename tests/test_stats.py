"""The benchmark's statistics against explicit references: the hierarchical bootstrap vs a nested
loop over the same draws, and its interval's behaviour where the answer is known."""

import numpy as np
import pytest

from timm_jax.experiments.stats import hierarchical_bootstrap, hierarchical_indices


def _nested_loop(a, b, n_boot, seed):
    """The statistic of every draw written out: loop over the drawn replicates and cases."""
    ra, rb, cases = hierarchical_indices(len(a), len(b), len(a[0]), n_boot, seed)
    out = []
    for k in range(n_boot):
        sa = sb = 0.0
        for r in ra[k]:
            for c in cases[k]:
                sa += a[r][c]
        for r in rb[k]:
            for c in cases[k]:
                sb += b[r][c]
        out.append(sa / (len(ra[k]) * len(cases[k])) - sb / (len(rb[k]) * len(cases[k])))
    return np.array(out)


def test_hierarchical_bootstrap_equals_an_explicit_nested_loop():
    rng = np.random.default_rng(3)
    a = rng.random((5, 7)).tolist()  # 5 replicates x 7 test cases
    b = (rng.random((3, 7)) * 0.5).tolist()  # another arm: 3 replicates, the same cases
    lo, hi, draws = hierarchical_bootstrap(a, b, n_boot=200, seed=11)
    ref = _nested_loop(a, b, 200, 11)
    np.testing.assert_allclose(draws, ref, rtol=0, atol=1e-12)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])), abs=1e-12)


def test_the_interval_holds_the_replicate_spread():
    """With test cases that agree perfectly, only the replicates vary: the interval is that of the
    replicate means (case resampling alone would give a zero-width interval)."""
    cases = 30
    a = np.repeat(np.array([[0.5], [0.7], [0.6], [0.8], [0.4]]), cases, axis=1)
    b = np.full((5, cases), 0.6)
    lo, hi, _ = hierarchical_bootstrap(a, b, n_boot=4000, seed=0)
    assert lo < -0.05 and hi > 0.05  # the replicate spread (sd 0.16) is in it
    assert lo >= -0.2 - 1e-12 and hi <= 0.2 + 1e-12  # within the extremes of a replicate mean
    # a real difference far above the spread is resolved
    lo, hi, _ = hierarchical_bootstrap(a + 0.5, b, n_boot=4000, seed=0)
    assert lo > 0.3


def test_hierarchical_bootstrap_refuses_unpaired_arms():
    with pytest.raises(ValueError, match="equal cases"):
        hierarchical_bootstrap(np.zeros((2, 5)), np.zeros((2, 4)))
