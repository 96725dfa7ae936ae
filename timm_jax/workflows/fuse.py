"""Fuse T >= 1 trained runs into an initialisation for a target task (IMM or T-IMM): what
``fuse.py`` calls.

The work is split the way the data flow:

1. :func:`load_sources` — read the source runs and check they are models of one architecture.
2. :func:`source_fisher` — each source's diagonal Fisher on its own task's training data
   (per-example gradients of patches drawn as the source was trained), cached in
   ``<source>/fisher/`` and reused while the source's checkpoint and the settings are unchanged.
3. :func:`fusion_partition` — the target network's transferable / task-specific split; a leaf
   whose shape differs from any source's is task-specific.
4. :func:`adaption_stage` (``method="timm"`` only) — train the mixing logits and the freshly
   initialised task-specific leaves through the merge until the validation loss stops
   improving; the best epoch is kept. ``method="imm"`` keeps equal ratios (α = 1/T).
5. :func:`materialise_fusion` and :func:`save_fusion` — the full target params as a run
   directory of kind ``fused``, plus the mixing ratios per layer as JSON, CSV and a figure.

:func:`fuse_models` runs them in order. A second call with the same request finds the result
and does nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np

from timm_jax.atomic import atomic_write, write_json
from timm_jax.config import DataSpec, DeviceConfig, FuseConfig, ModelConfig, TrainConfig
from timm_jax.core import PyTree
from timm_jax.core.merge import (
    check_fishers,
    expand_logits,
    init_logits,
    mixing_ratios,
    normalise_fisher_per_layer,
)
from timm_jax.core.partition import (
    Partition,
    default_is_transferable,
    from_flat_dict,
    select_like,
    split,
    to_flat_dict,
)
from timm_jax.data.spec import resolve
from timm_jax.errors import CheckpointError, ConfigError
from timm_jax.faults import fault
from timm_jax.nn.unet import build_model, init_params, layer_order
from timm_jax.runs.bundle import bundle_fisher, is_bundle
from timm_jax.runs.fisher_cache import source_fisher
from timm_jax.runs.models import load_model, model_config_for, short_names, train_batches
from timm_jax.training.events import Events
from timm_jax.training.inference import make_predictor
from timm_jax.training.loop import fit, state_dict, window_evaluator
from timm_jax.training.parallel import DataParallel
from timm_jax.training.rundir import RunDir, make_meta
from timm_jax.training.steps import create_state, fused_params, make_adaption_optimizer, make_adaption_step
from timm_jax.workflows.report import plot_mixing_ratios

__all__ = [
    "Sources",
    "adaption_stage",
    "fuse_models",
    "fusion_partition",
    "layer_ratio_spread",
    "layer_ratios",
    "load_sources",
    "materialise_fusion",
    "save_fusion",
    "source_task_specific",
]

_log = logging.getLogger(__name__)


@dataclass
class Sources:
    """The source runs of a fusion: directories, short names, params and metadata."""

    dirs: list[str]
    names: list[str]
    params: list[dict]
    metas: list[dict]
    model_cfg: ModelConfig  # the shared architecture (the first source's config)

    def request(self) -> list:
        """What the fusion depends on about each source: path, configuration, trained epochs."""
        return [
            [d, m.get("run_key"), (m.get("run") or {}).get("best_epoch")]
            for d, m in zip(self.dirs, self.metas)
        ]


def load_sources(source_dirs: Sequence[str]) -> Sources:
    """Read the source runs (models trained with ``train.py``, or model bundles of them) and check
    their architectures agree."""
    if not source_dirs:
        raise CheckpointError("fuse needs at least one --source run directory")
    real = [os.path.realpath(d) for d in source_dirs]
    for i, r in enumerate(real):
        if r in real[:i]:
            raise ConfigError(
                f"--source names {source_dirs[real.index(r)]} and {source_dirs[i]}, the same run twice; "
                "a model fused with itself is that model (give each source once)"
            )
    loaded = []
    for d in source_dirs:
        try:
            loaded.append(load_model(d, kinds=("train",)))  # a run directory or a model bundle
        except CheckpointError as e:
            raise CheckpointError(f"--source {d}: {e}") from e
    first = loaded[0].cfg
    for d, src in zip(source_dirs[1:], loaded[1:]):
        if not src.cfg.same_architecture(first):
            raise CheckpointError(
                f"source {d} (base {src.cfg.base_filters}, depth {src.cfg.depth}) is of "
                f"another architecture than {source_dirs[0]} (base {first.base_filters}, "
                f"depth {first.depth})"
            )
    return Sources(
        dirs=[s.path for s in loaded],
        names=short_names(source_dirs),
        params=[s.params for s in loaded],
        metas=[s.meta for s in loaded],
        model_cfg=first,
    )


def fusion_partition(fresh: dict, sources: Sources) -> Partition:
    """Split the target's freshly initialised params: a leaf whose shape differs from ANY source's
    is task-specific (e.g. the first convolution when the input channels differ)."""
    mismatched = sorted({m for p in sources.params for m in split(fresh, reference=p).mismatched})
    part = split(
        fresh,
        is_transferable=lambda names: default_is_transferable(names) and "/".join(names) not in mismatched,
    )
    part.mismatched = mismatched
    return part


def source_task_specific(part: Partition, source_params: dict, *, name: str = "source") -> dict:
    """``--task_specific_from``: the target's task-specific leaves taken from a source where the
    source has the leaf with the same shape (same label set: its heads; its norms), kept fresh
    elsewhere (e.g. heads of another label count)."""
    have = to_flat_dict(source_params)
    fresh = to_flat_dict(part.task_specific)
    taken = {k: have[k] for k, v in fresh.items() if k in have and np.shape(have[k]) == np.shape(v)}
    _log.info(
        "[fuse] task-specific leaves: %d of %d from %s (same shape), the rest fresh",
        len(taken),
        len(fresh),
        name,
    )
    return from_flat_dict({**fresh, **{k: jnp.asarray(v) for k, v in taken.items()}})


def _without_labels(cases) -> list:
    """The cases with all-zero label maps (what an unlabelled target provides; a read-only
    broadcast of one zero, so memory-mapped images stay on disk)."""
    return [dataclasses.replace(c, labels=np.broadcast_to(np.uint8(0), c.image.shape[:3])) for c in cases]


def adaption_stage(
    fused: RunDir,
    meta: dict,
    *,
    model,
    data,
    part: Partition,
    src_tr,
    fishers,
    cfg: FuseConfig,
    adapt_cfg: TrainConfig,
    rng,
    source_names: list[str] | None = None,
    dp: DataParallel = DataParallel(),
    task_specific: dict | None = None,
) -> tuple[PyTree, dict, dict]:
    """T-IMM stage 1 in the fused run's ``adaption/`` (resumable); returns the best epoch's
    ``(logits, task_specific, summary)``. With a mesh (``dp``), the batches are split over it and
    the sources, Fishers and adaption state are replicated. ``task_specific``: the starting 𝒮
    (default: the fresh ``part.task_specific``). Validation after each epoch predicts the
    validation cases with the fused parameters exactly as ``evaluate.py`` would (sliding windows
    at the training patch, ``adapt_cfg.val_overlap``).

    ``cfg.adaption_objective="entropy"`` (label-free): the loss is the fused model's mean binary
    prediction entropy on the training images, with their labels replaced by zeros before any
    batch is drawn (so patches are placed uniformly, never on known foreground); only the mixing
    logits train — 𝒮 stays as it starts, since minimising entropy through fresh heads would only
    make them confident, not right — and the best epoch is the one with the lowest entropy on the
    validation images (no Dice: their labels are not read either)."""
    T = len(src_tr)
    entropy = cfg.adaption_objective == "entropy"
    logits = init_logits(part.transferable, T, cfg.granularity)
    train_cases = data.load(data.train_ids, mmap=True)
    val_cases = data.load(data.val_ids, mmap=True)
    if entropy:
        train_cases, val_cases = _without_labels(train_cases), _without_labels(val_cases)
    optimizer = make_adaption_optimizer(
        cfg.logits_learning_rate, adapt_cfg.learning_rate, train_task=not entropy
    )
    start_task = part.task_specific if task_specific is None else task_specific
    state = dp.replicate(create_state({"logits": logits, "task": start_task}, optimizer, rng))
    src_tr, fishers = dp.replicate(src_tr), dp.replicate(fishers)
    kw = dict(
        granularity=cfg.granularity, loss=adapt_cfg.loss, objective=cfg.adaption_objective, mesh=dp.mesh
    )
    step = make_adaption_step(model, optimizer, **kw)
    merge = jax.jit(
        lambda tr, s, f: fused_params(s, f, tr["logits"], tr["task"], granularity=cfg.granularity)
    )
    evaluate = window_evaluator(
        make_predictor(model, adapt_cfg.patch_shape, overlap=adapt_cfg.val_overlap, mesh=dp.mesh),
        val_cases,
        data.task,
        loss="entropy" if entropy else adapt_cfg.loss,
        prepare=lambda tr: merge(tr, src_tr, fishers),
    )
    batch_cfg = adapt_cfg.replace(foreground_rate=0.0) if entropy else adapt_cfg
    names = source_names or [f"source{t}" for t in range(len(src_tr))]

    def ratio_scalars(state) -> dict[str, float]:
        ratios = layer_ratios(expand_logits(state.params["logits"], part.transferable, cfg.granularity))
        return {f"ratios/{layer}/{n}": a for layer, alphas in ratios.items() for n, a in zip(names, alphas)}

    adapt_meta = {**meta, "kind": "adaption"}
    with RunDir.create(fused.adaption_dir(), adapt_meta) as run:
        final, progress = fit(
            run,
            state=state,
            train_step=lambda s, b: step(s, src_tr, fishers, b),
            evaluate=evaluate,
            batches_from=train_batches(train_cases, data.task, batch_cfg, dp),
            cfg=adapt_cfg,
            name="adapt",
            epoch_scalars=ratio_scalars,
        )
        best, _ = run.restore(state_dict(final), which="best")
    summary = {
        "objective": cfg.adaption_objective,
        "best_epoch": progress["best_epoch"],
        "best_val_loss": progress["best_loss"],
        "epochs": progress["epoch"],
    }
    return best["params"]["logits"], best["params"]["task"], summary


def materialise_fusion(src_tr, fishers, logits, task_specific, granularity: str) -> dict:
    """The full target params (numpy): the merged transferable leaves joined with 𝒮."""
    fuse = jax.jit(lambda s, f, lg, t: fused_params(s, f, lg, t, granularity=granularity))
    return jax.tree_util.tree_map(np.asarray, fuse(src_tr, fishers, logits, task_specific))


def _layer_ratio_leaves(logits_per_leaf: PyTree) -> dict[str, np.ndarray]:
    """Each layer's ratios (its kernel's, else its first leaf's): (T,) or, per channel, (C, T)."""
    ratios = mixing_ratios(logits_per_leaf)
    out = {}
    for name in layer_order(list(ratios)):
        node = ratios[name]
        leaf = node["kernel"] if "kernel" in node else next(iter(node.values()))
        out[name] = np.asarray(leaf, np.float64)
    return out


