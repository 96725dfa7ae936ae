"""Property-based tests of the NIfTI validator over randomly corrupted cases.

Each example copies a valid data folder (one clean case, one to corrupt) of the ``brats`` or
``parcellation`` layout, damages one file of the second case (truncated, zero bytes, wrong
dimensionality, NaN / Inf voxels, labels outside the layout's set or beyond int32, non-integer
labels, a missing modality, a non-finite affine, complex voxels, no voxels, random header bytes)
and runs the validator. It must never raise: every problem is one line naming the damaged file and
what is wrong, the clean case still passes, ``load_case`` raises a :class:`DataError`, and no file
is changed. Another affine or shape is no longer an error: the case loads with the modalities
resampled onto the label grid, or (no overlap, a degenerate affine) is reported in one line. A
parcellation case without its T2 makes the data set's cases disagree: one line for the data set.
A few cases also run ``python -m timm_jax.data.validate`` in a subprocess (exit status 1, one
``ERROR`` line each). The readers of the other layouts (``dataset.json``, 4-D NIfTI, ``.mgz``) are
fuzzed in ``tests/test_fuzz_layouts.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fuzz_record import FUZZ, Tally
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_jax.data.io import LAYOUTS, DataError, inspect_case, load_case, save_nifti
from timm_jax.data.validate import validate_dataset

TALLY = Tally("data validator (timm_jax/data/io.py inspect_case, validate_dataset)")
SHAPE = (6, 7, 5)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
AFFINE[:3, 3] = [-5.0, 4.0, 1.0]
GOOD, BAD = "case_ok", "case_bad"
NIFTI1_HEADER = 348
SROW_OFFSET, DIM_OFFSET = 280, 40  # byte offsets of srow_x and dim[] in a NIfTI-1 header
REPORTED = "reported: one line naming the file and the problem; load_case raises DataError; no traceback"
UNCHANGED = "none (read-only; the files are unchanged)"


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    TALLY.write()


# ----------------------------------------------------------------------------- valid cases
def _image(rng, shape=SHAPE):
    img = rng.uniform(10, 100, size=shape).astype(np.float32)
    img[0] = 0.0
    return img


def _labels(layout, shape=SHAPE):
    lab = np.zeros(shape, np.int16)
    if layout == "brats":
        lab[2:4, 2:5, 1:3], lab[3, 3, 2], lab[2, 3, 2] = 2, 4, 1
    else:
        lab[1:3, 1:3, 1:3], lab[3:5, 3:5, 2:4] = 7, 12
    return lab


def file_of(root, layout, case_id, key, ext=".nii.gz"):
    return Path(root) / case_id / (LAYOUTS[layout].stem(case_id, key) + ext)


def write_case(root, layout, case_id):
    rng = np.random.default_rng(len(case_id))
    lay = LAYOUTS[layout]
    for m in lay.modalities:
        save_nifti(file_of(root, layout, case_id, m), _image(rng), AFFINE)
    save_nifti(file_of(root, layout, case_id, lay.label_key), _labels(layout), AFFINE)


_TEMPLATES: dict[str, Path] = {}


def template(layout):
    """A valid data folder with the two cases, written once per layout and copied per example."""
    if layout not in _TEMPLATES:
        root = Path(tempfile.mkdtemp(prefix=f"fuzz_{layout}_"))
        write_case(root, layout, GOOD)
        write_case(root, layout, BAD)
        assert not validate_dataset(root, layout)[1]
        _TEMPLATES[layout] = root
    return _TEMPLATES[layout]


@pytest.fixture(scope="module", autouse=True)
def _remove_templates():
    yield
    for root in _TEMPLATES.values():
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------- the faults
def patch_header(path, offset, values):
    """Overwrite bytes of a gzipped NIfTI file's (decompressed) header, recompressing it."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    data = np.asarray(values).tobytes()
    raw[offset : offset + len(data)] = data
    path.write_bytes(gzip.compress(bytes(raw)))


