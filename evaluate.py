"""Evaluate a run's best checkpoint on a split: per-case Dice/HD95 CSV, summary JSON, NIfTI maps.

Examples:
  python evaluate.py --run=runs/t3_timm --split=test
  python evaluate.py --run=runs/timm_fused --forgetting=runs/m1,runs/m2   # paper Table 4
"""
from absl import app, flags

from timm_jax import cli
from timm_jax.runs import evaluate_model, evaluate_forgetting

flags.DEFINE_string("run", None, "Run directory (train.py workdir or fuse.py output).")
flags.DEFINE_string("split", "test", "Split to evaluate: train, val or test.")
flags.DEFINE_string("out", "", "Output directory (default <run>/eval_<split>).")
flags.DEFINE_string("data_dir", "", "Override the run's data directory (e.g. data moved).")
flags.DEFINE_list("patch", [], "Sliding-window patch D,H,W (default: whole volume in one pass).")
flags.DEFINE_float("overlap", 0.5, "Sliding-window overlap fraction.")
flags.DEFINE_bool("hd95", True, "Also compute the 95th-percentile Hausdorff distance.")
flags.DEFINE_bool("save_predictions", False, "Write predicted label maps as NIfTI (source affine).")
flags.DEFINE_list("forgetting", [], "Source runs: evaluate the run's transferable params with each "
                  "source's task-specific leaves on that source's task (paper Table 4).")
FLAGS = flags.FLAGS


@cli.report_errors
def main(argv):
    if not FLAGS.run:
        raise flags.ValidationError("missing required flag: --run")
    try:
        patch = tuple(int(v) for v in FLAGS.patch) if FLAGS.patch else None
    except ValueError:
        raise flags.ValidationError(f"--patch must be integers D,H,W, got {FLAGS.patch}") from None
    kw = dict(split_name=FLAGS.split, patch_shape=patch, overlap=FLAGS.overlap, hd95=FLAGS.hd95)
    if FLAGS.forgetting:
        evaluate_forgetting(FLAGS.run, FLAGS.forgetting, out_dir=FLAGS.out, **kw)
    else:
        evaluate_model(FLAGS.run, out_dir=FLAGS.out, data_dir=FLAGS.data_dir,
                       save_predictions=FLAGS.save_predictions, **kw)


if __name__ == "__main__":
    app.run(main)
