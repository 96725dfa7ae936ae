"""Benchmark of the fusion step as users write it: ``jax.jit(imm_merge)(params_list, fishers, logits)``.

On the full Isensee network (8.27 M parameters, the paper's defaults) for T = 2, 4, 8 sources,
mode-IMM (with Fishers) and mean-IMM. The step is memory-bound: it reads T parameter sets and T
Fishers and writes one, so the figure of merit is achieved bandwidth as a fraction of the
machine's copy bandwidth, measured in the same run (best of a jitted JAX copy and numpy's
memcpy over a buffer of the same size as the merge's traffic).

Also times the naive alternative (``jnp.stack`` per leaf then reduce) for reference. All times
are the best of ``--repeats`` runs (for the merge and for the copies alike), which is the most
stable statistic on a shared machine.

Usage: python benchmarks/bench_merge.py [--repeats 20] [--sources 2,4,8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from timm_jax.core.merge import imm_merge, mixing_ratios, uniform_logits
from timm_jax.core.partition import split
from timm_jax.nn.unet import UNet3D, count_params


def timeit(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.min(ts))


def copy_bandwidth(nbytes: int, repeats: int) -> tuple[float, float]:
    n = nbytes // 4 // 2  # half read, half write
    x = jnp.ones((n,), jnp.float32)
    t_jax = timeit(jax.jit(lambda a: a + 1.0), x, repeats=repeats)
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t)
    t_np = float(np.min(ts))
    return 2 * n * 4 / t_jax, 2 * n * 4 / t_np


def stack_merge(params_list, fishers, logits, eps=1e-8):
    """Naive reference: stack the T versions of each leaf, then reduce over the stack axis."""
    alphas = mixing_ratios(logits)

    def leaf(alpha, *xs):
        T = len(xs) // 2
        th, f = jnp.stack(xs[:T]), jnp.stack(xs[T:])
        a = alpha.reshape((T,) + (1,) * (th.ndim - 1))
        return jnp.sum(a * f * th, 0) / (jnp.sum(a * f, 0) + eps)

    return jax.tree_util.tree_map(leaf, alphas, *params_list, *fishers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sources", default="2,4,8")
    args = ap.parse_args()
    model = UNet3D(out_channels=3)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 16, 4))))[
        "params"
    ]
    transferable = split(shapes).transferable
    n_all, n = count_params(shapes), count_params(transferable)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
        f"network {n_all:,} params, {n:,} transferable; best of {args.repeats}"
    )
    rng = np.random.default_rng(0)
    make = lambda positive=False: jax.tree_util.tree_map(  # noqa: E731
        lambda s: jnp.asarray(
            np.abs(rng.standard_normal(s.shape, np.float32))
            if positive
            else rng.standard_normal(s.shape, np.float32)
        ),
        transferable,
    )
    merge = jax.jit(imm_merge)
    naive = jax.jit(stack_merge)
    print(f"{'T':>2} {'mode':>5} {'ms':>8} {'GB/s':>7} {'copy GB/s':>9} {'fraction':>8} {'stack ms':>9}")
    for T in [int(t) for t in args.sources.split(",")]:
        params = [make() for _ in range(T)]
        fishers = [make(True) for _ in range(T)]
        logits = uniform_logits(transferable, T)
        for mode, fis in (("mode", fishers), ("mean", None)):
            traffic = ((2 * T if fis is not None else T) + 1) * n * 4
            bw_jax, bw_np = copy_bandwidth(traffic, args.repeats)
            copy_bw = max(bw_jax, bw_np)
            t = timeit(merge, params, fis, logits, repeats=args.repeats)
            t_naive = (
                timeit(naive, params, fishers, logits, repeats=args.repeats)
                if fis is not None
                else float("nan")
            )
            print(
                f"{T:>2} {mode:>5} {t * 1e3:8.2f} {traffic / t / 1e9:7.1f} {copy_bw / 1e9:9.1f} "
                f"{traffic / t / copy_bw:8.2f} {t_naive * 1e3:9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
