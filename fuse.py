"""Fuse T >= 1 trained runs into an initialisation for a target task: IMM or T-IMM.

Example (T-IMM of M1 and M2 for the tumour task, then fine-tune with train.py --init=fused):
  python fuse.py --source=runs/m1,runs/m2 --data_dir=demo_out/brats --layout=brats --task_key=task3 \
      --fraction=0.08 --method=timm --out=runs/timm_fused
"""
from absl import app, flags

from timm_jax import cli
from timm_jax.fusion import fuse_models

cli.define_data_flags()
cli.define_train_flags(lr_default=5e-4)
flags.DEFINE_list("source", [], "Source run directories (trained with train.py).")
flags.DEFINE_string("out", None, "Output run directory for the fused checkpoint.")
flags.DEFINE_enum("method", "timm", ["imm", "timm"], "imm: equal ratios; timm: learn ratios (adaption).")
flags.DEFINE_enum("imm_mode", "mode", ["mode", "mean"], "mode-IMM (Fisher-weighted) or mean-IMM.")
flags.DEFINE_enum("granularity", "layer", ["leaf", "layer", "global"], "One mixing logit vector per ...")
flags.DEFINE_enum("fisher", "empirical", ["empirical", "true"], "Reference labels or sampled labels.")
flags.DEFINE_integer("fisher_examples", 0, "Use at most this many training cases for the Fisher (0: all).")
flags.DEFINE_float("logits_learning_rate", 0.05, "Adam learning rate of the mixing logits in the "
                   "adaption stage (task-specific leaves use --learning_rate).")
FLAGS = flags.FLAGS


@cli.report_errors
def main(argv):
    if not FLAGS.out:
        raise flags.ValidationError("missing required flag: --out")
    if not FLAGS.source:
        raise flags.ValidationError("missing required flag: --source (one or more run directories)")
    fuse_models(FLAGS.source, cli.data_spec_from_flags(), FLAGS.out, method=FLAGS.method,
                imm_mode=FLAGS.imm_mode, granularity=FLAGS.granularity, fisher_kind=FLAGS.fisher,
                fisher_max_examples=FLAGS.fisher_examples, adapt_cfg=cli.train_config_from_flags(),
                logits_learning_rate=FLAGS.logits_learning_rate)


if __name__ == "__main__":
    app.run(main)
