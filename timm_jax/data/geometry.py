"""Voxel grids: degenerate-affine checks, the closest RAS orientation and its inverse, resampling onto a grid.

Every volume is brought to the closest RAS orientation on load: the voxel axes are permuted and
flipped (no interpolation) so that voxel axis 0 points most nearly to the right, axis 1 anterior and
axis 2 superior. This uses nibabel's ``io_orientation`` / ``apply_orientation`` / ``inv_ornt_aff``
(the same code as ``nibabel.as_closest_canonical``), so that oblique affines, ties and the affine
update follow the library every reader of these files uses. The orientation applied is kept as a
``(3, 2)`` array ``ornt`` (nibabel's convention: row ``i`` says which output axis input axis ``i``
becomes and whether it is flipped), and :func:`from_canonical` undoes it exactly.

Modalities whose grid (shape and affine, after reorientation) differs from the reference grid of a
case are resampled onto it by :func:`resample_to_grid` (linear for images, nearest for labels; zero
outside the field of view).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "MIN_VOXEL_MM",
    "MIN_AXES_VOLUME",
    "affine_problem",
    "canonical",
    "from_canonical",
    "same_grid",
    "grids_overlap",
    "resample_to_grid",
    "voxel_sizes",
]

#: a voxel axis shorter than this (mm) counts as zero: the affine is degenerate
MIN_VOXEL_MM = 1e-4
#: the volume spanned by the three unit voxel axes (|det| of the column-normalised 3x3 part) below
#: which the axes count as (nearly) coplanar, i.e. the affine is (nearly) singular; 1 for orthogonal
#: axes, 0.01 is a shear of the third axis to within ~0.6 degrees of the plane of the others
MIN_AXES_VOLUME = 1e-2
#: tolerance (mm, per affine entry) below which two affines describe the same grid
AFFINE_ATOL = 1e-3


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Length (mm) of each voxel axis: the column norms of the affine's 3x3 part."""
    return np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)


def affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` cannot map voxels to the world (non-finite, zero or coplanar axes), or ``None``."""
    a = np.asarray(affine, np.float64)
    if a.shape != (4, 4):
        return f"affine has shape {a.shape}, expected (4, 4)"
    if not np.all(np.isfinite(a)):
        return "affine (voxel-to-world transform of the sform/qform) has non-finite entries"
    sizes = voxel_sizes(a)
    if np.any(sizes < MIN_VOXEL_MM):
        shown = "x".join(f"{s:.3g}" for s in sizes)
        zero = ", ".join(str(i) for i in np.flatnonzero(sizes < MIN_VOXEL_MM))
        return (
            f"affine is degenerate: voxel axis {zero} has zero length (voxel sizes {shown} mm; "
            "check the header's sform/qform and pixdim)"
        )
    volume = abs(float(np.linalg.det(a[:3, :3] / sizes)))
    if volume < MIN_AXES_VOLUME:
        return (
            f"affine is (nearly) singular: its voxel axes are nearly coplanar (|det| of the normalised "
            f"3x3 part is {volume:.3g}, expected near 1)"
        )
    return None


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``data`` (3-D or more; the first three axes are spatial) in the closest RAS orientation.

    Returns:
      ``(data, affine, ornt)``: the reoriented array (a view when nothing moves), its affine, and
      the orientation applied (identity ``[[0, 1], [1, 1], [2, 1]]`` when already RAS).
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    affine = np.asarray(affine, np.float64)
    ornt = io_orientation(affine)
    if _is_identity(ornt):
        return data, affine, ornt
    out = apply_orientation(data, ornt)
    return out, affine @ inv_ornt_aff(ornt, data.shape[:3]), ornt


def _is_identity(ornt: np.ndarray) -> bool:
    return bool(np.array_equal(np.asarray(ornt), [[0, 1], [1, 1], [2, 1]]))


def from_canonical(data: np.ndarray, ornt: Sequence) -> np.ndarray:
    """Undo :func:`canonical`: ``data`` on the canonical grid back to the original voxel axes."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    ornt = np.asarray(ornt, np.float64)
    if _is_identity(ornt):
        return data
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), ornt)
    return apply_orientation(data, back)


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = AFFINE_ATOL) -> bool:
    """Same shape, and affines equal to within ``atol`` mm per entry."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and bool(
        np.allclose(affine_a, affine_b, atol=atol, rtol=0)
    )


def _voxel_map(affine: np.ndarray, ref_affine: np.ndarray) -> np.ndarray:
    """4x4 map from the reference grid's voxel coordinates to those of ``affine``'s grid."""
    return np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(ref_affine, np.float64)


def grids_overlap(shape, affine, ref_shape, ref_affine) -> bool:
    """Whether the reference grid's box, mapped into the other grid, meets that grid's voxels."""
    m = _voxel_map(affine, ref_affine)
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (-0.5, ref_shape[0] - 0.5)
            for j in (-0.5, ref_shape[1] - 0.5)
            for k in (-0.5, ref_shape[2] - 0.5)
        ]
    )
    mapped = corners @ m.T
    lo, hi = mapped[:, :3].min(axis=0), mapped[:, :3].max(axis=0)
    return bool(np.all(hi > -0.5) and np.all(lo < np.asarray(shape[:3], float) - 0.5))


def resample_to_grid(data: np.ndarray, affine, ref_shape, ref_affine, *, order: int) -> np.ndarray:
    """``data`` (3-D) sampled at the voxel centres of the reference grid (0 outside its field of view).

    ``order`` 1 is trilinear (images), 0 nearest neighbour (labels; the dtype is kept).
    """
    from scipy import ndimage

    m = _voxel_map(affine, ref_affine)
    out = ndimage.affine_transform(
        np.asarray(data),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=tuple(int(s) for s in ref_shape[:3]),
        order=order,
        mode="constant",
        cval=0.0,
    )
    return out.astype(data.dtype, copy=False)
