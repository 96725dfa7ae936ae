"""absl flag definitions shared by ``train.py``, ``fuse.py`` and ``evaluate.py``.

The scripts call ``define_*`` at import, and ``*_from_flags`` inside ``main``; nothing else.
"""
from __future__ import annotations

from absl import flags

from timm_jax.config import ModelConfig, TrainConfig
from timm_jax.experiment import DataSpec

FLAGS = flags.FLAGS


def define_data_flags(prefix: str = "") -> None:
    p = prefix
    flags.DEFINE_string(f"{p}data_dir", None, "Root of the data layout (<dir>/<case>/...).")
    flags.DEFINE_enum(f"{p}layout", None, ["brats", "parcellation"], "Data layout.")
    flags.DEFINE_string(f"{p}task_key", "", "Task of a demo manifest.json (task1, task2, task3): "
                        "sets the labels and the split.")
    flags.DEFINE_list(f"{p}labels", [], "Parcellation label ids to predict (real data).")
    flags.DEFINE_string(f"{p}splits_file", "", "JSON with train/val/test case lists (default: a "
                        "seeded split, or the manifest's).")
    flags.DEFINE_integer(f"{p}split_seed", 0, "Seed of the split and of the data fraction.")
    flags.DEFINE_float(f"{p}fraction", 1.0, "Fraction of the training cases used (nested, >= 1 case).")
    flags.DEFINE_string(f"{p}normalisation", "histogram", "histogram (original) or zscore.")
    flags.DEFINE_float(f"{p}spacing", 0.0, "Resample to this spacing in mm (0: keep).")
    flags.DEFINE_string(f"{p}cache_dir", "", "Preprocessing cache (default <data_dir>/../.timm_cache).")


def data_spec_from_flags(prefix: str = "") -> DataSpec:
    p = prefix
    missing = [f"--{p}{n}" for n in ("data_dir", "layout") if FLAGS[f"{p}{n}"].value is None]
    if missing:
        raise flags.ValidationError(f"missing required flag(s): {', '.join(missing)}")
    pp = {"normalisation": FLAGS[f"{p}normalisation"].value}
    if FLAGS[f"{p}spacing"].value:
        pp["spacing"] = FLAGS[f"{p}spacing"].value
    return DataSpec(data_dir=FLAGS[f"{p}data_dir"].value, layout=FLAGS[f"{p}layout"].value,
                    task_key=FLAGS[f"{p}task_key"].value,
                    labels=tuple(int(v) for v in FLAGS[f"{p}labels"].value),
                    splits_file=FLAGS[f"{p}splits_file"].value, split_seed=FLAGS[f"{p}split_seed"].value,
                    fraction=FLAGS[f"{p}fraction"].value, preprocess=pp,
                    cache_dir=FLAGS[f"{p}cache_dir"].value)


def define_model_flags() -> None:
    flags.DEFINE_integer("base_filters", 16, "Filters at the finest level (paper: 16).")
    flags.DEFINE_integer("depth", 5, "Number of levels (paper: 5).")
    flags.DEFINE_float("dropout", 0.3, "Spatial dropout rate in the context modules.")
    flags.DEFINE_enum("conv_impl", "auto", ["auto", "native", "depth2d", "direct"],
                      "3D convolution implementation (auto: the hand-written 'direct' kernels on "
                      "CPU, or 'depth2d' if they cannot be compiled; 'native' elsewhere).")


def model_config_from_flags() -> ModelConfig:
    return ModelConfig(base_filters=FLAGS.base_filters, depth=FLAGS.depth,
                       dropout_rate=FLAGS.dropout, conv_impl=FLAGS.conv_impl)


def define_train_flags(lr_default: float = 5e-4) -> None:
    flags.DEFINE_float("learning_rate", lr_default, "Adam learning rate.")
    flags.DEFINE_integer("batch_size", 2, "Patches per step.")
    flags.DEFINE_list("patch", ["32", "32", "32"], "Patch shape D,H,W (divisible by 2^(depth-1)).")
    flags.DEFINE_integer("steps_per_epoch", 20, "Training steps per epoch (validation after each).")
    flags.DEFINE_integer("max_epochs", 100, "Maximum number of epochs.")
    flags.DEFINE_integer("plateau_patience", 10, "Epochs without improvement before the LR is halved.")
    flags.DEFINE_float("plateau_factor", 0.5, "LR factor on plateau.")
    flags.DEFINE_integer("early_stopping_patience", 50, "Epochs without improvement before stopping.")
    flags.DEFINE_float("foreground_rate", 0.33, "Probability that a patch is centred on foreground.")
    flags.DEFINE_bool("augment", True, "Flips and intensity augmentation.")
    flags.DEFINE_enum("loss", "dice", ["dice", "ce", "dice+ce"], "Training loss.")
    flags.DEFINE_integer("seed", 0, "Seed of initialisation, dropout and patch sampling.")
    flags.DEFINE_integer("num_workers", 0, "Input pipeline worker processes (0: in-process).")


def train_config_from_flags() -> TrainConfig:
    try:
        patch = tuple(int(v) for v in FLAGS.patch)
    except ValueError:
        raise flags.ValidationError(f"--patch must be three integers, got {FLAGS.patch}") from None
    if len(patch) != 3:
        raise flags.ValidationError(f"--patch must be three integers, got {FLAGS.patch}")
    return TrainConfig(learning_rate=FLAGS.learning_rate, batch_size=FLAGS.batch_size, patch_shape=patch,
                       steps_per_epoch=FLAGS.steps_per_epoch, max_epochs=FLAGS.max_epochs,
                       plateau_patience=FLAGS.plateau_patience, plateau_factor=FLAGS.plateau_factor,
                       early_stopping_patience=FLAGS.early_stopping_patience,
                       foreground_rate=FLAGS.foreground_rate, augment=FLAGS.augment, loss=FLAGS.loss,
                       seed=FLAGS.seed, num_workers=FLAGS.num_workers)


def report_errors(main):
    """Wrap a script's main: expected errors print one clear line and exit with status 2."""
    import os
    import sys

    from timm_jax.checkpoint import CheckpointError
    from timm_jax.data.io import DataError

    def wrapped(argv):
        from absl import logging
        logging.set_verbosity(logging.WARNING)   # orbax logs every file operation at INFO
        import logging as std_logging
        # a corrupt checkpoint leaves a failed orbax task whose traceback asyncio logs at exit,
        # after our one-line error; the error itself is reported by CheckpointError
        std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
        try:
            if len(argv) > 1:
                raise flags.ValidationError(f"unexpected positional arguments: {argv[1:]}")
            return main(argv)
        except (CheckpointError, DataError, OSError, KeyError, ValueError, FloatingPointError,
                flags.ValidationError) as e:
            sys.stdout.flush()
            sys.stderr.flush()
            # Every checkpoint write has been waited for by now. After a failed restore, orbax's
            # background threads print "Event loop is closed" tracebacks while the interpreter
            # shuts down, burying the one-line error: silence the process's own output first,
            # then write the error to the original stderr and leave.
            stderr = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.write(stderr, f"error: {e}\n".encode())
            os._exit(2)
    return wrapped
