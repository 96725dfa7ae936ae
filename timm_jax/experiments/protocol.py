"""The paper's protocol, written once: the initialisations of a target task and one cell of it.

A *cell* is one initialisation of the target task (no transfer, a source, a fusion of sources),
fine-tuned on the target's training cases and evaluated on its test cases — the unit that
``make demo`` and the benchmark (:mod:`.benchmark`) repeat over fractions, seeds and
initialisations. :func:`run_cell` runs one, reusing whatever of it finished before (the fusion, the
fine-tuning, the evaluation), so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping

from timm_jax.config import DataSpec, EvalConfig, FuseConfig, ModelConfig, TrainConfig
from timm_jax.errors import CheckpointError
from timm_jax.training.rundir import RunDir, RunPaths

__all__ = ["INITS", "Init", "evaluated", "finished", "initialisations", "run_cell"]

_log = logging.getLogger(__name__)

#: the paper's Table 2 rows (the All-HCP transfers are extra rows of one fraction)
INITS = ("no transfer", "M1", "M2", "IMM", "T-IMM")


@dataclasses.dataclass(frozen=True)
class Init:
    """How a cell's network starts: ``random``, ``transfer`` from ``source`` (a trained run), or
    ``fused`` — the fusion of ``sources`` with ``fuse`` (written into the cell's fused directory)."""

    init: str
    source: str = ""
    sources: tuple[str, ...] = ()
    fuse: FuseConfig | None = None


def initialisations(
    m1: str, m2: str, fuse: FuseConfig = FuseConfig(), extra: Mapping[str, str] | None = None
) -> dict[str, Init]:
    """The paper's initialisations of the target from sources ``m1`` and ``m2``: no transfer, M1,
    M2, IMM (mode-IMM, equal ratios) and T-IMM (``fuse``: learned ratios), plus a transfer from
    each run of ``extra`` (name → run directory; the All-HCP rows)."""
    out = {
        "no transfer": Init("random"),
        "M1": Init("transfer", source=m1),
        "M2": Init("transfer", source=m2),
        "IMM": Init("fused", sources=(m1, m2), fuse=fuse.replace(method="imm")),
        "T-IMM": Init("fused", sources=(m1, m2), fuse=fuse.replace(method="timm")),
    }
    for name, run in (extra or {}).items():
        out[name] = Init("transfer", source=run)
    return out


def finished(run_dir: str) -> bool:
    """A train / fuse run whose last checkpoint says it finished (a fusion: that it exists)."""
    try:
        with RunDir.open(run_dir) as run:
            which = "latest" if run.latest_step("latest") is not None else "best"
            meta = run.read_meta(which)
    except CheckpointError:
        return False
    return meta.get("kind") == "fused" or bool((meta.get("run") or {}).get("finished"))


def evaluated(run_dir: str, split: str = EvalConfig.split) -> dict | None:
    """The summary of a finished evaluation of ``run_dir`` on ``split`` (its ``summary.json``, the
    evaluation's last file), else ``None``."""
    path = os.path.join(RunPaths(run_dir).eval_dir(split), "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_cell(
    init: Init,
    spec: DataSpec,
    run_dir: str,
    *,
    model: ModelConfig,
    target: TrainConfig,
    adapt: TrainConfig,
    fused_dir: str = "",
    evaluation: EvalConfig = EvalConfig(hd95=False),
) -> tuple[dict, bool]:
    """Run (or finish) one cell; returns ``(test summary, whether anything was computed)``.

    ``fused``: the sources are fused into ``fused_dir`` (``adapt``: the adaption stage's schedule)
    unless done; then, unless finished, ``run_dir`` is fine-tuned with ``target`` from the
    initialisation, and evaluated on ``evaluation.split`` unless evaluated.
    """
    from timm_jax.workflows.evaluate import evaluate_model
    from timm_jax.workflows.fuse import fuse_models
    from timm_jax.workflows.train import train_model

    computed = False
    init_from = init.source
    if init.init == "fused":
        if not fused_dir:
            raise ValueError("a fused initialisation needs fused_dir")
        if not finished(fused_dir):
            fuse_models(list(init.sources), spec, fused_dir, init.fuse, adapt)
            computed = True
        init_from = fused_dir
    if not finished(run_dir):
        train_model(spec, model, target, run_dir, init=init.init, init_from=init_from)
        computed = True
    summary = evaluated(run_dir, evaluation.split)
    if summary is None:
        summary = evaluate_model(run_dir, evaluation)
        computed = True
    return summary, computed
