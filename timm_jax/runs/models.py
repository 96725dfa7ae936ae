"""What every workflow needs to use a run: its network and parameters, the network for some data,
and the training batches of a run's cases.

* :func:`load_model` — the network and best parameters of a run directory (a stored
  ``conv_impl`` this machine cannot run is replaced by ``auto``, with a warning);
* :func:`model_config_for` — a :class:`~timm_jax.config.ModelConfig` with the channel counts of a
  data set (its modalities in, its task's channels out);
* :func:`train_batches` — the seeded, resumable batches of a run's training cases, split over the
  data-parallel mesh.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

from timm_jax.config import EvalConfig, ModelConfig, TrainConfig
from timm_jax.data.pipeline import make_train_dataset
from timm_jax.data.spec import Data
from timm_jax.errors import CheckpointError
from timm_jax.nn.unet import UNet3D, build_model, resolve_conv_impl
from timm_jax.runs.bundle import BundleError, is_bundle, open_bundle
from timm_jax.training.inference import make_predictor
from timm_jax.training.parallel import DataParallel
from timm_jax.training.rundir import RunDir

__all__ = [
    "LoadedModel",
    "load_model",
    "model_config_for",
    "run_predictor",
    "short_names",
    "train_batches",
    "training_patch",
]

_log = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    path: str  # the run directory, absolute
    model: UNet3D
    cfg: ModelConfig  # conv_impl resolved for this machine
    params: dict
    meta: dict


def load_model(run_dir: str, kinds=("train", "fused")) -> LoadedModel:
    """The network and params of a run's best checkpoint, or of a model bundle (a trained network:
    of kind ``train``; :mod:`timm_jax.runs.bundle`). A stored ``conv_impl`` that this machine
    cannot run (e.g. the CPU kernels on a GPU host) is replaced by ``auto``, with a warning."""
    if is_bundle(run_dir):
        if "train" not in kinds:
            raise BundleError(
                f"{run_dir} is a model bundle (a trained network); expected "
                f"{' or '.join(repr(k) for k in kinds)}"
            )
        b = open_bundle(run_dir)
        params, meta, path = b.params, b.meta, b.path
    else:
        with RunDir.open(run_dir, kinds) as run:
            params, meta = run.load_params()
            path = run.path
    model_cfg = ModelConfig.from_dict(meta["model"])
    try:
        resolve_conv_impl(model_cfg.conv_impl)
    except ValueError:
        _log.warning(
            "%s was trained with conv_impl=%s, which is not available here; using 'auto' "
            "(the same maths, other float rounding)",
            run_dir,
            model_cfg.conv_impl,
        )
        model_cfg = model_cfg.replace(conv_impl="auto")
    model, model_cfg = build_model(model_cfg)
    return LoadedModel(path, model, model_cfg, params, meta)


def model_config_for(data: Data, model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` with the channel counts of the data: its modalities in, its task's channels out."""
    return model_cfg.replace(in_channels=data.in_channels, out_channels=data.task.num_channels)


def train_batches(cases, task, cfg: TrainConfig, dp: DataParallel = DataParallel()):
    """``start_step -> iterator`` of the seeded, resumable training batches of ``cases``; with a
    mesh, each process reads its rows of every global batch and they arrive split over the mesh."""

    def batches_from(start: int):
        stream = make_train_dataset(
            cases,
            task,
            patch_shape=tuple(cfg.patch_shape),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            foreground_rate=cfg.foreground_rate,
            augment=cfg.augment,
            num_workers=cfg.num_workers,
            start_step=start,
            process_index=dp.process_index,
            process_count=dp.num_processes,
        )
        return map(dp.shard, iter(stream))

    return batches_from


def short_names(paths: Sequence[str]) -> list[str]:
    """A distinct short name per run directory (the ratio files' columns, the forgetting folders):
    its folder name, with as many parent folders as it takes to tell the runs apart
    (``a/m1, b/m1 -> a_m1, b_m1``). Paths of one run twice are the caller's error to refuse."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["_".join(p[-depth:]).lstrip("_") for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"the same run directory is given twice in {list(paths)}")


def training_patch(meta: dict) -> tuple[int, int, int] | None:
    """The patch a run's network was trained at (its sliding-window size): the ``train`` config's
    ``patch_shape`` (train runs, T-IMM fusions), the recorded ``patch`` (IMM fusions), else that of
    its first source (IMM fusions written before the patch was recorded); ``None`` if unknown."""
    train = meta.get("train") or {}
    if train.get("patch_shape"):
        return tuple(int(p) for p in train["patch_shape"])
    if meta.get("patch"):
        return tuple(int(p) for p in meta["patch"])
    for src in meta.get("sources") or []:
        try:
            with RunDir.open(src[0]) as run:
                return training_patch(run.meta)
        except CheckpointError:
            continue
    return None


def run_predictor(model, meta: dict, cfg: EvalConfig = EvalConfig(), mesh=None):
    """``predict(params, image) -> probabilities`` as ``evaluate.py`` predicts a run: sliding windows
    at its training patch (or ``cfg.patch``) with ``cfg.overlap`` (the reports' figures use it)."""
    patch = tuple(cfg.patch) or training_patch(meta)
    if patch is None:
        raise CheckpointError("the run records no training patch; pass --patch=D,H,W")
    return make_predictor(model, patch, overlap=cfg.overlap, mesh=mesh)
