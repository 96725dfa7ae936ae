"""Dice, HD95, case evaluation, result files and NIfTI export against hand-computed values."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from timm_jax.training.metrics import (
    BRATS_HD95_PENALTY,
    convention,
    dice_score,
    evaluate_case,
    hd95,
    save_prediction_nifti,
    surface_distances,
    write_results,
)


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_hand_computed_and_empty_convention():
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 1, 0], bool)
    assert dice_score(a, b) == pytest.approx(2 * 2 / 6)
    assert dice_score(a, a) == 1.0
    assert dice_score(np.zeros(5, bool), np.zeros(5, bool)) == 1.0
    assert dice_score(a, np.zeros(5, bool)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice_score(a, b[:4])


def test_hd95_shifted_cubes_isotropic_and_anisotropic():
    shape = (12, 12, 12)
    a = cube(shape, (2, 2, 2), (6, 6, 6))
    b = cube(shape, (4, 2, 2), (8, 6, 6))  # shifted by 2 voxels along axis 0
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(2.5, 1.0, 1.0)) == pytest.approx(5.0)
    # shift along axis 1 with anisotropic spacing: only axis 1's spacing matters
    c = cube(shape, (2, 4, 2), (6, 8, 6))
    assert hd95(a, c, spacing=(3.0, 0.5, 1.0)) == pytest.approx(1.0)
    assert hd95(a, a, spacing=(3.0, 0.5, 1.0)) == 0.0


def test_hd95_single_voxels_and_percentile():
    shape = (10, 10, 10)
    p = cube(shape, (1, 1, 1), (2, 2, 2))
    t = cube(shape, (4, 5, 1), (5, 6, 2))  # offset (3, 4, 0) → 5 voxels
    assert hd95(p, t) == pytest.approx(5.0)
    assert hd95(p, t, spacing=(2.0, 1.0, 1.0)) == pytest.approx(math.hypot(6, 4))
    # pooled symmetric distances; 95th percentile with numpy's linear interpolation
    big = cube(shape, (0, 0, 0), (5, 5, 5))
    d = surface_distances(big, p)
    assert hd95(big, p) == pytest.approx(np.percentile(d, 95))
    assert d.size == (125 - 27) + 1  # surface of a 5³ cube touching the border + one voxel


def test_hd95_empty_conventions():
    z = np.zeros((4, 4, 4), bool)
    m = cube((4, 4, 4), (1, 1, 1), (3, 3, 3))
    # the BraTS convention (default): both empty 0, exactly one empty the 373.13 mm penalty
    assert BRATS_HD95_PENALTY == pytest.approx(math.sqrt(240**2 + 240**2 + 155**2), abs=0.005)
    assert hd95(z, z) == 0.0
    assert hd95(m, z) == BRATS_HD95_PENALTY and hd95(z, m) == BRATS_HD95_PENALTY
    # the old behaviour
    assert hd95(z, z, empty_regions="nan") == 0.0
    assert math.isnan(hd95(m, z, empty_regions="nan"))
    assert math.isnan(hd95(z, m, empty_regions="nan"))
    with pytest.raises(ValueError, match="empty_regions"):
        hd95(m, m, empty_regions="zero")


def _surface_by_neighbours(mask):
    """Voxels with a face-neighbour outside the mask or the volume, by explicit shifts."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _hd95_reference(pred, truth, spacing):
    """HD95 from the surface voxels' coordinates in mm: nearest neighbours by a k-d tree and by brute
    force over all pairs (which must agree), pooled over both directions, numpy's 95th percentile."""
    from scipy.spatial import cKDTree

    sp = np.argwhere(_surface_by_neighbours(pred)) * np.asarray(spacing)
    st = np.argwhere(_surface_by_neighbours(truth)) * np.asarray(spacing)
    pairwise = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
    brute = np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)])
    tree = np.concatenate([cKDTree(st).query(sp)[0], cKDTree(sp).query(st)[0]])
    np.testing.assert_allclose(np.sort(brute), np.sort(tree), rtol=1e-12)
    return float(np.percentile(brute, 95))


