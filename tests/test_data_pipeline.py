"""The grain training pipeline: shapes, determinism across worker counts, resume, foreground rate."""

import itertools

import numpy as np
import pytest

from timm_jax.data.io import Case
from timm_jax.data.pipeline import AugmentConfig, PatchSampler, make_train_batches, make_train_dataset
from timm_jax.data.tasks import brats_regions, parcellation_labels

PATCH = (8, 8, 8)


def _cases(n=3, shape=(16, 14, 12), seed=0):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        img = rng.uniform(0.1, 1.0, size=shape + (4,)).astype(np.float32)
        img[:2] = 0.0
        lab = np.zeros(shape, np.int32)
        lo = [min(s // 3, s - 4) for s in shape]
        lab[lo[0] : lo[0] + 4, lo[1] : lo[1] + 4, lo[2] : lo[2] + 3] = rng.choice([1, 2, 4], size=(4, 4, 3))
        cases.append(Case(f"c{i}", img, lab, np.eye(4), ("t1", "t1ce", "t2", "flair")))
    return cases


def _take(ds, n):
    it = iter(ds)
    try:
        return list(itertools.islice(it, n))
    finally:
        if hasattr(it, "close"):
            it.close()


def _equal(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_batches_have_the_contract_shapes():
    task = brats_regions()
    (batch,) = _take(make_train_dataset(_cases(), task, patch_shape=PATCH, batch_size=3, seed=0), 1)
    assert set(batch) == {"image", "target"}
    assert batch["image"].shape == (3, *PATCH, 4) and batch["image"].dtype == np.float32
    assert batch["target"].shape == (3, *PATCH, 3) and batch["target"].dtype == np.float32
    assert set(np.unique(batch["target"])) <= {0.0, 1.0}
    # nested regions survive augmentation: ET <= TC <= WT everywhere
    t = batch["target"]
    assert np.all(t[..., 2] <= t[..., 1]) and np.all(t[..., 1] <= t[..., 0])


def test_targets_match_the_label_patch_without_augmentation():
    cases = _cases()
    task = brats_regions()
    sampler = PatchSampler(cases, task, PATCH, seed=5, augment=False)
    for index in range(20):
        sample, info = sampler.sample(index)
        sl = tuple(slice(c, c + p) for c, p in zip(info["corner"], PATCH))
        case = cases[info["case"]]
        np.testing.assert_array_equal(sample["image"], case.image[sl])
        np.testing.assert_array_equal(sample["target"], task.targets(case.labels[sl]))


def test_same_seed_same_stream_other_seed_differs():
    cases, task = _cases(), brats_regions()
    kw = dict(patch_shape=PATCH, batch_size=2)
    a = _take(make_train_dataset(cases, task, seed=1, **kw), 5)
    b = _take(make_train_dataset(cases, task, seed=1, **kw), 5)
    c = _take(make_train_dataset(cases, task, seed=2, **kw), 5)
    assert _equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_from_step_equals_uninterrupted_run():
    cases, task = _cases(), brats_regions()
    kw = dict(patch_shape=PATCH, batch_size=2, seed=9)
    full = _take(make_train_dataset(cases, task, **kw), 12)
    resumed = _take(make_train_dataset(cases, task, start_step=7, **kw), 5)
    assert _equal(full[7:], resumed)
    # random access by step gives the same batches
    batches = make_train_batches(cases, task, **kw)
    assert _equal([batches[3], batches[10]], [full[3], full[10]])


def test_identical_batches_for_0_and_2_workers():
    cases, task = _cases(), brats_regions()
    kw = dict(patch_shape=PATCH, batch_size=2, seed=4)
    serial = _take(make_train_dataset(cases, task, num_workers=0, **kw), 7)
    parallel = _take(make_train_dataset(cases, task, num_workers=2, **kw), 7)
    assert _equal(serial, parallel)
    resumed = _take(make_train_dataset(cases, task, num_workers=2, start_step=3, **kw), 4)
    assert _equal(serial[3:], resumed)


def test_every_case_used_once_per_epoch():
    cases = _cases(n=5)
    sampler = PatchSampler(cases, brats_regions(), PATCH, seed=0)
    for epoch in range(3):
        used = [sampler.case_index(epoch * 5 + i) for i in range(5)]
        assert sorted(used) == [0, 1, 2, 3, 4]
    assert [sampler.case_index(i) for i in range(5)] != [sampler.case_index(i) for i in range(5, 10)]


@pytest.mark.parametrize("rate", [0.0, 0.33, 0.8])
def test_foreground_oversampling_rate(rate):
    # one 2x2x2 foreground blob in a 40^3 volume: a uniformly placed 8^3 patch (33 corner
    # positions per axis) overlaps it for 9 corners per axis, p = (9/33)^3 ~ 2 %; a
    # foreground-forced patch always contains it
    shape = (40, 40, 40)
    img = np.ones(shape + (1,), np.float32)
    lab = np.zeros(shape, np.int32)
    lab[19:21, 19:21, 19:21] = 5
    task = parcellation_labels([5])
    sampler = PatchSampler(
        [Case("c", img, lab, np.eye(4), ("t1",))], task, PATCH, seed=11, foreground_rate=rate, augment=False
    )
    n = 1500
    hits = forced = 0
    for i in range(n):
        sample, info = sampler.sample(i)
        forced += info["foreground"]
        hits += sample["target"].any()
        if info["foreground"]:
            assert sample["target"].any()
    p_random = (9 / 33) ** 3
    expected = rate + (1 - rate) * p_random
    sd = np.sqrt(expected * (1 - expected) / n)
    assert abs(hits / n - expected) < 4 * sd + 1e-9
    assert abs(forced / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n) + 1e-9


def test_small_volumes_are_padded_to_the_patch():
    cases = _cases(n=1, shape=(5, 9, 6))
    (batch,) = _take(
        make_train_dataset(cases, brats_regions(), patch_shape=(8, 12, 8), batch_size=2, seed=0), 1
    )
    assert batch["image"].shape == (2, 8, 12, 8, 4)
    # everything from the case is inside the patch, padding is zero
    assert batch["target"][0].any(-1).sum() == cases[0].labels.astype(bool).sum()


def test_augmentation_flips_keep_image_and_target_aligned_and_leave_background_zero():
    cases = _cases(n=1, shape=(8, 8, 8))
    lab = cases[0].labels
    cases[0].image[..., 0] = np.where(lab > 0, 7.0, 1.0)  # channel 0 encodes the foreground
    cases[0].image[:2, ..., 0] = 0.0  # background (all channels zero) in the first two slices
    aug = AugmentConfig(flip_axes=(0, 1, 2), scale=0.0, shift=0.0, noise_prob=0.0)
    sampler = PatchSampler(cases, brats_regions(), (8, 8, 8), seed=3, augment=aug)
    flipped = 0
    for i in range(10):
        s = sampler(i)
        np.testing.assert_array_equal(s["image"][..., 0] == 7.0, s["target"][..., 0] == 1.0)
        assert np.all(s["image"][:, :, :, 1:][s["image"][..., 0] == 0] == 0)
        flipped += not np.array_equal(s["target"][..., 0], lab > 0)
    assert flipped > 0
    # intensity augmentation changes brain voxels but keeps zeros at zero
    s = PatchSampler(cases, brats_regions(), (8, 8, 8), seed=3, augment=AugmentConfig(flip_axes=()))(0)
    zero = cases[0].image == 0
    assert np.all(s["image"][zero] == 0)
    assert not np.allclose(s["image"][~zero], cases[0].image[~zero])


def test_invalid_inputs():
    task = brats_regions()
    bad = _cases(n=1)
    bad[0].labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match="unknown"):
        PatchSampler(bad, task, PATCH, seed=0)
    nolab = _cases(n=1)
    nolab[0].labels = None
    with pytest.raises(ValueError, match="labels"):
        PatchSampler(nolab, task, PATCH, seed=0)
    with pytest.raises(ValueError):
        PatchSampler([], task, PATCH, seed=0)
