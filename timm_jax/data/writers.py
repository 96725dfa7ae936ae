"""Write small data sets in each layout's exact on-disk convention (for tests, examples and benchmarks).

Each writer takes arrays in the loader's terms and writes the files, names and ``dataset.json``
the layout's own tools produce, so that what :mod:`timm_jax.data.io` reads back can be compared to
what went in:

* :func:`write_brats_case` — BraTS 2018–2021 (``<case>_t1.nii.gz``, labels 0/1/2/4) or 2023+
  (``<case>-t1n.nii.gz``, labels 0/1/2/3: the loader's label 4 is written as 3);
* :func:`write_msd_task` — an MSD task folder (4-D ``imagesTr/<case>.nii.gz``, ``labelsTr/``,
  ``imagesTs/``, ``dataset.json``); :data:`MSD_BRAIN_TUMOUR` is Task01's ``modality`` / ``labels``;
* :func:`write_nnunet_dataset` — nnU-Net v2 raw (``imagesTr/<case>_0000.nii.gz``, ...);
* :func:`write_freesurfer_subject` — ``<subject>/mri/{T1,T2,aseg}.mgz`` on a conformed LIA grid;
* :func:`write_parcellation_case` — ``<case>/{t1,t2,labels}.nii.gz``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from timm_jax.atomic import atomic_path, write_json

__all__ = [
    "MSD_BRAIN_TUMOUR",
    "conformed_lia",
    "write_brats_case",
    "write_freesurfer_subject",
    "write_msd_task",
    "write_nnunet_dataset",
    "write_parcellation_case",
    "write_volume",
]

#: Task01_BrainTumour's dataset.json "modality" and "labels"
MSD_BRAIN_TUMOUR = {
    "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
}


def conformed_lia(shape: Sequence[int] = (256, 256, 256)) -> np.ndarray:
    """FreeSurfer's conformed 1 mm LIA affine for ``shape`` (centred on the scanner origin)."""
    aff = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    centre = (np.asarray(shape, float)) / 2.0
    aff[:3, 3] = -aff[:3, :3] @ centre
    return aff


def write_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    qform_code: int = 1,
    sform_code: int = 1,
) -> Path:
    """NIfTI-1 (``.nii``/``.nii.gz``) with the given qform / sform codes, or MGH (``.mgz``/``.mgh``)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype in (np.int64, np.uint64):
        arr = arr.astype(np.int32)
    affine = np.asarray(affine, np.float64)
    if path.name.endswith((".mgz", ".mgh")):
        if arr.dtype not in (np.uint8, np.int16, np.int32, np.float32):
            arr = arr.astype(np.int32 if np.issubdtype(arr.dtype, np.integer) else np.float32)
        with atomic_path(path) as tmp:
            nib.save(nib.MGHImage(arr, affine), tmp)
        return path
    img = nib.Nifti1Image(arr, affine)
    img.set_data_dtype(arr.dtype)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def write_brats_case(
    root: str | os.PathLike,
    case_id: str,
    image: np.ndarray,
    labels: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    *,
    convention: str = "brats2018",
    group: str | None = None,
    ext: str = ".nii.gz",
) -> Path:
    """One BraTS case folder; ``image`` is ``(D, H, W, 4)`` in (t1, t1ce, t2, flair) order and
    ``labels`` uses the loader's ids 0/1/2/4 (written as 0/1/2/3 for ``convention="brats2023"``)."""
    from timm_jax.data.layouts import BRATS_MODALITIES, BRATS_NAMING

    naming = BRATS_NAMING[convention]
    folder = Path(root) / (group or "") / case_id
    affine = np.eye(4) if affine is None else affine
    for c, m in enumerate(BRATS_MODALITIES):
        write_volume(folder / f"{case_id}{naming['sep']}{naming[m]}{ext}", image[..., c], affine)
    if labels is not None:
        lab = np.asarray(labels).astype(np.uint8)
        if convention == "brats2023":
            lab = np.where(lab == 4, 3, lab).astype(np.uint8)
        write_volume(folder / f"{case_id}{naming['sep']}seg{ext}", lab, affine)
    return folder


