"""From a data description (directory, layout, task, split, fraction) to cases in memory.

A :class:`DataSpec` is stored in every checkpoint, so that ``fuse.py`` can compute a source
model's Fisher on *its own* task's data and ``evaluate.py`` can find a run's test split.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from timm_jax.data.io import list_cases
from timm_jax.data.preprocess import PreprocessConfig, load_preprocessed
from timm_jax.data.splits import fraction_subset, load_splits, make_splits, splits_from_manifest
from timm_jax.data.tasks import Task, brats_regions, parcellation_labels, task_from_manifest


@dataclass(frozen=True)
class DataSpec:
    """Where the data are and what to predict.

    Attributes:
      data_dir: the layout's root (``<dir>/<case>/...``).
      layout: ``"brats"`` or ``"parcellation"``.
      task_key: a task of a demo ``manifest.json`` (``task1``/``task2``/``task3``): gives the
        labels and the split. Leave empty for real data.
      labels: parcellation label ids to predict (real data; BraTS always predicts WT/TC/ET).
      manifest: path of a manifest; default: ``manifest.json`` in ``data_dir`` or its parent.
      splits_file: JSON with ``train``/``val``/``test`` lists (else a seeded split is made).
      split_seed, val_fraction, test_fraction: the seeded split of real data.
      fraction: fraction of the training cases used (nested across fractions, ≥ 1 case).
      preprocess: :class:`PreprocessConfig` settings as a dict.
      cache_dir: where preprocessed cases are cached (default ``<data_dir>/../.timm_cache``).
    """
    data_dir: str
    layout: str
    task_key: str = ""
    labels: tuple = ()
    manifest: str = ""
    splits_file: str = ""
    split_seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    fraction: float = 1.0
    preprocess: dict = field(default_factory=dict)
    cache_dir: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw["labels"] = tuple(kw.get("labels", ()))
        return cls(**kw)

    def replace(self, **kw) -> "DataSpec":
        return dataclasses.replace(self, **kw)


@dataclass
class Data:
    spec: DataSpec
    task: Task
    splits: dict            # full train/val/test ids
    train_ids: list         # the fraction of the training ids actually used

    def preprocess_config(self) -> PreprocessConfig:
        pp = dict(self.spec.preprocess)
        for k in ("spacing", "target_shape"):
            if isinstance(pp.get(k), list):
                pp[k] = tuple(pp[k])
        return PreprocessConfig(**pp)

    def load(self, ids, *, require_labels: bool = True, log=None) -> list:
        cfg = self.preprocess_config()
        cache = self.spec.cache_dir or str(Path(self.spec.data_dir).resolve().parent / ".timm_cache")
        out = []
        for i, cid in enumerate(ids):
            out.append(load_preprocessed(self.spec.data_dir, cid, self.spec.layout, cfg, cache,
                                         require_labels=require_labels))
            if log is not None and (i + 1) % 10 == 0:
                log(f"  loaded {i + 1}/{len(ids)} cases")
        for c in out:
            if c.labels is not None:
                self.task.check_labels(c.labels)
        return out


def _find_manifest(spec: DataSpec) -> Path | None:
    if spec.manifest:
        p = Path(spec.manifest)
        if not p.is_file():
            raise FileNotFoundError(f"manifest {p} does not exist")
        return p
    for p in (Path(spec.data_dir) / "manifest.json", Path(spec.data_dir).parent / "manifest.json"):
        if p.is_file():
            return p
    return None


def resolve(spec: DataSpec) -> Data:
    """Task, split and training fraction of a spec (reads only the directory listing/manifest)."""
    if spec.layout not in ("brats", "parcellation"):
        raise ValueError(f"--layout must be 'brats' or 'parcellation', got {spec.layout!r}")
    if not os.path.isdir(spec.data_dir):
        raise FileNotFoundError(f"data directory {spec.data_dir} does not exist")
    manifest = None
    if spec.task_key:
        mpath = _find_manifest(spec)
        if mpath is None:
            raise FileNotFoundError(f"--task_key={spec.task_key} needs a manifest.json in "
                                    f"{spec.data_dir} or its parent (or --manifest)")
        manifest = json.loads(mpath.read_text())
        task = task_from_manifest(manifest, spec.task_key)
        if task.layout != spec.layout:
            raise ValueError(f"task {spec.task_key} of {mpath} is a {task.layout} task, "
                             f"but --layout={spec.layout}")
        if spec.labels and tuple(spec.labels) != tuple(task.label_ids):
            raise ValueError(f"--labels={list(spec.labels)} contradicts task {spec.task_key} "
                             f"(labels {list(task.label_ids)})")
    elif spec.layout == "brats":
        task = brats_regions()
    else:
        if not spec.labels:
            raise ValueError("a parcellation task needs --labels (the label ids to predict) "
                             "or --task_key of a demo manifest")
        task = parcellation_labels(spec.labels)
    if spec.splits_file:
        splits = load_splits(spec.splits_file)
    elif manifest is not None:
        splits = splits_from_manifest(manifest, spec.task_key)
    else:
        splits = make_splits(list_cases(spec.data_dir, spec.layout), spec.split_seed,
                             spec.val_fraction, spec.test_fraction)
    for s in ("train", "val"):
        if not splits.get(s):
            raise ValueError(f"the split has no {s} cases ({spec.data_dir}, task {spec.task_key or task.name})")
    train_ids = fraction_subset(splits["train"], spec.fraction, spec.split_seed)
    return Data(spec=spec, task=task, splits=splits, train_ids=train_ids)
