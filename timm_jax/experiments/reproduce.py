"""``make reproduce``: the paper's experiments (Tables 1-4, Figures 3-5) on the demo benchmark,
with several training seeds and paired statistics.

    python -m timm_jax.experiments.reproduce --out=DIR [--seeds=3] [--scale=demo|paper] [--quick]

1. The demo data set with the proportions of the paper's Table 1 (built unless present).
2. Sources, trained until the validation loss stops improving: M1 (task 1), M2 (task 2 from
   M1) and, for the "Understanding T-IMM" rows, three All-HCP sources on the training cases of
   tasks 1 and 2 together (labels 1:14, 1:7, 8:14). One training seed (0) for every source.
3. The grid: for each fraction of the tumour pool and each training seed, the five
   initialisations of task 3 — no transfer, M1, M2, IMM (equal ratios), T-IMM (adaption stage,
   then fine-tuning) — and at 8 % the three All-HCP transfers; each fine-tuned with the same
   schedule and evaluated on the tumour test set. The data seed (splits, fractions) is fixed;
   the training seed changes initialisation, patch sampling and dropout.
4. Forgetting (Table 4): the transferable weights of M1, M2, IMM and T-IMM (after adaption)
   with the task-specific leaves of M1 on task 1's test set and of M2 on task 2's.
5. With ``--variants``, at 8 %: three variants of T-IMM (label-free entropy adaption, the Fisher
   read from the sources' Adam state, one mixing-ratio vector per output channel) on the same
   seeds and schedules, and a comparison of the Adam and the empirical Fisher (cost and rank
   correlation per layer); the report gets a section on them.
6. ``DIR/report.md`` with the tables, figures, paired comparisons and a verdict per claim, and
   the raw numbers it was computed from in ``DIR/raw/`` (:mod:`timm_jax.experiments.reproduce_report`).

Every run is a train / fuse / evaluate call on its own run directory; re-running the command
after an interruption reuses whatever finished (runs, evaluations) and continues.
"""

from __future__ import annotations

import json
import logging
import os
import time

from absl import flags

from timm_jax import cli
from timm_jax.atomic import write_json
from timm_jax.experiments.grid import (
    ALL_HCP,
    ALL_HCP_FRACTION,
    INITS,
    SOURCES,
    VARIANT_FRACTION,
    VARIANTS,
    cell_dir,
    slug,
)
from timm_jax.experiments.presets import SCALES

_log = logging.getLogger("timm_jax.experiments.reproduce")

FLAGS = flags.FLAGS


