"""Data-parallel train and adaption steps on 1, 2, 4, ... devices of one process, timed interleaved.

On CPU the devices are forced host devices (``--xla_force_host_platform_device_count``, set
here before JAX is imported) that share the machine's cores, so this is an *overhead* check —
how much the sharding, the gradient all-reduce and the replicated fallback of the C++ kernels
cost — not a scaling measurement. On a machine with several GPUs the same script gives real
data-parallel speed-ups (``--devices`` up to the GPU count; no forced devices there).

    python benchmarks/bench_devices.py [--devices 1,2,4] [--impls auto,depth2d] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--devices", default="1,2,4", help="mesh sizes to time (comma-separated)")
ap.add_argument("--impls", default="auto,depth2d", help="conv_impl values (auto = C++ kernels on CPU)")
ap.add_argument("--batch", type=int, default=4, help="global batch (a multiple of every mesh size)")
ap.add_argument("--patch", type=int, default=32)
ap.add_argument("--base", type=int, default=8, help="base filters of the U-Net")
ap.add_argument("--repeats", type=int, default=7)
args = ap.parse_args()
sizes = [int(n) for n in args.devices.split(",")]
if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(sizes)}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_steps import interleaved_medians  # noqa: E402

from timm_jax.config import ModelConfig  # noqa: E402
from timm_jax.core.merge import init_logits  # noqa: E402
from timm_jax.core.partition import split  # noqa: E402
from timm_jax.nn.unet import build_model, init_params  # noqa: E402
from timm_jax.training.parallel import DataParallel, make_mesh  # noqa: E402
from timm_jax.training.steps import (  # noqa: E402
    create_state,
    make_adaption_optimizer,
    make_adaption_step,
    make_optimizer,
    make_train_step,
)


def steps(impl: str, n: int):
    model, cfg = build_model(
        ModelConfig(in_channels=4, out_channels=3, base_filters=args.base, depth=5, conv_impl=impl)
    )
    dp = DataParallel(make_mesh(n))
    shape = (1, *(args.patch,) * 3, 4)
    params = jax.device_get(init_params(model, jax.random.PRNGKey(0), shape))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *shape[1:])).astype(np.float32)
    batch = dp.shard({"image": x, "target": (x[..., :3] > 0.5).astype(np.float32)})
    opt = make_optimizer()
    train = make_train_step(model, opt, mesh=dp.mesh)
    state = [dp.replicate(create_state(params, opt, jax.random.PRNGKey(1)))]
    parts = [split(jax.device_get(init_params(model, jax.random.PRNGKey(k), shape))) for k in range(2)]
    srcs = dp.replicate([p.transferable for p in parts])
    fishers = dp.replicate([jax.tree_util.tree_map(np.ones_like, p.transferable) for p in parts])
    aopt = make_adaption_optimizer()
    adapt = make_adaption_step(model, aopt, granularity="layer", mesh=dp.mesh)
    trainable = {"logits": init_logits(srcs[0], 2, "layer"), "task": parts[0].task_specific}
    astate = [dp.replicate(create_state(jax.device_get(trainable), aopt, jax.random.PRNGKey(1)))]

    def run_train():
        state[0], m = train(state[0], batch)
        m["loss"].block_until_ready()

    def run_adapt():
        astate[0], m = adapt(astate[0], srcs, fishers, batch)
        m["loss"].block_until_ready()

    return cfg.conv_impl, run_train, run_adapt


def main():
    print(
        f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} device(s) "
        f"({jax.devices()[0].device_kind}); global batch {args.batch} x {args.patch}^3 x 4, base {args.base}"
    )
    fns = {}
    for impl in args.impls.split(","):
        for n in sizes:
            resolved, tr, ad = steps(impl, n)
            fns[(resolved, n, "train")] = tr
            fns[(resolved, n, "adapt")] = ad
    for fn in fns.values():  # compile + warm up
        fn()
        fn()
    medians = interleaved_medians(fns, args.repeats)
    print("\n| conv_impl | devices | step | ms (median) | steps/s | vs 1 device |")
    print("|---|---:|---|---:|---:|---:|")
    for (impl, n, kind), med in medians.items():
        one = medians.get((impl, 1, kind), med)
        print(f"| {impl} | {n} | {kind} | {med * 1e3:.1f} | {1 / med:.2f} | {one / med:.2f} |")


if __name__ == "__main__":
    main()
