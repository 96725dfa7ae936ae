"""Reading and writing cases in the two on-disk layouts, with the checks that reject bad files.

Layouts (file names may end in ``.nii.gz`` or ``.nii``):

* ``brats`` (BraTS 2018): ``<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``; cases may also sit
  one level down in ``HGG/`` and ``LGG/`` folders. Labels 0 (background), 1 (necrotic / non-enhancing
  core), 2 (oedema), 4 (enhancing tumour).
* ``parcellation``: ``<root>/<case>/{t1,t2,labels}.nii.gz`` with any non-negative integer labels.

A case is read into a :class:`Case`: the modalities stacked on a trailing channel axis as float32
``(D, H, W, C)`` in the layout's modality order, the label map as int32 ``(D, H, W)`` (``None`` when a
case has no label file and labels are not required, e.g. for inference), and the voxel-to-world
affine. Every check (missing, unreadable or truncated file, unsupported voxel type, no voxels, not
3-D, non-finite affine, shape or affine mismatch between files, non-finite values, empty image,
label values that are not integers, do not fit int32 or lie outside the layout's set) produces a
one-line :class:`Problem` naming the file; :func:`load_case` raises them together as one
:class:`DataError`, and ``python -m timm_jax.data.validate`` prints them. No file content makes
these checks raise anything else (``tests/test_fuzz_validate.py``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from timm_jax.errors import UserError

__all__ = [
    "Case",
    "DataError",
    "LAYOUTS",
    "Layout",
    "Problem",
    "case_dir",
    "case_files",
    "inspect_case",
    "list_cases",
    "load_case",
    "save_nifti",
]

_EXTENSIONS = (".nii.gz", ".nii")
#: Tolerance (in mm, per affine entry) when comparing the affines of a case's files.
AFFINE_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a case: the file (or folder) concerned and what is wrong with it."""

    case_id: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DataError(UserError, ValueError):
    """Raised when a case or a data set cannot be used; the message names each file and its problem."""

    def __init__(self, problems: Sequence[Problem] | str):
        if isinstance(problems, str):
            problems = [Problem(case_id="", path="", message=problems)]
        self.problems = list(problems)
        lines = [str(p) if p.path else p.message for p in self.problems]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a case's files live and which label values are legal.

    Attributes:
      name: layout name (``"brats"`` or ``"parcellation"``).
      modalities: image modalities in channel order.
      label_key: name of the label file's key (``"seg"`` / ``"labels"``).
      label_values: the allowed label values, or ``None`` for any non-negative integer.
      group_dirs: sub-folders of the root that hold cases instead of being cases (BraTS HGG/LGG).
      prefix_case_id: whether file names are prefixed by the case id (``<case>_t1``) or not (``t1``).
    """

    name: str
    modalities: tuple[str, ...]
    label_key: str
    label_values: tuple[int, ...] | None
    group_dirs: tuple[str, ...] = ()
    prefix_case_id: bool = False

    def stem(self, case_id: str, key: str) -> str:
        """File name without extension for a modality or the label key."""
        return f"{case_id}_{key}" if self.prefix_case_id else key

    @property
    def keys(self) -> tuple[str, ...]:
        return self.modalities + (self.label_key,)


LAYOUTS: dict[str, Layout] = {
    "brats": Layout(
        name="brats",
        modalities=("t1", "t1ce", "t2", "flair"),
        label_key="seg",
        label_values=(0, 1, 2, 4),
        group_dirs=("HGG", "LGG"),
        prefix_case_id=True,
    ),
    "parcellation": Layout(
        name="parcellation",
        modalities=("t1", "t2"),
        label_key="labels",
        label_values=None,
    ),
}


@dataclasses.dataclass
class Case:
    """One subject: images ``(D, H, W, C)`` float32, labels ``(D, H, W)`` int or ``None``, affine ``(4, 4)``.

    ``paths`` maps each modality (and ``"labels"``) to its source file. ``meta`` holds provenance
    added by later steps (e.g. the crop box and original shape after preprocessing).
    """

    case_id: str
    image: np.ndarray
    labels: np.ndarray | None
    affine: np.ndarray
    modalities: tuple[str, ...]
    paths: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[:3])

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def _get_layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise DataError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}") from None


def _is_case_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith((".", "_"))


def list_cases(root: str | os.PathLike, layout: str | Layout) -> list[str]:
    """Sorted case ids under ``root``: every sub-folder (BraTS: also those inside ``HGG/``, ``LGG/``).

    Every folder counts as a case, even an incomplete one, so that validation reports what is
    missing instead of silently skipping it.

    Raises:
      DataError: ``root`` is not a folder, or one case id occurs in two group folders.
    """
    lay = _get_layout(layout)
    root = Path(root)
    if not root.is_dir():
        raise DataError([Problem("", str(root), "data folder not found")])
    found: dict[str, Path] = {}
    for entry in sorted(_list_dir(root)):
        if not _is_case_dir(entry):
            continue
        if entry.name in lay.group_dirs:
            subs = [e for e in sorted(_list_dir(entry)) if _is_case_dir(e)]
        else:
            subs = [entry]
        for sub in subs:
            if sub.name in found:
                raise DataError([Problem(sub.name, str(sub), f"case id also found at {found[sub.name]}")])
            found[sub.name] = sub
    return sorted(found)


def _list_dir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise DataError([Problem("", str(folder), f"cannot list folder ({_describe(err)})")]) from None


def _describe(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line (readers' messages may span several)."""
    msg = " ".join(str(err).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def case_dir(root: str | os.PathLike, case_id: str, layout: str | Layout) -> Path:
    """The folder of ``case_id`` (looked up in the group folders too); may not exist."""
    lay = _get_layout(layout)
    root = Path(root)
    direct = root / case_id
    if direct.is_dir():
        return direct
    for group in lay.group_dirs:
        if (root / group / case_id).is_dir():
            return root / group / case_id
    return direct


def case_files(root: str | os.PathLike, case_id: str, layout: str | Layout) -> dict[str, Path | None]:
    """Map each modality and the label key to its file, or ``None`` when no such file exists."""
    lay = _get_layout(layout)
    folder = case_dir(root, case_id, lay)
    out: dict[str, Path | None] = {}
    for key in lay.keys:
        stem = lay.stem(case_id, key)
        out[key] = next(
            (folder / (stem + ext) for ext in _EXTENSIONS if (folder / (stem + ext)).is_file()), None
        )
    return out


class _BadFile(ValueError):
    """A problem found from the header alone; the message is reported as it is."""


#: deflate cannot expand one compressed byte into more than ~1032 bytes
_GZIP_MAX_RATIO = 1032
#: above this many declared bytes, a gzipped file is decompressed once (in chunks) to count them
#: before the reader allocates its buffer: a damaged header must not make the validator allocate
#: (and zero-fill) gigabytes
_STREAM_CHECK_BYTES = 64 << 20


def _check_declared_size(path: Path, proxy) -> None:
    """Raise :class:`_BadFile` if the file cannot hold the voxel data its header declares.

    ``proxy`` is the image's (unread) array proxy: its shape, dtype and offset in the file are the
    header's (``img.header`` is a copy whose offset is reset).
    """
    shape = tuple(int(d) for d in proxy.shape)
    dtype = np.dtype(proxy.dtype)
    if any(d < 0 for d in shape):
        raise _BadFile(f"header is damaged: it declares a negative dimension (shape {shape})")
    need = int(proxy.offset) + int(np.prod(shape, dtype=object)) * dtype.itemsize
    have = path.stat().st_size
    bad = f"file is truncated or its header is damaged: the header declares {shape} voxels of {dtype}"
    if not path.name.endswith(".gz"):
        if need > have:
            raise _BadFile(f"{bad} ({need} bytes with the offset), the file has {have} bytes")
        return
    if need > _GZIP_MAX_RATIO * have:
        raise _BadFile(f"{bad} ({need} bytes), more than a {have}-byte gzip file can hold")
    if need > _STREAM_CHECK_BYTES:
        import gzip

        got = 0
        with gzip.open(path, "rb") as f:
            while got < need:
                chunk = f.read(min(8 << 20, need - got))
                if not chunk:
                    break
                got += len(chunk)
        if got < need:
            raise _BadFile(f"{bad} ({need} bytes with the offset), the file decompresses to {got}")


def _read_volume(path: Path, *, as_labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read one NIfTI file; images come back as float32, labels as whatever dtype is stored."""
    import nibabel as nib

    img = nib.load(str(path))  # reads the header only
    stored = img.get_data_dtype()
    if stored.kind not in "biuf":  # complex would lose its imaginary part silently, RGB cannot convert
        raise _BadFile(f"voxel type {stored} is not supported (expected integers or real numbers)")
    _check_declared_size(path, img.dataobj)
    if as_labels:
        data = np.asanyarray(img.dataobj)
    else:
        data = img.get_fdata(dtype=np.float32)
    return np.asarray(data), np.asarray(img.affine, dtype=np.float64)


def _squeeze_to_3d(data: np.ndarray) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def inspect_case(
    root: str | os.PathLike,
    case_id: str,
    layout: str | Layout,
    *,
    require_labels: bool = True,
) -> tuple[Case | None, list[Problem]]:
    """Read and check one case; the shared core of :func:`load_case` and the validator.

    Returns:
      ``(case, problems)``: ``case`` is ``None`` exactly when ``problems`` is non-empty.
    """
    lay = _get_layout(layout)
    folder = case_dir(root, case_id, lay)
    problems: list[Problem] = []

    def problem(path, message):
        problems.append(Problem(case_id, str(path), message))

    if not folder.is_dir():
        problem(folder, "case folder not found")
        return None, problems

    files = case_files(root, case_id, lay)
    volumes: dict[str, np.ndarray] = {}
    affines: dict[str, np.ndarray] = {}
    ref: tuple[str, tuple, np.ndarray] | None = None  # (file name, shape, affine) of the first 3-D volume
    for key in lay.keys:
        is_label = key == lay.label_key
        path = files[key]
        if path is None:
            if is_label and not require_labels:
                continue
            problem(folder / (lay.stem(case_id, key) + _EXTENSIONS[0]), "missing file")
            continue
        try:
            data, affine = _read_volume(path, as_labels=is_label)
        except _BadFile as err:
            problem(path, str(err))
            continue
        except Exception as err:  # nibabel raises many types for corrupt or non-NIfTI files
            problem(path, f"cannot read file ({_describe(err)})")
            continue
        data = _squeeze_to_3d(data)
        if data.size == 0:
            problem(path, f"volume has no voxels (shape {tuple(data.shape)})")
            continue
        if data.ndim != 3:
            problem(path, f"expected a 3-D volume, got shape {tuple(data.shape)}")
            continue
        ok = True
        affine_ok = bool(np.all(np.isfinite(affine)))
        if not affine_ok:
            problem(path, "affine (voxel-to-world transform of the sform/qform) has non-finite entries")
            ok = False
        if ref is None:
            if affine_ok:  # a broken affine is no reference for the other files
                ref = (path.name, tuple(data.shape), affine)
        elif tuple(data.shape) != ref[1]:
            problem(path, f"shape {tuple(data.shape)} differs from {ref[0]}'s {ref[1]}")
            ok = False
        elif affine_ok and not np.allclose(affine, ref[2], atol=AFFINE_ATOL, rtol=0):
            diff = float(np.max(np.abs(affine - ref[2])))
            problem(path, f"affine differs from {ref[0]}'s (max difference {diff:.4g})")
            ok = False
        if np.issubdtype(data.dtype, np.floating):
            n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            if n_bad:
                problem(path, f"{n_bad} non-finite value(s) (NaN or inf)")
                ok = False
        if ok and is_label:
            ok = _check_labels(path, data, lay, problem)
            if ok:
                data = data.astype(np.int32, copy=False)
        elif ok:
            lo, hi = float(data.min()), float(data.max())
            if lo == hi == 0.0:
                problem(path, "image is empty (all voxels are zero)")
                ok = False
            elif lo == hi:
                problem(path, f"image is constant (every voxel is {lo:g})")
                ok = False
        if ok:
            volumes[key] = data
            affines[key] = affine

    if problems:
        return None, problems
    image = np.stack([volumes[m] for m in lay.modalities], axis=-1).astype(np.float32, copy=False)
    labels = volumes.get(lay.label_key)
    paths = {k: str(v) for k, v in files.items() if v is not None}
    if lay.label_key in paths:
        paths["labels"] = paths[lay.label_key]
    case = Case(
        case_id=case_id,
        image=image,
        labels=labels,
        affine=affines[lay.modalities[0]],
        modalities=lay.modalities,
        paths=paths,
    )
    return case, problems


def _check_labels(path: Path, data: np.ndarray, lay: Layout, problem) -> bool:
    if np.issubdtype(data.dtype, np.floating):
        frac = data != np.round(data)
        if frac.any():
            example = float(data[frac].flat[0])
            problem(path, f"label values must be integers (found {example:g})")
            return False
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        problem(path, f"label map has non-numeric dtype {data.dtype}")
        return False
    info = np.iinfo(np.int32)
    lo, hi = data.min(), data.max()
    if hi > info.max or lo < info.min:  # labels are stored as int32; larger values would wrap around
        example = hi if hi > info.max else lo
        problem(path, f"label values must fit in int32 (found {example:.10g})")
        return False
    values = np.unique(data).astype(np.int64)
    if lay.label_values is None:
        bad = values[values < 0]
        allowed = "non-negative integers"
    else:
        bad = values[~np.isin(values, lay.label_values)]
        allowed = "{" + ", ".join(str(v) for v in lay.label_values) + "}"
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        problem(path, f"label values outside the {lay.name} set {allowed}: {shown}")
        return False
    return True


def load_case(
    root: str | os.PathLike,
    case_id: str,
    layout: str | Layout,
    *,
    require_labels: bool = True,
) -> Case:
    """Read one case in ``layout`` from ``root`` (images float32, labels int32, affine kept).

    Args:
      root: data folder.
      case_id: the case's folder name (see :func:`list_cases`).
      layout: ``"brats"`` or ``"parcellation"`` (or a :class:`Layout`).
      require_labels: if False, a missing label file gives ``labels=None`` (inference).

    Raises:
      DataError: listing every problem found, each with the file concerned.
    """
    case, problems = inspect_case(root, case_id, layout, require_labels=require_labels)
    if problems:
        raise DataError(problems)
    return case


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, dtype: Any = None) -> Path:
    """Write ``array`` with ``affine`` as NIfTI-1 (gzipped when the name ends in ``.gz``).

    ``dtype`` defaults to the array's own; the header's sform and qform are both set (code 1,
    scanner). nibabel writes gzip deterministically (no timestamp), so equal inputs give equal bytes.
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype in (np.int64, np.uint64):  # NIfTI readers handle int32 far more widely
        arr = arr.astype(np.int32)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_data_dtype(arr.dtype)
    img.set_sform(np.asarray(affine, dtype=np.float64), code=1)
    img.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    nib.save(img, str(path))
    return path