def layer_ratios(logits_per_leaf: PyTree) -> dict[str, list[float]]:
    """Mixing ratios per layer (a module's kernel, else its first leaf), in network order; for
    channel granularity the mean over the layer's output channels (:func:`layer_ratio_spread`
    gives their spread)."""
    return {
        name: [float(a) for a in np.reshape(r, (-1, r.shape[-1])).mean(axis=0)]
        for name, r in _layer_ratio_leaves(logits_per_leaf).items()
    }


def layer_ratio_spread(logits_per_leaf: PyTree) -> dict[str, list[float]] | None:
    """Per layer and source, the standard deviation of the ratios over the output channels
    (channel granularity); ``None`` when every layer has a single ratio vector."""
    leaves = _layer_ratio_leaves(logits_per_leaf)
    if all(r.ndim == 1 for r in leaves.values()):
        return None
    return {
        name: [float(a) for a in np.reshape(r, (-1, r.shape[-1])).std(axis=0)] for name, r in leaves.items()
    }


def save_fusion(
    run: RunDir,
    params: dict,
    meta: dict,
    ratios: dict[str, list[float]],
    source_names: list[str],
    spread: dict[str, list[float]] | None = None,
) -> None:
    """Into the open ``fused`` run: ``mixing_ratios.{json,csv,png}`` (by process 0 of a
    multi-process run), then the checkpoint (by every process) — the checkpoint is written last,
    since a run directory with one counts as finished."""
    if jax.process_index() == 0:
        extra = {} if spread is None else {"ratio_sd_over_channels": spread}
        write_json(run.ratios_path("json"), {"sources": source_names, "ratios": ratios, **extra})
        fault("ratios.write", run.path)
        with atomic_write(run.ratios_path("csv"), newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", *source_names])
            for layer, r in ratios.items():
                w.writerow([layer, *[f"{a:.6f}" for a in r]])
        png = plot_mixing_ratios(ratios, source_names, run.ratios_path("png"), spread=spread)
        with Events(run.path) as events:
            events.image("mixing_ratios", matplotlib.image.imread(png))
    run.save(0, {"params": params}, meta, best=True)


def fuse_models(
    source_dirs: Sequence[str],
    target: DataSpec,
    out_dir: str,
    cfg: FuseConfig = FuseConfig(),
    adapt_cfg: TrainConfig = TrainConfig(),
    devices: DeviceConfig | None = None,
) -> dict:
    """Fuse the source runs into an initialisation for ``target`` in ``out_dir``; returns its
    metadata. ``devices``: the data-parallel mesh of the Fisher and the adaption stage (``None``:
    one device, no mesh; ``DeviceConfig()``: every visible device, as ``fuse.py`` does).

    ``out_dir``'s lock is held from the first check to the last file: a second fusion into the
    same directory is refused before it loads a Fisher."""
    if cfg.task_specific_from >= len(source_dirs):
        raise ConfigError(
            f"--task_specific_from={cfg.task_specific_from} names no source ({len(source_dirs)} given)"
        )
    dp = DataParallel.setup(devices)
    timm = cfg.method == "timm"
    if timm:
        dp.check_batch(adapt_cfg.batch_size)
    _log.info("[fuse] fusing %d source run(s) into %s on %s", len(source_dirs), out_dir, dp.describe())
    sources = load_sources(source_dirs)
    data = resolve(target)
    model, model_cfg = build_model(model_config_for(data, sources.model_cfg))
    meta = make_meta(
        "fused",
        model=model_cfg,
        data=target,
        train=adapt_cfg if timm else None,
        **({} if timm else {"patch": list(adapt_cfg.patch_shape)}),  # the patch it is evaluated at
        init_seed=adapt_cfg.seed,  # the fresh task-specific leaves
        fuse=cfg,
        sources=sources.request(),
        task=data.task.to_dict(),
        data_info=data.info.to_dict(),
        splits=data.splits,
        train_ids=data.train_ids,
        val_ids=data.val_ids,
        **dp.record(),
    )
    with RunDir.create(out_dir, meta) as run:
        if run.latest_step("best") is not None:
            _log.info("[fuse] %s already holds this fusion; nothing to do", out_dir)
            return run.read_meta("best")
        return _fuse(run, meta, sources, data, model, model_cfg, cfg, adapt_cfg, dp)


def _fuse(run: RunDir, meta, sources: Sources, data, model, model_cfg, cfg, adapt_cfg, dp) -> dict:
    timm = cfg.method == "timm"
    patch = tuple(adapt_cfg.patch_shape)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(adapt_cfg.seed))
    part = fusion_partition(init_params(model, init_rng, (1, *patch, model_cfg.in_channels)), sources)
    src_tr = [jax.tree_util.tree_map(jnp.asarray, select_like(p, part.transferable)) for p in sources.params]
    fishers = None
    if cfg.imm_mode == "mode":
        fishers = [
            jax.tree_util.tree_map(
                jnp.asarray,
                select_like(
                    # a bundle's Fisher is stored in it (its data are not there to compute one)
                    bundle_fisher(d, cfg.fisher, patches_per_case=cfg.fisher_patches)
                    if is_bundle(d)
                    else source_fisher(
                        d,
                        kind=cfg.fisher,
                        max_examples=cfg.fisher_examples,
                        patches_per_case=cfg.fisher_patches,
                        dp=dp,
                    ),
                    part.transferable,
                ),
            )
            for d in sources.dirs
        ]
        # before the adaption stage: under jit imm_merge cannot check values, and a NaN / Inf /
        # negative Fisher would make the fused weights NaN for the whole stage
        try:
            check_fishers(fishers, names=sources.dirs)
        except ValueError as e:
            raise CheckpointError(
                f"{e}; the source's weights or its Fisher cache (<source>/fisher/) are damaged"
            ) from e
        if cfg.fisher_normalisation == "layer":
            fishers = [normalise_fisher_per_layer(f) for f in fishers]
    mismatched = f" (shape-mismatched: {', '.join(part.mismatched)})" if part.mismatched else ""
    _log.info(
        "[fuse] %s (%s-IMM) of %d source(s) %s for task %s; %d transferable leaves, "
        "%d task-specific%s; on %s",
        cfg.method.upper(),
        cfg.imm_mode,
        len(sources.dirs),
        sources.names,
        data.task.name,
        len(jax.tree_util.tree_leaves(part.transferable)),
        len(jax.tree_util.tree_leaves(part.task_specific)),
        mismatched,
        dp.describe(),
    )
    logits = init_logits(part.transferable, len(sources.dirs), cfg.granularity)
    task_specific, summary = part.task_specific, {}
    if cfg.task_specific_from >= 0:
        t = cfg.task_specific_from
        task_specific = source_task_specific(part, sources.params[t], name=sources.names[t])
    if timm:
        logits, task_specific, summary = adaption_stage(
            run,
            meta,
            model=model,
            data=data,
            part=part,
            src_tr=src_tr,
            fishers=fishers,
            cfg=cfg,
            adapt_cfg=adapt_cfg,
            rng=state_rng,
            source_names=sources.names,
            dp=dp,
            task_specific=task_specific,
        )
    params = materialise_fusion(src_tr, fishers, logits, task_specific, cfg.granularity)
    per_leaf = expand_logits(logits, part.transferable, cfg.granularity)
    ratios, spread = layer_ratios(per_leaf), layer_ratio_spread(per_leaf)
    meta = {**meta, "adaption": summary, "ratios": ratios, "mismatched": part.mismatched}
    save_fusion(run, params, meta, ratios, sources.names, spread)
    _log.info("[fuse] wrote fused checkpoint and mixing ratios to %s", run.path)
    return meta
