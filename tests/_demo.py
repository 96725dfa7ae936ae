"""Shared by the tests that run the scripts on data: a tiny demo data set and a subprocess env."""

import os
from pathlib import Path

# XLA settings of every test process (conftest.py, script subprocesses, the notebook's kernel):
# the tests' networks are tiny, so compilation dominates, and these compile 2-3x faster than the
# defaults: most optimisations off, and the loop-fusion emitters of the older CPU code generator
# (the newer MLIR fusion emitters took 41 s against 23 s for the same compile-bound tests).
FAST_COMPILE_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
FAST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"

GROUPS = (
    "n_parc_task1",
    "n_parc_task2",
    "n_parc_val",
    "n_parc_test",
    "n_brats_train",
    "n_brats_val",
    "n_brats_test",
)


def tiny_demo(path: Path, **counts: int) -> None:
    """The demo data set at 6 mm (32³ volumes), seed 0, with ``counts`` cases per group (default 1)."""
    from timm_jax.experiments.demo_data import build_demo

    unknown = set(counts) - set(GROUPS)
    if unknown:
        raise TypeError(f"unknown case groups {sorted(unknown)}; use {GROUPS}")
    build_demo(
        path, seed=0, spacing=6.0, progress=False, make_preview=False, **{g: counts.get(g, 1) for g in GROUPS}
    )


def script_env(tmp: Path, code: Path, drop: tuple[str, ...] = ()) -> dict:
    """Environment of a script subprocess: CPU, one device (no forced host devices), a compilation
    cache of every compilation in ``tmp``, fast compilation (:data:`FAST_COMPILE_ENV`,
    :data:`FAST_XLA_FLAGS`), the package imported from ``code``."""
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"), PYTHONPATH=str(code))
    e.update(FAST_COMPILE_ENV, XLA_FLAGS=FAST_XLA_FLAGS)
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the next script of the test reads them back
    for k in drop:
        e.pop(k, None)
    return e
