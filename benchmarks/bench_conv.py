"""Native 3D convolution vs the depth-folded 2D formulation ("depth2d") vs the hand-written CPU
kernels ("direct") on this backend.

Times, for ``conv_impl`` in {native, depth2d, direct}:
  1. one 3×3×3 convolution at the shapes of the demo and paper networks' finest levels:
     forward, and forward+backward (GFLOP/s counts 3 convolutions' worth for the latter);
  2. a training-step-like ``value_and_grad`` of a mean-squared loss of the Isensee et al. (2017)
     UNet3D at (2×32³×4, base 8) and (1×64³×4, base 16).

Everything is jitted; compilation and a warm-up call are excluded; the median (and minimum) of
several runs is reported. The UNet step runs in training mode (spatial dropout on).
Usage: ``python benchmarks/bench_conv.py [--repeats N] [--skip-large]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from timm_jax.nn.unet import UNet3D, conv3d, count_params, init_params

IMPLS = ("native", "depth2d", "direct")


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    """(median, min) wall time in ms of ``fn(*args)`` after one warm-up call; blocks on the result."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


CONV_SHAPES = [  # (batch, size, Cin, Cout): the finest levels of the demo and paper networks
    (2, 32, 8, 8),
    (2, 32, 16, 8),
    (2, 32, 16, 16),
    (1, 64, 16, 16),
    (1, 64, 32, 16),
]


def bench_single_conv(repeats: int) -> list[tuple[str, str, tuple[float, float], str]]:
    rows = []
    for b, n, cin, cout in CONV_SHAPES:
        kx, kk = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (b, n, n, n, cin))
        kernel = jax.random.normal(kk, (3, 3, 3, cin, cout)) * 0.1
        flops = 2 * b * n**3 * 27 * cin * cout  # multiply-adds ×2, stride 1, SAME
        label = f"conv 3³ {b}×{n}³×{cin}→{cout}"
        for impl in IMPLS:
            fwd = jax.jit(lambda x, k, impl=impl: conv3d(x, k, 1, impl))
            fwd_bwd = jax.jit(
                jax.value_and_grad(
                    lambda x, k, impl=impl: jnp.sum(conv3d(x, k, 1, impl) ** 2), argnums=(0, 1)
                )
            )
            reps = repeats if (impl != "native" or n <= 32) else 2
            t_f = _time(fwd, x, kernel, repeats=reps)
            t_fb = _time(fwd_bwd, x, kernel, repeats=reps)
            rows.append((f"{label} fwd", impl, t_f, f"{flops / t_f[0] / 1e6:.0f} GFLOP/s"))
            rows.append((f"{label} fwd+bwd", impl, t_fb, f"{3 * flops / t_fb[0] / 1e6:.0f} GFLOP/s"))
    return rows


def bench_unet(shape, base: int, repeats: int) -> list[tuple[str, str, tuple[float, float], str]]:
    x = jax.random.normal(jax.random.key(1), shape)
    target = jax.random.normal(jax.random.key(2), shape[:-1] + (3,))
    rows = []
    params = None
    for impl in IMPLS:
        model = UNet3D(out_channels=3, base_filters=base, conv_impl=impl)
        if params is None:
            params = init_params(model, jax.random.key(0), shape)

        def loss(p, x, key, model=model):
            y = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            return jnp.mean((y - target) ** 2)

        step = jax.jit(jax.value_and_grad(loss))
        t = _time(step, params, x, jax.random.key(3), repeats=repeats)
        label = f"UNet3D value_and_grad {shape[0]}×{shape[1]}³×{shape[-1]}, base {base}"
        rows.append((label, impl, t, f"{count_params(params) / 1e6:.2f} M params"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-large", action="store_true", help="skip the 1×64³ base-16 network")
    args = parser.parse_args()

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    rows = bench_single_conv(args.repeats)
    rows += bench_unet((2, 32, 32, 32, 4), 8, args.repeats)
    if not args.skip_large:
        rows += bench_unet((1, 64, 64, 64, 4), 16, max(3, args.repeats // 2))
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'impl':<8} {'median ms':>10} {'min ms':>9}  note")
    for name, impl, (med, best), note in rows:
        print(f"{name:<{width}}  {impl:<8} {med:>10.1f} {best:>9.1f}  {note}")


if __name__ == "__main__":
    main()
