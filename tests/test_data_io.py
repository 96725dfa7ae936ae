"""Loaders of both layouts, every validation error, and the validate command's exit codes."""

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from timm_jax.data import io
from timm_jax.data.io import LAYOUTS, DataError, list_cases, load_case, save_nifti
from timm_jax.data.validate import validate_case, validate_dataset

SHAPE = (6, 7, 5)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
AFFINE[:3, 3] = [-5.0, 4.0, 1.0]


def _image(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    img = rng.uniform(10, 100, size=shape).astype(np.float32)
    img[0] = 0.0
    return img


def write_brats(root, case_id, *, group=None, seg=True, labels=None, overrides=None):
    folder = Path(root) / (group or "") / case_id
    vols = {m: _image(i) for i, m in enumerate(LAYOUTS["brats"].modalities)}
    if seg:
        lab = np.zeros(SHAPE, np.uint8) if labels is None else labels
        if labels is None:
            lab[2:4, 2:5, 1:3] = 2
            lab[3, 3, 2] = 4
            lab[2, 3, 2] = 1
        vols["seg"] = lab
    for key, vol in vols.items():
        save_nifti(folder / f"{case_id}_{key}.nii.gz", vol, AFFINE)
    for key, (vol, aff) in (overrides or {}).items():
        save_nifti(folder / f"{case_id}_{key}.nii.gz", vol, aff)
    return folder


def write_parc(root, case_id, labels=None):
    folder = Path(root) / case_id
    save_nifti(folder / "t1.nii.gz", _image(1), AFFINE)
    save_nifti(folder / "t2.nii.gz", _image(2), AFFINE)
    lab = np.zeros(SHAPE, np.int16) if labels is None else labels
    if labels is None:
        lab[1:3, 1:3, 1:3] = 7
        lab[3:5, 3:5, 2:4] = 12
    save_nifti(folder / "labels.nii.gz", lab, AFFINE)
    return folder


# ------------------------------------------------------------------------------------ loaders
def test_load_brats_case(tmp_path):
    write_brats(tmp_path, "Case_A")
    case = load_case(tmp_path, "Case_A", "brats")
    assert case.case_id == "Case_A"
    assert case.image.shape == SHAPE + (4,)
    assert case.image.dtype == np.float32
    assert case.modalities == ("t1", "t1ce", "t2", "flair")
    # channel order follows the layout's modality order
    for c in range(4):
        np.testing.assert_allclose(case.image[..., c], _image(c), rtol=1e-6)
    assert case.labels.shape == SHAPE and np.issubdtype(case.labels.dtype, np.integer)
    assert set(np.unique(case.labels)) == {0, 1, 2, 4}
    np.testing.assert_allclose(case.affine, AFFINE)
    assert case.spacing == pytest.approx((2.0, 2.0, 3.0))
    assert case.paths["t1ce"].endswith("Case_A_t1ce.nii.gz")
    assert case.paths["labels"].endswith("Case_A_seg.nii.gz")


def test_load_parcellation_case(tmp_path):
    write_parc(tmp_path, "subj1")
    case = load_case(tmp_path, "subj1", "parcellation")
    assert case.image.shape == SHAPE + (2,)
    assert case.image.dtype == np.float32
    assert case.modalities == ("t1", "t2")
    np.testing.assert_allclose(case.image[..., 1], _image(2), rtol=1e-6)
    assert set(np.unique(case.labels)) == {0, 7, 12}
    np.testing.assert_allclose(case.affine, AFFINE)


def test_scaled_int16_images_are_read_as_float32(tmp_path):
    write_parc(tmp_path, "s")
    data = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 100 + 1).astype(np.int16)
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(0.5, 1.0)
    nib.save(img, str(tmp_path / "s" / "t1.nii.gz"))
    case = load_case(tmp_path, "s", "parcellation")
    assert case.image.dtype == np.float32
    np.testing.assert_allclose(case.image[..., 0], data * 0.5 + 1.0)


