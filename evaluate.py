r"""Evaluate a run's best checkpoint on a split: per-case Dice/HD95 CSV, summary JSON, NIfTI maps.

Examples:
  python evaluate.py --run=runs/t3_timm --split=test
  python evaluate.py --run=runs/timm_fused --forgetting=runs/m1,runs/m2   # paper Table 4
"""

from absl import flags

from timm_jax import cli
from timm_jax.config import DeviceConfig, EvalConfig
from timm_jax.errors import ConfigError
from timm_jax.workflows.evaluate import evaluate_forgetting, evaluate_model

cli.define_flags(EvalConfig, group="Evaluation")
cli.define_flags(DeviceConfig, group="Devices and processes")
flags.DEFINE_string(
    "run",
    None,
    "Run directory (train.py workdir or fuse.py output) or model bundle (needs --out, --data_dir).",
)
flags.DEFINE_string("out", "", "Output directory (default <run>/eval_<split>, or <run>/forgetting).")
flags.DEFINE_string(
    "data_dir",
    "",
    "Override the run's data directory (e.g. data moved; a bundle's: required); with --forgetting, "
    "every source's.",
)
flags.DEFINE_list(
    "forgetting",
    [],
    "Source runs or bundles: evaluate the run's transferable params with each "
    "source's task-specific leaves on that source's task (paper Table 4).",
)
FLAGS = flags.FLAGS


def main():
    if not FLAGS.run:
        raise ConfigError("missing required flag: --run")
    cfg = cli.from_flags(EvalConfig)
    devices = cli.from_flags(DeviceConfig)
    if FLAGS.forgetting:
        evaluate_forgetting(
            FLAGS.run, FLAGS.forgetting, cfg, out_dir=FLAGS.out, data_dir=FLAGS.data_dir, devices=devices
        )
    else:
        evaluate_model(FLAGS.run, cfg, out_dir=FLAGS.out, data_dir=FLAGS.data_dir, devices=devices)


if __name__ == "__main__":
    cli.run(main)