def apply_fault(fault, root, layout, key, rng, case_id=BAD):
    """Damage ``key``'s file of a case; returns (file named in the report, message fragment)."""
    lay = LAYOUTS[layout]
    path = file_of(root, layout, case_id, key)
    is_label = key == lay.label_key
    base = _labels(layout) if is_label else _image(rng)
    if fault == "truncated file":
        if rng.random() < 0.5:  # the gzipped file
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * rng.uniform(0.02, 0.9))])
        else:  # an uncompressed .nii
            raw = gzip.decompress(path.read_bytes())
            path.unlink()
            path = path.with_suffix("")  # .nii.gz -> .nii
            path.write_bytes(raw[: int(len(raw) * rng.uniform(0.02, 0.95))])
        return path, ("cannot read file", "file is truncated or its header is damaged")
    if fault == "zero-byte file":
        path.write_bytes(b"")
        return path, "cannot read file"
    if fault == "wrong dimensionality":
        bad = base[:, :, 0] if rng.random() < 0.5 else np.stack([base, base], axis=-1)
        save_nifti(path, bad, AFFINE)
        return path, "expected a 3-D volume"
    if fault == "NaN or Inf voxels":
        bad = base.astype(np.float32)
        n = int(rng.integers(1, 20))
        bad.flat[rng.choice(bad.size, n, replace=False)] = rng.choice([np.nan, np.inf, -np.inf], n)
        save_nifti(path, bad, AFFINE)
        return path, "non-finite value(s)"
    if fault == "mismatched affine":
        aff = AFFINE.copy()
        aff[rng.integers(3), rng.integers(4)] += rng.choice([-1, 1]) * rng.uniform(0.01, 10)
        save_nifti(path, base, aff)
        return path, "affine differs"
    if fault == "mismatched shape":
        shape = list(SHAPE)
        shape[rng.integers(3)] += int(rng.choice([-1, 1, 3]))
        save_nifti(path, _labels(layout, shape) if is_label else _image(rng, tuple(shape)), AFFINE)
        return path, "differs from"
    if fault == "non-finite affine":
        patch_header(path, SROW_OFFSET + 4 * int(rng.integers(12)), np.float32(rng.choice([np.nan, np.inf])))
        return path, "affine (voxel-to-world transform of the sform/qform) has non-finite entries"
    if fault == "no voxels":
        patch_header(path, DIM_OFFSET + 2 + 2 * int(rng.integers(3)), np.int16(0))
        return path, "no voxels"
    if fault == "header declares more voxels":  # must be reported before any buffer is allocated
        dims = [int(d) for d in rng.integers(SHAPE[0] + 1, 32768, size=3)]
        patch_header(path, DIM_OFFSET + 2, np.asarray(dims, np.int16))
        return path, "file is truncated or its header is damaged"
    if fault == "complex voxels":
        save_nifti(path, base.astype(np.complex64), AFFINE)
        return path, "voxel type complex64 is not supported"
    if fault == "missing modality":
        path.unlink()
        return path, "missing file"
    # label faults: always the label file
    path = file_of(root, layout, case_id, lay.label_key)
    lab = _labels(layout)
    where = tuple(rng.integers(0, s) for s in SHAPE)
    if fault == "labels outside the layout's set":
        lab = lab.astype(np.int32)
        lab[where] = int(rng.choice([3, 5, 255, -1])) if layout == "brats" else -int(rng.integers(1, 100))
        save_nifti(path, lab, AFFINE)
        return path, "label values outside"
    if fault == "non-integer labels":
        lab = lab.astype(np.float32)
        lab[where] += rng.choice([0.5, 0.25, 1e-3])
        save_nifti(path, lab, AFFINE)
        return path, "label values must be integers"
    if fault == "labels beyond int32":
        lab = lab.astype(np.float64 if rng.random() < 0.5 else np.uint32)
        lab[where] = 3_000_000_000 if lab.dtype == np.uint32 else rng.choice([3e9, 1e20])
        save_nifti(path, lab, AFFINE)
        return path, "must fit in int32"
    raise AssertionError(fault)


FAULTS = (
    "truncated file",
    "zero-byte file",
    "wrong dimensionality",
    "NaN or Inf voxels",
    "mismatched affine",
    "mismatched shape",
    "labels outside the layout's set",
    "non-integer labels",
    "missing modality",
    "non-finite affine",
    "labels beyond int32",
    "complex voxels",
    "no voxels",
    "header declares more voxels",
)


