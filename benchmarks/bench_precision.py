"""Train step of the paper's network in float32 and bfloat16 activations, timed interleaved.

Configurations (the paper's): 1 x 128^3 x 4 and 2 x 64^3 x 4 patches, base 16, depth 5, three
output channels, Adam, soft Dice. ``--precision=bfloat16`` casts the activations (the network's
``dtype``); parameters, gradients, the optimiser and the logits stay float32. Meant for a GPU
(``benchmarks/gpu_check.sh``, native convolution); on CPU use ``--quick`` (small patches).

    python benchmarks/bench_precision.py [--impl native] [--repeats 10] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_steps import interleaved_medians  # noqa: E402

from timm_jax.config import ModelConfig  # noqa: E402
from timm_jax.nn.unet import build_model, count_params, init_params  # noqa: E402
from timm_jax.training.steps import create_state, make_optimizer, make_train_step  # noqa: E402


def step_fn(batch: int, size: int, precision: str, impl: str):
    cfg = ModelConfig(in_channels=4, out_channels=3, conv_impl=impl, precision=precision)
    model, cfg = build_model(cfg)
    shape = (batch, size, size, size, 4)
    params = init_params(model, jax.random.PRNGKey(0), (1, *shape[1:]))
    opt = make_optimizer()
    state = [create_state(params, opt, jax.random.PRNGKey(1))]
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal(shape).astype(np.float32))
    data = {"image": x, "target": jax.device_put((np.asarray(x)[..., :3] > 0.5).astype(np.float32))}
    step = make_train_step(model, opt)

    def run():
        state[0], m = step(state[0], data)
        m["loss"].block_until_ready()
        return float(m["loss"])

    return cfg.conv_impl, count_params(params), run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="native", help="conv_impl (native on GPU)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="1 x 32^3 and 2 x 16^3 (CPU smoke run)")
    args = ap.parse_args()
    shapes = [(1, 32), (2, 16)] if args.quick else [(1, 128), (2, 64)]
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.platform} ({dev.device_kind}), conv_impl={args.impl}")
    fns, losses = {}, {}
    for b, s in shapes:
        for precision in ("float32", "bfloat16"):
            impl, n_params, fn = step_fn(b, s, precision, args.impl)
            fns[(b, s, precision)] = fn
            losses[(b, s, precision)] = [fn(), fn()]  # compile + warm up
    medians = interleaved_medians(fns, args.repeats)
    print(f"\n{n_params:,} parameters; median of {args.repeats} interleaved steps\n")
    print("| batch | patch | activations | ms / step | Mvoxel/s | vs float32 | first losses |")
    print("|---:|---|---|---:|---:|---:|---|")
    for (b, s, precision), med in medians.items():
        f32 = medians[(b, s, "float32")]
        first = ", ".join(f"{v:.4f}" for v in losses[(b, s, precision)])
        print(
            f"| {b} | {s}³ | {precision} | {med * 1e3:.1f} | {b * s**3 / med / 1e6:.1f} | "
            f"{f32 / med:.2f}× | {first} |"
        )


if __name__ == "__main__":
    main()
