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
``case.meta`` records the crop box and the input shape and affine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from timm_jax.data.io import Case, DataError, case_files, load_case
from timm_jax.errors import writing
from timm_jax.faults import fault

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
    "cache_key",
]

_CACHE_VERSION = 1
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


def crop_to_nonzero(case: Case, margin: int = 2) -> Case:
    """Crop image and labels to the joint non-zero box of all channels, ``margin`` voxels wider."""
    box = nonzero_bbox(case.image)
    box = tuple((max(lo - margin, 0), min(hi + margin, n)) for (lo, hi), n in zip(box, case.shape))
    sl = tuple(slice(lo, hi) for lo, hi in box)
    labels = None if case.labels is None else case.labels[sl]
    meta = dict(case.meta, crop_box=[list(b) for b in box])
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
    old = np.asarray(case.spacing)
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
    return dataclasses.replace(
        case, image=image.astype(np.float32), labels=labels, affine=case.affine @ scale
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


# --------------------------------------------------------------------------------------- cache
def cache_key(root, case_id: str, layout: str, config: PreprocessConfig) -> str:
    """Hash of the settings and of every source file's path, size and modification time."""
    sources = []
    for key, path in sorted(case_files(root, case_id, layout).items()):
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
            "sources": sources,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_preprocessed(
    root,
    case_id: str,
    layout: str,
    config: PreprocessConfig = PreprocessConfig(),
    cache_dir=None,
    *,
    require_labels: bool = True,
) -> Case:
    """Load and preprocess a case, reusing ``<cache_dir>/<case_id>-<key>.npz`` when present.

    The key hashes ``config`` with each source file's path, size and mtime, so a changed file or
    setting is recomputed. ``cache_dir=None`` disables caching.
    """
    if cache_dir is None:
        return preprocess_case(load_case(root, case_id, layout, require_labels=require_labels), config)
    cache_dir = Path(cache_dir)
    key = cache_key(root, case_id, layout, config)
    path = cache_dir / f"{case_id}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                labels = z["labels"] if "labels" in z.files else None
                if labels is not None or not require_labels:
                    return Case(
                        case_id=case_id,
                        image=z["image"],
                        labels=labels,
                        affine=z["affine"],
                        modalities=tuple(json.loads(str(z["modalities"]))),
                        paths=json.loads(str(z["paths"])),
                        meta=json.loads(str(z["meta"])),
                    )
        except Exception as e:  # truncated, zeroed or foreign file (zipfile, zlib, EOF, ...): rebuild it
            _log.warning(
                "preprocessed-data cache entry %s is unreadable (%s); rebuilding it", path, _brief(e)
            )
    case = preprocess_case(load_case(root, case_id, layout, require_labels=require_labels), config)
    with writing(cache_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = dict(
        image=case.image,
        affine=case.affine,
        modalities=json.dumps(list(case.modalities)),
        paths=json.dumps(case.paths),
        meta=json.dumps(case.meta),
    )
    if case.labels is not None:
        arrays["labels"] = case.labels
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            fault("preprocess.cache", tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return case


def _brief(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def load_preprocessed_many(
    root, case_ids, layout, config=PreprocessConfig(), cache_dir=None, *, progress=False
):
    """:func:`load_preprocessed` for several cases (optionally with a tqdm progress bar)."""
    ids = list(case_ids)
    if progress:
        from tqdm import tqdm

        ids = tqdm(ids, desc="preprocess", unit="case")
    return [load_preprocessed(root, cid, layout, config, cache_dir) for cid in ids]
