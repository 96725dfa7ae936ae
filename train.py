"""Train one model on one task (no transfer, transfer from a run, or from a fused checkpoint).

Examples:
  python train.py --data_dir=demo_out/parcellation --layout=parcellation --task_key=task1 --workdir=runs/m1
  python train.py --data_dir=demo_out/brats --layout=brats --task_key=task3 --fraction=0.08 \
      --init=transfer --init_from=runs/m1 --workdir=runs/t3_from_m1
Re-running the same command resumes from the latest checkpoint in --workdir.
"""
from absl import app, flags

from timm_jax import cli
from timm_jax.runs import train_model

cli.define_data_flags()
cli.define_model_flags()
cli.define_train_flags()
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, config.json).")
flags.DEFINE_enum("init", "random", ["random", "transfer", "fused"],
                  "random (no transfer), transfer (from a trained run) or fused (from fuse.py).")
flags.DEFINE_string("init_from", "", "Run directory to initialise from (with --init=transfer/fused).")
FLAGS = flags.FLAGS


@cli.report_errors
def main(argv):
    if not FLAGS.workdir:
        raise flags.ValidationError("missing required flag: --workdir")
    train_model(cli.data_spec_from_flags(), cli.model_config_from_flags(), cli.train_config_from_flags(),
                FLAGS.workdir, init=FLAGS.init, init_from=FLAGS.init_from)


if __name__ == "__main__":
    app.run(main)