def digest(root):
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()
    }


def check_report(root, layout, bad_file, fragment):
    """The validator's contract for a damaged BAD case, checked through the library."""
    before = digest(root)
    summaries, problems = validate_dataset(root, layout)
    assert [s.split(":")[0] for s in summaries] == [GOOD], summaries  # the clean case still passes
    assert problems and all(p.case_id == BAD for p in problems)
    for p in problems:
        assert str(p).strip() and "\n" not in str(p) and "Traceback" not in str(p), str(p)
    named = [str(p) for p in problems if bad_file.name in str(p)]
    assert named, (bad_file.name, [str(p) for p in problems])
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert any(f in line for line in named for f in fragments), (fragment, named)
    with pytest.raises(DataError) as err:
        load_case(root, BAD, layout)
    assert bad_file.name in str(err.value)
    assert digest(root) == before  # read-only
    return problems


#: faults after which the case may load: its modalities are resampled onto the label grid
RESAMPLED = ("mismatched affine", "mismatched shape")
#: what a resampled case may still be reported for (one line naming a file of the case)
RESAMPLE_PROBLEMS = ("does not overlap", "is empty on", "affine is degenerate", "nearly) singular")


def check_resampled(root, layout):
    """Another grid: the case loads (modalities resampled, said in its summary) or gets one-line reports."""
    before = digest(root)
    summaries, problems = validate_dataset(root, layout)
    assert digest(root) == before
    assert GOOD in [s.split(":")[0] for s in summaries], summaries
    if not problems:
        (bad,) = [s for s in summaries if s.startswith(BAD)]
        assert "resampled onto the" in bad, bad
        return "accepted: the modalities resampled onto the label grid (said in the summary line)"
    for p in problems:
        assert p.case_id == BAD and "\n" not in str(p) and any(f in p.message for f in RESAMPLE_PROBLEMS), p
    with pytest.raises(DataError):
        load_case(root, BAD, layout)
    return "reported: one line naming the file (no overlap, or a degenerate affine)"


def check_dataset_disagrees(root, layout, bad_file):
    """A T2 missing in one parcellation case only: the data set is refused in one line naming it."""
    before = digest(root)
    summaries, problems = validate_dataset(root, layout)
    assert digest(root) == before and not summaries
    (p,) = problems
    assert "\n" not in str(p) and f"{bad_file.name} is present in 1 of 2 cases (missing in {BAD})" in str(p)
    with pytest.raises(DataError, match=bad_file.name):
        load_case(root, BAD, layout)
    return "reported: one line for the data set (its cases disagree on the T2), naming the file and case"


def check_fault(fault, layout, key_pick, seed):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(template(layout), root)
        keys = LAYOUTS[layout].keys
        key = keys[key_pick % len(keys)]
        bad_file, fragment = apply_fault(fault, root, layout, key, rng)
        if fault in RESAMPLED:
            outcome = check_resampled(root, layout)
        elif fault == "missing modality" and layout == "parcellation" and key == "t2":
            outcome = check_dataset_disagrees(root, layout, bad_file)
        else:
            check_report(root, layout, bad_file, fragment)
            outcome = REPORTED
    TALLY.add(fault, outcome, UNCHANGED)


@pytest.mark.parametrize("fault", FAULTS)
@settings(FUZZ, max_examples=10)
@given(layout=st.sampled_from(sorted(LAYOUTS)), key_pick=st.integers(0, 4), seed=st.integers(0, 2**32 - 1))
def test_corrupted_case_is_reported_by_file(fault, layout, key_pick, seed):
    check_fault(fault, layout, key_pick, seed)


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
@settings(FUZZ, max_examples=60)
@given(layout=st.sampled_from(sorted(LAYOUTS)), key_pick=st.integers(0, 4), seed=st.integers(0, 2**32 - 1))
def test_corrupted_case_is_reported_by_file_long(fault, layout, key_pick, seed):
    check_fault(fault, layout, key_pick, seed)


