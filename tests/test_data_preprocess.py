"""Preprocessing (crop, normalise, resample, pad) against hand-computed small cases, and its cache."""

import dataclasses
import importlib.util
import os

import numpy as np
import pytest

from timm_jax.data import preprocess
from timm_jax.data.io import Case, DataError, load_case, save_nifti
from timm_jax.data.preprocess import (
    PreprocessConfig,
    crop_to_nonzero,
    histogram_normalise,
    load_preprocessed,
    pad_to_multiple,
    preprocess_case,
    resample,
    zscore_normalise,
)


def _world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


def _case(image, labels=None, affine=None, modalities=None):
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        image = image[..., None]
    return Case(
        case_id="c",
        image=image,
        labels=labels,
        affine=np.eye(4) if affine is None else affine,
        modalities=modalities or tuple(f"m{i}" for i in range(image.shape[-1])),
    )


def test_crop_to_joint_nonzero_box_with_margin():
    img = np.zeros((10, 9, 8, 2), np.float32)
    img[2:5, 3:6, 1:3, 0] = 1.0
    img[6, 4, 4, 1] = 2.0  # only in the second channel
    lab = np.zeros((10, 9, 8), np.int32)
    lab[3, 4, 2] = 5
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    aff[:3, 3] = [10, 20, 30]
    out = crop_to_nonzero(_case(img, lab, aff), margin=1)
    # joint box: x 2..6, y 3..5, z 1..4 -> with margin x 1..7, y 2..6, z 0..5 (inclusive)
    assert out.shape == (7, 5, 6)
    assert out.meta["crop_box"] == [[1, 8], [2, 7], [0, 6]]
    np.testing.assert_array_equal(out.image, img[1:8, 2:7, 0:6])
    np.testing.assert_array_equal(out.labels, lab[1:8, 2:7, 0:6])
    # the labelled voxel keeps its world position
    np.testing.assert_allclose(_world(out.affine, [2, 2, 2]), _world(aff, [3, 4, 2]))
    # margin is clipped at the volume edge
    assert crop_to_nonzero(_case(img), margin=5).shape == (10, 9, 8)
    with pytest.raises(DataError, match="empty"):
        crop_to_nonzero(_case(np.zeros((3, 3, 3))))


def test_histogram_normalisation_is_the_ecdf_of_nonzero_voxels():
    x = np.array([0.0, 3.0, 1.0, 2.0, 2.0, 0.0, -1.0])
    # non-zero sorted: -1, 1, 2, 2, 3 (N = 5): rank <= x / N
    np.testing.assert_allclose(histogram_normalise(x), [0, 5 / 5, 2 / 5, 4 / 5, 4 / 5, 0, 1 / 5])
    assert histogram_normalise(np.zeros(4)).tolist() == [0, 0, 0, 0]


def test_zscore_normalisation_over_nonzero_voxels():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    std = np.sqrt(2.0 / 3.0)
    np.testing.assert_allclose(zscore_normalise(x), [0.0, -1 / std, 0.0, 1 / std], rtol=1e-6)


def test_resample_upsampling_linear_and_nearest():
    ramp = np.broadcast_to(10.0 * np.arange(4)[:, None, None], (4, 2, 2)).astype(np.float32)
    lab = np.broadcast_to(np.array([1, 2, 3, 4])[:, None, None], (4, 2, 2)).astype(np.int32)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [5, 0, 0]
    out = resample(_case(ramp, lab.copy(), aff), (0.5, 1.0, 1.0))
    assert out.shape == (8, 2, 2)
    # output voxel j samples input x = (j + 0.5) * 0.5 - 0.5 = -0.25, 0.25, ..., 3.25 (edges clamp)
    np.testing.assert_allclose(out.image[:, 0, 0, 0], [0, 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30], atol=1e-5)
    np.testing.assert_array_equal(out.labels[:, 0, 0], [1, 1, 2, 2, 3, 3, 4, 4])
    assert out.labels.dtype == np.int32
    assert out.spacing == pytest.approx((0.5, 1.0, 1.0))
    # voxel j of the output sits at the world position of input coordinate x_j
    np.testing.assert_allclose(_world(out.affine, [3, 0, 0]), [5 + 1.25, 0, 0])


