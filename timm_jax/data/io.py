"""Reading cases of every on-disk layout, with the checks that reject bad files.

The layouts (``brats`` 2018–2021 and 2023+, ``msd``, ``nnunet``, ``freesurfer``, ``parcellation``)
are described in :mod:`timm_jax.data.layouts`; :func:`dataset_info` looks at a data folder once and
says which convention, modalities and labels it holds. NIfTI (``.nii.gz``, ``.nii``) and MGH
(``.mgz``, ``.mgh``) files are read through nibabel.

A case is read into a :class:`Case`: the modalities stacked on a trailing channel axis as float32
``(D, H, W, C)`` in the data set's modality order, the label map as int32 ``(D, H, W)`` (renumbered
to the layout's ids, e.g. BraTS 2023's 3 to 4, or merged by a label map; ``None`` when a case has no
label file and labels are not required, e.g. for inference), and the voxel-to-world affine. Every
volume is brought to the closest RAS orientation (:mod:`timm_jax.data.geometry`); modalities whose
grid differs from the reference grid (the label file's, else the first modality's) are resampled
onto it (logged once per case); ``Case.meta["source"]`` records the reference file's original shape,
affine, qform / sform codes and the orientation applied, so that results can be written back on
that file's grid (:func:`timm_jax.data.preprocess.to_input_geometry`).

Every check (missing, unreadable or truncated file, unsupported voxel type, no voxels, not 3-D or a
4-D image with the wrong channel count, non-finite or degenerate affine, non-positive voxel sizes,
grids that do not overlap, non-finite values, empty or constant image, label values that are not
integers, do not fit int32 or lie outside the data set's set or label map) produces a one-line
:class:`Problem` naming the file; :func:`load_case` raises them together as one :class:`DataError`,
and ``python -m timm_jax.data.validate`` prints them. No file content makes these checks raise
anything else (``tests/test_fuzz_validate.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from timm_jax.atomic import atomic_path
from timm_jax.config import LAYOUT_NAMES
from timm_jax.data import geometry
from timm_jax.data.files import (
    IMAGE_EXTENSIONS,
    CasePlan,
    DataError,
    ImageSource,
    Problem,
    is_case_dir,
    is_file,
    list_dir,
)
from timm_jax.data.files import (
    describe as _describe,
)

__all__ = [
    "Case",
    "CasePlan",
    "DataError",
    "ImageSource",
    "LAYOUTS",
    "LAYOUT_NAMES",
    "Layout",
    "Problem",
    "case_dir",
    "case_files",
    "dataset_info",
    "inspect_case",
    "list_cases",
    "load_case",
    "load_files",
    "save_nifti",
]

_EXTENSIONS = IMAGE_EXTENSIONS
#: Tolerance (in mm, per affine entry) below which two files' affines describe the same grid.
AFFINE_ATOL = geometry.AFFINE_ATOL
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The fixed file names of the two original layouts (kept for existing callers).

    The modalities of a data set are now found per data set (:func:`dataset_info`: BraTS 2023
    naming, a T1-only parcellation set, ...); use ``dataset_info(...).modalities`` for the channel
    count. ``LAYOUTS`` describes BraTS 2018–2021 and a parcellation set with T1 and T2.

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

    ``paths`` maps each modality (and ``"labels"``) to its source file. ``meta`` holds provenance:
    ``layout``, ``convention``, ``source`` (the reference file's original geometry, see the module
    docstring), ``resampled`` (modalities moved onto the reference grid) and, after preprocessing,
    the steps applied (see :mod:`timm_jax.data.preprocess`). ``image`` and ``labels`` may be
    read-only ``np.memmap`` views of the preprocessing cache (``load_preprocessed(..., mmap=True)``).
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


def _layout_name(layout) -> str:
    name = layout.name if isinstance(layout, Layout) else layout
    if name not in LAYOUT_NAMES:
        raise DataError(f"unknown layout {name!r}; expected one of {sorted(LAYOUT_NAMES)}")
    return name


def dataset_info(root: str | os.PathLike, layout: str | Layout, *, label_map: str | None = None):
    """The :class:`~timm_jax.data.layouts.DatasetInfo` of a data folder (see that module).

    This is the one call the workflows need per data set: ``info.modalities`` (channel order,
    ``len`` = the network's input channels), ``info.convention``, ``info.make_task()``,
    ``info.label_names``; pass ``info=`` on to :func:`load_case` / ``load_preprocessed`` so that
    the folder is looked at once.
    """
    from timm_jax.data import layouts

    return layouts.dataset_info(root, _layout_name(layout), label_map=label_map)


def _info(root, layout, info, label_map):
    if info is not None:
        return info
    return dataset_info(root, layout, label_map=label_map)


_is_case_dir = is_case_dir


def list_cases(
    root: str | os.PathLike,
    layout: str | Layout,
    *,
    subset: str = "train",
    info=None,
    label_map: str | None = None,
) -> list[str]:
    """Sorted case ids of a data folder.

    BraTS / parcellation: every sub-folder (BraTS: also those inside ``HGG/``, ``LGG/``), even an
    incomplete one, so that validation reports what is missing instead of silently skipping it.
    FreeSurfer: every sub-folder with an ``mri/`` folder but ``fsaverage*``. MSD: the cases of
    ``dataset.json``; nnU-Net: those in ``imagesTr/`` (``subset="test"``: ``imagesTs/``, ``"all"``:
    both; the other layouts have no test subset).

    Raises:
      DataError: ``root`` is not a folder, one case id occurs twice, or the data set is refused
        (see :func:`dataset_info`).
    """
    from timm_jax.data import layouts

    return layouts.list_layout_cases(_info(root, layout, info, label_map), subset)


_list_dir = list_dir


def case_dir(root: str | os.PathLike, case_id: str, layout: str | Layout, *, info=None) -> Path:
    """The folder of ``case_id`` (BraTS: looked up in the group folders too); may not exist."""
    from timm_jax.data import layouts

    try:
        plan, _ = layouts.case_plan(_info(root, layout, info, None), case_id)
    except DataError:
        plan = None
    return plan.folder if plan is not None else Path(root) / case_id


def case_files(
    root: str | os.PathLike, case_id: str, layout: str | Layout, *, info=None
) -> dict[str, Path | None]:
    """Map each modality and ``"labels"`` to its file, or ``None`` when no such file exists."""
    from timm_jax.data import layouts

    plan, _ = layouts.case_plan(_info(root, layout, info, None), case_id)
    if plan is None:
        return {}
    out: dict[str, Path | None] = {}
    for src in plan.images:
        for m in src.modalities:
            out[m] = src.path
    out["labels"] = plan.labels
    return out


# --------------------------------------------------------------------------------------- one file
class _BadFile(ValueError):
    """A problem found from the header alone; the message is reported as it is."""


#: deflate cannot expand one compressed byte into more than ~1032 bytes
_GZIP_MAX_RATIO = 1032
#: above this many declared bytes, a gzipped file is decompressed once (in chunks) to count them
#: before the reader allocates its buffer: a damaged header must not make the validator allocate
#: (and zero-fill) gigabytes
_STREAM_CHECK_BYTES = 64 << 20


def _is_gzipped(path: Path) -> bool:
    return path.name.endswith((".gz", ".mgz"))


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
    if not _is_gzipped(path):
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


@contextlib.contextmanager
def _quiet_nibabel():
    """nibabel logs (and silently fixes) some header faults, e.g. zero pixdims; they are reported here."""
    import nibabel as nib

    logger = nib.imageglobals.logger
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def _header_facts(path: Path, img) -> dict[str, Any]:
    """Format, qform / sform codes, and a problem with the voxel sizes the header declares (or None).

    nibabel fixes zero or negative NIfTI pixdims on load (to 1 / their absolute value), so they are
    read from the raw header: they define the affine when the sform is not set.
    """
    import nibabel as nib

    facts: dict[str, Any] = {"format": type(img).__name__, "qform_code": None, "sform_code": None}
    if isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        from nibabel.openers import ImageOpener

        with ImageOpener(str(path)) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        facts["qform_code"] = int(raw["qform_code"])
        facts["sform_code"] = int(raw["sform_code"])
        pixdim = np.asarray(raw["pixdim"][1:4], np.float64)
        if facts["sform_code"] == 0 and not np.all(np.isfinite(pixdim) & (pixdim > 0)):
            shown = ", ".join(f"{v:g}" for v in pixdim)
            facts["zooms_problem"] = (
                f"voxel sizes must be positive: the header's pixdim[1:4] is {shown} and defines the "
                "affine (no sform)"
            )
    elif isinstance(img, nib.MGHImage):
        delta = np.asarray(img.header["delta"], np.float64)
        if not np.all(np.isfinite(delta) & (delta > 0)):
            shown = ", ".join(f"{v:g}" for v in delta)
            facts["zooms_problem"] = f"voxel sizes must be positive: the MGH header's delta is {shown}"
    return facts


def _read_volume(path: Path, *, as_labels: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one NIfTI / MGH file; images come back as float32, labels as whatever dtype is stored."""
    import nibabel as nib

    # overflow in a damaged header's sizes or affine is a problem reported below, not a warning
    with _quiet_nibabel(), np.errstate(all="ignore"):
        img = nib.load(str(path))  # reads the header only
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image | nib.MGHImage):
            raise _BadFile(f"not a NIfTI or MGH image (read as {type(img).__name__})")
        stored = img.get_data_dtype()
        if stored.kind not in "biuf":  # complex would lose its imaginary part silently, RGB cannot convert
            raise _BadFile(f"voxel type {stored} is not supported (expected integers or real numbers)")
        _check_declared_size(path, img.dataobj)
        facts = _header_facts(path, img)
        if as_labels:
            data = np.asanyarray(img.dataobj)
        else:
            data = img.get_fdata(dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    return np.asarray(data), affine, facts


def _squeeze_to(data: np.ndarray, ndim: int) -> np.ndarray:
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _squeeze_to_3d(data: np.ndarray) -> np.ndarray:
    return _squeeze_to(data, 3)


def _load_file(path: Path, *, as_labels: bool, source: ImageSource | None, problem):
    """Read and check one file; ``(data, affine, facts)`` or ``None`` after reporting its problems."""
    try:
        data, affine, facts = _read_volume(path, as_labels=as_labels)
    except _BadFile as err:
        problem(path, str(err))
        return None
    except Exception as err:  # nibabel raises many types for corrupt or foreign files
        problem(path, f"cannot read file ({_describe(err)})")
        return None
    if data.size == 0:
        problem(path, f"volume has no voxels (shape {tuple(data.shape)})")
        return None
    volumes = None if source is None or source.volumes is None else source.n_volumes
    if volumes is None:
        data = _squeeze_to(data, 3)
        if data.ndim != 3:
            problem(path, f"expected a 3-D volume, got shape {tuple(data.shape)}")
            return None
    else:
        data = _squeeze_to(data, 4)
        if data.ndim == 3 and volumes == 1:
            data = data[..., None]
        if data.ndim != 4:
            problem(
                path, f"expected a 4-D image with {volumes} channels ({source.what}), got shape {data.shape}"
            )
            return None
        if data.shape[3] != volumes:
            problem(
                path, f"has {data.shape[3]} channels (shape {data.shape}), expected {volumes} ({source.what})"
            )
            return None
    ok = True
    msg = geometry.affine_problem(affine)
    if msg is None:
        msg = facts.get("zooms_problem")
    if msg is not None:
        problem(path, msg)
        ok = False
    if np.issubdtype(data.dtype, np.floating):
        n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            problem(path, f"{n_bad} non-finite value(s) (NaN or inf)")
            ok = False
    return (data, affine, facts) if ok else None


# --------------------------------------------------------------------------------------- one case
@dataclasses.dataclass
class _Grid:
    path: Path
    shape: tuple[int, int, int]  # canonical
    affine: np.ndarray  # canonical
    ornt: np.ndarray
    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    facts: dict


def _grid(path, data, affine, facts) -> tuple[np.ndarray, _Grid]:
    data_c, affine_c, ornt = geometry.canonical(data, affine)
    grid = _Grid(path, tuple(data_c.shape[:3]), affine_c, ornt, tuple(data.shape[:3]), affine, facts)
    return data_c, grid


def inspect_case(
    root: str | os.PathLike,
    case_id: str,
    layout: str | Layout,
    *,
    require_labels: bool = True,
    read_labels: bool = True,
    info=None,
    label_map: str | None = None,
) -> tuple[Case | None, list[Problem]]:
    """Read and check one case; the shared core of :func:`load_case` and the validator.

    Returns:
      ``(case, problems)``: ``case`` is ``None`` exactly when ``problems`` is non-empty.
    """
    from timm_jax.data import layouts

    try:
        info = _info(root, layout, info, label_map)
        plan, problems = layouts.case_plan(info, case_id)
    except DataError as err:
        return None, list(err.problems)
    if plan is None:
        return None, problems
    if not read_labels:
        plan = dataclasses.replace(plan, labels=None)
        require_labels = False
    return _read_case(plan, info, require_labels)


def _read_case(plan: CasePlan, info, require_labels: bool) -> tuple[Case | None, list[Problem]]:
    case_id = plan.case_id
    problems: list[Problem] = []

    def problem(path, message):
        problems.append(Problem(case_id, str(path), message))

    channels: dict[str, np.ndarray] = {}
    grids: list[tuple[_Grid, tuple[str, ...]]] = []
    empty: list[tuple[Path, tuple[str, ...], bool]] = []
    for src in plan.images:
        if src.path is None:
            problem(src.expected, "missing file")
            continue
        got = _load_file(src.path, as_labels=False, source=src, problem=problem)
        if got is None:
            continue
        data_c, grid = _grid(src.path, *got)
        if src.volumes is None:
            per = {src.modalities[0]: data_c}
        else:
            per = {m: data_c[..., v] for m, v in zip(src.modalities, src.volumes)}
        empties, ok = [], True
        for m, vol in per.items():
            lo, hi = float(vol.min()), float(vol.max())
            if lo == hi == 0.0:
                empties.append(m)
            elif lo == hi:
                where = f" (channel {m})" if src.volumes is not None else ""
                problem(src.path, f"image is constant{where} (every voxel is {lo:g})")
                ok = False
        if empties:
            empty.append((src.path, tuple(empties), src.volumes is not None))
        elif ok:
            channels.update(per)
            grids.append((grid, tuple(per)))

    labels = label_grid = None
    if plan.labels is None:
        if require_labels:
            if plan.labels_expected is not None:
                problem(plan.labels_expected, "missing file")
            else:
                problem(plan.folder / case_id, "a test case has no label file (labels are required)")
    else:
        got = _load_file(plan.labels, as_labels=True, source=None, problem=problem)
        if got is not None:
            data_c, label_grid = _grid(plan.labels, *got)
            labels = _check_labels(plan.labels, data_c, info, problem)
            if labels is None:
                label_grid = None

    if empty:
        n_empty = sum(len(m) for _, m, _ in empty)
        if n_empty == len(info.modalities) and len(empty) > 1:
            names = ", ".join(p.name for p, _, _ in empty)
            problem(plan.folder, f"every image of the case is empty (all voxels are zero): {names}")
        else:
            for path, mods, is_4d in empty:
                if is_4d and n_empty < len(info.modalities):
                    problem(path, f"channel(s) {', '.join(mods)} empty (all voxels are zero)")
                else:
                    problem(path, "image is empty (all voxels are zero)")
    if problems:
        return None, problems

    ref = label_grid if label_grid is not None else grids[0][0]
    resampled: list[str] = []
    reasons: list[str] = []
    for grid, mods in grids:
        if geometry.same_grid(grid.shape, grid.affine, ref.shape, ref.affine):
            continue
        if not geometry.grids_overlap(grid.shape, grid.affine, ref.shape, ref.affine):
            problem(grid.path, f"its field of view does not overlap {ref.path.name}'s (check the affines)")
            continue
        for m in mods:
            channels[m] = geometry.resample_to_grid(channels[m], grid.affine, ref.shape, ref.affine, order=1)
            if not np.any(channels[m]):
                problem(
                    grid.path, f"image is empty on {ref.path.name}'s grid (its non-zero voxels lie outside)"
                )
        resampled.extend(mods)
        if grid.shape != ref.shape:
            reasons.append(f"{grid.path.name}: shape {grid.shape} vs {ref.shape}")
        else:
            diff = float(np.max(np.abs(grid.affine - ref.affine)))
            reasons.append(f"{grid.path.name}: affine differs by up to {diff:.4g} mm")
    if problems:
        return None, problems
    if resampled:
        _log.info(
            "case %s: %s resampled onto the grid of %s (%s)",
            case_id,
            ", ".join(resampled),
            ref.path.name,
            "; ".join(reasons),
        )

    image = np.stack([channels[m] for m in info.modalities], axis=-1).astype(np.float32, copy=False)
    paths: dict[str, str] = {}
    for src in plan.images:
        for m in src.modalities:
            paths[m] = str(src.path)
    if plan.labels is not None:
        paths["labels"] = str(plan.labels)
    meta: dict[str, Any] = {
        "layout": info.layout,
        "convention": info.convention,
        "source": {
            "file": os.path.abspath(ref.path),  # absolute: write_like_input reads its header later
            "format": ref.facts.get("format"),
            "shape": [int(s) for s in ref.original_shape],
            "affine": np.asarray(ref.original_affine).tolist(),
            "qform_code": ref.facts.get("qform_code"),
            "sform_code": ref.facts.get("sform_code"),
            "orientation": np.asarray(ref.ornt).astype(int).tolist(),
        },
    }
    if resampled:
        meta["resampled"] = resampled
    case = Case(
        case_id=case_id,
        image=image,
        labels=labels,
        affine=np.asarray(ref.affine, np.float64),
        modalities=tuple(info.modalities),
        paths=paths,
        meta=meta,
    )
    return case, []


def _check_labels(path: Path, data: np.ndarray, info, problem) -> np.ndarray | None:
    """Checked and renumbered / mapped int32 labels, or ``None`` after reporting the problem."""
    if np.issubdtype(data.dtype, np.floating):
        frac = data != np.round(data)
        if frac.any():
            example = float(data[frac].flat[0])
            problem(path, f"label values must be integers (found {example:g})")
            return None
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        problem(path, f"label map has non-numeric dtype {data.dtype}")
        return None
    limits = np.iinfo(np.int32)
    lo, hi = data.min(), data.max()
    if hi > limits.max or lo < limits.min:  # labels are stored as int32; larger values would wrap around
        example = hi if hi > limits.max else lo
        problem(path, f"label values must fit in int32 (found {example:.10g})")
        return None
    values = np.unique(data).astype(np.int64)
    if info.native_labels is None:
        bad = values[values < 0]
        allowed = "non-negative integers"
    else:
        bad = values[~np.isin(values, info.native_labels)]
        allowed = "{" + ", ".join(str(v) for v in info.native_labels) + "}"
    if bad.size:
        problem(path, f"label values outside the {info.label_set_name} set {allowed}: {_show_values(bad)}")
        return None
    labels = data.astype(np.int32, copy=False)
    lm = info.get_label_map()
    if lm is not None:
        unknown = lm.unknown(values)
        if unknown.size:
            problem(
                path,
                f"label ids not in the label map {lm.name}: {_show_values(unknown)} (list them under "
                '"background", or set "unmapped": "background")',
            )
            return None
        return lm.apply(labels)
    if info.remap:
        if all(int(k) == int(v) for k, v in info.remap.items()):
            return labels
        table = np.zeros(max(info.native_labels) + 1, np.int32)
        for native, loaded in info.remap.items():
            table[int(native)] = int(loaded)
        return table[labels]
    return labels


def _show_values(values: np.ndarray) -> str:
    return ", ".join(str(int(v)) for v in values[:10]) + (", ..." if values.size > 10 else "")


def load_case(
    root: str | os.PathLike,
    case_id: str,
    layout: str | Layout,
    *,
    require_labels: bool = True,
    read_labels: bool = True,
    info=None,
    label_map: str | None = None,
) -> Case:
    """Read one case of ``root`` (images float32, labels int32, canonical RAS orientation).

    Args:
      root: data folder.
      case_id: one of :func:`list_cases`.
      layout: one of :data:`LAYOUT_NAMES` (or a :class:`Layout`).
      require_labels: if False, a missing label file gives ``labels=None`` (inference).
      read_labels: if False, the label file is not read even when it is there (``labels=None``;
        the images' grid is the case's: prediction).
      info: the data set's :func:`dataset_info` (looked up when not given).
      label_map: ``freesurfer`` / ``parcellation``: ``"paper14"`` or a JSON label map (when no
        ``info`` is given).

    Raises:
      DataError: listing every problem found, each with the file concerned.
    """
    case, problems = inspect_case(
        root,
        case_id,
        layout,
        require_labels=require_labels,
        read_labels=read_labels,
        info=info,
        label_map=label_map,
    )
    if problems:
        raise DataError(problems)
    return case


def load_files(
    paths: Sequence[str | os.PathLike],
    modalities: Sequence[str],
    *,
    case_id: str,
    volumes: Sequence[int] | None = None,
) -> Case:
    """One case from image files outside any layout (inference input), without labels.

    ``paths`` gives one file per modality, in the order of ``modalities``; or a single 4-D file
    holding them all, ``volumes`` then naming the index along its fourth axis of each modality
    (default ``0 .. n-1``). The files get the checks and the geometry handling of
    :func:`load_case` (closest-RAS orientation, other grids resampled onto the first file's),
    and ``Case.meta["source"]`` is the first file, so that results can be written back on its grid.

    Raises:
      DataError: listing every problem found, each with the file concerned.
    """
    from timm_jax.data.layouts import DatasetInfo

    files = [Path(p) for p in paths]
    mods = tuple(str(m) for m in modalities)
    if len(files) == 1 and len(mods) > 1:
        order = tuple(range(len(mods))) if volumes is None else tuple(int(v) for v in volumes)
        what = f"the {len(mods)} modalities {', '.join(mods)}"
        n = max(order) + 1 if volumes is not None else len(mods)
        images = (ImageSource(files[0] if is_file(files[0]) else None, files[0], mods, order, n, what),)
    elif len(files) == len(mods):
        images = tuple(ImageSource(f if is_file(f) else None, f, (m,)) for f, m in zip(files, mods))
    else:
        raise DataError(
            f"case {case_id}: {len(files)} file(s) for the {len(mods)} modalities {', '.join(mods)}"
        )
    info = DatasetInfo(
        layout="files", convention="files", root=str(files[0].parent), modalities=mods, native_labels=None
    )
    plan = CasePlan(case_id, files[0].parent, images, None, None)
    case, problems = _read_case(plan, info, require_labels=False)
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
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
