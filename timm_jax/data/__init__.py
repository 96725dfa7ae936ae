"""Data: NIfTI loading and checks, tasks, preprocessing, splits, the grain pipeline and the demo set.

Modules (each usable on its own):

* :mod:`~timm_jax.data.io` — ``Case``, ``LAYOUTS`` (``brats``, ``parcellation``), ``list_cases``,
  ``load_case``, ``save_nifti``, ``DataError``.
* :mod:`~timm_jax.data.validate` — ``validate_case``, ``validate_dataset`` and the command
  ``python -m timm_jax.data.validate --layout={brats,parcellation} DIR``.
* :mod:`~timm_jax.data.tasks` — ``Task``, ``brats_regions``, ``parcellation_labels``.
* :mod:`~timm_jax.data.preprocess` — ``PreprocessConfig``, ``preprocess_case``, ``load_preprocessed``.
* :mod:`~timm_jax.data.splits` — ``make_splits``, ``fraction_subset``, ``splits_from_manifest``.
* :mod:`~timm_jax.data.pipeline` — ``make_train_dataset`` (grain, deterministic, resumable).

The demo data set is built by :mod:`timm_jax.experiments.demo_data` (outside this package's core).
"""

from timm_jax.data.io import LAYOUTS, Case, DataError, Layout, Problem, list_cases, load_case, save_nifti
from timm_jax.data.pipeline import AugmentConfig, make_train_batches, make_train_dataset
from timm_jax.data.preprocess import (
    PreprocessConfig,
    load_preprocessed,
    load_preprocessed_many,
    preprocess_case,
)
from timm_jax.data.splits import fraction_subset, load_splits, make_splits, save_splits, splits_from_manifest
from timm_jax.data.tasks import Task, brats_regions, parcellation_labels, task_from_manifest


def __getattr__(name):
    # Imported lazily so that ``python -m timm_jax.data.validate`` does not find its module already
    # imported by the package (runpy warns about that).
    if name in ("validate_case", "validate_dataset"):
        from timm_jax.data import validate

        return getattr(validate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYOUTS",
    "AugmentConfig",
    "Case",
    "DataError",
    "Layout",
    "PreprocessConfig",
    "Problem",
    "Task",
    "brats_regions",
    "fraction_subset",
    "list_cases",
    "load_case",
    "load_preprocessed",
    "load_preprocessed_many",
    "load_splits",
    "make_splits",
    "make_train_batches",
    "make_train_dataset",
    "parcellation_labels",
    "preprocess_case",
    "save_nifti",
    "save_splits",
    "splits_from_manifest",
    "task_from_manifest",
    "validate_case",
    "validate_dataset",
]