class Progress:
    """``[grid] k/N`` lines with the elapsed time and an ETA from the cells computed so far."""

    def __init__(self, total: int):
        from timm_jax.progress import bar

        self.total, self.done, self.computed, self.t0 = total, 0, 0, time.time()
        self.bar = bar(total, "[grid]", "cell", leave=True)

    def step(self, what: str, computed: bool) -> None:
        self.bar.update()
        self.done += 1
        self.computed += computed
        elapsed = time.time() - self.t0
        left = self.total - self.done
        eta = elapsed / self.computed * left if self.computed else 0.0
        _log.info(
            "[grid] %d/%d %s%s  elapsed %s  ETA %s",
            self.done,
            self.total,
            what,
            "" if computed else " (reused)",
            _hms(elapsed),
            _hms(eta),
        )


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_reproduction(
    out: str,
    *,
    scale_name: str = "repro",
    seeds: int = 3,
    fractions=(0.04, 0.08, 1.0),
    data_seed: int = 0,
    variants: bool = False,
) -> str:
    """Run (or resume) the grid in ``out`` and write ``out/report.md``; returns its path.
    ``variants``: also the T-IMM variants of :data:`~timm_jax.experiments.grid.VARIANTS` at 8 %
    (added to an existing grid without touching its runs; their wall time is recorded apart)."""
    from timm_jax.errors import ConfigError

    if seeds < 1 or not fractions:
        raise ConfigError("--seeds must be >= 1 and --fractions non-empty")
    import jax

    from timm_jax.config import DataSpec, EvalConfig
    from timm_jax.experiments.demo_data import build_demo
    from timm_jax.experiments.protocol import Init, evaluated, finished, initialisations, run_cell
    from timm_jax.experiments.reproduce_report import write_reproduction_report
    from timm_jax.workflows.evaluate import evaluate_forgetting, evaluate_model
    from timm_jax.workflows.train import train_model

    t_start = time.time()
    os.makedirs(out, exist_ok=True)
    # finished runs are reused without re-checking each one, so the grid as a whole must match
    _claim(out, {"scale": scale_name, "preset": SCALES[scale_name].to_dict(), "data_seed": data_seed})
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, ".jax_cache"))
    scale = SCALES[scale_name]
    fractions = tuple(sorted(float(f) for f in fractions))
    data_dir = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        _log.info("== building the demo data set in %s", data_dir)
        build_demo(data_dir, seed=data_seed, progress=False, make_preview=False, **scale.data)
    model = scale.model
    src_dir = lambda name: os.path.join(out, "runs", "sources", name)  # noqa: E731

    def parc(task: str) -> DataSpec:
        return DataSpec(
            data_dir=os.path.join(data_dir, "parcellation"),
            layout="parcellation",
            task_key=task,
            split_seed=data_seed,
        )

    def tumour(fraction: float) -> DataSpec:
        return DataSpec(
            data_dir=os.path.join(data_dir, "brats"),
            layout="brats",
            task_key="task3",
            fraction=fraction,
            split_seed=data_seed,
        )

    with_hcp = ALL_HCP_FRACTION in fractions
    sources = [s for s in SOURCES if with_hcp or not s.startswith("hcp")]
    if variants and VARIANT_FRACTION not in fractions:
        raise ConfigError(f"--variants runs at {VARIANT_FRACTION:.0%}; add {VARIANT_FRACTION} to --fractions")
    n_cells = len(fractions) * seeds * len(INITS) + (seeds * len(ALL_HCP) if with_hcp else 0)
    n_cells += seeds * len(VARIANTS) + 1 if variants else 0
    progress = Progress(len(sources) + n_cells + 1)
    for name in sources:
        task, init_from = SOURCES[name]
        done = finished(src_dir(name))
        _log.info("== source %s: %s%s", name, task, f" from {init_from}" if init_from else "")
        if not done:
            train_model(
                parc(task),
                model,
                scale.stage("source", 0),
                src_dir(name),
                init="transfer" if init_from else "random",
                init_from=src_dir(init_from) if init_from else "",
            )
        if not evaluated(src_dir(name)):
            evaluate_model(src_dir(name), EvalConfig(hd95=False))
        progress.step(f"source {name}", not done)

    no_hd95 = EvalConfig(hd95=False)
    m1, m2 = src_dir("m1"), src_dir("m2")
    for fraction in fractions:
        extra = {k: src_dir(v) for k, v in ALL_HCP.items()} if fraction == ALL_HCP_FRACTION else {}
        inits = initialisations(m1, m2, scale.fuse, extra)
        for seed in range(seeds):
            cell = cell_dir(out, fraction, seed)
            for init_name, init in inits.items():
                _log.info("== %s, seed %d: %s", f"{fraction:.0%}", seed, init_name)
                _, computed = run_cell(
                    init,
                    tumour(fraction),
                    os.path.join(cell, slug(init_name)),
                    model=model,
                    target=scale.stage("target", seed),
                    adapt=scale.stage("adapt", seed),
                    fused_dir=os.path.join(cell, slug(init_name) + "_fused"),
                    evaluation=no_hd95,
                )
                progress.step(f"{fraction:.0%} seed {seed} {init_name}", computed)
            for init_name in ("IMM", "T-IMM"):
                fused_dir = os.path.join(cell, slug(init_name) + "_fused")
                if not os.path.isfile(os.path.join(fused_dir, "forgetting", "forgetting.json")):
                    evaluate_forgetting(fused_dir, [m1, m2], no_hd95)
    for name in ("m1", "m2"):
        if not os.path.isfile(os.path.join(src_dir(name), "forgetting", "forgetting.json")):
            evaluate_forgetting(src_dir(name), [src_dir("m1"), src_dir("m2")], no_hd95)
    if variants:
        for seed in range(seeds):
            cell = cell_dir(out, VARIANT_FRACTION, seed)
            for name, setting in VARIANTS.items():
                _log.info("== %s, seed %d: %s", f"{VARIANT_FRACTION:.0%}", seed, name)
                init = Init("fused", sources=(m1, m2), fuse=scale.fuse.replace(method="timm", **setting))
                _, computed = run_cell(
                    init,
                    tumour(VARIANT_FRACTION),
                    os.path.join(cell, slug(name)),
                    model=model,
                    target=scale.stage("target", seed),
                    adapt=scale.stage("adapt", seed),
                    fused_dir=os.path.join(cell, slug(name) + "_fused"),
                    evaluation=no_hd95,
                )
                progress.step(f"{VARIANT_FRACTION:.0%} seed {seed} {name}", computed)
        from timm_jax.experiments.reproduce_report import compare_fishers

        compare_fishers(out, [src_dir("m1"), src_dir("m2")])
        progress.step("Fisher: Adam vs empirical", True)
    _log.info("== report")
    state = _add_invocation(out, time.time() - t_start, "variant_invocations" if variants else "invocations")
    report = write_reproduction_report(
        out,
        scale_name=scale_name,
        scale=scale,
        seeds=seeds,
        fractions=fractions,
        state=state,
        variants=variants,
    )
    progress.step("report", True)
    return report


