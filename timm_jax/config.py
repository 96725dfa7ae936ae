"""Every setting of the network, the optimisation, the fusion and the evaluation, written once.

Each field of the frozen dataclasses below carries its default and its help text; the scripts'
absl flags are derived from them (:mod:`timm_jax.cli`), and the dataclasses are what the
library functions take and what every checkpoint's metadata stores (``to_dict`` /
``from_dict``). A field made with :func:`setting` is a flag (named after the field unless
``flag=`` says otherwise); a field made with :func:`derived` is filled in by the code from the
data (e.g. the number of input channels) and has no flag. The data description,
:class:`timm_jax.data.spec.DataSpec`, is built the same way.

This module imports only :mod:`timm_jax.errors`, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from timm_jax.errors import ConfigError

CONV_IMPLS = ("auto", "native", "depth2d", "direct")
PRECISIONS = ("float32", "bfloat16")
LOSSES = ("dice", "ce", "dice+ce")
#: the on-disk data layouts (``timm_jax.data.layouts``)
LAYOUT_NAMES = ("brats", "freesurfer", "msd", "nnunet", "parcellation")
NORMALISATIONS = ("histogram", "zscore")
METHODS = ("imm", "timm")
IMM_MODES = ("mode", "mean")
GRANULARITIES = ("leaf", "layer", "global", "channel")
FISHERS = ("empirical", "true", "adam")
ADAPTION_OBJECTIVES = ("supervised", "entropy")


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple = (),
    item: type | None = None,
    later: bool = False,
) -> Any:
    """A configuration field that the scripts expose as ``--<flag or field name>``.

    ``choices`` makes an enum flag; ``item`` is the element type of a tuple field (a list flag).
    ``later=True`` marks a setting added after runs had been written: a run's key
    (:func:`timm_jax.training.rundir.run_key`) includes it only when it is not at its default, so
    that those older runs keep their key and resume. (A setting that changes what every run
    computes — e.g. how validation predicts — must not be ``later``: older runs are then another
    configuration.)
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices), "item": item, "later": later}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default (configs are frozen)")
    return dataclasses.field(default=default, metadata=meta)


def derived(default: Any, help: str) -> Any:
    """A field set by the code from the data or the sources (stored, but not a flag)."""
    return dataclasses.field(default=default, metadata={"help": help, "derived": True})


