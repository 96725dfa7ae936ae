"""Training-step, adaption-step and Fisher throughput of the jitted steps (not a test).

- train step: voxels/s of ``make_train_step`` at the demo configuration (2×32³×4, base 8) and
  the paper's (1×64³×4, base 16), with random batches and fed by the real input pipeline
  (grain, demo data) to check that the pipeline does not starve the step;
- adaption step (T-IMM stage 1, through the merge of T=2 sources) over the plain step (target ≤ 1.2×);
- both with the default convolution (``auto``: the hand-written CPU kernels) and with the pure-XLA
  ``depth2d`` formulation, so the kernels' gain is measured in the same run;
- per-example Fisher: examples/s at 32³ and 64³ for several chunk sizes.

The PyTorch reference step (benchmarks/torch_reference.py) is timed too when torch is installed.
All steps of one configuration are timed interleaved (one call of each per round, medians), so
load drifts on a shared machine hit every candidate alike and the ratios stay meaningful.

Usage: python benchmarks/bench_steps.py [--quick] [--data demo_out/data]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from timm_jax.core.fisher import fisher_diagonal, segmentation_log_likelihood
from timm_jax.core.merge import init_logits
from timm_jax.core.partition import split
from timm_jax.nn.unet import UNet3D, init_params, resolve_conv_impl
from timm_jax.training.steps import create_state, make_adaption_step, make_optimizer, make_train_step


def median_time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def batch(rng, b, s, cin=4, k=3):
    x = rng.standard_normal((b, s, s, s, cin)).astype(np.float32)
    return {"image": x, "target": (x[..., :k] > 0.8).astype(np.float32)}


def step_fns(base, b, s, conv_impl="auto"):
    """Jitted train step and T-IMM adaption step on one fixed batch, as blocking callables."""
    model = UNet3D(out_channels=3, base_filters=base, conv_impl=conv_impl)
    shape = (b, s, s, s, 4)
    params = init_params(model, jax.random.PRNGKey(0), shape)
    opt = make_optimizer(5e-4)
    rng = np.random.default_rng(0)
    data = batch(rng, b, s)
    holder = {"s": create_state(params, opt, jax.random.PRNGKey(1))}
    train = make_train_step(model, opt)

    def run_train():
        holder["s"], m = train(holder["s"], data)
        jax.block_until_ready(m["loss"])

    # adaption through the merge of two sources (+ Fishers), per-layer logits
    p1 = init_params(model, jax.random.PRNGKey(0), shape)  # `params` was donated to the train step
    p2 = init_params(model, jax.random.PRNGKey(2), shape)
    part, part2 = split(p1), split(p2)
    sources = [part.transferable, part2.transferable]
    fishers = [jax.tree_util.tree_map(lambda a: jnp.abs(a) + 1e-3, s) for s in sources]
    aopt = make_optimizer(0.05)
    aholder = {
        "s": create_state(
            {"logits": init_logits(sources[0], 2, "layer"), "task": part.task_specific},
            aopt,
            jax.random.PRNGKey(3),
        )
    }
    adapt = make_adaption_step(model, aopt, granularity="layer")

    def run_adapt():
        aholder["s"], m = adapt(aholder["s"], sources, fishers, data)
        jax.block_until_ready(m["loss"])

    run_train()  # compile
    run_adapt()
    return run_train, run_adapt


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds per callable, calling them in turn each round, so that the machine's
    load drifts (this VM is shared) hit every candidate alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def pipeline_time(data_dir, steps):
    """Train step at the demo configuration fed by the real grain pipeline on demo data."""
    from timm_jax.data.pipeline import make_train_dataset
    from timm_jax.data.spec import DataSpec, resolve

    data = resolve(DataSpec(data_dir=os.path.join(data_dir, "brats"), layout="brats", task_key="task3"))
    cases = data.load(data.train_ids[:8])
    model = UNet3D(out_channels=3, base_filters=8)
    opt = make_optimizer(5e-4)
    state = create_state(
        init_params(model, jax.random.PRNGKey(0), (2, 32, 32, 32, 4)), opt, jax.random.PRNGKey(1)
    )
    train = make_train_step(model, opt)
    it = iter(make_train_dataset(cases, data.task, patch_shape=(32, 32, 32), batch_size=2, seed=0))
    state, m = train(state, next(it))
    jax.block_until_ready(m["loss"])
    t_data = median_time(lambda: next(it), steps)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = train(state, next(it))
    jax.block_until_ready(m["loss"])
    return (time.perf_counter() - t) / steps, t_data


def fisher_rate(s, chunk, n, base=16):
    model = UNet3D(out_channels=3, base_filters=base)
    params = init_params(model, jax.random.PRNGKey(0), (1, s, s, s, 4))
    rng = np.random.default_rng(0)
    d = batch(rng, n, s)
    ll = segmentation_log_likelihood(lambda p, x: model.apply({"params": p}, x))
    fisher_diagonal(ll, params, [(d["image"][:chunk], d["target"][:chunk])], chunk_size=chunk)  # compile
    t = time.perf_counter()
    jax.block_until_ready(fisher_diagonal(ll, params, [(d["image"], d["target"])], chunk_size=chunk))
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the 64^3 configurations")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="demo_out/data", help="demo data for the pipeline-fed step")
    ap.add_argument("--no-fisher", action="store_true", help="skip the Fisher throughput rows")
    ap.add_argument(
        "--conv-impls",
        default="auto,depth2d",
        help="comma-separated UNet3D conv_impl values to time the steps with",
    )
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, conv auto -> {resolve_conv_impl('auto')}")
    configs = [("demo", 8, 2, 32)] + ([] if args.quick else [("paper", 16, 1, 64)])
    try:  # optional reference implementation, measured in the same run
        import torch_reference
    except ImportError:
        torch_reference = None
    print(
        f"{'config':>6} {'batch':>12} {'conv':>8} {'train ms':>9} {'Mvox/s':>7} {'adapt ms':>9} "
        f"{'adapt/train':>11} {'torch ms':>9} {'jax/torch':>9}"
    )
    for name, base, b, s in configs:
        fns = {}
        for impl in args.conv_impls.split(","):
            fns[("train", impl)], fns[("adapt", impl)] = step_fns(base, b, s, conv_impl=impl)
        if torch_reference:
            fns[("torch", "")] = torch_reference.make_step(base, s, b)
        t = interleaved_medians(fns, args.repeats)
        t_torch = t.get(("torch", ""), float("nan"))
        for impl in args.conv_impls.split(","):
            t_train, t_adapt = t[("train", impl)], t[("adapt", impl)]
            print(
                f"{name:>6} {f'{b}x{s}^3 b{base}':>12} {impl:>8} {t_train * 1e3:9.1f} "
                f"{b * s**3 / t_train / 1e6:7.2f} {t_adapt * 1e3:9.1f} {t_adapt / t_train:11.2f} "
                f"{t_torch * 1e3:9.1f} {t_train / t_torch:9.2f}",
                flush=True,
            )
    if os.path.isfile(os.path.join(args.data, "manifest.json")):
        t_fed, t_data = pipeline_time(args.data, 3 * args.repeats)
        print(
            f"pipeline-fed demo step: {t_fed * 1e3:.1f} ms/step; producing one batch alone: "
            f"{t_data * 1e3:.1f} ms",
            flush=True,
        )
    else:
        print(f"(no demo data in {args.data}: pipeline-fed step skipped)")
    if args.no_fisher:
        return
    print(f"{'fisher':>6} {'size':>5} {'chunk':>5} {'examples/s':>10}")
    for s, chunks, n in [(32, (1, 2, 4), 8)] + ([] if args.quick else [(64, (1, 2), 4)]):
        for c in chunks:
            print(f"{'':>6} {s:>4}³ {c:>5} {fisher_rate(s, c, n):10.2f}", flush=True)


if __name__ == "__main__":
    main()
