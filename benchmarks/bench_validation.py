"""Validation cost per epoch: sliding windows at the training patch vs one whole-volume pass.

The validation after every epoch used to predict each validation case in one pass of the padded
whole volume (a different network for a patch-trained, instance-normalised model); it now runs
the evaluation's sliding windows at the training patch (`training.inference.make_predictor`).
This script times, interleaved in one run on the demo configuration (base 8, depth 5, 32³
patches, 48×64×48×4 volumes as at 3 mm), the validation of N cases:

* ``whole``: the old way — one pass of the volume padded to a multiple of 16, loss and Dice;
* ``windows 0.5`` / ``windows 0``: `window_evaluator` with overlap 0.5 (the default
  ``--val_overlap``, evaluate.py's) and 0;

and, for scale, one training epoch of the demo (20 steps of 2 patches).

    python benchmarks/bench_validation.py [--cases 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from types import SimpleNamespace

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_steps import interleaved_medians  # noqa: E402

from timm_jax.core.losses import probability_loss  # noqa: E402
from timm_jax.nn.unet import UNet3D, init_params  # noqa: E402
from timm_jax.training.inference import make_predictor, model_apply, sliding_window_predict  # noqa: E402
from timm_jax.training.loop import window_evaluator  # noqa: E402
from timm_jax.training.metrics import evaluate_case  # noqa: E402
from timm_jax.training.steps import create_state, make_optimizer, make_train_step  # noqa: E402

SHAPE = (48, 64, 48)
PATCH = (32, 32, 32)


class _Task(SimpleNamespace):
    channel_names = ("WT", "TC", "ET")

    def targets(self, labels):
        return np.stack([labels > 0, labels > 1, labels > 2], -1).astype(np.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=4, help="validation cases (8 %% of the demo pool: 4)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = [
        SimpleNamespace(
            image=rng.standard_normal((*SHAPE, 4)).astype(np.float32), labels=rng.integers(0, 4, SHAPE)
        )
        for _ in range(args.cases)
    ]
    task = _Task()
    model = UNet3D(out_channels=3, base_filters=8)
    params = init_params(model, jax.random.PRNGKey(0), (1, *PATCH, 4))
    apply_fn = model_apply(model)

    def whole():  # the validation before: one padded pass per case
        for c in cases:
            probs = sliding_window_predict(apply_fn, params, c.image, patch_shape=None, divisor=16)
            t = task.targets(c.labels)
            float(probability_loss(probs[None], t[None], "dice"))
            evaluate_case(probs, t, task.channel_names, compute_hd95=False)

    windows = {
        ov: window_evaluator(make_predictor(model, PATCH, overlap=ov), cases, task) for ov in (0.5, 0.0)
    }
    opt = make_optimizer(1e-3)
    step = make_train_step(model, opt)
    copy = jax.tree_util.tree_map(lambda a: a.copy(), params)  # the step donates its state
    state = [create_state(copy, opt, jax.random.PRNGKey(1))]
    batch = {
        "image": rng.standard_normal((2, *PATCH, 4)).astype(np.float32),
        "target": (rng.random((2, *PATCH, 3)) > 0.5).astype(np.float32),
    }

    def epoch():
        for _ in range(20):
            state[0], m = step(state[0], batch)
        jax.block_until_ready(m["loss"])

    fns = {
        "whole": whole,
        "windows 0.5": lambda: windows[0.5](params),
        "windows 0": lambda: windows[0.0](params),
    }
    fns["train epoch (20 steps)"] = epoch
    for fn in fns.values():  # compile
        fn()
    t = interleaved_medians(fns, args.repeats)
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"validation of {args.cases} cases {'x'.join(map(str, SHAPE))}, patch {'x'.join(map(str, PATCH))}")
    print("| what | s per epoch | vs whole |")
    print("|---|---:|---:|")
    for name, sec in t.items():
        ratio = "" if name.startswith("train") else f"{sec / t['whole']:.2f}"
        print(f"| {name} | {sec:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