class Config:
    """Mixin: JSON round trip and ``replace`` for the frozen config dataclasses."""

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a stored dict; unknown keys are ignored, missing ones take the default."""
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(f.default, tuple) and v is not None else v
        return cls(**kw)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @classmethod
    def later_defaults(cls) -> dict[str, Any]:
        """The ``later=True`` settings and their defaults (see :func:`setting`)."""
        return {f.name: _jsonable(f.default) for f in dataclasses.fields(cls) if f.metadata.get("later")}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _check_choice(value: Any, name: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig(Config):
    """The network. Defaults are the paper's (Isensee 3D U-Net, ~8.3 M parameters for 4→3)."""

    in_channels: int = derived(4, "Input channels (the layout's modalities).")
    out_channels: int = derived(3, "Output channels (the task's labels or regions).")
    base_filters: int = setting(16, "Filters at the finest level (paper: 16).")
    depth: int = setting(5, "Number of resolution levels (paper: 5).")
    dropout_rate: float = setting(0.3, "Spatial dropout rate in the context modules.", flag="dropout")
    conv_impl: str = setting(
        "auto",
        "3D convolution implementation: auto (the C++ 'direct' kernels on CPU, 'depth2d' "
        "if they cannot be built; 'native' elsewhere), native, depth2d or direct. Resolved once "
        "when the model is built; checkpoints record the resolved name.",
        choices=CONV_IMPLS,
    )
    precision: str = setting(
        "float32",
        "Dtype of the network's activations: float32, or bfloat16 (mixed precision; parameters, "
        "gradients, the optimiser and the merge stay float32).",
        choices=PRECISIONS,
        later=True,
    )

    def __post_init__(self):
        _check_choice(self.conv_impl, "conv_impl", CONV_IMPLS)
        _check_choice(self.precision, "precision", PRECISIONS)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (2^(depth-1))."""
        return 2 ** (self.depth - 1)

    def same_architecture(self, other: ModelConfig) -> bool:
        """Same width/depth: parameters transfer (channel counts may differ, see partition)."""
        return (self.base_filters, self.depth) == (other.base_filters, other.depth)


@dataclass(frozen=True)
class TrainConfig(Config):
    """Optimisation schedule (the original: Adam 5e-4, plateau ×0.5 after 10, stop after 50 epochs)."""

    learning_rate: float = setting(5e-4, "Adam learning rate.")
    batch_size: int = setting(2, "Patches per step (the global batch).")
    patch_shape: tuple = setting(
        (32, 32, 32), "Patch shape D,H,W (divisible by 2^(depth-1)).", flag="patch", item=int
    )
    steps_per_epoch: int = setting(20, "Training steps per epoch (validation after each).")
    max_epochs: int = setting(100, "Maximum number of epochs.")
    plateau_patience: int = setting(10, "Epochs without improvement before the LR is reduced.")
    plateau_factor: float = setting(0.5, "LR factor on plateau.")
    min_learning_rate: float = setting(1e-6, "The LR is never reduced below this.")
    early_stopping_patience: int = setting(50, "Epochs without improvement before stopping.")
    foreground_rate: float = setting(0.33, "Probability that a patch is centred on foreground.")
    val_overlap: float = setting(
        0.5,
        "Overlap of the sliding windows (at --patch) with which the validation cases are predicted "
        "after every epoch; 0.5 is evaluate.py's default, so the validation Dice is the one "
        "evaluate.py --split=val reports. Lower is cheaper (fewer windows).",
    )
    augment: bool = setting(True, "Flips and intensity augmentation.")
    loss: str = setting("dice", "Training loss.", choices=LOSSES)
    seed: int = setting(0, "Seed of initialisation, dropout and patch sampling.")
    num_workers: int = setting(0, "Input pipeline worker processes (0: in-process).")
    skip_nonfinite_steps: bool = setting(
        False,
        "Skip a training step whose loss or updated parameters are not finite (counted as "
        "skipped_steps in metrics.jsonl) instead of stopping the run.",
        later=True,
    )

    def __post_init__(self):
        if len(self.patch_shape) != 3 or not all(isinstance(p, int) and p > 0 for p in self.patch_shape):
            raise ConfigError(f"--patch must be three integers D,H,W (> 0), got {list(self.patch_shape)}")
        if self.batch_size < 1 or self.steps_per_epoch < 1 or self.max_epochs < 1:
            raise ConfigError("--batch_size, --steps_per_epoch and --max_epochs must be >= 1")
        if not self.learning_rate >= 0:
            raise ConfigError(f"--learning_rate must be >= 0, got {self.learning_rate}")
        _check_choice(self.loss, "loss", LOSSES)
        if not 0 <= self.val_overlap < 1:
            raise ConfigError(f"--val_overlap must be in [0, 1), got {self.val_overlap}")


@dataclass(frozen=True)
class FuseConfig(Config):
    """How ``fuse.py`` fuses the sources (the adaption stage's schedule is a :class:`TrainConfig`)."""

    method: str = setting(
        "timm", "imm: equal ratios; timm: learn the ratios (adaption stage).", choices=METHODS
    )
    imm_mode: str = setting("mode", "mode-IMM (Fisher-weighted) or mean-IMM.", choices=IMM_MODES)
    granularity: str = setting(
        "layer",
        "One mixing logit vector per leaf, per layer, for the model, or per output channel of each layer.",
        choices=GRANULARITIES,
    )
    fisher: str = setting(
        "empirical",
        "Fisher with the reference labels (empirical), labels sampled from the model (true), or "
        "read from the source's Adam second moment at its checkpoint (adam: no pass over the data).",
        choices=FISHERS,
    )
    fisher_normalisation: str = setting(
        "none",
        "none: the Fishers as they are (the paper); layer: each source's Fisher scaled to unit mean per "
        "layer before the merge, so that a source whose task labels more voxels does not outweigh the "
        "others everywhere.",
        choices=("none", "layer"),
        later=True,
    )
    fisher_examples: int = setting(0, "Use at most this many training cases for the Fisher (0: all).")
    fisher_patches: int = setting(
        4,
        "Patches per training case for the empirical / true Fisher: drawn as the source was trained "
        "(its --patch and foreground rate, no augmentation, a fixed seed), one per-example gradient each.",
    )
    logits_learning_rate: float = setting(
        0.05,
        "Adam learning rate of the mixing logits in the "
        "adaption stage (task-specific leaves use --learning_rate).",
    )
    adaption_objective: str = setting(
        "supervised",
        "Adaption-stage objective: supervised (the training loss on labelled target cases; trains the "
        "logits and the task-specific leaves) or entropy (mean voxel-wise prediction entropy on the "
        "target images, no labels; trains only the logits, early-stopped on the validation images' "
        "entropy).",
        choices=ADAPTION_OBJECTIVES,
        later=True,
    )
    task_specific_from: int = setting(
        -1,
        "Task-specific leaves (norms, heads) start from this source (0-based index in --source order) "
        "where its leaf has the target's shape (same label set), freshly initialised elsewhere; "
        "-1: all fresh (the paper).",
        later=True,
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.metadata.get("choices"):
                _check_choice(getattr(self, f.name), f.name, f.metadata["choices"])
        if self.fisher_patches < 1:
            raise ConfigError(f"--fisher_patches must be >= 1, got {self.fisher_patches}")
        if self.task_specific_from < -1:
            raise ConfigError(
                f"--task_specific_from must be -1 or a source index, got {self.task_specific_from}"
            )
        if self.adaption_objective == "entropy" and self.method != "timm":
            raise ConfigError("--adaption_objective=entropy needs --method=timm (imm has no adaption stage)")


@dataclass(frozen=True)
class EvalConfig(Config):
    """Evaluation of a checkpoint: Gaussian-weighted sliding windows at the run's training patch."""

    split: str = setting("test", "Split to evaluate: train, val or test.")
    patch: tuple = setting(
        (),
        "Sliding-window patch D,H,W (default: the run's training patch, recorded in its config.json).",
        item=int,
    )
    overlap: float = setting(0.5, "Sliding-window overlap fraction (nnU-Net's 0.5).")
    hd95: bool = setting(True, "Also compute the 95th-percentile Hausdorff distance.")
    save_predictions: bool = setting(False, "Write predicted label maps as NIfTI (source affine).")
    empty_regions: str = setting(
        "brats",
        "A region empty in reference or prediction: brats (both empty: Dice 1, HD95 0; one empty: Dice 0, "
        "HD95 373.13 mm; no case dropped) or nan (one empty: HD95 nan, left out of the HD95 means).",
        choices=("brats", "nan"),
    )

    def __post_init__(self):
        if self.patch and len(self.patch) != 3:
            raise ConfigError(f"--patch must be three integers D,H,W, got {list(self.patch)}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"--overlap must be in [0, 1), got {self.overlap}")


@dataclass(frozen=True)
class DataSpec(Config):
    """Where the data are and what to predict (the ``--data_dir`` ... flags; stored in checkpoints).

    ``fraction`` is the fraction of the annotated pool (train + val) used, split 80 / 20 into
    train / val and nested across fractions (:func:`timm_jax.data.splits.fraction_split`).
    ``cache_dir`` defaults to ``<data_dir>/../.timm_cache``. :mod:`timm_jax.data.spec` resolves a
    spec to cases (``resolve``).
    """

    data_dir: str = setting("", "Root of the data layout (<dir>/<case>/...).")
    layout: str = setting(
        "",
        "Data layout: brats (2018-2021 or 2023+ naming), msd, nnunet, freesurfer or parcellation.",
        choices=LAYOUT_NAMES,
    )
    label_map: str = setting(
        "",
        "freesurfer / parcellation: merge the label ids into classes: paper14 (the paper's 14 classes "
        'from aseg / aparc+aseg) or a JSON file {"class": [ids, "lo-hi"], ...}.',
        later=True,
    )
    task_key: str = setting(
        "",
        "Task of a demo manifest.json (task1, task2, task3): sets the labels "
        "and the split. Leave empty for real data.",
    )
    labels: tuple = setting(
        (),
        "Label ids to predict (parcellation / freesurfer / msd / nnunet; default: the data set's own "
        "labels where it names them; BraTS always predicts WT/TC/ET).",
        item=int,
    )
    manifest: str = setting("", "Path of a manifest.json (default: in --data_dir or its parent).")
    splits_file: str = setting(
        "", "JSON with train/val/test case lists (default: the manifest's, or a seeded split)."
    )
    split_seed: int = setting(0, "Seed of the seeded split and of the data fraction.")
    val_fraction: float = setting(0.2, "Validation share of a seeded split (real data).")
    test_fraction: float = setting(0.2, "Test share of a seeded split (real data).")
    fraction: float = setting(
        1.0,
        "Fraction of the annotated pool (train + val) used, split 80/20 into train/val; nested "
        "across fractions (paper Table 1: 4 % of 255 = 8 + 2 cases). 1: the split itself.",
    )
    normalisation: str = setting(
        "histogram",
        "Intensity normalisation: histogram (original) or zscore.",
        choices=NORMALISATIONS,
    )
    spacing: float = setting(0.0, "Resample to this spacing in mm (0: keep).")
    cache_dir: str = setting("", "Preprocessing cache (default <data_dir>/../.timm_cache).")

    def __post_init__(self):
        if not self.data_dir or not self.layout:
            missing = [f"--{n}" for n in ("data_dir", "layout") if not getattr(self, n)]
            raise ConfigError(f"missing required flag(s): {', '.join(missing)}")
        if self.layout not in LAYOUT_NAMES:
            raise ConfigError(f"--layout must be one of {', '.join(LAYOUT_NAMES)}, got {self.layout!r}")
        if self.label_map and self.layout not in ("freesurfer", "parcellation"):
            raise ConfigError(
                f"--label_map applies to --layout=freesurfer or parcellation, not {self.layout}"
            )
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")


@dataclass(frozen=True)
class DeviceConfig(Config):
    """Where a run computes: the devices of its data-parallel mesh and, for multi-host runs, the
    ``jax.distributed`` processes. Not part of a run's configuration key: a run may resume on
    another number of devices or processes."""

    num_devices: int = setting(
        0,
        "Devices of the data-parallel mesh (0: every visible device, of every process). The "
        "global --batch_size must divide over them.",
    )
    distributed: bool = setting(
        False,
        "Start jax.distributed (multi-host run). Without --coordinator_address/--num_processes/"
        "--process_id, JAX detects them from the cluster (Slurm, Open MPI, ...).",
    )
    coordinator_address: str = setting("", "host:port of process 0 (multi-host runs).")
    num_processes: int = setting(0, "Number of processes of a multi-host run (0: detect).")
    process_id: int = setting(-1, "This process's index, 0 .. num_processes-1 (-1: detect).")
    distributed_timeout: int = setting(300, "Seconds to wait for every process to join.")

    def __post_init__(self):
        if self.num_devices < 0:
            raise ConfigError(f"--num_devices must be >= 0, got {self.num_devices}")
        if self.num_processes < 0:
            raise ConfigError(f"--num_processes must be >= 0, got {self.num_processes}")
        if self.num_processes and not -1 <= self.process_id < self.num_processes:
            raise ConfigError(
                f"--process_id must be in 0..{self.num_processes - 1} for --num_processes="
                f"{self.num_processes}, got {self.process_id}"
            )
        if self.distributed_timeout < 1:
            raise ConfigError(f"--distributed_timeout must be >= 1 s, got {self.distributed_timeout}")

    @property
    def multi_process(self) -> bool:
        """Whether ``jax.distributed`` is to be started."""
        return self.distributed or bool(self.coordinator_address) or self.num_processes > 1
