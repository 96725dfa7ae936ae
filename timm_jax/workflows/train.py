"""Train one model on one task: what ``train.py`` calls.

Initialisations (the paper's Table 2 rows): ``random`` (Glorot, "no transfer"), ``transfer``
(transferable leaves from a trained run; task-specific and shape-mismatched leaves freshly
initialised) and ``fused`` (every leaf from a run written by ``fuse.py``).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from timm_jax.config import DataSpec, DeviceConfig, ModelConfig, TrainConfig
from timm_jax.core.partition import join, select_like, shape_mismatches, split
from timm_jax.data.spec import resolve
from timm_jax.errors import CheckpointError, ConfigError
from timm_jax.nn.unet import build_model, init_params
from timm_jax.runs.bundle import is_bundle
from timm_jax.runs.models import load_model, model_config_for, train_batches
from timm_jax.training.inference import make_predictor
from timm_jax.training.loop import fit, window_evaluator
from timm_jax.training.parallel import DataParallel
from timm_jax.training.rundir import RunDir, make_meta
from timm_jax.training.steps import create_state, make_optimizer, make_train_step

__all__ = ["INITS", "load_init", "train_model"]

INITS = ("random", "transfer", "fused")
_log = logging.getLogger(__name__)


def load_init(init: str, init_from: str, model_cfg: ModelConfig):
    """Check the initialisation flags and load the source checkpoint (before any compute)."""
    if init not in INITS:
        raise ConfigError(f"--init must be one of {INITS}, got {init!r}")
    if init == "random":
        if init_from:
            raise ConfigError("--init_from was given but --init=random; use --init=transfer or fused")
        return None, None
    if not init_from:
        raise ConfigError(f"--init={init} needs --init_from (a run directory)")
    if is_bundle(init_from):  # a model bundle: a trained network, for --init=transfer
        if init != "transfer":
            raise ConfigError(f"--init={init} but {init_from} is a model bundle; use --init=transfer")
        src_bundle = load_model(init_from, kinds=("train",))
        return _check_init_architecture(init_from, model_cfg, src_bundle.params, src_bundle.meta)
    with RunDir.open(init_from) as run:
        if init == "fused" and run.kind != "fused":
            raise ConfigError(
                f"--init=fused but {init_from} is a {run.kind!r} run, not a fuse.py "
                "output; use --init=transfer"
            )
        if init == "transfer" and run.kind != "train":
            raise ConfigError(
                f"--init=transfer but {init_from} is a {run.kind!r} run, not a model "
                "trained with train.py" + ("; use --init=fused" if run.kind == "fused" else "")
            )
        params, meta = run.load_params()
    return _check_init_architecture(init_from, model_cfg, params, meta)


def _check_init_architecture(init_from: str, model_cfg: ModelConfig, params, meta):
    src = ModelConfig.from_dict(meta.get("model", {}))
    if not model_cfg.same_architecture(src):
        raise CheckpointError(
            f"{init_from} holds a network of another architecture (base_filters={src.base_filters}, "
            f"depth={src.depth}) than requested (base_filters={model_cfg.base_filters}, "
            f"depth={model_cfg.depth})"
        )
    return params, meta


def _warn_if_patch_exceeds(patch, cases) -> None:
    """One warning when the patch is larger than every training volume along an axis: every
    training patch is then zero-padded there (legitimate — whole-volume training — but worth a line)."""
    largest = [max(c.image.shape[a] for c in cases) for a in range(3)]
    over = [a for a in range(3) if patch[a] > largest[a]]
    if over:
        _log.warning(
            "[train] --patch %s is larger than every training volume along axis %s (largest %s): "
            "every training patch is zero-padded there; predictions use the same padding",
            "x".join(map(str, patch)),
            ",".join(map(str, over)),
            "x".join(map(str, largest)),
        )


def train_model(
    spec: DataSpec,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    workdir: str,
    *,
    init: str = "random",
    init_from: str = "",
    devices: DeviceConfig | None = None,
) -> dict:
    """Train (or resume) one model in ``workdir``; returns the run summary (history, best epoch).

    ``devices``: the data-parallel mesh and ``jax.distributed`` processes (``None``: one device,
    no mesh; ``DeviceConfig()``: every visible device, as the scripts do)."""
    dp = DataParallel.setup(devices)
    dp.check_batch(train_cfg.batch_size)
    data = resolve(spec)
    model, model_cfg = build_model(model_config_for(data, model_cfg))
    src_params, _ = load_init(init, init_from, model_cfg)
    patch = tuple(train_cfg.patch_shape)
    if any(p % model_cfg.divisor for p in patch):
        raise ConfigError(f"--patch {list(patch)} must be divisible by {model_cfg.divisor} (2^(depth-1))")
    meta = make_meta(
        "train",
        model=model_cfg,
        train=train_cfg,
        data=spec,
        task=data.task.to_dict(),
        data_info=data.info.to_dict(),
        splits=data.splits,
        train_ids=data.train_ids,
        val_ids=data.val_ids,
        init=init,
        init_from=os.path.abspath(init_from) if init_from else "",
        **dp.record(),
    )
    with RunDir.create(workdir, meta) as run:
        _log.info(
            "[train] task %s: %d training + %d validation cases (fraction %s of a pool of %d); "
            "conv_impl=%s; on %s",
            data.task.name,
            len(data.train_ids),
            len(data.val_ids),
            spec.fraction,
            len(data.splits["train"]) + len(data.splits["val"]),
            model_cfg.conv_impl,
            dp.describe(),
        )
        train_cases = data.load(data.train_ids, mmap=True)  # memory-mapped: data larger than RAM
        val_cases = data.load(data.val_ids, mmap=True)
        _warn_if_patch_exceeds(patch, train_cases)
        init_rng, state_rng = jax.random.split(jax.random.PRNGKey(train_cfg.seed))
        params = init_params(model, init_rng, (1, *patch, model_cfg.in_channels))
        if init == "transfer":
            part = split(params, reference=src_params)
            if not jax.tree_util.tree_leaves(part.transferable):
                raise CheckpointError(f"{init_from} shares no transferable leaf with this network")
            params = join(select_like(src_params, part.transferable), part.task_specific)
            mismatched = f" (shape-mismatched: {', '.join(part.mismatched)})" if part.mismatched else ""
            _log.info(
                "[train] transfer from %s: %d leaves copied, %d task-specific leaves re-initialised%s",
                init_from,
                len(jax.tree_util.tree_leaves(part.transferable)),
                len(jax.tree_util.tree_leaves(part.task_specific)),
                mismatched,
            )
        elif init == "fused":
            bad = shape_mismatches(params, src_params)
            if bad:
                raise CheckpointError(f"fused checkpoint {init_from} does not fit this task: leaves {bad}")
            params = jax.tree_util.tree_map(np.asarray, src_params)
            _log.info("[train] initialised from fused checkpoint %s", init_from)
        optimizer = make_optimizer(train_cfg.learning_rate)
        state = dp.replicate(create_state(params, optimizer, state_rng))
        predict = make_predictor(model, patch, overlap=train_cfg.val_overlap, mesh=dp.mesh)
        evaluate = window_evaluator(predict, val_cases, data.task, loss=train_cfg.loss)
        _, summary = fit(
            run,
            state=state,
            train_step=make_train_step(model, optimizer, train_cfg.loss, mesh=dp.mesh),
            evaluate=evaluate,
            batches_from=train_batches(train_cases, data.task, train_cfg, dp),
            cfg=train_cfg,
        )
    return summary
