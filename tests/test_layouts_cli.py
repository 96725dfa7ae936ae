"""Every layout through the command-line scripts: validate -> train.py -> predict.py -> evaluate.py.

For each layout (BraTS 2018 and 2023 naming, MSD, nnU-Net, FreeSurfer with --label_map=paper14,
parcellation) a small data set is written in that exact on-disk convention
(:mod:`timm_jax.data.writers`): three annotated cases (a seeded split of 1 train / 1 val / 1 test),
plus an unlabelled test case where the layout has a test folder. A tiny network (base 2, depth 2,
16³ patches, one step) is trained, then ``predict.py`` segments the whole folder and
``evaluate.py --save_predictions`` the test split.

The round trip: ``predict.py``'s segmentation of each test case has the input file's shape, affine,
qform / sform codes and orientation, and equals ``evaluate.py``'s prediction (written on the
preprocessed grid) mapped back with ``to_input_geometry`` and into the data set's own label ids,
voxel for voxel. The BraTS 2023 cases are 240×240×155 at 1 mm on an oblique, non-RAS grid (mostly
zero: the preprocessing crops to the non-zero box, so the network sees ~32³).
"""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _demo import script_env

from timm_jax.data.io import dataset_info
from timm_jax.data.preprocess import to_input_geometry
from timm_jax.data.spec import DataSpec, resolve
from timm_jax.data.writers import (
    MSD_BRAIN_TUMOUR,
    conformed_lia,
    write_brats_case,
    write_freesurfer_subject,
    write_msd_task,
    write_nnunet_dataset,
    write_parcellation_case,
    write_volume,
)

pytestmark = pytest.mark.e2e  # scripts in subprocesses: left out by `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
NET = ["--base_filters=2", "--depth=2", "--patch=16,16,16", "--steps_per_epoch=1", "--max_epochs=1"]
SMALL = (26, 28, 24)
BIG = (240, 240, 155)


def oblique_lps():
    """1 mm voxels, axes ~ (L, P, S) — the BraTS files' LPS — rotated by 8 and 12 degrees."""
    a, c = np.deg2rad(8), np.deg2rad(12)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([-1.0, -1.0, 1.0])
    aff[:3, 3] = [120.0, 119.0, -70.0]
    return aff


def blobs(shape, seed, ids, box=None):
    """Labels: nested spheres with the ``ids`` (outermost first) inside a "head" box; an image that
    is non-zero in the box, brighter where labelled, and a per-channel contrast."""
    rng = np.random.default_rng(seed)
    box = box or tuple(slice(2, s - 2) for s in shape)
    lab = np.zeros(shape, np.int32)
    centre = [(b.start + b.stop) / 2 + rng.uniform(-2, 2) for b in box]
    half = min(b.stop - b.start for b in box) / 2
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
    for k, v in enumerate(ids):
        lab[r2 <= (half * (0.8 - 0.2 * k)) ** 2] = v
    head = np.zeros(shape, bool)
    head[box] = True
    lab[~head] = 0

    def image(channels):
        out = np.zeros((*shape, channels), np.float32)
        for c in range(channels):
            vol = rng.uniform(20, 60, size=shape).astype(np.float32)
            vol += (lab > 0) * (30 + 10 * c) + (lab == ids[-1]) * 20
            out[..., c] = np.where(head, np.round(vol), 0)
        return out

    return lab, image


def build_brats(root, convention):
    for i in range(3):
        if convention == "brats2023":
            cid = f"BraTS-GLI-{i:05d}-000"
            box = (slice(100, 122), slice(90, 114), slice(60, 80))
            lab, image = blobs(BIG, i, (2, 1, 4), box)
            img = image(4)
            naming = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
            aff = oblique_lps()
            for c, m in enumerate(("t1", "t1ce", "t2", "flair")):
                path = root / cid / f"{cid}-{naming[m]}.nii.gz"
                write_volume(path, img[..., c].astype(np.int16), aff, qform_code=1, sform_code=2)
            seg = np.where(lab == 4, 3, lab).astype(np.uint8)  # BraTS 2023 ids: ET = 3
            write_volume(root / cid / f"{cid}-seg.nii.gz", seg, aff, qform_code=1, sform_code=2)
        else:
            cid = f"Brats18_TCIA_{i:03d}_1"
            lab, image = blobs(SMALL, i, (2, 1, 4))
            write_brats_case(root, cid, image(4), lab, group="HGG" if i else "LGG")