def test_list_cases_brats_groups_and_inference_without_seg(tmp_path):
    write_brats(tmp_path, "B1", group="HGG")
    write_brats(tmp_path, "B2", group="LGG")
    write_brats(tmp_path, "B3")
    write_brats(tmp_path, "B4", seg=False)
    (tmp_path / ".hidden").mkdir()
    assert list_cases(tmp_path, "brats") == ["B1", "B2", "B3", "B4"]
    assert load_case(tmp_path, "B2", "brats").labels is not None
    case = load_case(tmp_path, "B4", "brats", require_labels=False)
    assert case.labels is None and case.image.shape == SHAPE + (4,)
    with pytest.raises(DataError, match=r"B4_seg\.nii\.gz: missing file"):
        load_case(tmp_path, "B4", "brats")


def test_list_cases_rejects_duplicate_ids_and_missing_root(tmp_path):
    write_brats(tmp_path, "B1", group="HGG")
    write_brats(tmp_path, "B1", group="LGG")
    with pytest.raises(DataError, match="B1"):
        list_cases(tmp_path, "brats")
    with pytest.raises(DataError, match="not found"):
        list_cases(tmp_path / "nope", "parcellation")


def test_uncompressed_nii_is_accepted(tmp_path):
    folder = write_parc(tmp_path, "s")
    nib.save(nib.load(str(folder / "t2.nii.gz")), str(folder / "t2.nii"))
    (folder / "t2.nii.gz").unlink()
    assert load_case(tmp_path, "s", "parcellation").paths["t2"].endswith("t2.nii")


def test_save_nifti_roundtrip_and_deterministic_bytes(tmp_path):
    arr = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    p1 = save_nifti(tmp_path / "a.nii.gz", arr, AFFINE)
    p2 = save_nifti(tmp_path / "b.nii.gz", arr, AFFINE)
    assert p1.read_bytes() == p2.read_bytes()
    img = nib.load(str(p1))
    assert img.get_data_dtype() == np.int32
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    np.testing.assert_allclose(img.affine, AFFINE)


# ------------------------------------------------------------------------------------ validation errors
def _messages(problems):
    return [(Path(p.path).name, p.message) for p in problems]


def _assert_single(problems, file_name, fragment):
    assert len(problems) == 1, _messages(problems)
    assert Path(problems[0].path).name == file_name
    assert fragment in problems[0].message


def _check_both(tmp_path, case_id, layout, file_name, fragment):
    """validate_case reports exactly this problem and load_case raises it, naming the file."""
    _assert_single(validate_case(tmp_path, case_id, layout), file_name, fragment)
    with pytest.raises(DataError) as err:
        load_case(tmp_path, case_id, layout)
    assert file_name in str(err.value) and fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_error_missing_file(tmp_path):
    folder = write_brats(tmp_path, "C")
    (folder / "C_t2.nii.gz").unlink()
    _check_both(tmp_path, "C", "brats", "C_t2.nii.gz", "missing file")


def test_error_missing_case_folder(tmp_path):
    _assert_single(validate_case(tmp_path, "ghost", "parcellation"), "ghost", "case folder not found")


def test_error_unreadable_file(tmp_path):
    folder = write_parc(tmp_path, "s")
    (folder / "t1.nii.gz").write_bytes(b"this is not a nifti file")
    _check_both(tmp_path, "s", "parcellation", "t1.nii.gz", "cannot read")


