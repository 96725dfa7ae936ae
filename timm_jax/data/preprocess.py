"""Preprocessing of a :class:`~timm_jax.data.io.Case`, and an on-disk cache so it runs once.

:func:`preprocess_case` applies, in order:

1. optional N4 bias-field correction (``n4=True``; SimpleITK, ``pip install -e '.[n4]'``) of every
   modality but FLAIR, as in the T-IMM code;
2. a crop to the joint non-zero bounding box of all modalities, widened by ``margin`` voxels;
3. per-channel intensity normalisation over the non-zero voxels (zeros stay 0):
   ``"histogram"`` — the empirical CDF, ``x ↦ #{v ≤ x} / N`` over the N non-zero voxels ``v``, as
   the original code did; ``"zscore"`` — ``(x - mean) / std``;
4. optional resampling to ``spacing`` mm (linear for images, nearest for labels);
5. padding with zeros (symmetric) to ``target_shape`` — or, without one, to the next multiple of
   ``shape_multiple`` per axis, since a U-Net of depth d needs sizes divisible by 2^(d-1).
   A volume larger than ``target_shape`` is centre-cropped.

The affine is updated at every step so the output still maps voxels to the same world positions;
``case.meta`` records the input shape and affine and, in ``meta["steps"]``, every geometric step
(crop box, resampling ratio and offset, padding start) with the shapes before and after it.

The whole chain is invertible: :func:`to_input_geometry` takes an array on the preprocessed grid
(a label map or per-channel probabilities) back to the voxel grid of the case's original reference
file — undoing the padding, the resampling (nearest for labels, linear for probabilities), the crop
and the RAS reorientation of :mod:`timm_jax.data.io` — and :func:`write_like_input` saves it with
that file's header (shape, affine, qform / sform codes). Without ``spacing`` the round trip of a
label map is exact wherever the labels lie inside the crop box (outside it, i.e. where every
modality is zero, the result is 0); with ``spacing`` nearest-neighbour resampling there and back
moves label boundaries by up to one input voxel.

The cache (:func:`load_preprocessed`) stores each case as ``<case>-<key>.image.npy``,
``<case>-<key>.labels.npy`` and ``<case>-<key>.json`` (the record, written last), each written to a
temporary file and renamed into place; ``mmap=True`` returns read-only ``np.memmap`` views of the
``.npy`` files, and :func:`load_preprocessed_lazy` a sequence that opens a case only when it is
used. Entries of the earlier ``.npz`` format (cache version 1) are not read: their key differs, so
the case is preprocessed again (the old files stay until deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from timm_jax.atomic import atomic_path, atomic_paths
from timm_jax.data import geometry
from timm_jax.data.io import Case, DataError, case_files, dataset_info, load_case
from timm_jax.errors import writing

__all__ = [
    "PreprocessConfig",
    "crop_to_nonzero",
    "histogram_normalise",
    "zscore_normalise",
    "resample",
    "pad_or_crop_to",
    "pad_to_multiple",
    "n4_correct",
    "preprocess_case",
    "load_preprocessed",
    "load_preprocessed_lazy",
    "LazyCases",
    "cache_key",
    "to_input_geometry",
    "write_like_input",
]

_CACHE_VERSION = 2
_CACHE_FORMAT = "timm_jax preprocessed case"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings (see the module docstring for the order of the steps).

    Attributes:
      margin: voxels kept around the non-zero bounding box.
      normalisation: ``"histogram"`` (empirical CDF of the non-zero voxels) or ``"zscore"``.
      spacing: resample to this voxel size in mm (a number or one per axis); ``None`` keeps it.
      shape_multiple: pad every axis to a multiple of this (ignored when ``target_shape`` is set).
      target_shape: pad (or centre-crop) to exactly this shape.
      n4: N4 bias-field correction of every modality but FLAIR (needs SimpleITK).
    """

    margin: int = 2
    normalisation: str = "histogram"
    spacing: float | tuple[float, float, float] | None = None
    shape_multiple: int = 16
    target_shape: tuple[int, int, int] | None = None
    n4: bool = False

    def __post_init__(self):
        if self.normalisation not in ("histogram", "zscore"):
            raise ValueError(f"normalisation must be 'histogram' or 'zscore', got {self.normalisation!r}")
        if self.margin < 0 or self.shape_multiple < 1:
            raise ValueError("margin must be >= 0 and shape_multiple >= 1")
        if self.spacing is not None and not np.isscalar(self.spacing):
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if self.target_shape is not None:
            object.__setattr__(self, "target_shape", tuple(int(s) for s in self.target_shape))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("spacing", "target_shape"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d


# --------------------------------------------------------------------------------------- steps
def _translate(affine: np.ndarray, offset: Sequence[float]) -> np.ndarray:
    """Affine of a grid whose voxel 0 is voxel ``offset`` of the grid of ``affine``."""
    shift = np.eye(4)
    shift[:3, 3] = offset
    return affine @ shift


def nonzero_bbox(image: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``((lo, hi), ...)`` half-open box of the voxels where any channel is non-zero."""
    mask = np.any(image != 0, axis=-1) if image.ndim == 4 else image != 0
    if not mask.any():
        raise DataError("image is empty (all voxels are zero); nothing to crop to")
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _with_step(meta: dict, **step) -> dict:
    """``meta`` with one more geometric step recorded (a new dict and list: the input is not changed)."""
    return dict(meta, steps=[*meta.get("steps", []), step])


def crop_to_nonzero(case: Case, margin: int = 2) -> Case:
    """Crop image and labels to the joint non-zero box of all channels, ``margin`` voxels wider."""
    box = nonzero_bbox(case.image)
    box = tuple((max(lo - margin, 0), min(hi + margin, n)) for (lo, hi), n in zip(box, case.shape))
    sl = tuple(slice(lo, hi) for lo, hi in box)
    labels = None if case.labels is None else case.labels[sl]
    meta = dict(case.meta, crop_box=[list(b) for b in box])
    meta = _with_step(meta, op="crop", box=[list(b) for b in box], shape_in=list(case.shape))
    return dataclasses.replace(
        case,
        image=case.image[sl],
        labels=labels,
        affine=_translate(case.affine, [lo for lo, _ in box]),
        meta=meta,
    )


def histogram_normalise(channel: np.ndarray) -> np.ndarray:
    """Empirical CDF of the non-zero voxels: ``x ↦ #{v ≠ 0 : v ≤ x} / #{v ≠ 0}``; zeros stay 0.

    Output lies in (0, 1] on non-zero voxels; tied values share the highest rank.
    """
    x = np.asarray(channel, np.float32)
    out = np.zeros_like(x)
    nz = x != 0
    values = x[nz]
    if values.size:
        ranks = np.searchsorted(np.sort(values), values, side="right")
        out[nz] = ranks.astype(np.float64) / values.size
    return out


def zscore_normalise(channel: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` with mean and std over the non-zero voxels; zeros stay 0."""
    x = np.asarray(channel, np.float32)
    out = np.zeros_like(x)
    nz = x != 0
    values = x[nz].astype(np.float64)
    if values.size:
        std = values.std()
        out[nz] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def resample(case: Case, spacing: float | Sequence[float]) -> Case:
    """Resample to ``spacing`` mm: linear interpolation for images, nearest neighbour for labels.

    The field of view is kept: with ``r = new / old`` spacing per axis the output has
    ``round(n / r)`` voxels and output voxel ``j`` samples input coordinate ``(j + 0.5) r - 0.5``
    (edges replicate).
    """
    from scipy import ndimage

    new = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    if not np.all(np.isfinite(new) & (new > 0)):
        raise DataError(f"resampling spacing must be positive, got {spacing}")
    old = np.asarray(case.spacing)
    if not np.all(old > 0):  # the readers reject such affines; a hand-made Case may still have one
        raise DataError(f"case {case.case_id}: voxel sizes {tuple(old)} must be positive to resample")
    ratio = new / old
    if np.allclose(ratio, 1.0):
        return case
    shape = tuple(max(1, int(round(n / r))) for n, r in zip(case.shape, ratio))
    offset = 0.5 * ratio - 0.5

    def warp(vol, order):
        return ndimage.affine_transform(
            vol, ratio, offset=offset, output_shape=shape, order=order, mode="nearest"
        )

    image = np.stack([warp(case.image[..., c], 1) for c in range(case.image.shape[-1])], axis=-1)
    labels = None if case.labels is None else warp(case.labels, 0).astype(case.labels.dtype)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(ratio)
    scale[:3, 3] = offset
    meta = _with_step(
        case.meta,
        op="resample",
        ratio=ratio.tolist(),
        offset=offset.tolist(),
        shape_in=list(case.shape),
        shape_out=list(shape),
    )
    return dataclasses.replace(
        case, image=image.astype(np.float32), labels=labels, affine=case.affine @ scale, meta=meta
    )


def pad_or_crop_to(case: Case, shape: Sequence[int]) -> Case:
    """Zero-pad (symmetrically, extra voxel after) or centre-crop every axis to ``shape``."""
    shape = tuple(int(s) for s in shape)
    if shape == case.shape:
        return case
    image, labels = case.image, case.labels
    start = []
    for axis, (n, m) in enumerate(zip(case.shape, shape)):
        if m < n:  # centre crop
            lo = (n - m) // 2
            sl = [slice(None)] * 3
            sl[axis] = slice(lo, lo + m)
            image = image[tuple(sl)]
            labels = None if labels is None else labels[tuple(sl)]
            start.append(lo)
        elif m > n:
            before = (m - n) // 2
            pad = [(0, 0)] * image.ndim
            pad[axis] = (before, m - n - before)
            image = np.pad(image, pad)
            labels = None if labels is None else np.pad(labels, pad[:3])
            start.append(-before)
        else:
            start.append(0)
    meta = dict(case.meta, pad_start=[int(s) for s in start])
    meta = _with_step(
        meta, op="pad", start=[int(s) for s in start], shape_in=list(case.shape), shape_out=list(shape)
    )
    return dataclasses.replace(
        case, image=image, labels=labels, affine=_translate(case.affine, start), meta=meta
    )


def pad_to_multiple(case: Case, multiple: int) -> Case:
    """Zero-pad every axis up to the next multiple of ``multiple``."""
    return pad_or_crop_to(case, [-(-n // multiple) * multiple for n in case.shape])


def n4_correct(case: Case, *, skip: Sequence[str] = ("flair",)) -> Case:
    """N4 bias-field correction (SimpleITK) of every modality not in ``skip``, masked to non-zero voxels."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ImportError(
            "N4 bias-field correction needs SimpleITK, which is not installed: pip install -e '.[n4]' "
            "(or set n4=False)"
        ) from None
    image = case.image.copy()
    for c, modality in enumerate(case.modalities):
        if modality in skip:
            continue
        vol = image[..., c]
        mask = (vol != 0).astype(np.uint8)
        if not mask.any():
            continue
        itk = sitk.GetImageFromArray(vol.astype(np.float32))
        itk_mask = sitk.GetImageFromArray(mask)
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        out = sitk.GetArrayFromImage(corrector.Execute(itk, itk_mask)).astype(np.float32)
        image[..., c] = np.where(mask > 0, out, 0.0)
    return dataclasses.replace(case, image=image)


def preprocess_case(case: Case, config: PreprocessConfig = PreprocessConfig()) -> Case:
    """Crop, normalise, resample and pad one case (pure: the input is not modified)."""
    meta = dict(case.meta, input_shape=list(case.shape), input_affine=np.asarray(case.affine).tolist())
    out = dataclasses.replace(case, meta=meta)
    if config.n4:
        out = n4_correct(out)
    out = crop_to_nonzero(out, config.margin)
    norm = histogram_normalise if config.normalisation == "histogram" else zscore_normalise
    image = np.stack([norm(out.image[..., c]) for c in range(out.image.shape[-1])], axis=-1)
    out = dataclasses.replace(out, image=image.astype(np.float32))
    if config.spacing is not None:
        out = resample(out, config.spacing)
    if config.target_shape is not None:
        out = pad_or_crop_to(out, config.target_shape)
    else:
        out = pad_to_multiple(out, config.shape_multiple)
    return out


# --------------------------------------------------------------------------------------- inverse
def to_input_geometry(array: np.ndarray, case: Case, *, order: int | None = None) -> np.ndarray:
    """``array`` on the preprocessed grid of ``case`` back on the voxel grid of its original file.

    Undoes, in reverse order, the padding (or centre crop), the resampling to ``spacing``, the crop
    to the non-zero box (``meta["steps"]``) and the RAS reorientation of the loader
    (``meta["source"]``); the result has the shape of the reference file (the label file, or the
    first modality without one: ``case.meta["source"]["file"]``) and can be written with
    :func:`write_like_input`.

    Args:
      array: ``(D, H, W)`` or ``(D, H, W, K)`` on the grid of ``case`` (``case.shape``).
      case: the preprocessed case (from :func:`preprocess_case` / :func:`load_preprocessed`).
      order: interpolation when undoing a resampling: 0 nearest (default for integer / bool arrays:
        label maps), 1 linear (default for floats: probabilities).

    Voxels outside the crop box, or cut by a centre crop to ``target_shape``, come back as 0.
    """
    a = np.asarray(array)
    if a.shape[:3] != tuple(case.shape) or a.ndim not in (3, 4):
        raise ValueError(f"expected an array of shape {tuple(case.shape)} (+ channels), got {a.shape}")
    if order is None:
        order = 0 if (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_) else 1
    for step in reversed(case.meta.get("steps", [])):
        if step["op"] == "pad":
            a = _place(a, step["start"], step["shape_in"])  # output voxel j is input voxel j + start
        elif step["op"] == "resample":
            a = _unresample(a, step, order)
        elif step["op"] == "crop":
            a = _place(a, [lo for lo, _ in step["box"]], step["shape_in"])
        else:
            raise ValueError(f"unknown preprocessing step {step['op']!r} in case {case.case_id}'s meta")
    source = case.meta.get("source")
    if source is not None:
        a = geometry.from_canonical(a, source["orientation"])
        if tuple(a.shape[:3]) != tuple(source["shape"][:3]):
            raise ValueError(
                f"case {case.case_id}: the inverse gives shape {a.shape[:3]}, its file {source['file']} "
                f"has {tuple(source['shape'])}"
            )
    return np.ascontiguousarray(a)


def _place(a: np.ndarray, at: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """A zero array of ``shape`` (+ ``a``'s channels) with ``a`` written starting at voxel ``at``
    (negative: ``a`` starts before the output, and that part is dropped)."""
    out = np.zeros(tuple(int(s) for s in shape) + a.shape[3:], a.dtype)
    dst, src = [], []
    for o, n_a, n_out in zip(at, a.shape[:3], shape):
        lo, hi = max(int(o), 0), min(int(o) + n_a, int(n_out))
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo - int(o), hi - int(o)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def _unresample(a: np.ndarray, step: dict, order: int) -> np.ndarray:
    """Inverse of :func:`resample`: input voxel ``i`` sits at resampled coordinate ``(i + 0.5) / r - 0.5``."""
    from scipy import ndimage

    ratio = np.asarray(step["ratio"], np.float64)
    shape = tuple(int(s) for s in step["shape_in"])

    def warp(vol):
        return ndimage.affine_transform(
            vol, 1.0 / ratio, offset=0.5 / ratio - 0.5, output_shape=shape, order=order, mode="nearest"
        )

    if a.ndim == 3:
        return warp(a).astype(a.dtype, copy=False)
    return np.stack([warp(a[..., k]) for k in range(a.shape[-1])], axis=-1).astype(a.dtype, copy=False)


def write_like_input(path: str | os.PathLike, array: np.ndarray, case: Case) -> Path:
    """Save ``array`` (on the original grid: :func:`to_input_geometry`) with the input file's header.

    The header of the case's reference file (``case.meta["source"]["file"]``) is the template: the
    written file has its shape, affine and qform / sform codes (and pixdim, units, orientation
    fields). Integer / bool arrays (label maps) are stored as the smallest of uint8, int16, int32
    that holds them, floats (probabilities, ``(D, H, W, K)``) as float32. ``.nii`` / ``.nii.gz``
    paths get NIfTI, ``.mgz`` / ``.mgh`` MGH; when the input was of the other format (or is gone),
    the header is made from the recorded affine and codes instead.
    """
    import nibabel as nib

    source = case.meta.get("source")
    if source is None:
        raise ValueError(f"case {case.case_id} has no meta['source'] (it was not read by timm_jax.data.io)")
    arr = _storable(np.asarray(array))
    if tuple(arr.shape[:3]) != tuple(source["shape"][:3]):
        raise ValueError(
            f"array of shape {arr.shape} is not on the grid of {source['file']} "
            f"(shape {tuple(source['shape'])}); map it with to_input_geometry first"
        )
    path = Path(path)
    mgh = path.name.endswith((".mgz", ".mgh"))
    affine = np.asarray(source["affine"], np.float64)
    template = None
    try:
        template = nib.load(source["file"])
    except Exception as e:  # moved or unreadable: the recorded geometry is enough
        _log.warning(
            "input file %s is unreadable (%s); writing %s from the recorded affine",
            source["file"],
            _brief(e),
            path,
        )
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if mgh:
            header = template.header.copy() if isinstance(template, nib.MGHImage) else None
            if arr.dtype not in (np.uint8, np.int16, np.int32, np.float32):
                arr = arr.astype(np.int32)
            img = nib.MGHImage(arr, affine, header=header)
        elif isinstance(template, nib.Nifti1Image):  # Nifti2Image too
            img = _nifti_like(type(template), arr, template.header)
        else:
            img = nib.Nifti1Image(arr, affine)
            qcode, scode = source.get("qform_code"), source.get("sform_code")
            img.set_qform(affine, code=1 if qcode is None else int(qcode))
            img.set_sform(affine, code=1 if scode is None else int(scode))
        img.set_data_dtype(arr.dtype)
        with atomic_path(path) as tmp:  # the same ending: nibabel picks the format by it
            nib.save(img, tmp)
    return path


_HEADER_GEOMETRY = (
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
    "xyzt_units",
    "dim_info",
)


def _nifti_like(klass, arr: np.ndarray, template_header):
    """A NIfTI image of ``arr`` whose header is the template's, geometry fields copied verbatim."""
    header = template_header.copy()
    img = klass(arr, None, header=header)
    h = img.header
    for key in _HEADER_GEOMETRY:
        h[key] = template_header[key]
    pixdim = np.array(template_header["pixdim"], copy=True)
    h["pixdim"][:4] = pixdim[:4]  # qfac and the voxel sizes; the 4th axis (channels) keeps nibabel's
    h.set_slope_inter(1.0, 0.0)
    h["cal_min"], h["cal_max"] = 0.0, 0.0
    return klass(arr, None, header=h)


def _storable(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return arr.astype(dt, copy=False)
        raise ValueError(f"label values {lo}..{hi} do not fit int32")
    return arr.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------- cache
def cache_key(root, case_id: str, layout: str, config: PreprocessConfig, *, info=None) -> str:
    """Hash of the settings, the data set's reading conventions and every source file's path, size
    and modification time."""
    info = info if info is not None else dataset_info(root, layout)
    sources = []
    for key, path in sorted(case_files(root, case_id, layout, info=info).items()):
        if path is None:
            sources.append([key, None])
        else:
            st = os.stat(path)
            sources.append([key, str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {
            "version": _CACHE_VERSION,
            "layout": layout,
            "case_id": case_id,
            "config": config.to_dict(),
            "dataset": info.fingerprint(),
            "sources": sources,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _entry_paths(cache_dir: Path, case_id: str, key: str) -> dict[str, Path]:
    stem = f"{case_id}-{key}"
    return {
        "record": cache_dir / f"{stem}.json",
        "image": cache_dir / f"{stem}.image.npy",
        "labels": cache_dir / f"{stem}.labels.npy",
    }


def _read_entry(paths: dict[str, Path], case_id: str, *, mmap: bool) -> Case:
    """The cached case (arrays memory-mapped read-only with ``mmap``); raises on any damage."""
    rec = json.loads(paths["record"].read_text(encoding="utf-8"))
    if (
        not isinstance(rec, dict)
        or rec.get("format") != _CACHE_FORMAT
        or rec.get("version") != _CACHE_VERSION
    ):
        raise ValueError("not a timm_jax cache record of this version")
    if rec["case_id"] != case_id:
        raise ValueError(f"record of case {rec['case_id']!r}")
    arrays = {}
    for name in ("image", "labels"):
        spec = rec["arrays"].get(name)
        if spec is None:
            arrays[name] = None
            continue
        arr = np.load(paths[name], mmap_mode="r" if mmap else None, allow_pickle=False)
        if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
            raise ValueError(f"{paths[name].name} holds {arr.dtype}{arr.shape}, the record says {spec}")
        arrays[name] = arr
    if arrays["image"] is None:
        raise ValueError("record has no image")
    return Case(
        case_id=case_id,
        image=arrays["image"],
        labels=arrays["labels"],
        affine=np.asarray(rec["affine"], np.float64),
        modalities=tuple(rec["modalities"]),
        paths=dict(rec["paths"]),
        meta=dict(rec["meta"]),
    )


def _write_entry(cache_dir: Path, paths: dict[str, Path], case: Case) -> None:
    """Each array to a temporary ``.npy``, then the record; renamed into place arrays first, record
    last, so a record on disk always has its arrays. Nothing is left behind on an error."""
    with writing(cache_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"image": np.ascontiguousarray(case.image, np.float32)}
    if case.labels is not None:
        arrays["labels"] = np.ascontiguousarray(case.labels)
    record = {
        "format": _CACHE_FORMAT,
        "version": _CACHE_VERSION,
        "case_id": case.case_id,
        "modalities": list(case.modalities),
        "paths": case.paths,
        "meta": case.meta,
        "affine": np.asarray(case.affine).tolist(),
        "arrays": {
            name: {"file": paths[name].name, "shape": list(arr.shape), "dtype": str(arr.dtype)}
            for name, arr in arrays.items()
        },
    }
    # the arrays first, the record last: the record is the entry's commit mark
    names = list(arrays)
    with atomic_paths([paths[n] for n in names] + [paths["record"]], fault_point="preprocess.cache") as tmps:
        for name, tmp in zip(names, tmps):
            with open(tmp, "xb") as f:
                np.save(f, arrays[name], allow_pickle=False)
        with open(tmps[-1], "x", encoding="utf-8") as f:
            json.dump(record, f)


def load_preprocessed(
    root,
    case_id: str,
    layout: str,
    config: PreprocessConfig = PreprocessConfig(),
    cache_dir=None,
    *,
    require_labels: bool = True,
    info=None,
    mmap: bool = False,
) -> Case:
    """Load and preprocess a case, reusing its cache entry ``<cache_dir>/<case_id>-<key>.*`` when present.

    The key hashes ``config`` and the data set's conventions with each source file's path, size and
    mtime, so a changed file or setting is recomputed. ``cache_dir=None`` disables caching. With
    ``mmap=True`` (needs ``cache_dir``) the case's ``image`` and ``labels`` are read-only
    ``np.memmap`` views of the cache files: nothing is read until it is used. A damaged entry
    (truncated, zeroed, foreign) is logged and rebuilt.
    """
    info = info if info is not None else dataset_info(root, layout)
    if cache_dir is None:
        if mmap:
            raise ValueError("mmap=True needs a cache_dir (the memory-mapped files live there)")
        return preprocess_case(
            load_case(root, case_id, layout, require_labels=require_labels, info=info), config
        )
    cache_dir = Path(cache_dir)
    key = cache_key(root, case_id, layout, config, info=info)
    paths = _entry_paths(cache_dir, case_id, key)
    if paths["record"].is_file():
        try:
            case = _read_entry(paths, case_id, mmap=mmap)
            if case.labels is not None or not require_labels:
                return case
        except (
            Exception
        ) as e:  # truncated, zeroed or foreign file (JSON, npy header, mmap size...): rebuild it
            _log.warning(
                "preprocessed-data cache entry %s is unreadable (%s); rebuilding it",
                paths["record"],
                _brief(e),
            )
    case = preprocess_case(load_case(root, case_id, layout, require_labels=require_labels, info=info), config)
    _write_entry(cache_dir, paths, case)
    if mmap:
        return _read_entry(paths, case_id, mmap=True)
    return case


def _brief(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def load_preprocessed_many(
    root, case_ids, layout, config=PreprocessConfig(), cache_dir=None, *, progress=False, info=None
):
    """:func:`load_preprocessed` for several cases (optionally with a tqdm progress bar)."""
    info = info if info is not None else dataset_info(root, layout)
    ids = list(case_ids)
    if progress:
        from tqdm import tqdm

        ids = tqdm(ids, desc="preprocess", unit="case")
    return [load_preprocessed(root, cid, layout, config, cache_dir, info=info) for cid in ids]


class LazyCases(Sequence):
    """Cases of the preprocessing cache, each opened (memory-mapped, read-only) when it is accessed.

    Holds only the case ids and how to find them: ``cases[i]`` is ``load_preprocessed(...,
    mmap=True)`` (a cache hit; rebuilt if the entry was removed or damaged meanwhile). Iterating
    opens one case at a time, so a data set larger than memory can be walked through, and no file
    stays open between accesses.
    """

    def __init__(self, root, ids, layout, config, cache_dir, *, require_labels=True, info=None):
        self.root, self.layout, self.config = root, layout, config
        self.cache_dir = Path(cache_dir)
        self.ids = list(ids)
        self.require_labels = require_labels
        self.info = info if info is not None else dataset_info(root, layout)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return load_preprocessed(
            self.root,
            self.ids[i],
            self.layout,
            self.config,
            self.cache_dir,
            require_labels=self.require_labels,
            info=self.info,
            mmap=True,
        )

    def __repr__(self) -> str:
        return f"LazyCases({len(self)} cases in {self.cache_dir})"


def load_preprocessed_lazy(
    root,
    case_ids,
    layout,
    config: PreprocessConfig = PreprocessConfig(),
    cache_dir=None,
    *,
    require_labels: bool = True,
    info=None,
    check: Callable[[np.ndarray], None] | None = None,
    progress: bool = False,
) -> LazyCases:
    """Preprocess every case into the cache (one at a time), then return them as :class:`LazyCases`.

    ``check`` (e.g. ``task.check_labels``) is applied to each case's labels as it is cached.
    """
    if cache_dir is None:
        raise ValueError("load_preprocessed_lazy needs a cache_dir")
    info = info if info is not None else dataset_info(root, layout)
    ids = list(case_ids)
    walk = ids
    if progress:
        from tqdm import tqdm

        walk = tqdm(ids, desc="preprocess", unit="case")
    for n, cid in enumerate(walk):
        case = load_preprocessed(
            root, cid, layout, config, cache_dir, require_labels=require_labels, info=info, mmap=True
        )
        if check is not None and case.labels is not None:
            check(case.labels)
        del case
        if (n + 1) % 10 == 0:
            _log.info("  cached %d/%d cases", n + 1, len(ids))
    return LazyCases(root, ids, layout, config, cache_dir, require_labels=require_labels, info=info)
