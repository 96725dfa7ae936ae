"""Segment unlabelled scans with a trained run (or a model bundle), in the input's own geometry.

Examples:
  python predict.py --run=runs/t3_timm --input=/data/brats2023/val --out=seg/       # a data folder
  python predict.py --run=bundles/m1 --input=sub01_t1.nii.gz,sub01_t2.nii.gz --out=seg/ --probabilities
Writes <out>/<case>_seg.nii.gz (and <case>_prob.nii.gz + .json); --input files: one per modality,
in the run's modality order (the log names it).
"""

from absl import flags

from timm_jax import cli
from timm_jax.config import DeviceConfig
from timm_jax.data.io import LAYOUT_NAMES
from timm_jax.errors import ConfigError
from timm_jax.workflows.predict import predict

cli.define_flags(DeviceConfig)
flags.DEFINE_string("run", None, "Run directory (train.py workdir or fuse.py output) or model bundle.")
flags.DEFINE_list("input", [], "A data folder, or the comma-separated image files of ONE case.")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_enum("layout", None, list(LAYOUT_NAMES), "Layout of an --input folder (default: the run's).")
flags.DEFINE_string("case_id", "", "Name of the case given as files (default: from the first file's name).")
flags.DEFINE_bool("probabilities", False, "Also write per-channel probability maps (4-D NIfTI + JSON).")
flags.DEFINE_float("overlap", 0.5, "Sliding-window overlap fraction.")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs (default: refuse).")
FLAGS = flags.FLAGS


def main():
    for name in ("run", "out"):
        if not FLAGS[name].value:
            raise ConfigError(f"missing required flag: --{name}")
    if not 0 <= FLAGS.overlap < 1:
        raise ConfigError(f"--overlap must be in [0, 1), got {FLAGS.overlap}")
    predict(
        FLAGS.run,
        FLAGS.input,
        FLAGS.out,
        layout=FLAGS.layout or "",
        probabilities=FLAGS.probabilities,
        overlap=FLAGS.overlap,
        overwrite=FLAGS.overwrite,
        case_id=FLAGS.case_id,
        devices=cli.from_flags(DeviceConfig),
    )


if __name__ == "__main__":
    cli.run(main)
