"""Export a trained run as a model bundle: what ``python -m timm_jax.bundle export`` calls; and
:func:`source_fisher_any`, the Fisher of a run or a bundle.

The bundle (format in :mod:`timm_jax.runs.bundle` and ``docs/bundles.md``) is written into a
temporary directory beside ``out`` and renamed into place when complete, so a bundle on disk is
always whole. It holds the run's best parameters, the Fisher(s) asked for — the empirical one is
computed on the run's training data if its cache is missing
(:func:`~timm_jax.runs.fisher_cache.source_fisher`, which caches it), the Adam one read from the
checkpoint's optimiser state — and a description with no path to the training data:
``data_dir``, ``cache_dir``, manifest and split files are left out,
and the case ids too unless ``include_case_ids`` (case ids can identify patients).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import timm_jax
from timm_jax.atomic import atomic_dir
from timm_jax.config import DeviceConfig, FuseConfig
from timm_jax.core.partition import to_flat_dict
from timm_jax.errors import ConfigError, writing
from timm_jax.runs import fisher_cache
from timm_jax.runs.bundle import (
    BUNDLE_FILE,
    CARD_FILE,
    FISHER_KINDS,
    FORMAT,
    PARAMS_FILE,
    VERSION,
    BundleError,
    bundle_fisher,
    file_sha256,
    fisher_file,
    is_bundle,
    open_bundle,
    run_modalities,
)
from timm_jax.runs.models import load_model
from timm_jax.training.parallel import DataParallel
from timm_jax.training.rundir import RunDir, read_metrics

__all__ = ["code_version", "export_bundle", "source_fisher_any"]

_log = logging.getLogger(__name__)
#: the data-spec fields a bundle keeps (how to read and preprocess inputs); paths are left out
_DATA_FIELDS = ("layout", "label_map", "labels", "task_key", "normalisation", "spacing")


def code_version() -> dict:
    """The package version and, when the code is a git checkout, its commit and whether it had
    uncommitted changes (``None`` when git or the checkout is not there)."""
    here = os.path.dirname(os.path.abspath(timm_jax.__file__))
    out = {"package": "timm_jax", "version": timm_jax.__version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            out["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _plain_name(value: str) -> str:
    """A label-map setting without its folder (``paper14`` stays, ``/x/y/map.json`` -> ``map.json``)."""
    return os.path.basename(value) if value and (os.sep in value or "/" in value) else value


def _data_record(meta: dict) -> dict:
    spec = meta.get("data") or {}
    out = {k: spec.get(k) for k in _DATA_FIELDS if k in spec}
    if out.get("label_map"):
        out["label_map"] = _plain_name(out["label_map"])
    return out


def _data_info_record(meta: dict, model_cfg) -> dict:
    info = dict(meta.get("data_info") or {})
    if not info:  # a run written before data_info was recorded
        layout = (meta.get("data") or {}).get("layout", "")
        task = meta.get("task") or {}
        info = {
            "layout": layout,
            "convention": {"brats": "brats2018"}.get(layout, layout),
            "modalities": run_modalities(meta),
            "task": task or None,
        }
    info["root"] = ""  # the training data's folder: not part of a bundle
    if isinstance(info.get("label_map"), dict):
        info["label_map"] = {**info["label_map"], "name": _plain_name(str(info["label_map"].get("name", "")))}
    return info


def _validation(run_dir: str, best_epoch) -> dict:
    """The best epoch's validation record from metrics.jsonl (empty if it has none)."""
    try:
        records = read_metrics(run_dir)
    except (OSError, ValueError):
        return {}
    best = next((r for r in records if r.get("epoch") == best_epoch), None)
    if best is None:
        return {}
    return {k: best.get(k) for k in ("epoch", "val_loss", "val_dice_mean", "val_dice", "step") if k in best}


def _fisher(run_dir: str, kind: str, patches_per_case: int, dp: DataParallel) -> tuple[dict, dict]:
    """``(fisher, settings)``: the cache key of the Fisher used (patch, patches per case, seed, step)."""
    if kind == "adam":
        fisher = fisher_cache.adam_source_fisher(run_dir)
        with RunDir.open(run_dir, ("train",)) as run:
            which = run.best_or_latest()
            settings = {
                "kind": "adam",
                "checkpoint": which,
                "step": run.latest_step(which),
                "run_key": run.meta.get("run_key"),
                "estimate": "bias-corrected Adam second moment nu / (1 - beta2^t) of the checkpoint",
            }
        return fisher, settings
    fisher = fisher_cache.source_fisher(run_dir, kind=kind, patches_per_case=patches_per_case, dp=dp)
    cache = os.path.join(run_dir, "fisher", fisher_file(kind))
    with np.load(cache, allow_pickle=False) as z:
        settings = json.loads(str(z["__key__"]))
        cached = {k: z[k] for k in z.files if k != "__key__"}
    flat = to_flat_dict(fisher)
    if settings.get("patches_per_case") != patches_per_case or not all(
        np.array_equal(cached[k], np.asarray(v)) for k, v in flat.items()
    ):  # another process replaced the cache meanwhile
        raise BundleError(f"the Fisher cache {cache} changed while the bundle was written; run again")
    return fisher, settings


