"""Data: NIfTI / MGH loading and checks, layouts, tasks, preprocessing, splits, the grain pipeline.

Modules (each usable on its own):

* :mod:`~timm_jax.data.io` — ``Case``, ``dataset_info``, ``list_cases``, ``load_case``,
  ``save_nifti``, ``DataError``; ``LAYOUTS`` (the fixed BraTS 2018 / parcellation names, kept for
  existing callers).
* :mod:`~timm_jax.data.layouts` — ``DatasetInfo`` and the layouts ``brats`` (2018–2021 and 2023+),
  ``msd``, ``nnunet``, ``freesurfer``, ``parcellation``; :mod:`~timm_jax.data.labelmaps` —
  ``paper14`` and JSON label maps; :mod:`~timm_jax.data.geometry` — orientation and grids.
* :mod:`~timm_jax.data.validate` — ``validate_case``, ``validate_dataset`` and the command
  ``python -m timm_jax.data.validate --layout=... DIR``.
* :mod:`~timm_jax.data.tasks` — ``Task``, ``brats_regions``, ``parcellation_labels``.
* :mod:`~timm_jax.data.preprocess` — ``PreprocessConfig``, ``preprocess_case``, ``load_preprocessed``
  (``mmap=True``), ``load_preprocessed_lazy``, ``to_input_geometry``, ``write_like_input``.
* :mod:`~timm_jax.data.splits` — ``make_splits``, ``fraction_subset``, ``splits_from_manifest``.
* :mod:`~timm_jax.data.pipeline` — ``make_train_dataset`` (grain, deterministic, resumable; in-memory
  or memory-mapped cases).
* :mod:`~timm_jax.data.writers` — small data sets in each layout's exact convention.

The demo data set is built by :mod:`timm_jax.experiments.demo_data` (outside this package's core).
"""

from timm_jax.data.io import (
    LAYOUT_NAMES,
    LAYOUTS,
    Case,
    DataError,
    Layout,
    Problem,
    dataset_info,
    list_cases,
    load_case,
    save_nifti,
)
from timm_jax.data.layouts import DatasetInfo
from timm_jax.data.pipeline import AugmentConfig, make_train_batches, make_train_dataset
from timm_jax.data.preprocess import (
    LazyCases,
    PreprocessConfig,
    load_preprocessed,
    load_preprocessed_lazy,
    load_preprocessed_many,
    preprocess_case,
    to_input_geometry,
    write_like_input,
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
    "LAYOUT_NAMES",
    "AugmentConfig",
    "Case",
    "DataError",
    "DatasetInfo",
    "LazyCases",
    "Layout",
    "PreprocessConfig",
    "Problem",
    "Task",
    "brats_regions",
    "dataset_info",
    "fraction_subset",
    "list_cases",
    "load_case",
    "load_preprocessed",
    "load_preprocessed_lazy",
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
    "to_input_geometry",
    "validate_case",
    "validate_dataset",
    "write_like_input",
]