def test_resample_downsampling_samples_exact_positions():
    vol = np.arange(6 * 6 * 3, dtype=np.float32).reshape(6, 6, 3) + 1
    lab = (np.arange(6 * 6 * 3).reshape(6, 6, 3) % 7).astype(np.int16)
    out = resample(_case(vol, lab, np.diag([1.0, 2.0, 1.0, 1.0])), 3.0)
    # r = (3, 1.5, 3): x = 1, 4; y = 0.25, 1.75, 3.25, 4.75; z = 1
    assert out.shape == (2, 4, 1)
    np.testing.assert_allclose(
        out.image[:, 0, 0, 0],
        [vol[1, 0, 1] * 0.75 + vol[1, 1, 1] * 0.25, vol[4, 0, 1] * 0.75 + vol[4, 1, 1] * 0.25],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(out.labels[:, :, 0], lab[np.ix_([1, 4], [0, 2, 3, 5], [1])][..., 0])
    assert out.spacing == pytest.approx((3.0, 3.0, 3.0))


def test_pad_to_multiple_is_symmetric_and_keeps_world_positions():
    img = np.ones((5, 16, 17), np.float32)
    out = pad_to_multiple(_case(img, np.ones((5, 16, 17), np.int32)), 8)
    assert out.shape == (8, 16, 24)
    assert out.meta["pad_start"] == [-1, 0, -3]
    np.testing.assert_array_equal(out.image[1:6, :, 3:20, 0], img)
    assert out.image.sum() == img.sum() and out.labels.sum() == img.sum()
    np.testing.assert_allclose(_world(out.affine, [1, 0, 3]), [0, 0, 0])


def test_preprocess_case_end_to_end():
    rng = np.random.default_rng(0)
    img = np.zeros((20, 18, 12, 2), np.float32)
    img[4:14, 3:15, 2:10] = rng.uniform(1, 100, size=(10, 12, 8, 2))
    lab = np.zeros((20, 18, 12), np.int32)
    lab[6, 5, 4] = 2
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    case = _case(img, lab, aff)
    out = preprocess_case(case, PreprocessConfig(margin=1, spacing=2.0, shape_multiple=8))
    assert case.image.shape == (20, 18, 12, 2)  # input untouched
    # crop 12x14x10 at 1x1x2 mm -> resample to 2 mm: 6x7x10 -> pad to multiple of 8
    assert out.shape == (8, 8, 16)
    assert out.image.dtype == np.float32
    assert out.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert out.image.min() >= 0 and out.image.max() <= 1.0
    assert out.meta["input_shape"] == [20, 18, 12]
    # the label voxel stays at the same world position (within half an output voxel)
    (ijk,) = np.argwhere(out.labels == 2)
    assert np.abs(_world(out.affine, ijk) - _world(aff, [6, 5, 4])).max() <= 1.0 + 1e-6
    z = preprocess_case(case, PreprocessConfig(margin=0, normalisation="zscore", target_shape=(16, 16, 8)))
    assert z.shape == (16, 16, 8)
    nz = z.image[..., 0][z.image[..., 0] != 0]
    assert abs(nz.mean()) < 1e-4 and abs(nz.std() - 1) < 1e-3


def test_n4_needs_simpleitk_or_runs():
    img = np.zeros((10, 10, 10, 2), np.float32)
    img[2:8, 2:8, 2:8] = 50.0 + np.arange(6)[:, None, None, None]
    case = _case(img, modalities=("t1", "flair"))
    if importlib.util.find_spec("SimpleITK") is None:
        with pytest.raises(ImportError, match=r"pip install -e '\.\[n4\]'"):
            preprocess_case(case, PreprocessConfig(n4=True))
    else:
        out = preprocess.n4_correct(case)
        np.testing.assert_array_equal(out.image[..., 1], img[..., 1])  # FLAIR untouched
        assert out.image.shape == img.shape


def _write_case(root):
    rng = np.random.default_rng(3)
    folder = root / "s1"
    for name in ("t1", "t2"):
        vol = np.zeros((12, 12, 12), np.float32)
        vol[2:10, 3:9, 1:11] = rng.uniform(1, 10, size=(8, 6, 10))
        save_nifti(folder / f"{name}.nii.gz", vol, np.eye(4))
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[4:6, 4:6, 4:6] = 3
    save_nifti(folder / "labels.nii.gz", lab, np.eye(4))
    return folder


def test_load_preprocessed_caches_once_per_case_and_settings(tmp_path, monkeypatch):
    folder = _write_case(tmp_path / "data")
    calls = []
    real = preprocess.preprocess_case

    def counting(case, config):
        calls.append(config)
        return real(case, config)

    monkeypatch.setattr(preprocess, "preprocess_case", counting)
    cfg = PreprocessConfig(shape_multiple=8)
    cache = tmp_path / "cache"
    a = load_preprocessed(tmp_path / "data", "s1", "parcellation", cfg, cache)
    b = load_preprocessed(tmp_path / "data", "s1", "parcellation", cfg, cache)
    assert len(calls) == 1
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.affine, b.affine)
    assert b.modalities == ("t1", "t2") and b.meta == a.meta and b.paths == a.paths
    expected = real(load_case(tmp_path / "data", "s1", "parcellation"), cfg)
    np.testing.assert_array_equal(b.image, expected.image)
    # other settings: computed again, cached separately
    load_preprocessed(tmp_path / "data", "s1", "parcellation", dataclasses.replace(cfg, margin=0), cache)
    assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 2  # one record (+ its .npy files) each
    # a changed source file invalidates the entry
    st = os.stat(folder / "t2.nii.gz")
    os.utime(folder / "t2.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_preprocessed(tmp_path / "data", "s1", "parcellation", cfg, cache)
    assert len(calls) == 3
    load_preprocessed(tmp_path / "data", "s1", "parcellation", cfg, cache)
    assert len(calls) == 3


def test_config_validation():
    with pytest.raises(ValueError):
        PreprocessConfig(normalisation="minmax")
    assert PreprocessConfig(spacing=[1, 2, 3]).spacing == (1.0, 2.0, 3.0)