def build_msd(root):
    cases = {}
    for i in range(4):
        lab, image = blobs(SMALL, 10 + i, (1, 2, 3))  # MSD ids: 1 edema, 2 non-enhancing, 3 enhancing
        cases[f"BRATS_{i:03d}"] = (image(4), lab if i < 3 else None)
    write_msd_task(root, cases, **MSD_BRAIN_TUMOUR)


def build_nnunet(root):
    cases = {}
    for i in range(4):
        lab, image = blobs(SMALL, 20 + i, (1, 2))
        cases[f"case_{i:03d}"] = (image(2), lab if i < 3 else None)
    write_nnunet_dataset(
        root,
        cases,
        channel_names={"0": "T1", "1": "T2"},
        labels={"background": 0, "organ": 1, "lesion": 2},
    )


def build_freesurfer(root):
    shape = (30, 30, 30)
    for i in range(3):
        lab, image = blobs(shape, 30 + i, (2, 10, 17))  # aseg ids: WM, thalamus, hippocampus
        lab[(lab == 0) & (image(1)[..., 0] > 0) & (np.arange(shape[0])[:, None, None] < 8)] = 3  # cortex
        t1 = image(1)[..., 0] * 2
        write_freesurfer_subject(root, f"sub{i:02d}", t1, lab, affine=conformed_lia(shape))


def build_parcellation(root):
    for i in range(3):
        lab, image = blobs(SMALL, 40 + i, (1, 2, 3))
        write_parcellation_case(root, f"subj{i}", image(2), lab)