def test_error_truncated_gzip(tmp_path):
    folder = write_parc(tmp_path, "s")
    raw = gzip.decompress((folder / "t2.nii.gz").read_bytes())
    (folder / "t2.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    _check_both(tmp_path, "s", "parcellation", "t2.nii.gz", "cannot read")


def test_error_not_3d(tmp_path):
    write_brats(tmp_path, "C", overrides={"flair": (np.ones(SHAPE + (2,), np.float32), AFFINE)})
    _check_both(tmp_path, "C", "brats", "C_flair.nii.gz", "expected a 3-D volume, got shape (6, 7, 5, 2)")


def test_trailing_singleton_axis_is_accepted(tmp_path):
    write_brats(tmp_path, "C", overrides={"flair": (_image(3)[..., None], AFFINE)})
    assert load_case(tmp_path, "C", "brats").image.shape == SHAPE + (4,)


def test_modality_with_another_shape_is_resampled_onto_the_label_grid(tmp_path, caplog):
    # was an error ("shape differs"); now the label grid is the reference and the modality is resampled
    t1ce = _image(1, (6, 7, 6))
    write_brats(tmp_path, "C", overrides={"t1ce": (t1ce, AFFINE)})
    assert validate_case(tmp_path, "C", "brats") == []
    with caplog.at_level("INFO", logger="timm_jax.data.io"):
        case = load_case(tmp_path, "C", "brats")
    assert case.image.shape == SHAPE + (4,) and case.meta["resampled"] == ["t1ce"]
    np.testing.assert_allclose(case.image[..., 1], t1ce[:, :, :5], rtol=1e-6)  # same affine: same voxels
    (line,) = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert "case C: t1ce resampled onto the grid of C_seg.nii.gz" in line and "(6, 7, 6)" in line


def test_modalities_with_another_affine_are_resampled_onto_the_label_grid(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0  # half a voxel along x
    write_parc(tmp_path, "s")
    lab = np.zeros(SHAPE, np.uint8)
    lab[2, 3, 2] = 7
    save_nifti(tmp_path / "s" / "labels.nii.gz", lab, shifted)
    case = load_case(tmp_path, "s", "parcellation")
    assert case.meta["resampled"] == ["t1", "t2"]
    np.testing.assert_allclose(case.affine, shifted)
    # label voxel i sits at t1 voxel i + 0.5 along x: the mean of the two neighbours
    t1 = _image(1)
    np.testing.assert_allclose(case.image[2, 3, 2, 0], 0.5 * (t1[2, 3, 2] + t1[3, 3, 2]), rtol=1e-5)
    summaries, problems = validate_dataset(tmp_path, "parcellation")
    assert not problems and "(t1,t2 resampled onto the" in summaries[0]


def test_error_grids_that_do_not_overlap(tmp_path):
    far = AFFINE.copy()
    far[:3, 3] += 500.0
    write_parc(tmp_path, "s")
    save_nifti(tmp_path / "s" / "t2.nii.gz", _image(2), far)
    _check_both(tmp_path, "s", "parcellation", "t2.nii.gz", "does not overlap labels.nii.gz's")


def test_error_non_finite(tmp_path):
    img = _image(2)
    img[1, 1, 1] = np.nan
    img[2, 2, 2] = np.inf
    write_brats(tmp_path, "C", overrides={"t2": (img, AFFINE)})
    _check_both(tmp_path, "C", "brats", "C_t2.nii.gz", "2 non-finite value(s)")


def test_error_empty_image(tmp_path):
    write_parc(tmp_path, "s")
    save_nifti(tmp_path / "s" / "t2.nii.gz", np.zeros(SHAPE, np.float32), AFFINE)
    _check_both(tmp_path, "s", "parcellation", "t2.nii.gz", "image is empty")


def test_error_constant_image(tmp_path):
    write_parc(tmp_path, "s")
    save_nifti(tmp_path / "s" / "t1.nii.gz", np.full(SHAPE, 3.0, np.float32), AFFINE)
    _check_both(tmp_path, "s", "parcellation", "t1.nii.gz", "constant")


def test_error_brats_label_outside_set(tmp_path):
    lab = np.zeros(SHAPE, np.uint8)
    lab[1, 1, 1] = 3
    lab[2, 2, 2] = 4
    write_brats(tmp_path, "C", labels=lab)
    _check_both(tmp_path, "C", "brats", "C_seg.nii.gz", "label values outside the brats set {0, 1, 2, 4}: 3")


def test_error_parcellation_negative_label(tmp_path):
    lab = np.zeros(SHAPE, np.int16)
    lab[0, 0, 0] = -1
    write_parc(tmp_path, "s", labels=lab)
    _check_both(tmp_path, "s", "parcellation", "labels.nii.gz", "outside the parcellation set")


def test_error_non_integer_labels(tmp_path):
    lab = np.zeros(SHAPE, np.float32)
    lab[0, 0, 0] = 1.5
    write_parc(tmp_path, "s", labels=lab)
    _check_both(tmp_path, "s", "parcellation", "labels.nii.gz", "must be integers")


def test_float_labels_with_integer_values_are_accepted(tmp_path):
    lab = np.zeros(SHAPE, np.float32)
    lab[1, 1, 1] = 4.0
    write_brats(tmp_path, "C", labels=lab)
    case = load_case(tmp_path, "C", "brats")
    assert np.issubdtype(case.labels.dtype, np.integer) and case.labels[1, 1, 1] == 4


def test_every_problem_of_a_case_is_reported(tmp_path):
    img = _image(1)
    img[1, 1, 1] = np.nan
    folder = write_brats(tmp_path, "C", overrides={"t1ce": (img, AFFINE)})
    (folder / "C_flair.nii.gz").unlink()
    problems = validate_case(tmp_path, "C", "brats")
    assert sorted(_messages(problems)) == sorted(
        [
            ("C_t1ce.nii.gz", "1 non-finite value(s) (NaN or inf)"),
            ("C_flair.nii.gz", "missing file"),
        ]
    )
    with pytest.raises(DataError) as err:
        load_case(tmp_path, "C", "brats")
    assert len(err.value.problems) == 2


def test_validate_dataset(tmp_path):
    write_brats(tmp_path, "good", group="HGG")
    folder = write_brats(tmp_path, "bad")
    (folder / "bad_t1.nii.gz").unlink()
    summaries, problems = validate_dataset(tmp_path, "brats")
    assert len(summaries) == 1 and summaries[0].startswith("good: ok, 6x7x5")
    assert _messages(problems) == [("bad_t1.nii.gz", "missing file")]
    summaries, problems = validate_dataset(tmp_path / "empty_dir_missing", "brats")
    assert not summaries and problems


# ------------------------------------------------------------------------------------ the command
def _run_validate(*args):
    return subprocess.run(
        [sys.executable, "-m", "timm_jax.data.validate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_validate_command_exit_codes(tmp_path):
    good = tmp_path / "good"
    write_parc(good, "s1")
    write_parc(good, "s2")
    res = _run_validate("--layout=parcellation", good)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("s1: ok") and lines[1].startswith("s2: ok")

    bad = tmp_path / "bad"
    write_brats(bad, "B1", group="HGG")
    f2 = write_brats(bad, "B2")
    (f2 / "B2_t1ce.nii.gz").unlink()
    f3 = write_brats(bad, "B3", labels=np.full(SHAPE, 5, np.uint8))
    save_nifti(f3 / "B3_t2.nii.gz", np.zeros(SHAPE, np.float32), AFFINE)
    res = _run_validate("--layout", "brats", bad)
    assert res.returncode == 1
    out = res.stdout
    # every problem is printed with its file
    assert "B2_t1ce.nii.gz: missing file" in out
    assert "B3_t2.nii.gz: image is empty" in out
    assert "B3_seg.nii.gz: label values outside the brats set" in out
    assert "B1" not in out
    assert len(out.strip().splitlines()) == 3


def test_validate_command_usage_errors(tmp_path):
    assert _run_validate("--layout=nope", tmp_path).returncode == 2
    res = _run_validate("--layout=brats", tmp_path)  # no cases: a problem, exit 1
    assert res.returncode == 1 and "no case folders" in res.stdout


def test_unknown_layout_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="unknown layout"):
        load_case(tmp_path, "x", "hcp")
    assert io.LAYOUTS["parcellation"].modalities == ("t1", "t2")
