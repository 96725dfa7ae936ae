r"""Train one model on one task (no transfer, transfer from a run, or from a fused checkpoint).

Examples:
  python train.py --data_dir=demo_out/data/parcellation --layout=parcellation --task_key=task1 \
      --workdir=runs/m1
  python train.py --data_dir=demo_out/data/brats --layout=brats --task_key=task3 --fraction=0.08 \
      --init=transfer --init_from=runs/m1 --workdir=runs/t3_from_m1
Re-running the same command resumes from the latest checkpoint in --workdir.
"""

from absl import flags

from timm_jax import cli
from timm_jax.config import DeviceConfig, ModelConfig, TrainConfig
from timm_jax.data.spec import DataSpec
from timm_jax.errors import ConfigError
from timm_jax.workflows.train import INITS, train_model

cli.define_flags(DataSpec, group="Data", section="data")
cli.define_flags(DeviceConfig, group="Devices and processes")
cli.define_flags(ModelConfig, group="Network", section="model")
cli.define_flags(TrainConfig, group="Training", section="train")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, config.json).")
flags.DEFINE_enum(
    "init",
    "random",
    list(INITS),
    "random (no transfer), transfer (from a trained run) or fused (from fuse.py).",
)
flags.DEFINE_string("init_from", "", "Run directory to initialise from (with --init=transfer/fused).")
cli.define_config_flag(
    workdir=lambda meta, run: run,
    init=lambda meta, run: meta["init"],
    init_from=lambda meta, run: meta["init_from"],
)
FLAGS = flags.FLAGS


def main():
    if not FLAGS.workdir:
        raise ConfigError("missing required flag: --workdir")
    train_model(
        cli.from_flags(DataSpec),
        cli.from_flags(ModelConfig),
        cli.from_flags(TrainConfig),
        FLAGS.workdir,
        init=FLAGS.init,
        init_from=FLAGS.init_from,
        devices=cli.from_flags(DeviceConfig),
    )


if __name__ == "__main__":
    cli.run(main)