def source_fisher_any(
    path: str,
    kind: str = "empirical",
    *,
    max_examples: int = 0,
    patches_per_case: int = FuseConfig().fisher_patches,
    dp: DataParallel = DataParallel(),
) -> dict:
    """The ``kind`` Fisher of a source: stored in a model bundle (:func:`bundle_fisher`; it cannot be
    computed again, its data are not there), else :func:`timm_jax.runs.fisher_cache.source_fisher` of
    the run directory (computed on its training data, cached)."""
    if is_bundle(path):
        return bundle_fisher(path, kind, patches_per_case=patches_per_case)
    return fisher_cache.source_fisher(
        path, kind=kind, max_examples=max_examples, patches_per_case=patches_per_case, dp=dp
    )


def _finite(v):
    """``v`` with non-finite floats as ``None`` (JSON has no NaN)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _savez(path: Path, flat: dict) -> None:
    with writing(path), open(path, "wb") as f:
        np.savez(f, **{k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()})


def _model_card(rec: dict) -> str:
    src, task, info = rec["source"], rec["task"], rec["data_info"]
    val = src.get("validation") or {}
    dice = val.get("val_dice_mean")
    per = val.get("val_dice") or []
    names = task.get("channel_names") or []
    per_text = ", ".join(f"{n} {d:.3f}" for n, d in zip(names, per) if isinstance(d, (int, float)))
    fishers = ", ".join(
        f"{k} ({v['settings'].get('patches_per_case', '-')} patches per case)" if k != "adam" else "adam"
        for k, v in rec["fishers"].items()
    )
    m, t = rec["model"], rec["train"]
    spacing = rec["data"].get("spacing") or 0
    lines = [
        f"# Model card: {task.get('name')} ({rec['id']})",
        "",
        f"A 3D U-Net (Isensee et al. 2017; base filters {m['base_filters']}, depth {m['depth']}) trained "
        f"with timm_jax {rec['code']['version']} to segment **{task.get('name')}** "
        f"({task.get('kind')}: {', '.join(names)}) from the MR modalities "
        f"{', '.join(info.get('modalities') or [])} (in this channel order).",
        "",
        "## Training",
        "",
        f"- Data: layout `{rec['data'].get('layout')}` (convention `{info.get('convention')}`), "
        f"{src.get('n_train_cases')} training and {src.get('n_val_cases')} validation cases "
        f"(fraction {src.get('fraction')} of the annotated pool).",
        f"- Preprocessing: crop to the non-zero box, `{rec['data'].get('normalisation')}` normalisation, "
        + (f"resampled to {spacing} mm" if spacing else "native voxel spacing")
        + ", padded to a multiple of 16.",
        f"- Patches {'x'.join(str(p) for p in t['patch_shape'])}, batch {t['batch_size']}, Adam "
        f"{t['learning_rate']}, loss `{t['loss']}`, {src.get('epochs')} epochs; best epoch "
        f"{src.get('best_epoch')}.",
        f"- Initialisation: {src.get('init') or 'random'}.",
        "",
        "## Validation",
        "",
        (
            f"Validation Dice of the best epoch: **{dice:.3f}** (mean over channels; {per_text}), sliding "
            f"windows at the training patch, overlap {t.get('val_overlap')}."
            if isinstance(dice, (int, float))
            else "No validation record was found in the run's metrics.jsonl."
        ),
        "These are numbers on the run's own validation cases, not a test set.",
        "",
        "## Intended use",
        "",
        "Research only — not a medical device. Use as a source for T-IMM fusion (`fuse.py --source=BUNDLE`) "
        "or as an initialisation for fine-tuning on a new task (`train.py --init=transfer "
        "--init_from=BUNDLE`), or predict scans of the same modalities and preprocessing "
        "(`predict.py --run=BUNDLE`). Outside the training distribution (other scanners, sequences, "
        "pathologies) expect lower accuracy.",
        "",
        "## Contents",
        "",
        f"`{PARAMS_FILE}` (best parameters), Fisher(s): {fishers or 'none'}; `{BUNDLE_FILE}` (format "
        f"{FORMAT} version {VERSION}, checksums). **It contains no image** and no path to the training "
        "data; "
        + (
            "it lists the training and validation case ids (exported with --case_ids)."
            if rec.get("case_ids")
            else "the training case ids are left out."
        ),
        "",
    ]
    return "\n".join(lines)


def export_bundle(
    run_dir: str,
    out: str,
    *,
    fishers: Sequence[str] = ("empirical",),
    patches_per_case: int = FuseConfig().fisher_patches,
    include_case_ids: bool = False,
    overwrite: bool = False,
    devices: DeviceConfig | None = None,
) -> str:
    """Write the bundle of the trained run ``run_dir`` to ``out``; returns its path.

    ``fishers``: any of ``empirical``, ``true``, ``adam`` (none: a bundle for fine-tuning and
    prediction only). ``patches_per_case``: the empirical / true Fisher's sampling (the cache key;
    a cached Fisher of other settings is recomputed). An existing ``out`` is refused unless
    ``overwrite`` and it is a bundle (another directory is never replaced).
    """
    kinds = list(dict.fromkeys(fishers))
    bad = [k for k in kinds if k not in FISHER_KINDS]
    if bad:
        raise ConfigError(f"--fisher: unknown kind(s) {bad}; choose from {', '.join(FISHER_KINDS)}")
    if patches_per_case < 1:
        raise ConfigError(f"--fisher_patches must be >= 1, got {patches_per_case}")
    out_path = Path(os.path.abspath(os.path.expanduser(out)))
    if os.path.lexists(out_path):
        if not overwrite:
            raise ConfigError(f"{out_path} exists; choose another --out or pass --overwrite")
        if not is_bundle(out_path):
            raise ConfigError(f"{out_path} exists and is not a model bundle; it is not replaced")
    src = load_model(run_dir, kinds=("train",))
    meta = src.meta
    dp = DataParallel.setup(devices)
    with RunDir.open(src.path, ("train",)) as run:
        which = run.best_or_latest()
        step = run.latest_step(which)
    progress = meta.get("run") or {}
    record = {
        "format": FORMAT,
        "version": VERSION,
        "id": "",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": {
            "run_key": meta.get("run_key"),
            "run_name": os.path.basename(src.path),
            "checkpoint": which,
            "step": step,
            "best_epoch": progress.get("best_epoch"),
            "epochs": progress.get("epoch"),
            "n_train_cases": len(meta.get("train_ids") or []),
            "n_val_cases": len(meta.get("val_ids") or []),
            "fraction": (meta.get("data") or {}).get("fraction"),
            "init": meta.get("init") or "random",
            "validation": _validation(src.path, progress.get("best_epoch")),
        },
        "model": src.cfg.to_dict(),
        "train": dict(meta.get("train") or {}),
        "task": dict(meta.get("task") or {}),
        "data_info": _data_info_record(meta, src.cfg),
        "data": _data_record(meta),
        "code": code_version(),
        "fishers": {},
        "files": {},
    }
    if include_case_ids:
        record["case_ids"] = {
            "train": list(meta.get("train_ids") or []),
            "val": list(meta.get("val_ids") or []),
        }
    computed = {}
    for kind in kinds:
        computed[kind] = _fisher(src.path, kind, patches_per_case, dp)
    if not dp.is_main:
        return str(out_path)
    with atomic_dir(out_path) as tmp_dir:
        tmp = Path(tmp_dir)
        _savez(tmp / PARAMS_FILE, to_flat_dict(src.params))
        for kind, (fisher, settings) in computed.items():
            _savez(tmp / fisher_file(kind), to_flat_dict(fisher))
            record["fishers"][kind] = {"file": fisher_file(kind), "settings": settings}
        record["id"] = file_sha256(tmp / PARAMS_FILE)[:16]
        (tmp / CARD_FILE).write_text(_model_card(record), encoding="utf-8")
        for name in sorted(os.listdir(tmp)):
            record["files"][name] = {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        text = json.dumps(_finite(record), indent=2, allow_nan=False)
        (tmp / BUNDLE_FILE).write_text(text, encoding="utf-8")
        open_bundle(tmp, remember=False)  # what was written reads back
    _log.info(
        "[bundle] wrote %s (id %s): params%s; %s",
        out_path,
        record["id"],
        "".join(f", {k} Fisher" for k in record["fishers"]),
        "with the case ids" if include_case_ids else "no case ids",
    )
    return str(out_path)
