"""The protocol's data and statistics: Table 1's splits of the demo data set, the paired statistics
helpers and the verdict rule, the presets."""

import itertools
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from timm_jax.data.splits import fraction_split
from timm_jax.experiments import demo_data, stats

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = dict(
    n_parc_task1=23,
    n_parc_task2=23,
    n_parc_val=5,
    n_parc_test=12,
    n_brats_train=215,
    n_brats_val=40,
    n_brats_test=40,
)


@pytest.fixture(scope="module")
def plan():
    p = demo_data._plan(0, **DEFAULTS, test_donors=demo_data.DEFAULT_TEST_DONORS)
    return p, demo_data.task_splits(p)


def test_default_demo_data_has_the_proportions_of_table_1(plan):
    import inspect

    params = inspect.signature(demo_data.build_demo).parameters
    assert {k: params[k].default for k in DEFAULTS} == DEFAULTS
    cases, splits = plan
    counts = {k: [len(v[s]) for s in ("train", "val", "test")] for k, v in splits.items()}
    assert counts["task1"] == counts["task2"] == [18, 5, 12]
    assert counts["hcp_1_14"] == counts["hcp_1_7"] == counts["hcp_8_14"] == [36, 10, 12]
    assert counts["task3"] == [215, 40, 40]
    # groups A (task 1), B (task 2) and C (shared test) are disjoint
    a = set(splits["task1"]["train"] + splits["task1"]["val"])
    b = set(splits["task2"]["train"] + splits["task2"]["val"])
    c = set(splits["task1"]["test"])
    assert len(a) == len(b) == 23 and len(c) == 12 and not (a & b or a & c or b & c)
    assert splits["task2"]["test"] == sorted(c)


@pytest.mark.parametrize("seed", [0, 3])
def test_fractions_match_table_1_nested_and_disjoint_from_test(plan, seed):
    cases, splits = plan
    t3 = splits["task3"]
    got = {f: fraction_split(t3, f, seed) for f in (0.04, 0.08, 1.0)}
    assert [(len(tr), len(va)) for tr, va in got.values()] == [(8, 2), (16, 4), (215, 40)]
    for f, (tr, va) in got.items():
        assert not set(tr) & set(va), f
        assert not (set(tr) | set(va)) & set(t3["test"]), f
    pool4, pool8 = (set(got[f][0]) | set(got[f][1]) for f in (0.04, 0.08))
    assert pool4 < pool8 < set(got[1.0][0]) | set(got[1.0][1])
    assert fraction_split(t3, 0.08, seed) == got[0.08]  # fixed by the data seed
    assert fraction_split(t3, 0.08, seed + 1) != got[0.08]


def test_test_cases_use_only_held_out_donors(plan):
    cases, _ = plan
    held = set(demo_data.DEFAULT_TEST_DONORS)
    for c in cases:
        assert (c["source"] in held) == (c["split"] == "test"), c


def test_bootstrap_ci_and_wilcoxon_against_hand_computations():
    diff = np.array([0.05, -0.01, 0.03, 0.02, 0.04, -0.02, 0.06, 0.01])
    lo, hi = stats.bootstrap_ci(diff, n_boot=4000, seed=1)
    assert lo < diff.mean() < hi
    # the same resampling written as an explicit loop
    rng = np.random.default_rng(1)
    idx = rng.integers(0, diff.size, size=(4000, diff.size))
    means = [np.mean([diff[i] for i in row]) for row in idx]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert stats.bootstrap_ci(np.full(5, 0.3)) == pytest.approx((0.3, 0.3))
    # exact two-sided signed-rank p-value by enumerating all 2^n sign patterns
    ranks = scipy_stats.rankdata(np.abs(diff))
    w_obs = ranks[diff > 0].sum()
    w_all = [
        sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=diff.size)
    ]
    mean_w = ranks.sum() / 2
    p_exact = np.mean([abs(w - mean_w) >= abs(w_obs - mean_w) - 1e-12 for w in w_all])
    assert stats.wilcoxon_p(diff) == pytest.approx(p_exact)
    assert stats.wilcoxon_p(diff) == pytest.approx(scipy_stats.wilcoxon(diff).pvalue)
    assert stats.wilcoxon_p(np.zeros(4)) == 1.0
    c = stats.compare("a", "b", [1, 2, 3], [0.5, 2.5, 2.0], n_seeds=3)
    assert c.mean_diff == pytest.approx(1 / 3) and c.n_cases == 3 and c.n_seeds == 3


@pytest.mark.parametrize(
    "interval, at_least, word",
    [
        ((0.01, 0.05), False, "supported"),
        ((-0.05, -0.01), False, "contradicted"),
        ((-0.01, 0.02), False, "cannot tell"),
        ((-0.005, 0.02), True, "supported"),
        ((-0.05, -0.02), True, "contradicted"),
        ((-0.02, 0.01), True, "cannot tell"),
    ],
)
def test_verdict_rules(interval, at_least, word):
    assert stats.verdict(*interval, at_least=at_least) == word


@pytest.mark.parametrize("name", ["full", "smoke", "repro", "repro_quick", "paper"])
def test_every_preset_gives_valid_stage_configs(name):
    from timm_jax.experiments.presets import SCALES

    scale = SCALES[name]
    for stage in ("source", "target", "adapt"):
        cfg = scale.stage(stage, seed=2)
        assert cfg == getattr(scale, stage).replace(seed=2) and cfg.seed == 2
        assert all(p % scale.model.divisor == 0 for p in cfg.patch_shape)
    assert scale.fuse.method == "timm"


def test_the_presets_read_as_one_table():
    from timm_jax.experiments.presets import SCALES, table

    t = table()
    assert t.splitlines()[0] == "| setting | " + " | ".join(SCALES) + " |"
    assert "| model.base_filters | 8 | 4 | 8 | 4 | 16 |" in t
    assert "| target.max_epochs | 12 | 2 | 16 | 2 | 500 |" in t
