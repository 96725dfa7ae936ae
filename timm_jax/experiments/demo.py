"""``make demo``: the paper's protocol (section 4) end to end on the built-in demo data.

1. Build the demo data set (synthetic images on real Desikan–Killiany anatomy, see
   ``timm_jax.experiments.demo_data``) unless it exists.
2. Train M1 on task 1 (deep grey structures) from scratch, and M2 on task 2 (lobes and white
   matter) incrementally from M1 — the paper's HCP tasks 1 and 2.
3. On task 3 (tumours, BraTS layout and regions) with a small fraction of the training cases,
   train five initialisations: no transfer, M1, M2, IMM (mode-IMM, equal ratios) and T-IMM
   (adaption of the mixing ratios + task-specific leaves, then fine-tuning).
4. Evaluate all on the held-out test cases, print the table, and write ``report.md``; also
   the forgetting table (paper Table 4): tasks 1 and 2 solved with the fused transferable
   weights and each source's own task-specific leaves.

Every step is a train.py / fuse.py / evaluate.py call made in-process (same functions, same
checkpoints), so re-running ``make demo`` after an interruption resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time

from absl import flags

from timm_jax import cli
from timm_jax.experiments.presets import SCALES

FLAGS = flags.FLAGS


def _log(msg: str) -> None:
    logging.getLogger("timm_jax.experiments.demo").info(msg)


def run_demo(out: str, scale_name: str = "full", fraction: float = 0.08, seed: int = 0) -> str:
    # imports here so `--help` is fast
    import jax

    from timm_jax.config import DataSpec, EvalConfig
    from timm_jax.experiments.demo_data import build_demo
    from timm_jax.experiments.protocol import initialisations, run_cell
    from timm_jax.training.rundir import RunDir
    from timm_jax.workflows.evaluate import evaluate_forgetting, evaluate_model
    from timm_jax.workflows.train import train_model

    jax.config.update("jax_compilation_cache_dir", os.path.join(out, ".jax_cache"))
    scale = SCALES[scale_name]
    t0 = time.time()
    data_dir = os.path.join(out, "data")
    runs = os.path.join(out, "runs")
    manifest_path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        _log(f"== building the demo data set in {data_dir}")
        build_demo(data_dir, seed=seed, **scale.data)
    else:
        _log(f"== demo data set found in {data_dir}")
    manifest = json.load(open(manifest_path))
    parc = lambda key: DataSpec(  # noqa: E731
        data_dir=os.path.join(data_dir, "parcellation"), layout="parcellation", task_key=key, split_seed=seed
    )
    tumour = DataSpec(
        data_dir=os.path.join(data_dir, "brats"),
        layout="brats",
        task_key="task3",
        fraction=fraction,
        split_seed=seed,
    )
    d = lambda name: os.path.join(runs, name)  # noqa: E731

    source = scale.stage("source", seed)
    _log("== M1: task 1 from scratch")
    train_model(parc("task1"), scale.model, source, d("m1"))
    _log("== M2: task 2, incrementally from M1")
    train_model(parc("task2"), scale.model, source, d("m2"), init="transfer", init_from=d("m1"))

    inits = initialisations(d("m1"), d("m2"), scale.fuse)
    results = {}
    for method, init in inits.items():
        name = method.lower().replace(" ", "_").replace("-", "")
        _log(f"== task 3 ({fraction:.0%} of training cases): {method}")
        summary, _ = run_cell(
            init,
            tumour,
            d("t3_" + name),
            model=scale.model,
            target=scale.stage("target", seed),
            adapt=scale.stage("adapt", seed),
            fused_dir=d(f"{name}_fused"),
            evaluation=EvalConfig(split="test"),
        )
        results[method] = (d("t3_" + name), summary)
    with RunDir.open(d("timm_fused")) as run:
        timm_meta = run.meta

    _log("== forgetting (paper Table 4): the sources' tasks with their own task-specific leaves")
    no_hd95 = EvalConfig(hd95=False)
    forgetting = {
        "M1 / M2 themselves": {"m1": evaluate_model(d("m1"), no_hd95), "m2": evaluate_model(d("m2"), no_hd95)}
    }
    for method, run in (("T-IMM fused init", d("timm_fused")), ("T-IMM fine-tuned", d("t3_timm"))):
        forgetting[method] = evaluate_forgetting(run, [d("m1"), d("m2")], no_hd95)

    from timm_jax.experiments.demo_report import write_demo_report

    report = write_demo_report(
        out,
        results,
        manifest=manifest,
        scale=scale,
        fraction=fraction,
        timm_meta=timm_meta,
        minutes=(time.time() - t0) / 60,
        forgetting=forgetting,
    )
    return report


def main():
    report = run_demo(FLAGS.out, FLAGS.scale, FLAGS.fraction, FLAGS.seed)
    _log(f"report: {os.path.abspath(report)}")


def define_flags() -> None:
    flags.DEFINE_string("out", "demo_out", "Output directory (data, runs, report).")
    flags.DEFINE_enum(
        "scale",
        "full",
        list(SCALES),
        "A preset of timm_jax.experiments.presets: full (the "
        "README's demo) or smoke (a minutes-long check of the whole pipeline, for the tests).",
    )
    flags.DEFINE_float("fraction", 0.08, "Fraction of the tumour task's training cases (paper: 4 %, 8 %).")
    flags.DEFINE_integer("seed", 0, "Seed of data generation, initialisation and sampling.")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
