"""Orientation and grids on load: closest RAS, resampling onto the label grid, degenerate geometry, .mgz."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from timm_jax.data import geometry
from timm_jax.data.io import DataError, load_case, save_nifti
from timm_jax.data.validate import validate_case, validate_dataset

SHAPE = (6, 7, 5)


def _rotation(deg_x, deg_z):
    a, c = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ rx


def oblique_lps(spacing=(1.0, 1.0, 1.0)):
    """A non-RAS, oblique affine: voxel axes ~ (P, L, S), rotated by 12 / 20 degrees."""
    perm = np.array([[0, -1, 0], [-1, 0, 0], [0, 0, 1]], float)  # i -> -y (P), j -> -x (L), k -> z
    aff = np.eye(4)
    aff[:3, :3] = _rotation(12, 20) @ perm @ np.diag(spacing)
    aff[:3, 3] = [30.0, -20.0, 10.0]
    return aff


def _image(seed, shape=SHAPE):
    img = np.random.default_rng(seed).uniform(10, 100, size=shape).astype(np.float32)
    img[0] = 0.0
    return img


def _labels(shape=SHAPE):
    lab = np.zeros(shape, np.int16)
    lab[1:3, 2:4, 1:3] = 7
    lab[3, 4, 2] = 12
    return lab


def write_parc(root, case_id, affine, *, t2=True, ext=".nii.gz"):
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    vols = {"t1": _image(1), "labels": _labels()}
    if t2:
        vols["t2"] = _image(2)
    for key, vol in vols.items():
        if ext == ".mgz":
            nib.save(
                nib.MGHImage(vol.astype(np.int32 if key == "labels" else np.float32), affine),
                str(folder / f"{key}.mgz"),
            )
        else:
            save_nifti(folder / f"{key}{ext}", vol, affine)
    return folder


# ----------------------------------------------------------------------------------- orientation
def test_oblique_non_ras_volumes_are_brought_to_the_closest_ras_orientation(tmp_path):
    aff = oblique_lps((2.0, 1.5, 3.0))
    write_parc(tmp_path, "s", aff)
    case = load_case(tmp_path, "s", "parcellation")
    ref = nib.as_closest_canonical(nib.load(str(tmp_path / "s" / "t1.nii.gz")))
    np.testing.assert_allclose(case.affine, ref.affine)
    np.testing.assert_array_equal(case.image[..., 0], ref.get_fdata(dtype=np.float32))
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    assert case.shape == (7, 6, 5) and case.spacing == pytest.approx((1.5, 2.0, 3.0))
    # every voxel keeps its world position: the labelled voxel (3, 4, 2) of the file
    (ijk,) = np.argwhere(case.labels == 12)
    np.testing.assert_allclose(
        case.affine[:3, :3] @ ijk + case.affine[:3, 3], aff[:3, :3] @ [3, 4, 2] + aff[:3, 3]
    )
    src = case.meta["source"]
    assert src["file"].endswith("labels.nii.gz") and src["shape"] == list(SHAPE)
    np.testing.assert_allclose(src["affine"], aff)
    assert src["qform_code"] == 1 and src["sform_code"] == 1 and src["format"] == "Nifti1Image"
    assert geometry.from_canonical(case.labels, src["orientation"]).tolist() == _labels().tolist()
    assert "resampled" not in case.meta


def test_a_modality_stored_in_another_orientation_of_the_same_grid_is_not_resampled(tmp_path):
    aff = oblique_lps()
    folder = write_parc(tmp_path, "s", aff)
    # t2 written with its axes flipped and permuted (the same voxels in the world): RAS-reoriented
    # it is on the label grid exactly, so it is not interpolated
    t2 = nib.load(str(folder / "t2.nii.gz"))
    flipped = nib.as_closest_canonical(t2)
    save_nifti(folder / "t2.nii.gz", flipped.get_fdata(dtype=np.float32), flipped.affine)
    case = load_case(tmp_path, "s", "parcellation")
    assert "resampled" not in case.meta
    np.testing.assert_array_equal(case.image[..., 1], flipped.get_fdata(dtype=np.float32))


def test_canonical_and_back_for_every_axis_permutation_and_flip():
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for perm in ([0, 1, 2], [1, 0, 2], [2, 0, 1], [1, 2, 0]):
        for signs in ([1, 1, 1], [-1, 1, -1], [-1, -1, -1]):
            aff = np.eye(4)
            aff[:3, :3] = np.eye(3)[:, perm] * signs
            out, aff_c, ornt = geometry.canonical(data, aff)
            assert nib.aff2axcodes(aff_c) == ("R", "A", "S")
            np.testing.assert_array_equal(geometry.from_canonical(out, ornt), data)


# ----------------------------------------------------------------------------------- degenerate
def _write_raw(path, data, *, sform=None, qform=None, pixdim=None):
    """NIfTI with exactly the given sform / qform (None: code 0) and raw pixdim bytes."""
    img = nib.Nifti1Image(data, None)
    img.set_sform(sform, code=0 if sform is None else 1)
    img.set_qform(qform, code=0 if qform is None else 1)
    nib.save(img, str(path))
    if pixdim is not None:
        raw = bytearray(path.read_bytes() if path.suffix != ".gz" else gzip.decompress(path.read_bytes()))
        pix = np.frombuffer(bytes(raw[76:108]), np.float32).copy()
        pix[1:4] = pixdim
        raw[76:108] = pix.tobytes()
        path.write_bytes(gzip.compress(bytes(raw)) if path.suffix == ".gz" else bytes(raw))


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("zero column", "affine is degenerate: voxel axis 0 has zero length (voxel sizes 0x6x6 mm"),
        ("equal columns", "affine is (nearly) singular: its voxel axes are nearly coplanar"),
        ("zero pixdim", "voxel sizes must be positive: the header's pixdim[1:4] is 0, 6, 6"),
        ("negative pixdim", "voxel sizes must be positive: the header's pixdim[1:4] is -6, 6, 6"),
    ],
)
def test_degenerate_geometry_is_one_problem_naming_the_file(tmp_path, how, fragment):
    folder = write_parc(tmp_path, "s", np.diag([6.0, 6.0, 6.0, 1.0]))
    path = folder / "t2.nii.gz"
    if how == "zero column":  # was accepted as "0.00x6.00x6.00 mm" and divided by zero at --spacing
        _write_raw(path, _image(2), sform=np.diag([0.0, 6.0, 6.0, 1.0]))
    elif how == "equal columns":
        aff = np.diag([6.0, 6.0, 6.0, 1.0])
        aff[:3, 1] = aff[:3, 0] + [0, 1e-3, 0]
        _write_raw(path, _image(2), sform=aff)
    elif how == "zero pixdim":
        _write_raw(path, _image(2), pixdim=[0, 6, 6])
    else:
        _write_raw(path, _image(2), qform=np.diag([6.0, 6.0, 6.0, 1.0]), pixdim=[-6, 6, 6])
    problems = validate_case(tmp_path, "s", "parcellation")
    assert [(Path(p.path).name, fragment in p.message) for p in problems] == [("t2.nii.gz", True)], problems
    with pytest.raises(DataError, match="t2.nii.gz"):
        load_case(tmp_path, "s", "parcellation")


def test_affine_problem_accepts_ordinary_and_oblique_affines():
    assert geometry.affine_problem(np.diag([0.5, 1.0, 3.0, 1.0])) is None
    assert geometry.affine_problem(oblique_lps((0.8, 1.0, 5.0))) is None
    assert "non-finite" in geometry.affine_problem(np.full((4, 4), np.nan))


def test_an_all_zero_case_is_one_line_not_one_per_modality(tmp_path):
    folder = write_parc(tmp_path, "s", np.eye(4))
    for m in ("t1", "t2"):
        save_nifti(folder / f"{m}.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
    (p,) = validate_case(tmp_path, "s", "parcellation")
    assert p.path == str(folder) and "every image of the case is empty" in p.message
    assert "t1.nii.gz, t2.nii.gz" in p.message
    # one empty modality of two: that file is named
    save_nifti(folder / "t1.nii.gz", _image(1), np.eye(4))
    (p,) = validate_case(tmp_path, "s", "parcellation")
    assert p.path.endswith("t2.nii.gz") and p.message == "image is empty (all voxels are zero)"


# ----------------------------------------------------------------------------------- .mgz
def test_mgz_files_are_read_and_reoriented(tmp_path):
    lia = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])  # conformed LIA
    write_parc(tmp_path, "s", lia, ext=".mgz")
    case = load_case(tmp_path, "s", "parcellation")
    assert case.paths["t1"].endswith("t1.mgz") and case.meta["source"]["format"] == "MGHImage"
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    assert case.meta["source"]["qform_code"] is None
    ref = nib.as_closest_canonical(nib.load(str(tmp_path / "s" / "t2.mgz")))
    np.testing.assert_array_equal(case.image[..., 1], ref.get_fdata(dtype=np.float32))


def test_truncated_mgz_is_one_problem_naming_the_file(tmp_path):
    folder = write_parc(tmp_path, "s", np.eye(4), ext=".mgz")
    raw = gzip.decompress((folder / "t1.mgz").read_bytes())
    (folder / "t1.mgz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    (p,) = validate_case(tmp_path, "s", "parcellation")
    assert p.path.endswith("t1.mgz") and "\n" not in p.message
    assert "cannot read file" in p.message or "truncated" in p.message
    (folder / "t2.mgz").write_bytes((folder / "t2.mgz").read_bytes()[:100])  # the gzip stream cut
    problems = validate_case(tmp_path, "s", "parcellation")
    assert sorted(Path(p.path).name for p in problems) == ["t1.mgz", "t2.mgz"]


def test_mgz_with_zero_voxel_size_is_reported(tmp_path):
    folder = write_parc(tmp_path, "s", np.eye(4), ext=".mgz")
    img = nib.load(str(folder / "t2.mgz"))
    img.header["delta"] = [1.0, 0.0, 1.0]
    nib.save(nib.MGHImage(img.get_fdata(dtype=np.float32), None, img.header), str(folder / "t2.mgz"))
    (p,) = validate_case(tmp_path, "s", "parcellation")
    assert p.path.endswith("t2.mgz") and ("degenerate" in p.message or "delta" in p.message), p


# ----------------------------------------------------------------------------------- T1-only
def test_parcellation_t2_is_optional_for_a_whole_data_set_only(tmp_path):
    write_parc(tmp_path, "a", np.eye(4), t2=False)
    write_parc(tmp_path, "b", np.eye(4), t2=False)
    case = load_case(tmp_path, "a", "parcellation")
    assert case.modalities == ("t1",) and case.image.shape == SHAPE + (1,)
    write_parc(tmp_path, "c", np.eye(4), t2=True)
    summaries, problems = validate_dataset(tmp_path, "parcellation")
    (p,) = problems
    assert not summaries and p.path == str(tmp_path)
    assert "t2.nii.gz is present in 1 of 3 cases (missing in a, b)" in p.message
    with pytest.raises(DataError, match="all cases of a data set must have it or all lack it"):
        load_case(tmp_path, "c", "parcellation")
