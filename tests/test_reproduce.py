"""The reproduction: Table 1's splits, the statistics helpers, and the --quick grid end to end
(killed, resumed without redoing finished runs, report with every row and column)."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from timm_jax.data.splits import fraction_split
from timm_jax.experiments import demo_data, stats
from timm_jax.experiments.grid import ALL_HCP, INITS

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


def _grid(out, env, *args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "timm_jax.experiments.reproduce", f"--out={out}", "--quick", *args],
        env=env,
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.e2e
def test_quick_grid_killed_resumes_and_writes_the_full_report(tmp_path):
    out = tmp_path / "grid"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    # 1. kill the grid once the first source has its best checkpoint
    p = _grid(out, env)
    best = out / "runs" / "sources" / "m1" / "checkpoints" / "best"
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None:
        if (out / "runs" / "sources" / "m2").is_dir() and best.is_dir():
            break
        time.sleep(0.2)
    assert p.poll() is None, p.stdout.read()[-3000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    m1_files = {f: f.stat().st_mtime_ns for f in best.rglob("*") if f.is_file()}
    assert m1_files
    # 2. resume: m1 is not trained again, the grid completes
    p = _grid(out, env)
    log, _ = p.communicate(timeout=900)
    assert p.returncode == 0, log[-3000:]
    assert {f: f.stat().st_mtime_ns for f in best.rglob("*") if f.is_file()} == m1_files
    assert "source m1 (reused)" in log and "ETA" in log
    # 3. a finished grid redoes nothing but the report
    p = _grid(out, env)
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0 and "[train] epoch" not in log and "[adapt] epoch" not in log, log[-3000:]
    report = (out / "report.md").read_text()
    state = json.loads((out / "grid_state.json").read_text())
    assert len(state["invocations"]) == 2  # the killed one never reached the report
    for heading in (
        "## Table 1",
        "## Table 2",
        "## Table 3",
        "## Table 4",
        "## Paired comparisons",
        "## Verdict",
        "Figure 3",
        "Figure 4",
        "Figure 5",
    ):
        assert heading in report, heading
    for init in (*INITS, *ALL_HCP):
        assert f"| {init} |" in report, init
    for claim in (
        "M2 > M1 > no transfer",
        "T-IMM ≥ the best single source",
        "T-IMM > IMM",
        "T-IMM > All-HCP",
        "remember tasks 1 and 2",
        "Transfer helps more with less data",
    ):
        assert claim in report, claim
    for col in ("| task | fraction | train | val | test |", "95 % CI", "Wilcoxon p", "task 1 (M1's heads)"):
        assert col in report, col
    assert "| task3 | 8% | 16 | 4 | 40 |" in report
    for name in ("per_case", "runs", "forgetting", "ratios", "comparisons", "splits"):
        assert (out / "raw" / f"{name}.csv").stat().st_size > 100, name
    rows = (out / "raw" / "per_case.csv").read_text().splitlines()
    assert len(rows) == 1 + 40 * (len(INITS) + len(ALL_HCP))
    for fig in ("fig3_forgetting", "fig4_per_case", "fig5_ratios"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_grid_variants_leave_the_grid_and_its_report_as_they_were(tmp_path):
    """``--variants`` on a finished grid: no file of the grid's runs is rewritten, the report is the
    old one with the variants' section appended, and the section has its rows and raw files."""
    from timm_jax.experiments.grid import VARIANTS

    out = tmp_path / "grid"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    p = _grid(out, env)
    log, _ = p.communicate(timeout=900)
    assert p.returncode == 0, log[-3000:]
    before = (out / "report.md").read_text()
    files = {f: f.stat().st_mtime_ns for f in (out / "runs").rglob("*") if f.is_file()}
    p = _grid(out, env, "--variants")
    log, _ = p.communicate(timeout=900)
    assert p.returncode == 0, log[-3000:]
    assert {f: f.stat().st_mtime_ns for f in files} == files  # nothing of the grid recomputed
    after = (out / "report.md").read_text()
    assert after.startswith(before) and after[len(before) :].lstrip("\n").startswith("## Beyond the paper")
    for name in VARIANTS:
        assert f"| {name} |" in after, name
    assert "Spearman" in after and "over 1 invocation(s)" in after
    state = json.loads((out / "grid_state.json").read_text())
    assert len(state["invocations"]) == 1 and len(state["variant_invocations"]) == 1
    for name in ("variants_per_case", "variants_runs", "variants_comparisons", "fisher_cost"):
        assert (out / "raw" / f"{name}.csv").stat().st_size > 50, name
    assert (out / "figures" / "variants_channel_ratios.png").stat().st_size > 5000


def test_an_output_directory_holds_one_grid_configuration(tmp_path):
    from timm_jax.errors import ConfigError
    from timm_jax.experiments.reproduce import _claim

    _claim(str(tmp_path), {"scale": "repro", "data_seed": 0})
    _claim(str(tmp_path), {"scale": "repro", "data_seed": 0})  # the same grid: resumed
    with pytest.raises(ConfigError, match="another configuration"):
        _claim(str(tmp_path), {"scale": "repro_quick", "data_seed": 0})
    state = json.loads((tmp_path / "grid_state.json").read_text())
    assert state["config"]["scale"] == "repro" and state["invocations"] == []


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
