"""Case-level segmentation metrics, result files and prediction export.

* :func:`dice_score` — the Dice coefficient ``2|P ∩ T| / (|P| + |T|)`` of two binary masks,
  the metric of the T-IMM paper (averaged over the relevant labels / BraTS regions).
* :func:`hd95` — the 95th percentile of the symmetric surface distances in mm (the robust
  Hausdorff distance reported by the BraTS challenge).
* :func:`evaluate_case` — both metrics per output channel from sigmoid probabilities.
* :func:`write_results` — a per-case CSV and a summary JSON (mean / std / median per metric).

Empty regions (:data:`EMPTY_REGIONS`, ``EvalConfig.empty_regions``): with ``"brats"`` (the default)
a region empty in both the reference and the prediction scores Dice 1 and HD95 0, and one empty in
exactly one of them Dice 0 and HD95 :data:`BRATS_HD95_PENALTY` mm, so every case has a finite value
and none is dropped from the means; ``"nan"`` (the behaviour before) gives such a case HD95 ``nan``,
and the summary's nan-aware means leave it out. Dice is the same under both. :func:`convention`
describes the one used, for ``summary.json``.
* :func:`save_prediction_nifti` — a label map as an int16 NIfTI with the source affine.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from timm_jax.atomic import atomic_path, atomic_write
from timm_jax.config import EvalConfig
from timm_jax.errors import writing

__all__ = [
    "BRATS_HD95_PENALTY",
    "EMPTY_REGIONS",
    "convention",
    "dice_score",
    "evaluate_case",
    "hd95",
    "save_prediction_nifti",
    "summarize",
    "surface_distances",
    "write_results",
]


#: how a region empty in the reference or the prediction is scored (see the module docstring)
EMPTY_REGIONS = ("brats", "nan")
#: HD95 (mm) of a region present in exactly one of reference and prediction under the ``"brats"``
#: convention: the diagonal of the BraTS 240 x 240 x 155 volume at 1 mm, sqrt(240² + 240² + 155²),
#: as BraTS 2021-era evaluation code uses; the BraTS 2023 lesion-wise tooling (rachitsaluja/
#: BraTS-2023-Metrics) uses 374 mm instead (docs/method.md, "Metrics")
BRATS_HD95_PENALTY = 373.13


def _check_convention(empty_regions: str) -> None:
    if empty_regions not in EMPTY_REGIONS:
        raise ValueError(f"empty_regions must be one of {EMPTY_REGIONS}, got {empty_regions!r}")


def convention(empty_regions: str = EvalConfig.empty_regions) -> dict[str, Any]:
    """The scoring convention as recorded in ``summary.json`` (``"convention"``)."""
    _check_convention(empty_regions)
    if empty_regions == "brats":
        one = f"Dice 0, HD95 {BRATS_HD95_PENALTY} mm (BraTS)"
    else:
        one = "Dice 0, HD95 nan (left out of the HD95 statistics)"
    return {
        "empty_regions": empty_regions,
        "both_empty": "Dice 1, HD95 0",
        "one_empty": one,
        "hd95_penalty_mm": BRATS_HD95_PENALTY if empty_regions == "brats" else None,
        "hd95": "95th percentile of the pooled symmetric distances between the 6-connected surface "
        "voxels of prediction and reference, in mm with the evaluation grid's voxel spacing",
    }


def _as_masks(pred: Any, truth: Any, fn: str):
    pred = np.asarray(pred).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"{fn}: pred and truth shapes differ: {pred.shape} vs {truth.shape}")
    return pred, truth


def dice_score(pred: Any, truth: Any) -> float:
    """Dice coefficient ``2 |P ∩ T| / (|P| + |T|)`` of two boolean masks of equal shape.

    Convention: if both masks are empty the prediction is perfect and the score is 1.0
    (an empty prediction of a non-empty truth, or vice versa, scores 0.0).
    """
    pred, truth = _as_masks(pred, truth, "dice_score")
    denom = int(pred.sum()) + int(truth.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, truth).sum() / denom)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (the volume border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def surface_distances(pred: Any, truth: Any, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The symmetric surface distances (mm) between two non-empty masks.

    The surface of a mask is the set of its voxels with a face-neighbour (6-connectivity
    in 3D) outside the mask or outside the volume. The result concatenates, for every
    surface voxel of ``pred``, the Euclidean distance (with voxel ``spacing``) to the
    nearest surface voxel of ``truth``, and the same from ``truth`` to ``pred``
    (computed with :func:`scipy.ndimage.distance_transform_edt`).
    """
    pred, truth = _as_masks(pred, truth, "surface_distances")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"surface_distances: spacing {spacing} does not match mask ndim {pred.ndim}")
    if not pred.any() or not truth.any():
        raise ValueError("surface_distances: both masks must be non-empty")
    sp, st = _surface(pred), _surface(truth)
    dist_to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return np.concatenate([dist_to_truth[sp], dist_to_pred[st]])