def write_parcellation_case(
    root: str | os.PathLike,
    case_id: str,
    image: np.ndarray,
    labels: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    *,
    ext: str = ".nii.gz",
) -> Path:
    """``<case>/t1`` (and ``t2`` when ``image`` has two channels) and ``labels``."""
    folder = Path(root) / case_id
    affine = np.eye(4) if affine is None else affine
    for c, m in enumerate(("t1", "t2")[: image.shape[-1]]):
        write_volume(folder / f"{m}{ext}", image[..., c], affine)
    if labels is not None:
        write_volume(folder / f"labels{ext}", np.asarray(labels).astype(np.int32), affine)
    return folder


def write_freesurfer_subject(
    root: str | os.PathLike,
    subject: str,
    t1: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    t2: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    t1_name: str = "T1.mgz",
    t2_name: str = "T2.mgz",
    labels_name: str = "aseg.mgz",
) -> Path:
    """``<subject>/mri/`` with the T1 (uint8 as FreeSurfer writes it), optional T2 and the aseg."""
    mri = Path(root) / subject / "mri"
    affine = conformed_lia(t1.shape) if affine is None else affine
    write_volume(mri / t1_name, np.clip(np.round(t1), 0, 255).astype(np.uint8), affine)
    if t2 is not None:
        write_volume(mri / t2_name, np.asarray(t2, np.float32), affine)
    if labels is not None:
        write_volume(mri / labels_name, np.asarray(labels).astype(np.int32), affine)
    return mri.parent


def write_msd_task(
    root: str | os.PathLike,
    cases: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    *,
    modality: Mapping[str, str] = MSD_BRAIN_TUMOUR["modality"],
    labels: Mapping[str, str] = MSD_BRAIN_TUMOUR["labels"],
    affine: np.ndarray | None = None,
    name: str = "BRATS",
) -> Path:
    """An MSD task folder: each case's image ``(D, H, W, C)`` in the file's own channel order (3-D
    when ``C`` is 1) goes to ``imagesTr/`` with its label map in ``labelsTr/`` (native ids), or to
    ``imagesTs/`` when its labels are ``None``; ``dataset.json`` lists them."""
    root = Path(root)
    affine = np.eye(4) if affine is None else affine
    training, test = [], []
    for cid, (image, lab) in cases.items():
        img = np.asarray(image, np.float32)
        img = img[..., 0] if img.shape[-1] == 1 else img
        sub = "imagesTr" if lab is not None else "imagesTs"
        write_volume(root / sub / f"{cid}.nii.gz", img, affine)
        if lab is not None:
            write_volume(root / "labelsTr" / f"{cid}.nii.gz", np.asarray(lab).astype(np.uint8), affine)
            training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        else:
            test.append(f"./imagesTs/{cid}.nii.gz")
    meta = {
        "name": name,
        "description": "synthetic",
        "tensorImageSize": "4D" if len(modality) > 1 else "3D",
        "modality": dict(modality),
        "labels": dict(labels),
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    write_json(root / "dataset.json", meta, indent=4)
    return root


def write_nnunet_dataset(
    root: str | os.PathLike,
    cases: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    *,
    channel_names: Mapping[str, str],
    labels: Mapping[str, int | list],
    regions_class_order: Sequence[int] | None = None,
    affine: np.ndarray | None = None,
    file_ending: str = ".nii.gz",
) -> Path:
    """nnU-Net v2 raw: ``imagesTr/<case>_<XXXX><ending>`` per channel of ``(D, H, W, C)``,
    ``labelsTr/<case><ending>`` (cases whose labels are ``None`` go to ``imagesTs/``), dataset.json."""
    root = Path(root)
    affine = np.eye(4) if affine is None else affine
    n_train = 0
    for cid, (image, lab) in cases.items():
        sub = "imagesTr" if lab is not None else "imagesTs"
        for c in range(image.shape[-1]):
            write_volume(
                root / sub / f"{cid}_{c:04d}{file_ending}", np.asarray(image[..., c], np.float32), affine
            )
        if lab is not None:
            write_volume(root / "labelsTr" / f"{cid}{file_ending}", np.asarray(lab).astype(np.uint8), affine)
            n_train += 1
    meta = {
        "channel_names": dict(channel_names),
        "labels": dict(labels),
        "numTraining": n_train,
        "file_ending": file_ending,
    }
    if regions_class_order is not None:
        meta["regions_class_order"] = list(regions_class_order)
    # the order of "labels" matters for region-based training: no sort_keys
    write_json(root / "dataset.json", meta, indent=4)
    return root
