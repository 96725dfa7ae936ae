"""Train one model on one task, and evaluate a checkpoint: what ``train.py``/``evaluate.py`` call.

Initialisations (the paper's Table 1 rows): ``random`` (Glorot, "no transfer"), ``transfer``
(transferable leaves from a trained run; task-specific and shape-mismatched leaves freshly
initialised) and ``fused`` (every leaf from a checkpoint written by ``fuse.py``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable

import jax
import numpy as np

from timm_jax.checkpoint import CheckpointError, RunCheckpoints, find_run, load_params
from timm_jax.config import ModelConfig, TrainConfig
from timm_jax.data.io import LAYOUTS
from timm_jax.data.pipeline import make_train_dataset
from timm_jax.evaluation import evaluate_case, save_prediction_nifti, write_results
from timm_jax.experiment import DataSpec, resolve
from timm_jax.inference import sliding_window_predict
from timm_jax.model import init_params
from timm_jax.partition import join, select_like, shape_mismatches, split
from timm_jax.steps import create_state, make_eval_step, make_optimizer, make_train_step
from timm_jax.training import fit, volume_evaluator

INITS = ("random", "transfer", "fused")


def run_key(*parts: dict) -> str:
    """A short hash identifying a run's configuration (a workdir is bound to one run)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_config_for(data, model_cfg: ModelConfig) -> ModelConfig:
    n_in = len(LAYOUTS[data.spec.layout].modalities)
    return dataclasses.replace(model_cfg, in_channels=n_in, out_channels=data.task.num_channels)