def check_random_header_bytes(layout, key_pick, n_bytes, seed):
    """Random bytes in a header: either a one-line report naming the file, or a valid read."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(template(layout), root)
        keys = LAYOUTS[layout].keys
        path = file_of(root, layout, BAD, keys[key_pick % len(keys)])
        raw = bytearray(gzip.decompress(path.read_bytes()))
        for pos in rng.choice(NIFTI1_HEADER, n_bytes, replace=False):
            raw[pos] = int(rng.integers(256))
        path.write_bytes(gzip.compress(bytes(raw)))
        before = digest(root)
        case, problems = inspect_case(root, BAD, layout)
        assert digest(root) == before
        for p in problems:
            assert "\n" not in str(p) and path.name in str(p), str(p)
        assert (case is None) == bool(problems)
    if problems:
        TALLY.add("random header bytes", "reported: one line naming the file", UNCHANGED)
    else:
        TALLY.add(
            "random header bytes",
            "accepted as valid: no check fails for the changed header fields",
            UNCHANGED,
        )


@settings(FUZZ, max_examples=60)
@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    key_pick=st.integers(0, 4),
    n_bytes=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_header_bytes_never_raise(layout, key_pick, n_bytes, seed):
    check_random_header_bytes(layout, key_pick, n_bytes, seed)


@pytest.mark.slow
@settings(FUZZ, max_examples=600)
@given(
    layout=st.sampled_from(sorted(LAYOUTS)),
    key_pick=st.integers(0, 4),
    n_bytes=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_header_bytes_never_raise_long(layout, key_pick, n_bytes, seed):
    check_random_header_bytes(layout, key_pick, n_bytes, seed)


def test_oversized_header_is_checked_by_streaming_before_allocating(tmp_path):
    """A header declaring 72 MB of voxels in a 250 kB gzip file (within deflate's ratio): the file is
    decompressed in chunks to count its bytes, and the reader's 72 MB buffer is never allocated."""
    root = tmp_path / "data"
    shutil.copytree(template("parcellation"), root)
    path = file_of(root, "parcellation", BAD, "t2")
    noise = np.random.default_rng(0).uniform(1, 2, size=(40, 40, 40)).astype(np.float32)
    save_nifti(path, noise, AFFINE)
    patch_header(path, DIM_OFFSET + 2, np.asarray([300, 300, 200], np.int16))
    assert 300 * 300 * 200 * 4 < 1032 * path.stat().st_size  # not caught by the ratio bound
    check_report(
        root, "parcellation", path, "(72000352 bytes with the offset), the file decompresses to 256352"
    )


# ------------------------------------------------------------------------------- the command
@pytest.mark.parametrize(
    "layout, faults",
    [
        ("parcellation", [("truncated file", 0), ("NaN or Inf voxels", 1)]),
        ("brats", [("zero-byte file", 2), ("labels beyond int32", 4), ("non-finite affine", 0)]),
    ],
)
def test_validate_command_reports_each_damaged_file_on_one_line(tmp_path, layout, faults):
    root = tmp_path / "data"
    shutil.copytree(template(layout), root)
    shutil.rmtree(root / BAD)  # one clean case, and one damaged case per fault
    rng = np.random.default_rng(0)
    expected = []
    for i, (fault, key_pick) in enumerate(faults):
        case_id = f"damaged{i}"
        write_case(root, layout, case_id)
        keys = LAYOUTS[layout].keys
        expected.append(apply_fault(fault, root, layout, keys[key_pick % len(keys)], rng, case_id))
    res = subprocess.run(
        [sys.executable, "-m", "timm_jax.data.validate", f"--layout={layout}", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stdout.strip().splitlines()
    assert all(line.startswith("ERROR ") for line in lines), lines
    for path, fragment in expected:
        mine = [line for line in lines if path.name in line]
        fragments = (fragment,) if isinstance(fragment, str) else fragment
        assert any(f in line for line in mine for f in fragments), (path.name, lines)
    assert res.stderr.strip().splitlines()[-1].endswith(f"in {len(faults)} case(s); 1 case(s) ok.")
    for fault, _ in faults:
        TALLY.add(
            f"{fault} (python -m timm_jax.data.validate)",
            "exit status 1; one ERROR line per problem naming the file; no traceback",
            UNCHANGED,
        )
