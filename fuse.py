r"""Fuse T >= 1 trained runs into an initialisation for a target task: IMM or T-IMM.

Example (T-IMM of M1 and M2 for the tumour task, then fine-tune with train.py --init=fused):
  python fuse.py --source=runs/m1,runs/m2 --data_dir=demo_out/data/brats --layout=brats \
      --task_key=task3 --fraction=0.08 --method=timm --out=runs/timm_fused
The training flags (--learning_rate, --max_epochs, ...) set the T-IMM adaption stage.
"""

from absl import flags

from timm_jax import cli
from timm_jax.config import DeviceConfig, FuseConfig, TrainConfig
from timm_jax.data.spec import DataSpec
from timm_jax.errors import ConfigError
from timm_jax.workflows.fuse import fuse_models

cli.define_flags(DataSpec, group="Target data", section="data")
cli.define_flags(DeviceConfig, group="Devices and processes")
cli.define_flags(TrainConfig, group="Adaption stage (T-IMM)", section="train")
cli.define_flags(FuseConfig, group="Fusion", section="fuse")
flags.DEFINE_list("source", [], "Source run directories (trained with train.py).")
flags.DEFINE_string("out", None, "Output run directory for the fused checkpoint.")
cli.define_config_flag(out=lambda meta, run: run, source=lambda meta, run: [s[0] for s in meta["sources"]])
FLAGS = flags.FLAGS


def main():
    if not FLAGS.out:
        raise ConfigError("missing required flag: --out")
    if not FLAGS.source:
        raise ConfigError("missing required flag: --source (one or more run directories)")
    fuse_models(
        FLAGS.source,
        cli.from_flags(DataSpec),
        FLAGS.out,
        cli.from_flags(FuseConfig),
        cli.from_flags(TrainConfig),
        devices=cli.from_flags(DeviceConfig),
    )


if __name__ == "__main__":
    cli.run(main)