LAYOUTS = {
    # name: (layout, extra train flags, builder, native label ids of the written segmentation)
    "brats2018": ("brats", [], lambda r: build_brats(r, "brats2018"), {0, 1, 2, 4}),
    "brats2023": ("brats", [], lambda r: build_brats(r, "brats2023"), {0, 1, 2, 3}),
    "msd": ("msd", [], build_msd, {0, 1, 2, 3}),
    "nnunet": ("nnunet", [], build_nnunet, {0, 1, 2}),
    "freesurfer": ("freesurfer", ["--label_map=paper14"], build_freesurfer, set(range(15))),
    "parcellation": ("parcellation", ["--labels=1,2,3"], build_parcellation, {0, 1, 2, 3}),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    env = script_env(tmp, ROOT)
    return tmp, env


def run(base, *args, check=True):
    tmp, env = base
    p = subprocess.run(
        [sys.executable, *map(str, args)], env=env, cwd=tmp, capture_output=True, text=True, timeout=900
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _reference_file(case):
    return case.meta["source"]["file"]


_TRAINED: dict = {}


def trained(base, name):
    """The data set of layout ``name``, validated, and a run trained on it (once per module)."""
    if name not in _TRAINED:
        tmp, _ = base
        layout, extra, build, _ = LAYOUTS[name]
        data = tmp / name / "data"
        build(data)
        label_map = [e for e in extra if e.startswith("--label_map")]
        out = run(base, "-m", "timm_jax.data.validate", f"--layout={layout}", *label_map, data)
        assert "ok." in out.stderr
        workdir = tmp / name / "run"
        out = run(
            base,
            ROOT / "train.py",
            f"--data_dir={data}",
            f"--layout={layout}",
            *extra,
            *NET,
            f"--workdir={workdir}",
        )
        assert "epoch 1/1" in out.stdout
        _TRAINED[name] = (data, workdir)
    return _TRAINED[name]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_validate_train_predict_evaluate(base, name):
    tmp, _ = base
    layout, extra, build, native_ids = LAYOUTS[name]
    data, workdir = trained(base, name)
    seg_dir = tmp / name / "seg"
    probs = name == "msd"
    out = run(
        base,
        ROOT / "predict.py",
        f"--run={workdir}",
        f"--input={data}",
        f"--out={seg_dir}",
        *(["--probabilities"] if probs else []),
    ).stdout
    assert "[predict]" in out and "labels written as" in out
    run(base, ROOT / "evaluate.py", f"--run={workdir}", "--save_predictions")
    summary = json.loads((workdir / "eval_test" / "summary.json").read_text())
    assert summary["convention"]["empty_regions"] == "brats" and summary["n_cases"] == 1
    assert all(v["n_valid"] == 1 for k, v in summary["metrics"].items() if k.startswith("hd95"))

    # every case of the folder was written, labelled or not
    spec_obj = DataSpec(
        data_dir=str(data),
        layout=layout,
        label_map="paper14" if name == "freesurfer" else "",
        labels=(1, 2, 3) if name == "parcellation" else (),
    )
    all_cases = resolve(spec_obj)
    info = dataset_info(data, layout, label_map=spec_obj.label_map or None)
    from timm_jax.data.io import list_cases

    every = list_cases(data, layout, subset="all", info=info)
    assert sorted(p.name for p in seg_dir.glob("*_seg.nii.gz")) == sorted(f"{c}_seg.nii.gz" for c in every)

    # the round trip: predict.py's output == evaluate.py's prediction mapped back, in native ids
    (cid,) = all_cases.splits["test"]
    (case,) = all_cases.load([cid])
    pred = np.asarray(nib.load(workdir / "eval_test" / "predictions" / f"{cid}.nii.gz").dataobj)
    back = to_input_geometry(pred.astype(np.int32), case)
    if name == "freesurfer":
        expected = back  # paper14 merged the aseg ids: class ids are written
    else:
        expected = info.to_native_labels(back)
    written = nib.load(seg_dir / f"{cid}_seg.nii.gz")
    ref = nib.load(_reference_file(case))
    assert written.shape == ref.shape[:3]
    np.testing.assert_allclose(written.affine, ref.affine, atol=1e-4)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(ref.affine)
    if isinstance(ref, nib.Nifti1Image):
        assert int(written.header["qform_code"]) == int(ref.header["qform_code"])
        assert int(written.header["sform_code"]) == int(ref.header["sform_code"])
    got = np.asarray(written.dataobj)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got).tolist()) <= native_ids
    if name == "brats2023":
        assert written.shape == BIG and nib.aff2axcodes(written.affine) != ("R", "A", "S")
        assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    if probs:
        prob = nib.load(seg_dir / f"{cid}_prob.nii.gz")
        meta = json.loads((seg_dir / f"{cid}_prob.json").read_text())
        assert meta["channels"] == ["WT", "TC", "ET"] and prob.shape == (*ref.shape[:3], 3)
        np.testing.assert_allclose(prob.affine, ref.affine, atol=1e-4)
        from timm_jax.data.tasks import brats_regions

        np.testing.assert_array_equal(
            info.to_native_labels(brats_regions().decode(np.asarray(prob.dataobj))), got
        )


