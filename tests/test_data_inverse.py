"""Preprocessing is invertible: to_input_geometry and write_like_input give results on the input grid."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from timm_jax.data.io import load_case
from timm_jax.data.preprocess import PreprocessConfig, preprocess_case, to_input_geometry, write_like_input
from timm_jax.data.writers import conformed_lia, write_freesurfer_subject, write_volume

SHAPE = (240, 240, 155)


def oblique_non_ras():
    """1 mm voxels, axes ~ (A, L, I) — permuted and flipped — and rotated by 10 and 25 degrees."""
    a, c = np.deg2rad(10), np.deg2rad(25)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    perm = np.array([[0, -1, 0], [1, 0, 0], [0, 0, -1]], float)
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ perm
    aff[:3, 3] = [100.0, -120.0, 80.0]
    return aff


def _volumes(seed=0):
    """A T1 that is non-zero in a "head" box, and labels (blobs) inside it (where the crop keeps them)."""
    rng = np.random.default_rng(seed)
    t1 = np.zeros(SHAPE, np.float32)
    box = (slice(60, 170), slice(50, 190), slice(20, 130))
    t1[box] = rng.uniform(1, 100, size=(110, 140, 110)).astype(np.float32)
    lab = np.zeros(SHAPE, np.uint8)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    for k, (cz, cy, cx, r) in enumerate(
        [(100, 90, 60, 18), (130, 150, 90, 12), (110, 120, 100, 25)], start=1
    ):
        lab[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return t1, lab


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A T1-only parcellation case on a 240x240x155, 1 mm, oblique non-RAS grid (qform 1, sform 2)."""
    root = tmp_path_factory.mktemp("inverse")
    t1, lab = _volumes()
    aff = oblique_non_ras()
    write_volume(root / "s" / "t1.nii.gz", t1, aff, qform_code=1, sform_code=2)
    write_volume(root / "s" / "labels.nii.gz", lab, aff, qform_code=1, sform_code=2)
    case = load_case(root, "s", "parcellation")
    return root, case, lab


def test_round_trip_of_labels_is_exact_without_resampling(study, tmp_path):
    root, case, lab = study
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    assert case.meta["source"]["orientation"] == [[1, 1], [0, -1], [2, -1]]  # axes swapped, two flipped
    pre = preprocess_case(case, PreprocessConfig())
    assert pre.shape != case.shape and all(n % 16 == 0 for n in pre.shape)
    back = to_input_geometry(pre.labels, pre)
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back, lab)  # voxel for voxel

    out = write_like_input(tmp_path / "pred.nii.gz", back, pre)
    src = nib.load(str(root / "s" / "labels.nii.gz"))
    img = nib.load(str(out))
    assert img.shape == SHAPE
    np.testing.assert_array_equal(img.affine, src.affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    for key in ("srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "pixdim"):
        np.testing.assert_array_equal(img.header[key], src.header[key])
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), lab)


def test_round_trip_with_spacing_moves_label_boundaries_by_at_most_one_voxel(study):
    _, case, lab = study
    pre = preprocess_case(case, PreprocessConfig(spacing=2.0))
    assert pre.spacing == pytest.approx((2.0, 2.0, 2.0))
    back = to_input_geometry(pre.labels, pre)
    assert back.shape == SHAPE
    wrong = back != lab
    # the tolerance documented in timm_jax/data/README.md
    assert wrong.mean() < 0.002  # 0.09 % here
    # every mismatch is a boundary voxel: another label within one voxel (its 3x3x3 neighbourhood)
    edge = ndimage.maximum_filter(lab, size=3) != ndimage.minimum_filter(lab, size=3)
    assert not np.any(wrong & ~edge)
    for k in (1, 2, 3):
        dice = 2 * np.sum((back == k) & (lab == k)) / (np.sum(back == k) + np.sum(lab == k))
        assert dice > 0.9  # 0.93 for the smallest blob (r = 12 voxels)


def test_probabilities_come_back_linearly_interpolated_on_the_input_grid(study, tmp_path):
    _, case, lab = study
    pre = preprocess_case(case, PreprocessConfig(spacing=(2.0, 1.5, 2.0)))
    probs = np.stack([(pre.labels == k).astype(np.float32) for k in (1, 2, 3)], axis=-1)
    back = to_input_geometry(probs, pre)
    assert back.shape == SHAPE + (3,) and back.dtype == np.float32
    assert back.min() >= 0 and back.max() <= 1
    assert np.mean((back[..., 0] > 0.5) == (lab == 1)) > 0.995
    out = write_like_input(tmp_path / "probs.nii.gz", back, pre)
    img = nib.load(str(out))
    assert img.shape == SHAPE + (3,) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.affine, nib.load(case.meta["source"]["file"]).affine)


def test_target_shape_centre_crop_is_undone_with_zeros_where_cut(study):
    _, case, lab = study
    pre = preprocess_case(case, PreprocessConfig(target_shape=(64, 64, 64)))
    back = to_input_geometry(pre.labels, pre)
    assert back.shape == SHAPE
    kept = back != 0
    np.testing.assert_array_equal(back[kept], lab[kept])
    assert 0 < kept.sum() < (lab != 0).sum()


def test_freesurfer_mgz_round_trip_and_mgz_output(tmp_path):
    shape = (32, 32, 32)
    rng = np.random.default_rng(1)
    t1 = np.zeros(shape, np.float32)
    t1[4:28, 6:26, 5:27] = rng.uniform(20, 200, size=(24, 20, 22))
    lab = np.zeros(shape, np.int32)
    lab[8:20, 10:16, 9:18] = 17
    lab[20:24, 10:20, 9:12] = 53
    write_freesurfer_subject(tmp_path / "subjects", "bert", t1, lab)
    case = load_case(tmp_path / "subjects", "bert", "freesurfer")
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")  # from conformed LIA
    pre = preprocess_case(case, PreprocessConfig(shape_multiple=8))
    back = to_input_geometry(pre.labels, pre)
    np.testing.assert_array_equal(back, lab)
    out = write_like_input(tmp_path / "pred.mgz", back, pre)
    img = nib.load(str(out))
    assert isinstance(img, nib.MGHImage) and img.shape == shape
    np.testing.assert_allclose(img.affine, conformed_lia(shape))
    np.testing.assert_array_equal(np.asarray(img.dataobj), lab)
    # NIfTI output of an MGH input: the recorded affine
    nii = nib.load(str(write_like_input(tmp_path / "pred.nii.gz", back, pre)))
    np.testing.assert_allclose(nii.affine, conformed_lia(shape))


def test_write_like_input_refuses_an_array_on_another_grid(study, tmp_path):
    _, case, _ = study
    pre = preprocess_case(case, PreprocessConfig())
    with pytest.raises(ValueError, match="to_input_geometry"):
        write_like_input(tmp_path / "x.nii.gz", pre.labels, pre)
    assert not list(tmp_path.iterdir())