@pytest.mark.parametrize("seed", range(6))
def test_hd95_against_an_independent_implementation(seed):
    """Random blobby masks (a random field smoothed and thresholded, some touching the volume
    border) with anisotropic spacing: hd95 equals the surface-voxel distances computed from
    coordinates (brute force and cKDTree), not from a distance transform."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(9, 16, size=3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, size=3))
    masks = []
    for _ in range(2):
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5)
        masks.append(field > np.quantile(field, rng.uniform(0.6, 0.9)))
    pred, truth = masks
    assert pred.any() and truth.any()
    assert hd95(pred, truth, spacing) == pytest.approx(_hd95_reference(pred, truth, spacing), rel=1e-9)
    assert hd95(truth, pred, spacing) == pytest.approx(hd95(pred, truth, spacing), rel=1e-12)


def test_convention_record():
    c = convention()
    assert c["empty_regions"] == "brats" and c["hd95_penalty_mm"] == BRATS_HD95_PENALTY
    assert "373.13" in c["one_empty"] and c["both_empty"] == "Dice 1, HD95 0"
    assert convention("nan")["hd95_penalty_mm"] is None


def test_evaluate_case_keys_and_values():
    shape = (8, 8, 8)
    t0 = cube(shape, (1, 1, 1), (5, 5, 5))
    t1 = cube(shape, (2, 2, 2), (4, 4, 4))
    truth = np.stack([t0, t1], -1).astype(np.float32)
    probs = np.zeros(shape + (2,), np.float32)
    probs[..., 0] = np.where(cube(shape, (3, 1, 1), (7, 5, 5)), 0.9, 0.1)  # shifted by 2
    # channel 1 predicted empty
    out = evaluate_case(probs, truth, ("WT", "ET"), spacing=(1.0, 1.0, 2.0))
    assert set(out) == {"dice_WT", "hd95_WT", "dice_ET", "hd95_ET", "dice_mean"}
    assert out["dice_WT"] == pytest.approx(2 * 32 / 128)
    assert out["hd95_WT"] == pytest.approx(2.0)
    assert out["dice_ET"] == 0.0 and out["hd95_ET"] == BRATS_HD95_PENALTY
    assert out["dice_mean"] == pytest.approx(0.25)
    old = evaluate_case(probs, truth, ("WT", "ET"), spacing=(1.0, 1.0, 2.0), empty_regions="nan")
    assert math.isnan(old["hd95_ET"]) and {k: v for k, v in old.items() if k != "hd95_ET"} == {
        k: v for k, v in out.items() if k != "hd95_ET"
    }
    fast = evaluate_case(probs, truth, ("WT", "ET"), compute_hd95=False)
    assert set(fast) == {"dice_WT", "dice_ET", "dice_mean"}
    with pytest.raises(ValueError, match="channel names"):
        evaluate_case(probs, truth, ("WT",))


def test_write_results_csv_and_json(tmp_path):
    rows = [
        {"case": "c1", "dice_WT": 0.5, "hd95_WT": 2.0},
        {"case": "c2", "dice_WT": 1.0, "hd95_WT": float("nan")},
        {"case": "c3", "dice_WT": 0.0, "hd95_WT": 4.0, "note": "x"},
    ]
    csv_path, json_path = tmp_path / "sub" / "cases.csv", tmp_path / "summary.json"
    write_results(
        rows,
        str(csv_path),
        str(json_path),
        extra={"method": "T-IMM", "seed": np.int64(3)},
        convention=convention("nan"),
    )
    with open(csv_path) as f:
        table = list(csv.reader(f))
    assert table[0] == ["case", "dice_WT", "hd95_WT", "note"]
    assert [r[0] for r in table[1:]] == ["c1", "c2", "c3"]
    assert float(table[2][1]) == 1.0 and math.isnan(float(table[2][2])) and table[1][3] == ""
    s = json.loads(json_path.read_text())
    assert s["n_cases"] == 3 and s["extra"] == {"method": "T-IMM", "seed": 3}
    assert s["metrics"]["dice_WT"]["mean"] == pytest.approx(0.5)
    assert s["metrics"]["dice_WT"]["median"] == pytest.approx(0.5)
    assert s["metrics"]["dice_WT"]["std"] == pytest.approx(np.std([0.5, 1.0, 0.0]))
    assert s["metrics"]["hd95_WT"] == {"mean": 3.0, "std": 1.0, "median": 3.0, "n_valid": 2}
    assert "note" not in s["metrics"]
    assert s["convention"]["empty_regions"] == "nan"
    with pytest.raises(ValueError, match="no 'case'"):
        write_results([{"dice": 1.0}], str(csv_path), str(json_path))


def test_nifti_round_trip_keeps_affine_and_labels(tmp_path):
    lab = np.zeros((5, 6, 7), np.int64)
    lab[1:3, 2:4, 3:6] = 4
    lab[0, 0, 0] = 2
    affine = np.array([[-1.2, 0, 0, 90.0], [0, 1.0, 0.1, -126.0], [0, 0, 2.0, -72.0], [0, 0, 0, 1]])
    path = tmp_path / "pred" / "case.nii.gz"
    save_prediction_nifti(lab, affine, str(path))
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), lab)
    with pytest.raises(ValueError, match="int16"):
        save_prediction_nifti(lab + 40000, affine, str(path))
    with pytest.raises(ValueError, match="4x4"):
        save_prediction_nifti(lab, np.eye(3), str(path))
