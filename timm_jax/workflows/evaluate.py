"""Evaluate a run on a split of its task, and the forgetting of source tasks: what ``evaluate.py`` calls."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from timm_jax.atomic import writable_dir, write_json
from timm_jax.config import DeviceConfig, EvalConfig
from timm_jax.core.partition import join, select_like, split
from timm_jax.data.spec import DataSpec, resolve
from timm_jax.errors import CheckpointError, ConfigError
from timm_jax.progress import bar
from timm_jax.runs.bundle import is_bundle
from timm_jax.runs.models import load_model, short_names, training_patch
from timm_jax.training.events import Events
from timm_jax.training.inference import make_predictor
from timm_jax.training.metrics import (
    convention,
    evaluate_case,
    save_prediction_nifti,
    summarize,
    write_results,
)
from timm_jax.training.parallel import DataParallel
from timm_jax.training.rundir import RunPaths
from timm_jax.workflows.report import prediction_slice

__all__ = ["evaluate_forgetting", "evaluate_model"]

_log = logging.getLogger(__name__)
_PREVIEWS = 3  # prediction slices written to TensorBoard per evaluation


def _inference_patch(run_dir: str, meta: dict, cfg: EvalConfig) -> tuple[int, ...]:
    """``--patch`` if given, else the run's training patch (one log line for runs validated on
    whole volumes, i.e. written before validation used sliding windows)."""
    if cfg.patch:
        return tuple(cfg.patch)
    patch = training_patch(meta)
    if patch is None:
        raise CheckpointError(f"{run_dir} records no training patch; pass --patch=D,H,W")
    train = meta.get("train") or {}
    if train and "val_overlap" not in train:
        _log.info(
            "[evaluate] %s was written before validation used sliding windows (its early stopping "
            "saw whole volumes); evaluating with sliding windows at its training patch %s",
            run_dir,
            "x".join(map(str, patch)),
        )
    return patch


def evaluate_model(
    run_dir: str,
    cfg: EvalConfig = EvalConfig(),
    *,
    out_dir: str = "",
    data_dir: str = "",
    params_override=None,
    spec_override: DataSpec | None = None,
    devices: DeviceConfig | None = None,
) -> dict:
    """Evaluation of a run's best checkpoint (or of a model bundle) on one split of its task.

    Writes ``<out_dir>/per_case.csv`` and ``summary.json`` (and ``predictions/*.nii.gz``);
    returns the summary. Each volume is predicted with Gaussian-weighted sliding windows
    (``cfg.overlap``) of the run's training patch (:func:`training_patch`), or of ``cfg.patch``
    when given — the prediction function validation uses. ``params_override`` evaluates other
    parameters of the same architecture, ``spec_override`` other data. ``devices``: the mesh
    (``None``: one device); sliding windows are then predicted one per device per call, and in
    a multi-process run only process 0 writes files. A bundle holds no data and is not written
    into: it needs ``data_dir`` (or ``spec_override``) and ``out_dir``.
    """
    dp = DataParallel.setup(devices)
    _bundle_needs(
        run_dir, out_dir=out_dir, data_dir=data_dir or (spec_override.data_dir if spec_override else "")
    )
    run_dir, model, model_cfg, params, meta = load_model(run_dir)
    if params_override is not None:
        params = params_override
    new_dir = {"data_dir": data_dir} if data_dir else {}
    if spec_override is not None:
        spec = spec_override.replace(**new_dir)
    else:  # a bundle records no data folder: from_dict needs it given
        spec = DataSpec.from_dict({**meta["data"], **new_dir})
    data = resolve(spec)
    if not data.splits.get(cfg.split):
        raise ConfigError(f"--split={cfg.split} has no cases (have {sorted(data.splits)})")
    n_in = data.in_channels
    recorded = (meta.get("data_info") or {}).get("modalities")
    if recorded and list(recorded) != list(data.info.modalities):
        raise CheckpointError(
            f"{run_dir} was trained on the modalities {list(recorded)}, the data in {spec.data_dir} "
            f"have {list(data.info.modalities)}"
        )
    if (n_in, data.task.num_channels) != (model_cfg.in_channels, model_cfg.out_channels):
        raise CheckpointError(
            f"{run_dir} is a {model_cfg.in_channels}→{model_cfg.out_channels} channel "
            f"model, the data need {n_in}→{data.task.num_channels}"
        )
    out_dir = out_dir or RunPaths(run_dir).eval_dir(cfg.split)
    if dp.is_main:
        writable_dir(out_dir)
    patch = _inference_patch(run_dir, meta, cfg)
    if any(p % model_cfg.divisor for p in patch):
        raise ConfigError(f"--patch {list(patch)} must be divisible by {model_cfg.divisor} (2^(depth-1))")
    predict = make_predictor(model, patch, overlap=cfg.overlap, mesh=dp.mesh)
    params = dp.replicate(params)
    ids = data.splits[cfg.split]
    _log.info(
        "[evaluate] %s: %d %s cases of task %s, sliding windows %s (overlap %g); on %s",
        run_dir,
        len(ids),
        cfg.split,
        data.task.name,
        "x".join(map(str, patch)),
        cfg.overlap,
        dp.describe(),
    )
    rows = []
    with Events(out_dir) as events, bar(len(ids), f"[evaluate] {cfg.split}", "case") as progress:
        for i, (cid, case) in enumerate(zip(ids, data.load(ids, mmap=True))):
            probs = predict(params, case.image)
            rows.append(
                {
                    "case": cid,
                    **evaluate_case(
                        probs,
                        data.task.targets(case.labels),
                        data.task.channel_names,
                        spacing=case.spacing,
                        compute_hd95=cfg.hd95,
                        empty_regions=cfg.empty_regions,
                    ),
                }
            )
            if cfg.save_predictions and dp.is_main:
                save_prediction_nifti(
                    data.task.decode(probs),
                    case.affine,
                    os.path.join(out_dir, "predictions", f"{cid}.nii.gz"),
                )
            if i < _PREVIEWS:
                events.image(
                    f"predictions/{cid}",
                    prediction_slice(case.image[..., 0], case.labels, data.task.decode(probs)),
                )
            progress.update()
            if (i + 1) % 10 == 0:
                _log.info("[evaluate] %d/%d cases", i + 1, len(ids))
        events.scalars(
            0,
            {f"eval/{cfg.split}/{k}": np.mean([r[k] for r in rows]) for k in rows[0] if k.startswith("dice")},
        )
    extra = {
        "run": run_dir,
        "split": cfg.split,
        "task": data.task.name,
        "channels": list(data.task.channel_names),
    }
    if dp.is_main:
        csv_path, json_path = (os.path.join(out_dir, f) for f in ("per_case.csv", "summary.json"))
        summary = write_results(
            rows, csv_path, json_path, extra=extra, convention=convention(cfg.empty_regions)
        )
    else:
        summary = {
            "n_cases": len(rows),
            "metrics": summarize(rows),
            "extra": extra,
            "convention": convention(cfg.empty_regions),
        }
    m = summary["metrics"]
    _log.info(
        "[evaluate] mean Dice %.3f %s -> %s",
        m["dice_mean"]["mean"],
        " ".join(f"{c} {m[f'dice_{c}']['mean']:.3f}" for c in data.task.channel_names),
        out_dir,
    )
    return summary


def _bundle_needs(path: str, role: str = "--run", *, out_dir: str | None = None, data_dir: str | None = None):
    """Refuse a model bundle given without what it needs: ``out_dir`` (nothing is written into a
    bundle) and ``data_dir`` (it holds no data); a ``None`` argument is not checked."""
    if not is_bundle(path):
        return
    if out_dir is not None and not out_dir:
        raise ConfigError(f"{role}={path} is a model bundle, which is not written into: give --out")
    if data_dir is not None and not data_dir:
        raise ConfigError(
            f"{role}={path} is a model bundle, which holds no data: give --data_dir (the folder of its "
            "task's cases, in the layout the bundle records)"
        )


def evaluate_forgetting(
    run_dir: str,
    source_dirs: Sequence[str],
    cfg: EvalConfig = EvalConfig(),
    *,
    out_dir: str = "",
    data_dir: str = "",
    devices: DeviceConfig | None = None,
) -> dict:
    """Paper Table 4: how well a fused or fine-tuned model still solves the source tasks.

    For each source run (or bundle), the run's transferable leaves are combined with the
    *source's* task-specific leaves (norms, heads, shape-mismatched leaves) and evaluated on the
    source's own split. Writes ``<out_dir>/<source>/`` per source and ``forgetting.json``.
    ``data_dir`` replaces every source's data folder (the sources' tasks share one folder, as the
    paper's HCP tasks do); a bundle source needs it, a bundle ``run_dir`` needs ``out_dir``.
    """
    real = [os.path.realpath(s) for s in source_dirs]
    if len(set(real)) != len(real):
        raise ConfigError(f"--forgetting names one source run twice: {list(source_dirs)}")
    _bundle_needs(run_dir, out_dir=out_dir)
    for src in source_dirs:
        _bundle_needs(src, "--forgetting", data_dir=data_dir)
    params = load_model(run_dir).params
    root = out_dir or RunPaths(run_dir).forgetting_dir()
    results = {}
    for src, name in zip(source_dirs, short_names(source_dirs)):  # a/m1, b/m1 -> a_m1, b_m1
        src_params = load_model(src, ("train",)).params
        part = split(src_params, reference=params)
        combo = join(select_like(params, part.transferable), part.task_specific)
        _log.info("[forgetting] %s with the task-specific leaves of %s", run_dir, src)
        results[name] = evaluate_model(
            src,
            cfg,
            params_override=combo,
            out_dir=os.path.join(root, name),
            data_dir=data_dir,
            devices=devices,
        )
    if DataParallel.setup(devices).is_main:
        write_json(
            os.path.join(root, "forgetting.json"), {k: v["metrics"]["dice_mean"] for k, v in results.items()}
        )
    return results
