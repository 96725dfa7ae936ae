"""Seeded splits and nested data fractions."""

import random

import pytest

from timm_jax.data.splits import (
    fraction_count,
    fraction_subset,
    load_splits,
    make_splits,
    save_splits,
    splits_from_manifest,
)

IDS = [f"case_{i:03d}" for i in range(50)]


def test_make_splits_deterministic_disjoint_and_order_independent():
    a = make_splits(IDS, seed=3, val_fraction=0.2, test_fraction=0.1)
    shuffled = IDS[:]
    random.Random(0).shuffle(shuffled)
    b = make_splits(shuffled, seed=3, val_fraction=0.2, test_fraction=0.1)
    assert a == b
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (35, 10, 5)
    assert sorted(a["train"] + a["val"] + a["test"]) == IDS
    assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["test"])
    assert all(v == sorted(v) for v in a.values())
    c = make_splits(IDS, seed=4, val_fraction=0.2, test_fraction=0.1)
    assert c["test"] != a["test"]


def test_make_splits_small_sets():
    s = make_splits(["a", "b", "c"], seed=0, val_fraction=0.1, test_fraction=0.1)
    assert len(s["val"]) == 1 and len(s["test"]) == 1 and len(s["train"]) == 1
    assert make_splits(["a", "b"], seed=0, val_fraction=0.0, test_fraction=0.0)["train"] == ["a", "b"]
    with pytest.raises(ValueError):
        make_splits(["a", "b"], seed=0, val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(ValueError):
        make_splits(["a", "a", "b", "c"], seed=0)


def test_fractions_nested_deterministic_at_least_one():
    fracs = [0.01, 0.04, 0.08, 0.25, 0.5, 1.0]
    subsets = [fraction_subset(IDS, f, seed=7) for f in fracs]
    assert [len(s) for s in subsets] == [1, 2, 4, 12, 25, 50]
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) < set(large)
    assert subsets[-1] == IDS
    assert fraction_subset(list(reversed(IDS)), 0.08, seed=7) == subsets[2]
    assert fraction_subset(IDS, 0.08, seed=8) != subsets[2]
    assert fraction_count(3, 0.04) == 1
    with pytest.raises(ValueError):
        fraction_subset(IDS, 0.0)
    with pytest.raises(ValueError):
        fraction_subset(IDS, 1.5)


def test_save_and_load_splits(tmp_path):
    s = make_splits(IDS, seed=1)
    path = save_splits(tmp_path / "sub" / "splits.json", s, seed=1, source="test")
    assert load_splits(path) == s
    assert '"seed": 1' in path.read_text()


def test_splits_from_manifest():
    manifest = {
        "cases": [
            {"id": "p1", "task": "task1", "split": "train"},
            {"id": "p0", "task": "task1", "split": "train"},
            {"id": "p2", "task": "task1", "split": "val"},
            {"id": "p3", "task": "task1", "split": "test"},
            {"id": "b1", "task": "task3", "split": "train"},
        ]
    }
    assert splits_from_manifest(manifest, "task1") == {"train": ["p0", "p1"], "val": ["p2"], "test": ["p3"]}
    assert splits_from_manifest(manifest, "task3") == {"train": ["b1"], "val": [], "test": []}
    with pytest.raises(KeyError):
        splits_from_manifest(manifest, "task2")