def _claim(out: str, config: dict) -> None:
    """Refuse an output directory that holds a grid of another configuration (seeds and
    fractions may be added to a grid; the scale and data seed may not change)."""
    from timm_jax.errors import ConfigError

    path = os.path.join(out, "grid_state.json")
    state = json.load(open(path)) if os.path.isfile(path) else {"invocations": []}
    config = json.loads(json.dumps(config))
    if state.get("config", config) != config:
        raise ConfigError(
            f"{out} holds a reproduction grid of another configuration "
            f"({state['config']['scale']}, data seed {state['config']['data_seed']}); "
            "use another --out"
        )
    state["config"] = config
    write_json(path, state)


def _add_invocation(out: str, seconds: float, key: str = "invocations") -> dict:
    """Wall time of this invocation, added to ``out/grid_state.json`` (the report states the sum
    and the number of invocations it took); ``--variants`` invocations are listed under
    ``variant_invocations``, so the paper grid's time stays its own."""
    path = os.path.join(out, "grid_state.json")
    state = json.load(open(path)) if os.path.isfile(path) else {"invocations": []}
    if not state.get("invocations"):  # a grid first run with --variants: its time is the grid's
        key = "invocations"
    state.setdefault(key, []).append(
        {"ended": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1)}
    )
    write_json(path, state)
    return state


def main():
    fractions = tuple(float(f) for f in FLAGS.fractions)
    if FLAGS.quick:
        scale, seeds, fractions = "repro_quick", 1, (ALL_HCP_FRACTION,)
    else:
        scale, seeds = ("repro" if FLAGS.scale == "demo" else "paper"), FLAGS.seeds
    report = run_reproduction(
        FLAGS.out,
        scale_name=scale,
        seeds=seeds,
        fractions=fractions,
        data_seed=FLAGS.data_seed,
        variants=FLAGS.variants,
    )
    _log.info("report: %s", os.path.abspath(report))


def define_flags() -> None:
    flags.DEFINE_string("out", "reproduce_out", "Output directory (data, runs, raw numbers, report).")
    flags.DEFINE_integer("seeds", 3, "Training seeds per cell (0 .. seeds-1).")
    flags.DEFINE_enum(
        "scale",
        "demo",
        ["demo", "paper"],
        "demo: the CPU-sized benchmark (presets 'repro'); paper: the paper's network and "
        "whole-volume training (preset 'paper', for a GPU).",
    )
    flags.DEFINE_bool(
        "quick",
        False,
        "One fraction (8 %), one seed, coarse volumes, a tiny network and "
        "two epochs per stage: a few minutes, for tests.",
    )
    flags.DEFINE_list("fractions", ["0.04", "0.08", "1.0"], "Fractions of the tumour pool.")
    flags.DEFINE_integer("data_seed", 0, "Seed of the data set, its splits and the fractions.")
    flags.DEFINE_bool(
        "variants",
        False,
        "Also run T-IMM's variants beyond the paper at 8 % (entropy adaption, Adam Fisher, channel "
        "granularity) on the same seeds, compare the Adam and empirical Fishers, and add a report "
        "section on them. Reuses every finished run of the grid.",
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