def check_workdir(workdir: str, key: str) -> None:
    """Refuse, before any compute, a workdir that holds checkpoints of another configuration."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints", "latest")):
        return
    ckpt = RunCheckpoints(workdir)
    try:
        if ckpt.latest_step() is None:
            return
        old = ckpt.restore_meta().get("run_key")
    finally:
        ckpt.close()
    if old != key:
        raise CheckpointError(f"{workdir} already holds checkpoints of a run with another configuration "
                              f"(run key {old} vs {key}); use a new --workdir or the original flags")


def load_init(init: str, init_from: str, model_cfg: ModelConfig):
    """Check the initialisation flags and load the checkpoint (before any compute)."""
    if init not in INITS:
        raise ValueError(f"--init must be one of {INITS}, got {init!r}")
    if init == "random":
        if init_from:
            raise ValueError("--init_from was given but --init=random; use --init=transfer or fused")
        return None, None
    if not init_from:
        raise ValueError(f"--init={init} needs --init_from (a run directory)")
    params, meta = load_params(init_from)
    src = ModelConfig.from_dict(meta.get("model", {}))
    if not model_cfg.same_architecture(src):
        raise CheckpointError(
            f"{init_from} holds a network of another architecture (base_filters={src.base_filters}, "
            f"depth={src.depth}) than requested (base_filters={model_cfg.base_filters}, depth={model_cfg.depth})")
    kind = meta.get("kind", "train")
    if init == "fused" and kind != "fused":
        raise ValueError(f"--init=fused but {init_from} is a trained model, not a fuse.py output; use --init=transfer")
    if init == "transfer" and kind == "fused":
        raise ValueError(f"--init=transfer but {init_from} is a fused checkpoint; use --init=fused")
    if kind not in ("train", "fused"):
        raise CheckpointError(f"{init_from} is a {kind!r} run directory, not a model; use a train.py "
                              "workdir or a fuse.py output")
    return params, meta


def train_model(spec: DataSpec, model_cfg: ModelConfig, train_cfg: TrainConfig, workdir: str, *,
                init: str = "random", init_from: str = "", log: Callable[[str], None] = print) -> dict:
    """Train (or resume) one model; returns the run summary (history, best epoch)."""
    data = resolve(spec)
    model_cfg = model_config_for(data, model_cfg)
    src_params, _ = load_init(init, init_from, model_cfg)
    patch = tuple(train_cfg.patch_shape)
    if any(p % model_cfg.divisor for p in patch):
        raise ValueError(f"--patch {patch} must be divisible by {model_cfg.divisor} (2^(depth-1))")
    init_from_abs = os.path.abspath(init_from) if init_from else ""
    meta = {"kind": "train", "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
            "data": spec.to_dict(), "task": data.task.to_dict(), "splits": data.splits,
            "train_ids": data.train_ids, "init": init, "init_from": init_from_abs}
    meta["run_key"] = run_key(meta)
    check_workdir(workdir, meta["run_key"])
    os.makedirs(workdir, exist_ok=True)
    log(f"[train] task {data.task.name}: {len(data.train_ids)} training cases "
        f"(fraction {spec.fraction} of {len(data.splits['train'])}), {len(data.splits['val'])} validation")
    train_cases = data.load(data.train_ids, log=log)
    val_cases = data.load(data.splits["val"], log=log)
    model = model_cfg.build()
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(train_cfg.seed))
    params = init_params(model, init_rng, (1, *patch, model_cfg.in_channels))
    if init == "transfer":
        part = split(params, reference=src_params)
        if not jax.tree_util.tree_leaves(part.transferable):
            raise CheckpointError(f"{init_from} shares no transferable leaf with this network")
        params = join(select_like(src_params, part.transferable), part.task_specific)
        log(f"[train] transfer from {init_from}: {len(jax.tree_util.tree_leaves(part.transferable))} "
            f"leaves copied, {len(jax.tree_util.tree_leaves(part.task_specific))} task-specific leaves "
            f"re-initialised" + (f" (shape-mismatched: {', '.join(part.mismatched)})" if part.mismatched else ""))
    elif init == "fused":
        bad = shape_mismatches(params, src_params)
        if bad:
            raise CheckpointError(f"fused checkpoint {init_from} does not fit this task: leaves {bad}")
        params = jax.tree_util.tree_map(np.asarray, src_params)
        log(f"[train] initialised from fused checkpoint {init_from}")
    optimizer = make_optimizer(train_cfg.learning_rate)
    state = create_state(params, optimizer, state_rng)
    evaluate = volume_evaluator(make_eval_step(model, train_cfg.loss), val_cases, data.task, model_cfg.divisor)

    def batches_from(start):
        return iter(make_train_dataset(
            train_cases, data.task, patch_shape=patch, batch_size=train_cfg.batch_size,
            seed=train_cfg.seed, foreground_rate=train_cfg.foreground_rate, augment=train_cfg.augment,
            num_workers=train_cfg.num_workers, start_step=start))

    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    _, summary = fit(workdir=workdir, state=state, train_step=make_train_step(model, optimizer, train_cfg.loss),
                     evaluate=evaluate, batches_from=batches_from, cfg=train_cfg, meta=meta, log=log)
    return summary


def evaluate_model(run_dir: str, *, split_name: str = "test", out_dir: str = "",
                   data_dir: str = "", patch_shape=None, overlap: float = 0.5, hd95: bool = True,
                   save_predictions: bool = False, params_override=None, spec_override: DataSpec | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Whole-volume evaluation of a run's best checkpoint on one split of its task.

    Writes ``<out_dir>/per_case.csv`` and ``summary.json`` (and ``predictions/*.nii.gz``);
    returns the summary. ``patch_shape=None`` predicts each volume in one pass; otherwise a
    Gaussian-weighted sliding window with ``overlap``.
    """
    run_dir = find_run(run_dir)
    params, meta = load_params(run_dir)
    if meta.get("kind", "train") not in ("train", "fused"):
        raise CheckpointError(f"{run_dir} is a {meta.get('kind')!r} run directory, not a model; "
                              "evaluate a train.py workdir or a fuse.py output")
    if params_override is not None:
        params = params_override
    model_cfg = ModelConfig.from_dict(meta["model"])
    spec = spec_override or DataSpec.from_dict(meta["data"])
    if data_dir:
        spec = spec.replace(data_dir=data_dir)
    data = resolve(spec)
    if split_name not in data.splits or not data.splits[split_name]:
        raise ValueError(f"split {split_name!r} has no cases (have {sorted(data.splits)})")
    n_in = len(LAYOUTS[spec.layout].modalities)
    if (n_in, data.task.num_channels) != (model_cfg.in_channels, model_cfg.out_channels):
        raise CheckpointError(f"{run_dir} is a {model_cfg.in_channels}→{model_cfg.out_channels} channel "
                              f"model, the data need {n_in}→{data.task.num_channels}")
    out_dir = out_dir or os.path.join(run_dir, f"eval_{split_name}")
    os.makedirs(out_dir, exist_ok=True)
    model = model_cfg.build()
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    ids = data.splits[split_name]
    log(f"[evaluate] {run_dir}: {len(ids)} {split_name} cases of task {data.task.name}")
    rows = []
    for cid, case in zip(ids, data.load(ids)):
        probs = sliding_window_predict(apply_fn, params, case.image, patch_shape=patch_shape,
                                       overlap=overlap, divisor=model_cfg.divisor)
        row = {"case": cid, **evaluate_case(probs, data.task.targets(case.labels), data.task.channel_names,
                                            spacing=case.spacing, compute_hd95=hd95)}
        rows.append(row)
        if save_predictions:
            save_prediction_nifti(data.task.decode(probs), case.affine,
                                  os.path.join(out_dir, "predictions", f"{cid}.nii.gz"))
    summary = write_results(rows, os.path.join(out_dir, "per_case.csv"), os.path.join(out_dir, "summary.json"),
                            extra={"run": run_dir, "split": split_name, "task": data.task.name,
                                   "channels": list(data.task.channel_names)})
    log(f"[evaluate] mean Dice {summary['metrics']['dice_mean']['mean']:.3f} "
        + " ".join(f"{c} {summary['metrics'][f'dice_{c}']['mean']:.3f}" for c in data.task.channel_names)
        + f" -> {out_dir}")
    return summary


def evaluate_forgetting(run_dir: str, source_dirs, *, out_dir: str = "",
                        log: Callable[[str], None] = print, **kw) -> dict:
    """Paper Table 4: how well a fused/fine-tuned model still solves the source tasks.

    For each source run, the run's transferable leaves are combined with the *source's*
    task-specific leaves (norms, heads, shape-mismatched leaves) and evaluated on the source's
    own split. Writes ``<out_dir>/<source>/`` per source and ``forgetting.json``.
    """
    params, _ = load_params(run_dir)
    out_dir = out_dir or os.path.join(find_run(run_dir), "forgetting")
    results = {}
    for src in source_dirs:
        src_params, _ = load_params(src)
        part = split(src_params, reference=params)
        combo = join(select_like(params, part.transferable), part.task_specific)
        name = os.path.basename(os.path.normpath(src))
        log(f"[forgetting] {run_dir} with the task-specific leaves of {src}")
        results[name] = evaluate_model(src, params_override=combo, out_dir=os.path.join(out_dir, name),
                                       log=log, **kw)
    with open(os.path.join(out_dir, "forgetting.json"), "w") as f:
        json.dump({k: v["metrics"]["dice_mean"] for k, v in results.items()}, f, indent=2)
    return results
