"""The layouts: BraTS 2018 / 2023+ naming, MSD, nnU-Net v2, FreeSurfer with label maps, and their errors.

Each test writes a small data set in the layout's exact convention (file names, 4-D images,
dataset.json, .mgz, label values) and checks what the loader makes of it: the convention found,
the channel meaning, the label renumbering, the task, and one-line errors naming the file.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from timm_jax.data.io import DataError, dataset_info, list_cases, load_case
from timm_jax.data.labelmaps import load_label_map, paper14
from timm_jax.data.spec import DataSpec, resolve
from timm_jax.data.tasks import brats_regions
from timm_jax.data.validate import validate_dataset
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

SHAPE = (10, 9, 8)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _image(seed, channels=4, shape=SHAPE):
    rng = np.random.default_rng(seed)
    img = rng.uniform(1, 100, size=shape + (channels,)).astype(np.float32)
    img[0] = 0.0
    return img


def _tumour(shape=SHAPE):
    """BraTS 2018 ids: oedema 2 around a core 1 around enhancing 4."""
    lab = np.zeros(shape, np.uint8)
    lab[2:8, 2:7, 2:6] = 2
    lab[3:6, 3:6, 3:5] = 1
    lab[4, 4, 3:5] = 4
    return lab


def _names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def _one_problem(root, layout, **kw):
    summaries, problems = validate_dataset(root, layout, **kw)
    assert len(problems) == 1, [str(p) for p in problems]
    assert "\n" not in str(problems[0])
    return summaries, problems[0]


# ----------------------------------------------------------------------------------- brats
def test_brats_2023_naming_gives_the_same_channels_and_regions_as_2018(tmp_path):
    img, lab = _image(0), _tumour()
    write_brats_case(tmp_path / "b18", "BraTS2021_00000", img, lab, LPS)
    write_brats_case(tmp_path / "b23", "BraTS-GLI-00000-000", img, lab, LPS, convention="brats2023")
    assert _names(tmp_path / "b18" / "BraTS2021_00000") == [
        f"BraTS2021_00000_{k}.nii.gz" for k in ("flair", "seg", "t1", "t1ce", "t2")
    ]
    assert _names(tmp_path / "b23" / "BraTS-GLI-00000-000") == [
        f"BraTS-GLI-00000-000-{k}.nii.gz" for k in ("seg", "t1c", "t1n", "t2f", "t2w")
    ]
    import nibabel as nib

    seg = nib.load(str(tmp_path / "b23/BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz"))
    assert sorted(np.unique(np.asarray(seg.dataobj))) == [0, 1, 2, 3]  # 2023 ids on disk

    i18, i23 = dataset_info(tmp_path / "b18", "brats"), dataset_info(tmp_path / "b23", "brats")
    assert (i18.convention, i23.convention) == ("brats2018", "brats2023")
    assert i18.modalities == i23.modalities == ("t1", "t1ce", "t2", "flair")
    c18 = load_case(tmp_path / "b18", "BraTS2021_00000", "brats", info=i18)
    c23 = load_case(tmp_path / "b23", "BraTS-GLI-00000-000", "brats", info=i23)
    assert c23.meta["convention"] == "brats2023" and c23.paths["t1ce"].endswith("-t1c.nii.gz")
    assert c23.paths["flair"].endswith("-t2f.nii.gz")
    np.testing.assert_array_equal(c18.image, c23.image)  # channel c is the same modality
    np.testing.assert_array_equal(c18.labels, c23.labels)  # 3 -> 4
    task = brats_regions()
    np.testing.assert_array_equal(task.targets(c18.labels), task.targets(c23.labels))  # WT, TC, ET
    native = np.asarray(nib.as_closest_canonical(seg).dataobj)  # the file's ids, on the loaded grid
    np.testing.assert_array_equal(i23.to_native_labels(c23.labels), native)  # 4 -> 3 for writing back
    np.testing.assert_array_equal(i18.to_native_labels(c18.labels), c18.labels)


def test_brats_2023_label_4_is_outside_its_set(tmp_path):
    write_brats_case(tmp_path, "BraTS-GLI-00001-000", _image(1), None, convention="brats2023")
    # 4 written as it is (BraTS 2024's resection cavity, or a 2018 label file renamed)
    write_volume(tmp_path / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz", _tumour(), np.eye(4))
    _, p = _one_problem(tmp_path, "brats")
    assert p.path.endswith("BraTS-GLI-00001-000-seg.nii.gz")
    assert "label values outside the brats (BraTS 2023+) set {0, 1, 2, 3}: 4" in p.message


def test_brats_cases_with_both_namings_are_refused_in_one_line(tmp_path):
    write_brats_case(tmp_path, "BraTS2021_00001", _image(0), _tumour(), group="HGG")
    write_brats_case(tmp_path, "BraTS2021_00002", _image(1), _tumour())
    write_brats_case(tmp_path, "BraTS-GLI-00003-000", _image(2), _tumour(), convention="brats2023")
    _, p = _one_problem(tmp_path, "brats")
    assert p.path == str(tmp_path)
    assert "BraTS 2018-2021 naming (<case>_t1.nii.gz: 2 case(s)" in p.message
    assert "BraTS 2023+ naming (<case>-t1n.nii.gz: 1 case(s), e.g. BraTS-GLI-00003-000)" in p.message
    with pytest.raises(DataError, match="all cases of a data set must use one"):
        load_case(tmp_path, "BraTS2021_00002", "brats")


def test_brats_2023_missing_file_is_named_in_its_convention(tmp_path):
    folder = write_brats_case(tmp_path, "BraTS-GLI-00004-000", _image(0), _tumour(), convention="brats2023")
    (folder / "BraTS-GLI-00004-000-t2f.nii.gz").unlink()
    _, p = _one_problem(tmp_path, "brats")
    assert p.path.endswith("BraTS-GLI-00004-000-t2f.nii.gz") and p.message == "missing file"


# ----------------------------------------------------------------------------------- msd
def _msd_brain(root, n=2, test=1):
    cases = {}
    for i in range(n):
        # MSD channel order: FLAIR, T1w, t1gd, T2w; labels 1 edema, 2 non-enhancing, 3 enhancing
        msd = np.stack([_image(i, 1)[..., 0] * (c + 1) for c in range(4)], axis=-1)
        lab = np.zeros(SHAPE, np.uint8)
        lab[2:8, 2:7, 2:6] = 1
        lab[3:6, 3:6, 3:5] = 2
        lab[4, 4, 3:5] = 3
        cases[f"BRATS_{i + 1:03d}"] = (msd, lab)
    for j in range(test):
        cases[f"BRATS_{n + j + 1:03d}"] = (np.stack([_image(9, 1)[..., 0]] * 4, axis=-1), None)
    return write_msd_task(root / "Task01_BrainTumour", cases, affine=LPS)


def test_msd_brain_tumour_is_mapped_to_brats_channels_and_regions(tmp_path):
    root = _msd_brain(tmp_path)
    assert _names(root) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]
    assert _names(root / "imagesTr") == ["BRATS_001.nii.gz", "BRATS_002.nii.gz"]
    meta = json.loads((root / "dataset.json").read_text())
    assert (
        meta["modality"]
        == MSD_BRAIN_TUMOUR["modality"]
        == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    )
    assert meta["labels"] == {
        "0": "background",
        "1": "edema",
        "2": "non-enhancing tumor",
        "3": "enhancing tumour",
    }
    assert meta["training"][0] == {
        "image": "./imagesTr/BRATS_001.nii.gz",
        "label": "./labelsTr/BRATS_001.nii.gz",
    }
    assert meta["test"] == ["./imagesTs/BRATS_003.nii.gz"] and meta["numTraining"] == 2
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0macOS junk")  # not listed: never read
    (root / "imagesTr" / "extra").mkdir()
    info = dataset_info(root, "msd")
    assert info.convention == "msd-brats" and info.modalities == ("t1", "t1ce", "t2", "flair")
    assert list_cases(root, "msd", info=info) == ["BRATS_001", "BRATS_002"]
    assert list_cases(root, "msd", info=info, subset="test") == ["BRATS_003"]
    case = load_case(root, "BRATS_001", "msd", info=info)
    base = np.asarray(case.image[..., 0]) / 2.0  # t1 = channel 1 (x2) of the file
    for c, factor in enumerate((2, 3, 4, 1)):  # t1 <- T1w, t1ce <- t1gd, t2 <- T2w, flair <- FLAIR
        np.testing.assert_allclose(case.image[..., c], base * factor, rtol=1e-5)
    assert sorted(np.unique(case.labels)) == [0, 1, 2, 4]
    lab = case.labels
    assert np.sum(lab == 2) > np.sum(lab == 1) > np.sum(lab == 4) > 0  # edema 1->2, non-enh. 2->1, enh. 3->4
    assert info.make_task().channel_names == ("WT", "TC", "ET")
    test_case = load_case(root, "BRATS_003", "msd", info=info, require_labels=False)
    assert test_case.labels is None and test_case.image.shape == SHAPE + (4,)
    summaries, problems = validate_dataset(root, "msd")
    assert not problems and len(summaries) == 3


def test_msd_other_task_keeps_its_channels_and_labels(tmp_path):
    cases = {f"hippocampus_{i:03d}": (_image(i, 1), np.minimum(_tumour(), 2)) for i in range(2)}
    root = write_msd_task(
        tmp_path / "Task04_Hippocampus",
        cases,
        modality={"0": "MRI"},
        labels={"0": "background", "1": "Anterior", "2": "Posterior"},
        name="Hippocampus",
    )
    info = dataset_info(root, "msd")
    assert info.convention == "msd" and info.modalities == ("MRI",)
    task = info.make_task()
    assert (
        task.kind == "labels" and task.label_ids == (1, 2) and task.channel_names == ("Anterior", "Posterior")
    )
    case = load_case(root, "hippocampus_000", "msd", info=info)
    assert case.image.shape == SHAPE + (1,) and sorted(np.unique(case.labels)) == [0, 1, 2]
    d = resolve(DataSpec(data_dir=str(root), layout="msd", val_fraction=0.5, test_fraction=0.0))
    assert d.task.channel_names == ("Anterior", "Posterior") and d.in_channels == 1


def _edit_json(root, fn):
    path = root / "dataset.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d) if not isinstance(d, str) else d)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            lambda d: d.update(training=[{"image": "../../etc/passwd", "label": "./labelsTr/x.nii.gz"}]),
            "'training'[0]['image'] '../../etc/passwd' points outside the data set folder",
        ),
        (
            lambda d: d["training"][0].update(label=5),
            "'training'[0]['label'] must be a string, got an integer 5",
        ),
        (lambda d: d.update(modality=["FLAIR"]), "'modality' must be an object, got a list"),
        (lambda d: d.update(modality={"0": "FLAIR", "2": "T1w"}), '\'modality\' keys must be "0" .. "1"'),
        (lambda d: d.update(numTraining=7), "'numTraining' is 7 but 'training' lists 2 case(s)"),
        (lambda d: d.pop("training"), "has no 'training' entry"),
        (lambda d: d["labels"].update({"x": "y"}), "'labels' keys must be label values"),
        (lambda d: d.update(training=d["training"] * 2), "lists case 'BRATS_001' twice"),
    ],
)
def test_msd_dataset_json_problems_are_one_line_naming_it(tmp_path, edit, fragment):
    root = _msd_brain(tmp_path)
    _edit_json(root, edit)
    _, p = _one_problem(root, "msd")
    assert p.path == str(root / "dataset.json") and fragment in p.message, p.message


def test_msd_dataset_json_that_is_not_json_or_is_missing(tmp_path):
    root = _msd_brain(tmp_path)
    (root / "dataset.json").write_text('{"modality": {"0": "FLAIR"},')
    _, p = _one_problem(root, "msd")
    assert p.path.endswith("dataset.json") and "is not valid JSON (JSONDecodeError" in p.message
    (root / "dataset.json").write_bytes(b"\xff\xfe\x00")
    assert "is not valid JSON (UnicodeDecodeError" in _one_problem(root, "msd")[1].message
    (root / "dataset.json").write_text("[1, 2]")
    assert "must hold a JSON object, got a list" in _one_problem(root, "msd")[1].message
    (root / "dataset.json").unlink()
    assert "missing file" in _one_problem(root, "msd")[1].message


def test_msd_listed_file_missing_and_4d_with_wrong_channel_count(tmp_path):
    root = _msd_brain(tmp_path)
    (root / "labelsTr" / "BRATS_002.nii.gz").unlink()
    write_volume(root / "imagesTr" / "BRATS_001.nii.gz", _image(3, 3), LPS)
    summaries, problems = validate_dataset(root, "msd")
    assert sorted((Path(p.path).name, p.message.split(" (")[0]) for p in problems) == [
        ("BRATS_001.nii.gz", "has 3 channels"),
        ("BRATS_002.nii.gz", "missing file"),
    ]
    assert "expected 4 (channels of dataset.json 'modality')" in str(problems[0]) + str(problems[1])
    assert [s.split(":")[0] for s in summaries] == ["BRATS_003"]


# ----------------------------------------------------------------------------------- nnunet
def _nnunet(root, labels, order=None, n=3, test=1, channels=2):
    cases = {}
    for i in range(n):
        lab = np.zeros(SHAPE, np.uint8)
        lab[2:8, 2:7, 2:6] = 1
        lab[3:6, 3:6, 3:5] = 2
        lab[4, 4, 3:5] = 3 if order else 2
        cases[f"case_{i:03d}"] = (_image(i, channels), lab)
    for j in range(test):
        cases[f"test_{j:03d}"] = (_image(50 + j, channels), None)
    names = {str(c): n for c, n in enumerate(("T1", "T2", "FLAIR", "T1ce")[:channels])}
    return write_nnunet_dataset(
        root / "Dataset501_Test", cases, channel_names=names, labels=labels, regions_class_order=order
    )


def test_nnunet_plain_labels(tmp_path):
    root = _nnunet(tmp_path, {"background": 0, "edema": 1, "core": 2})
    assert _names(root / "imagesTr")[:2] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert _names(root / "labelsTr")[0] == "case_000.nii.gz"
    info = dataset_info(root, "nnunet")
    assert info.convention == "nnunet" and info.modalities == ("T1", "T2")
    assert list_cases(root, "nnunet", info=info) == ["case_000", "case_001", "case_002"]
    assert list_cases(root, "nnunet", info=info, subset="test") == ["test_000"]
    task = info.make_task()
    assert task.kind == "labels" and task.label_ids == (1, 2) and task.channel_names == ("edema", "core")
    case = load_case(root, "case_001", "nnunet", info=info)
    np.testing.assert_allclose(case.image[..., 1], _image(1, 2)[..., 1], rtol=1e-6)
    summaries, problems = validate_dataset(root, "nnunet")
    assert not problems and len(summaries) == 4


def test_nnunet_region_based_labels_become_the_channels(tmp_path):
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    root = _nnunet(tmp_path, labels, order=[1, 2, 3])
    info = dataset_info(root, "nnunet")
    assert info.convention == "nnunet-regions"
    task = info.make_task()
    assert task.kind == "regions" and task.channel_names == ("whole tumor", "tumor core", "enhancing tumor")
    assert task.regions == ((1, 2, 3), (2, 3), (3,)) and task.region_labels == (1, 2, 3)
    case = load_case(root, "case_000", "nnunet", info=info)
    targets = task.targets(case.labels)
    assert targets.shape == SHAPE + (3,)
    np.testing.assert_array_equal(task.decode(targets), case.labels)  # regions_class_order paints back
    d = resolve(DataSpec(data_dir=str(root), layout="nnunet", val_fraction=0.34, test_fraction=0.0))
    assert d.task.channel_names == task.channel_names and d.in_channels == 2


@pytest.mark.parametrize(
    "edit, where, fragment",
    [
        (
            lambda d: d.update(numTraining=5),
            "dataset.json",
            "'numTraining' is 5 but imagesTr holds 3 case(s)",
        ),
        (lambda d: d["labels"].update(ignore=4), "dataset.json", "'ignore' label (sparse annotation)"),
        (lambda d: d.update(file_ending=".png"), "dataset.json", "'.png' is not supported"),
        (lambda d: d["labels"].update(background=1), "dataset.json", 'must map "background" to 0'),
        (lambda d: d["labels"].update(x=[1, 2]), "dataset.json", "'regions_class_order' entry"),
        (lambda d: d["labels"].update(x="1"), "dataset.json", "must be a label value or a non-empty list"),
        (lambda d: d.update(channel_names={"0": "T1"}), "case_000_0001.nii.gz", "channel 0001, but"),
    ],
)
def test_nnunet_dataset_json_problems_are_one_line(tmp_path, edit, where, fragment):
    root = _nnunet(tmp_path, {"background": 0, "edema": 1, "core": 2})
    _edit_json(root, edit)
    _, p = _one_problem(root, "nnunet")
    assert Path(p.path).name == where and fragment in p.message, str(p)


def test_nnunet_missing_channel_and_label_files(tmp_path):
    root = _nnunet(tmp_path, {"background": 0, "edema": 1, "core": 2})
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    (root / "labelsTr" / "case_002.nii.gz").unlink()
    summaries, problems = validate_dataset(root, "nnunet")
    assert sorted((Path(p.path).name, p.message) for p in problems) == [
        ("case_001_0001.nii.gz", "missing file"),
        ("case_002.nii.gz", "missing file"),
    ]
    (root / "imagesTr" / "case_003.nii.gz").write_bytes(b"")
    _, p = _one_problem(root, "nnunet")
    assert "file name is not <case>_<XXXX>.nii.gz" in p.message


# ----------------------------------------------------------------------------------- freesurfer
ASEG_IDS = [2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 31, 41, 42, 43, 44, 46, 47]
ASEG_IDS += [49, 50, 51, 52, 53, 54, 58, 60, 63, 77, 85, 1001, 1035, 2000, 2035, 251]


def _aseg(shape=(16, 16, 16)):
    """Every id of ASEG_IDS on its own voxels (plus background)."""
    lab = np.zeros(shape, np.int32)
    flat = lab.reshape(-1)
    for k, v in enumerate(ASEG_IDS):
        flat[10 + 3 * k : 13 + 3 * k] = v
    return lab


def _subjects(root, n=2, t2=False, labels_name="aseg.mgz", t1_name="T1.mgz"):
    rng = np.random.default_rng(0)
    for i in range(n):
        t1 = rng.uniform(10, 200, size=(16, 16, 16))
        t1[:2] = 0
        write_freesurfer_subject(
            root,
            f"subj{i}",
            t1,
            _aseg(),
            t2=rng.uniform(10, 200, size=(16, 16, 16)) if t2 else None,
            t1_name=t1_name,
            labels_name=labels_name,
        )
    return root


def test_freesurfer_subjects_with_paper14(tmp_path):
    root = _subjects(tmp_path / "subjects")
    (root / "fsaverage" / "mri").mkdir(parents=True)  # the template link FreeSurfer puts there
    (root / "notes").mkdir()  # no mri/: not a subject
    assert _names(root / "subj0" / "mri") == ["T1.mgz", "aseg.mgz"]
    info = dataset_info(root, "freesurfer", label_map="paper14")
    assert info.modalities == ("t1",) and info.files == {"t1": "T1.mgz", "labels": "aseg.mgz"}
    assert list_cases(root, "freesurfer", info=info) == ["subj0", "subj1"]
    case = load_case(root, "subj0", "freesurfer", info=info)
    src = load_case(root, "subj0", "freesurfer")  # raw aseg ids, same grid
    assert case.meta["source"]["file"].endswith("mri/aseg.mgz")
    for cls, _, ids in paper14().classes:
        np.testing.assert_array_equal(case.labels == cls, np.isin(src.labels, ids))
    for other in (77, 85, 251):  # WM hypointensities, optic chiasm, corpus callosum: background
        assert np.all(case.labels[src.labels == other] == 0)
    task = info.make_task()
    assert task.label_ids == tuple(range(1, 15)) and task.channel_names[6] == "CSF"
    d = resolve(
        DataSpec(
            data_dir=str(root), layout="freesurfer", label_map="paper14", val_fraction=0.5, test_fraction=0
        )
    )
    assert d.task.num_channels == 14 and d.in_channels == 1


def test_paper14_classes_as_specified():
    lm = paper14()
    by_name = {n: set(ids) for _, n, ids in lm.classes}
    assert len(lm.classes) == 14 and lm.unmapped == "background"
    assert by_name["cerebral grey matter and accumbens"] >= {3, 42, 26, 58, 1000, 1035, 2000, 2035}
    assert by_name["ventricles"] == {4, 43, 5, 44, 14, 15} and by_name["brainstem"] == {16}
    assert by_name["amygdala and choroid plexus"] == {18, 54, 31, 63}
    lab = np.array([0, 8, 47, 3, 1017, 2035, 10, 18, 63, 11, 13, 24, 7, 2, 41, 17, 4, 15, 12, 28, 60, 16, 77])
    assert lm.apply(lab).tolist() == [
        0,
        1,
        1,
        2,
        2,
        2,
        3,
        4,
        4,
        5,
        6,
        7,
        8,
        9,
        9,
        10,
        11,
        11,
        12,
        13,
        13,
        14,
        0,
    ]


def test_freesurfer_json_label_map_unmapped_ids_are_an_error_by_default(tmp_path):
    root = _subjects(tmp_path / "subjects")
    lm = tmp_path / "deep_grey.json"
    lm.write_text(json.dumps({"thalamus": [10, 49], "cortex": [3, 42, "1000-1035", "2000-2035"]}))
    summaries, problems = validate_dataset(root, "freesurfer", label_map=str(lm))
    assert not summaries and len(problems) == 2  # each subject's aseg.mgz, one line
    assert all(
        p.path.endswith("mri/aseg.mgz") and "label ids not in the label map" in p.message for p in problems
    )
    assert str(lm) in problems[0].message and "2, 4, 5, 7, 8" in problems[0].message
    lm.write_text(
        json.dumps(
            {"thalamus": [10, 49], "cortex": [3, 42, "1000-1035", "2000-2035"], "unmapped": "background"}
        )
    )
    case = load_case(root, "subj0", "freesurfer", label_map=str(lm))
    src = load_case(root, "subj0", "freesurfer")
    np.testing.assert_array_equal(case.labels == 1, np.isin(src.labels, [10, 49]))
    np.testing.assert_array_equal(case.labels == 2, np.isin(src.labels, [3, 42, 1001, 1035, 2000, 2035]))
    assert set(np.unique(case.labels)) == {0, 1, 2}
    # explicit background list instead
    lm.write_text(
        json.dumps({"1": [10, 49], "7": [3], "background": [i for i in ASEG_IDS if i not in (10, 49, 3)]})
    )
    info = dataset_info(root, "freesurfer", label_map=str(lm))
    assert info.make_task().label_ids == (1, 7) and info.label_names == {1: "class_1", 7: "class_7"}
    assert set(np.unique(load_case(root, "subj1", "freesurfer", info=info).labels)) == {0, 1, 7}


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "label map is not readable JSON"),
        ("[1, 2]", "must be a non-empty JSON object"),
        ('{"a": [1], "b": [1]}', "source id 1 is listed twice"),
        ('{"a": [0]}', "lists source id 0, which is always background"),
        ('{"a": "3"}', "must be a list of source ids"),
        ('{"a": [3.5]}', "3.5 is not a source id"),
        ('{"a": ["9-3"]}', "range '9-3' must be lo-hi"),
        ('{"1": [3], "b": [4]}', "all names or all decimal class ids"),
        ('{"a": [3], "unmapped": "ignore"}', '"unmapped" must be "error" or "background"'),
        ('{"0": [3]}', 'class id "0" is the background'),
    ],
)
def test_bad_label_map_file_is_one_line_naming_it(tmp_path, content, fragment):
    path = tmp_path / "map.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_label_map(path)
    assert (
        str(err.value).startswith(f"{path}: ") and fragment in str(err.value) and "\n" not in str(err.value)
    )
    root = _subjects(tmp_path / "subjects", n=1)
    _, p = _one_problem(root, "freesurfer", label_map=str(path))
    assert p.path == str(path)


def test_freesurfer_file_choices_per_data_set(tmp_path):
    root = _subjects(tmp_path / "a", labels_name="aparc+aseg.mgz", t1_name="orig.mgz", t2=True)
    info = dataset_info(root, "freesurfer")
    assert info.files == {"t1": "orig.mgz", "t2": "T2.mgz", "labels": "aparc+aseg.mgz"}
    assert (
        info.modalities == ("t1", "t2")
        and load_case(root, "subj0", "freesurfer", info=info).image.shape[-1] == 2
    )
    # one subject with T1.mgz, one with orig.mgz only: refused
    root = _subjects(tmp_path / "b")
    (root / "subj1" / "mri" / "T1.mgz").rename(root / "subj1" / "mri" / "orig.mgz")
    _, p = _one_problem(root, "freesurfer")
    assert "the cases disagree on the t1 file: T1.mgz in 1 (subj0); orig.mgz in 1 (subj1)" in p.message
    # a T2 in one subject only: refused
    root = _subjects(tmp_path / "c")
    write_volume(
        root / "subj0" / "mri" / "T2.mgz", np.ones((16, 16, 16), np.float32), conformed_lia((16, 16, 16))
    )
    _, p = _one_problem(root, "freesurfer")
    assert "T2.mgz or T2.prenorm.mgz is present in 1 of 2 cases (missing in subj1)" in p.message


def test_label_map_only_for_freesurfer_and_parcellation(tmp_path):
    write_brats_case(tmp_path, "B", _image(0), _tumour())
    with pytest.raises(DataError, match="--label_map applies to the freesurfer and parcellation"):
        dataset_info(tmp_path, "brats", label_map="paper14")


def test_parcellation_with_a_label_map(tmp_path):
    write_parcellation_case(tmp_path, "s", _image(0, 1), np.where(_tumour() > 0, 17, 0))
    case = load_case(tmp_path, "s", "parcellation", label_map="paper14")
    assert case.modalities == ("t1",) and set(np.unique(case.labels)) == {0, 10}  # hippocampus


# ----------------------------------------------------------------------------------- the command
def _run_validate(*args):
    return subprocess.run(
        [sys.executable, "-m", "timm_jax.data.validate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_validate_command_for_each_new_layout(tmp_path):
    msd = _msd_brain(tmp_path)
    nn = _nnunet(tmp_path, {"background": 0, "edema": 1, "core": 2})
    fs = _subjects(tmp_path / "subjects")
    ok = _run_validate("--layout=msd", msd)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert len(ok.stdout.strip().splitlines()) == 3 and "convention msd-brats" in ok.stderr
    res = _run_validate("--layout=freesurfer", "--label_map=paper14", fs)
    assert res.returncode == 0 and "channels t1" in res.stderr and "14 brainstem" in res.stderr
    (nn / "labelsTr" / "case_001.nii.gz").write_bytes(b"\x1f\x8b broken")
    _edit_json(msd, lambda d: d.update(modality="FLAIR"))
    for root, layout, name in ((nn, "nnunet", "case_001.nii.gz"), (msd, "msd", "dataset.json")):
        res = _run_validate(f"--layout={layout}", root)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        (line,) = res.stdout.strip().splitlines()
        assert line.startswith("ERROR ") and name in line