def hd95(
    pred: Any,
    truth: Any,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    empty_regions: str = EvalConfig.empty_regions,
) -> float:
    """95th percentile (numpy's linear interpolation) of the symmetric surface distances in mm.

    The distances from every surface voxel of ``pred`` to the surface of ``truth`` and from
    every surface voxel of ``truth`` to the surface of ``pred`` are pooled into one set (see
    :func:`surface_distances`) and its 95th percentile is returned. (Some toolkits instead
    take the maximum of the two directed 95th percentiles; the two agree for symmetric
    configurations such as shifted copies of one shape.)

    Conventions: both masks empty → 0.0 (perfect agreement); exactly one empty →
    :data:`BRATS_HD95_PENALTY` with ``empty_regions="brats"`` (the default), ``nan`` with
    ``"nan"`` (the distance is undefined; aggregate with nan-aware statistics).
    """
    _check_convention(empty_regions)
    pred, truth = _as_masks(pred, truth, "hd95")
    has_p, has_t = bool(pred.any()), bool(truth.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return BRATS_HD95_PENALTY if empty_regions == "brats" else float("nan")
    return float(np.percentile(surface_distances(pred, truth, spacing), 95))


def evaluate_case(
    probs: Any,
    truth_targets: Any,
    channel_names: Sequence[str],
    spacing: Sequence[float] | None = None,
    compute_hd95: bool = True,
    threshold: float = 0.5,
    empty_regions: str = EvalConfig.empty_regions,
) -> dict[str, float]:
    """Per-channel Dice (and HD95) of one case.

    Channel ``k`` is predicted as ``probs[..., k] > threshold`` and compared with
    ``truth_targets[..., k] > 0.5``. Returns ``{"dice_<name>": ..., "hd95_<name>": ...}`` for
    every channel name (HD95 in mm with voxel ``spacing``, default (1, 1, 1); omitted when
    ``compute_hd95`` is False) and ``"dice_mean"``, the mean Dice over the channels. A channel
    empty in the truth or the prediction is scored by ``empty_regions`` (:data:`EMPTY_REGIONS`).

    Args:
      probs: (D, H, W, K) sigmoid probabilities.
      truth_targets: (D, H, W, K) binary targets (e.g. ``task.targets(labelmap)``).
      channel_names: K names, e.g. ``("WT", "TC", "ET")``.
    """
    probs = np.asarray(probs)
    truth = np.asarray(truth_targets)
    names = list(channel_names)
    if probs.ndim != 4 or probs.shape != truth.shape:
        raise ValueError(
            f"evaluate_case: probs and truth_targets must both be (D, H, W, K) of equal shape; "
            f"got {probs.shape} and {truth.shape}"
        )
    if probs.shape[-1] != len(names):
        raise ValueError(f"evaluate_case: {probs.shape[-1]} channels but {len(names)} channel names {names}")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    out: dict[str, float] = {}
    dices = []
    for k, name in enumerate(names):
        p = probs[..., k] > threshold
        t = truth[..., k] > 0.5
        d = dice_score(p, t)
        dices.append(d)
        out[f"dice_{name}"] = d
        if compute_hd95:
            out[f"hd95_{name}"] = hd95(p, t, spacing, empty_regions=empty_regions)
    out["dice_mean"] = float(np.mean(dices))
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _json_safe(v: Any) -> Any:
    """Python scalars/containers for json; non-finite floats become ``None``."""
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return _json_safe(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return v


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Nan-aware statistics over cases for every numeric column (all but ``case``).

    For each metric: ``mean`` (np.nanmean), ``std`` (np.nanstd, population, ddof=0),
    ``median`` (np.nanmedian) over the finite values, and ``n_valid``, the number of cases
    with a finite value. Statistics of a metric with no finite value are ``nan``.
    """
    names: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k != "case" and k not in names and _is_number(v):
                names.append(k)
    stats: dict[str, dict[str, Any]] = {}
    for name in names:
        vals = np.array(
            [float(r[name]) if _is_number(r.get(name)) else np.nan for r in rows], dtype=np.float64
        )
        vals[~np.isfinite(vals)] = np.nan
        n_valid = int(np.isfinite(vals).sum())
        if n_valid == 0:
            stats[name] = {"mean": math.nan, "std": math.nan, "median": math.nan, "n_valid": 0}
        else:
            stats[name] = {
                "mean": float(np.nanmean(vals)),
                "std": float(np.nanstd(vals)),
                "median": float(np.nanmedian(vals)),
                "n_valid": n_valid,
            }
    return stats


def write_results(
    rows: list[dict[str, Any]],
    csv_path: str,
    json_path: str,
    extra: dict[str, Any] | None = None,
    convention: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes per-case metrics to ``csv_path`` and their summary to ``json_path``.

    The CSV has one row per case; its columns are ``case`` first, then every other key in
    the order first seen over the rows (missing values are left empty, nan is written as
    ``nan``). The JSON is ``{"n_cases": N, "metrics": {metric: {"mean", "std", "median",
    "n_valid"}}, "extra": extra}`` with the statistics of :func:`summarize` (and
    ``"convention"``, the scoring of empty regions, when given: :func:`convention`); non-finite
    numbers are written as ``null``. Parent directories are created. Returns the summary.

    Raises:
      ValueError: if a row has no ``case`` key.
    """
    for i, row in enumerate(rows):
        if "case" not in row:
            raise ValueError(f"write_results: row {i} has no 'case' key: {sorted(row)}")
    columns = ["case"]
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    # the summary is the pair's commit mark: removed first, written last, so that a kill in between
    # leaves a CSV without a summary (unfinished), never a new CSV beside an old summary
    with writing(json_path):
        if os.path.lexists(json_path):
            os.unlink(json_path)
    with atomic_write(csv_path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            cells = []
            for c in columns:
                v = row.get(c, "")
                if isinstance(v, (float, np.floating)):
                    v = repr(float(v))
                elif isinstance(v, np.integer):
                    v = int(v)
                cells.append(v)
            writer.writerow(cells)
    summary = {"n_cases": len(rows), "metrics": summarize(rows), "extra": dict(extra or {})}
    if convention is not None:
        summary["convention"] = dict(convention)
    with atomic_write(json_path, fault_point="results.summary") as f:
        json.dump(_json_safe(summary), f, indent=2, allow_nan=False)
    return summary


def save_prediction_nifti(labelmap: Any, affine: Any, path: str) -> None:
    """Saves an integer label map (D, H, W) as an int16 NIfTI with the given 4×4 ``affine``.

    Raises:
      ValueError: for a non-3-D label map, a non-integer or out-of-int16-range label, or an
        affine that is not a finite 4×4 matrix.
    """
    import nibabel as nib

    lab = np.asarray(labelmap)
    if lab.ndim != 3:
        raise ValueError(f"save_prediction_nifti: label map must be 3-D, got shape {lab.shape}")
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise ValueError("save_prediction_nifti: label map has non-integer values")
    elif lab.dtype.kind not in "iub":
        raise ValueError(f"save_prediction_nifti: label map dtype {lab.dtype} is not integer")
    if lab.size and (lab.min() < np.iinfo(np.int16).min or lab.max() > np.iinfo(np.int16).max):
        raise ValueError(f"save_prediction_nifti: labels [{lab.min()}, {lab.max()}] do not fit into int16")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"save_prediction_nifti: affine must be a finite 4x4 matrix, got {aff.shape}")
    img = nib.Nifti1Image(lab.astype(np.int16), aff)
    img.set_data_dtype(np.int16)
    img.header["scl_slope"] = 1
    img.header["scl_inter"] = 0
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
