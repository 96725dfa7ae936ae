"""From a data description (directory, layout, task, split, fraction) to cases.

A :class:`~timm_jax.config.DataSpec` (defined with the other settings in :mod:`timm_jax.config`,
re-exported here) is stored in every checkpoint, so that ``fuse.py`` can compute a source
model's Fisher on *its own* task's data and ``evaluate.py`` can find a run's test split. Its
fields are the scripts' data flags (:mod:`timm_jax.cli` derives them). :func:`resolve` looks at
the data folder once: ``Data.info`` (a :class:`~timm_jax.data.layouts.DatasetInfo`) holds the
convention found, the modalities in channel order (``Data.in_channels``) and the labels;
``Data.load(ids, mmap=True)`` gives cases whose arrays are read-only memory maps of the cache.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from timm_jax.config import DataSpec
from timm_jax.data.io import DataError, dataset_info, list_cases
from timm_jax.data.layouts import DatasetInfo
from timm_jax.data.preprocess import PreprocessConfig, load_preprocessed, load_preprocessed_lazy
from timm_jax.data.splits import fraction_split, load_splits, make_splits, splits_from_manifest
from timm_jax.data.tasks import Task, brats_regions, parcellation_labels, task_from_manifest
from timm_jax.errors import ConfigError

__all__ = ["Data", "DataSpec", "preprocess_config", "resolve"]

_log = logging.getLogger(__name__)


def preprocess_config(spec: DataSpec) -> PreprocessConfig:
    """The preprocessing a spec asks for."""
    return PreprocessConfig(normalisation=spec.normalisation, spacing=spec.spacing or None)


@dataclass
class Data:
    spec: DataSpec
    task: Task
    splits: dict  # the full train/val/test ids
    train_ids: list  # the training cases of the fraction actually used
    val_ids: list  # its validation cases
    info: DatasetInfo | None = None  # the data folder's convention, modalities and labels

    @property
    def in_channels(self) -> int:
        """The network's input channels: the data set's modalities."""
        return len(self.info.modalities)

    @property
    def cache_dir(self) -> str:
        return self.spec.cache_dir or str(Path(self.spec.data_dir).resolve().parent / ".timm_cache")

    def load(self, ids, *, require_labels: bool = True, mmap: bool = False):
        """The preprocessed cases ``ids`` (cached), their labels checked against the task.

        With ``mmap=True`` the result is a lazy sequence (:class:`~timm_jax.data.preprocess.LazyCases`):
        every case is preprocessed into the cache first, then each item is opened on access, its
        ``image`` / ``labels`` read-only ``np.memmap`` views of the cache files, so that a data set
        larger than memory can be trained on (the training pipeline reads only the patches it samples).
        """
        cfg = preprocess_config(self.spec)
        if mmap:
            cases = load_preprocessed_lazy(
                self.spec.data_dir,
                ids,
                self.spec.layout,
                cfg,
                self.cache_dir,
                require_labels=require_labels,
                info=self.info,
                check=self.task.check_labels,
            )
            return cases
        out = []
        for i, cid in enumerate(ids):
            out.append(
                load_preprocessed(
                    self.spec.data_dir,
                    cid,
                    self.spec.layout,
                    cfg,
                    self.cache_dir,
                    require_labels=require_labels,
                    info=self.info,
                )
            )
            if (i + 1) % 10 == 0:
                _log.info("  loaded %d/%d cases", i + 1, len(ids))
        for c in out:
            if c.labels is not None:
                self.task.check_labels(c.labels)
        return out


def _find_manifest(spec: DataSpec) -> Path | None:
    if spec.manifest:
        p = Path(spec.manifest)
        if not p.is_file():
            raise DataError(f"manifest {p} (--manifest) does not exist")
        return p
    for p in (Path(spec.data_dir) / "manifest.json", Path(spec.data_dir).parent / "manifest.json"):
        if p.is_file():
            return p
    return None


def resolve(spec: DataSpec) -> Data:
    """Task, split and training fraction of a spec (reads only the directory listing/manifest)."""
    if not os.path.isdir(spec.data_dir):
        raise DataError(f"data directory {spec.data_dir} (--data_dir) does not exist")
    info = dataset_info(spec.data_dir, spec.layout, label_map=spec.label_map or None)
    manifest = None
    if spec.task_key:
        mpath = _find_manifest(spec)
        if mpath is None:
            raise ConfigError(
                f"--task_key={spec.task_key} needs a manifest.json in "
                f"{spec.data_dir} or its parent (or --manifest)"
            )
        manifest = json.loads(mpath.read_text())
        task = task_from_manifest(manifest, spec.task_key)
        if task.layout != spec.layout:
            raise ConfigError(
                f"task {spec.task_key} of {mpath} is a {task.layout} task, but --layout={spec.layout}"
            )
        if spec.labels and tuple(spec.labels) != tuple(task.label_ids):
            raise ConfigError(
                f"--labels={list(spec.labels)} contradicts task {spec.task_key} "
                f"(labels {list(task.label_ids)})"
            )
    elif spec.layout == "brats":
        task = brats_regions()
    elif info.convention == "msd-brats":
        task = info.make_task()
    elif spec.labels:
        known = info.label_values
        bad = [v for v in spec.labels if known is not None and v not in known]
        if bad:
            raise ConfigError(f"--labels {bad} are not labels of {spec.data_dir} (its labels: {list(known)})")
        names = [info.label_names.get(int(v), f"label_{v}") for v in spec.labels]
        task = parcellation_labels(spec.labels, names, layout=spec.layout, known_labels=known)
    elif info.task is not None:
        task = info.make_task()
    else:
        raise ConfigError(
            f"a {spec.layout} task needs --labels (the label ids to predict), --label_map "
            "or --task_key of a demo manifest"
        )
    if spec.splits_file:
        splits = load_splits(spec.splits_file)
    elif manifest is not None:
        splits = splits_from_manifest(manifest, spec.task_key)
    else:
        splits = make_splits(
            list_cases(spec.data_dir, spec.layout, info=info),
            spec.split_seed,
            spec.val_fraction,
            spec.test_fraction,
        )
    for s in ("train", "val"):
        if not splits.get(s):
            raise DataError(
                f"the split has no {s} cases ({spec.data_dir}, task {spec.task_key or task.name})"
            )
    try:
        train_ids, val_ids = fraction_split(splits, spec.fraction, spec.split_seed)
    except ValueError as e:
        raise ConfigError(f"--fraction={spec.fraction}: {e}") from None
    return Data(spec=spec, task=task, splits=splits, train_ids=train_ids, val_ids=val_ids, info=info)