def test_the_files_of_one_case_give_the_folder_s_result_and_a_wrong_order_is_refused(base):
    """--input as the files of one case (named by the first file) writes what the folder run wrote;
    files in another modality order are refused in one line, and nothing is written."""
    tmp, _ = base
    data, workdir = trained(base, "brats2023")
    folder_seg = tmp / "brats2023" / "seg"
    if not folder_seg.is_dir():
        run(base, ROOT / "predict.py", f"--run={workdir}", f"--input={data}", f"--out={folder_seg}")
    cid = "BraTS-GLI-00001-000"
    files = [data / cid / f"{cid}-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")]
    out = tmp / "brats2023" / "files"
    run(base, ROOT / "predict.py", f"--run={workdir}", "--input=" + ",".join(map(str, files)), f"--out={out}")
    a = nib.load(out / f"{cid}_seg.nii.gz")
    b = nib.load(folder_seg / f"{cid}_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)
    wrong = tmp / "brats2023" / "wrong"
    swapped = [files[1], files[0], *files[2:]]
    p = run(
        base,
        ROOT / "predict.py",
        f"--run={workdir}",
        "--input=" + ",".join(map(str, swapped)),
        f"--out={wrong}",
        check=False,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    assert f"case {cid}:" in errors[0] and "['t1ce', 't1', 't2', 'flair']" in errors[0]
    assert "['t1', 't1ce', 't2', 'flair']" in errors[0]
    assert not wrong.exists() or not any(wrong.iterdir())


def test_refusals_before_anything_is_written_and_unreadable_cases_are_skipped(base, tmp_path):
    """In-process: modalities of another data set, a missing modality file, existing outputs; a
    damaged case is skipped (one line at the end naming it) and the others are written; a damaged
    label file does not matter (predict does not read labels)."""
    import shutil

    from timm_jax.data.io import DataError
    from timm_jax.errors import ConfigError
    from timm_jax.workflows.predict import predict

    data, workdir = trained(base, "brats2023")
    parc, parc_run = trained(base, "parcellation")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        predict(str(workdir), [str(parc)], str(out), layout="parcellation")
    assert "have the modalities ['t1', 't2'], the model reads ['t1', 't1ce', 't2', 'flair']" in str(e.value)
    cid = "BraTS-GLI-00002-000"
    three = [str(data / cid / f"{cid}-{m}.nii.gz") for m in ("t1n", "t1c", "t2w")]
    with pytest.raises(ConfigError, match=f"case {cid}: 3 file.s. .* the model reads 4 modalities"):
        predict(str(workdir), three, str(out))
    assert not out.exists()
    # a damaged case among good ones: skipped, the others written, one error line at the end
    copy = tmp_path / "parc"
    shutil.copytree(parc, copy)
    (copy / "subj1" / "t2.nii.gz").write_bytes(b"not a nifti")
    labels = next((copy / "subj2").glob("labels.*"))
    labels.write_bytes(b"not a nifti")  # a label file is not read: subj2 is still predicted
    with pytest.raises(DataError) as e:
        predict(str(parc_run), [str(copy)], str(out))
    assert "\n" not in str(e.value) and "1 of 3 case(s) could not be read" in str(e.value)
    assert "subj1" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["subj0_seg.nii.gz", "subj2_seg.nii.gz"]
    with pytest.raises(ConfigError, match="subj0_seg.nii.gz and 1 more exist.s.; .* --overwrite"):
        predict(str(parc_run), [str(copy)], str(out))
    before = (out / "subj0_seg.nii.gz").stat().st_mtime_ns
    with pytest.raises(DataError):
        predict(str(parc_run), [str(copy)], str(out), overwrite=True)
    assert (out / "subj0_seg.nii.gz").stat().st_mtime_ns >= before


@pytest.mark.parametrize(
    "path, modality, rest",
    [
        ("BraTS-GLI-00001-000-t1n.nii.gz", "t1", "BraTS-GLI-00001-000"),
        ("BraTS-GLI-00001-000-t2f.nii.gz", "flair", "BraTS-GLI-00001-000"),
        ("Brats18_X_1_t1ce.nii.gz", "t1ce", "Brats18_X_1"),
        ("Brats18_X_1_t1.nii", "t1", "Brats18_X_1"),
        ("case_007_0001.nii.gz", "t1ce", "case_007"),
        ("T1.mgz", "t1", ""),
        ("scan.nii.gz", None, "scan"),
    ],
)
def test_file_modality_from_names(path, modality, rest):
    from timm_jax.workflows.predict import file_modality

    assert file_modality(path, ["t1", "t1ce", "t2", "flair"]) == (modality, rest)
