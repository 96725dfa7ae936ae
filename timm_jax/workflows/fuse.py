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
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np

from timm_jax.config import DeviceConfig, FuseConfig, ModelConfig, TrainConfig
from timm_jax.core import PyTree
from timm_jax.core.fisher import (
    adam_fisher,
    fisher_diagonal,
    sampled_segmentation_log_likelihood,
    segmentation_log_likelihood,
    with_sample_keys,
)
from timm_jax.core.merge import check_fishers, expand_logits, init_logits, mixing_ratios
from timm_jax.core.partition import (
    Partition,
    default_is_transferable,
    from_flat_dict,
    select_like,
    split,
    to_flat_dict,
)
from timm_jax.data.pipeline import PatchSampler
from timm_jax.data.spec import DataSpec, resolve
from timm_jax.errors import CheckpointError, ConfigError, OptimizerStateError, writing
from timm_jax.faults import fault
from timm_jax.nn.unet import build_model, init_params, layer_order
from timm_jax.progress import bar
from timm_jax.training.events import Events
from timm_jax.training.inference import make_predictor
from timm_jax.training.loop import fit, state_dict, window_evaluator
from timm_jax.training.parallel import DataParallel
from timm_jax.training.rundir import RunDir, make_meta
from timm_jax.training.steps import (
    create_state,
    fused_params,
    make_adaption_optimizer,
    make_adaption_step,
)
from timm_jax.workflows.bundle import bundle_fisher, is_bundle, load_source
from timm_jax.workflows.report import plot_mixing_ratios
from timm_jax.workflows.train import load_model, model_config_for, train_batches

__all__ = [
    "Sources",
    "adaption_stage",
    "fuse_models",
    "fusion_partition",
    "adam_source_fisher",
    "layer_ratio_spread",
    "layer_ratios",
    "load_sources",
    "materialise_fusion",
    "save_fusion",
    "source_fisher",
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
    loaded = []
    for d in source_dirs:
        try:
            loaded.append(load_source(d, kinds=("train",)))  # a run directory or a model bundle
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
        names=[os.path.basename(os.path.normpath(d)) for d in source_dirs],
        params=[s.params for s in loaded],
        metas=[s.meta for s in loaded],
        model_cfg=first,
    )


def source_fisher(
    source_dir: str,
    *,
    kind: str = "empirical",
    max_examples: int = 0,
    patches_per_case: int = FuseConfig().fisher_patches,
    dp: DataParallel = DataParallel(),
) -> dict:
    """Diagonal Fisher of a trained run on its own training data (cached beside its checkpoint).

    The examples are the source's *training distribution*: ``patches_per_case`` patches per
    training case, drawn by the source's own patch sampler (its patch shape and foreground rate,
    no augmentation, seed 0) — one per-example gradient each (:func:`fisher_patches`). A network
    trained on patches with instance normalisation is another function on a whole volume, so a
    Fisher of whole volumes would weigh the parameters of a network the source never was.

    ``kind="empirical"`` uses the reference labels, ``"true"`` labels sampled from the model,
    ``"adam"`` reads the bias-corrected Adam second moment of the same checkpoint (no pass over
    the data, nothing cached; :func:`adam_source_fisher`). The cache
    ``<source>/fisher/fisher_<kind>.npz`` is keyed by the checkpoint step, the run's
    configuration and the settings (the examples included: a cache of another sampling, e.g. of
    whole volumes, is recomputed), and written atomically (by process 0 only). With a mesh, each
    call of the per-example gradients takes one patch per device.
    """
    if kind not in ("empirical", "true", "adam"):
        raise ValueError(f"Fisher kind must be 'empirical', 'true' or 'adam', got {kind!r}")
    if kind == "adam":
        return adam_source_fisher(source_dir)
    source_dir, model, model_cfg, params, meta = load_model(source_dir, kinds=("train",))
    with RunDir.open(source_dir, ("train",)) as run:
        step = run.latest_step(run.best_or_latest())
    train_cfg = TrainConfig.from_dict(meta.get("train") or {})
    examples = {
        "examples": "patches",
        "patch_shape": list(train_cfg.patch_shape),
        "foreground_rate": train_cfg.foreground_rate,
        "patches_per_case": patches_per_case,
        "seed": _FISHER_SEED,
    }
    key = {
        "step": step,
        "kind": kind,
        "max_examples": max_examples,
        "run_key": meta.get("run_key"),
        **examples,
    }
    cache = os.path.join(source_dir, "fisher", f"fisher_{kind}.npz")
    shapes = {k: np.shape(v) for k, v in to_flat_dict(params).items()}
    cached = _read_fisher_cache(cache, key, shapes)
    # every process of a multi-process run must take the same branch (the computation is collective)
    if dp.agree(cached is not None):
        _log.info("[fuse] Fisher of %s: cached (%s)", source_dir, cache)
        return cached
    return _compute_fisher(source_dir, model, params, meta, kind, max_examples, train_cfg, key, cache, dp)


def adam_source_fisher(source_dir: str) -> dict:
    """``--fisher=adam``: ν / (1 − β₂ᵗ) from the optimiser state of the checkpoint whose params
    are fused (best, else latest) — zero passes over the data. Raises
    :class:`~timm_jax.errors.OptimizerStateError` (one line naming the run and the checkpoint)
    when that state is missing or is not Adam's."""
    with RunDir.open(source_dir, ("train",)) as run:
        which = run.best_or_latest()
        where = f"--fisher=adam: source {run.path} (checkpoint {which}/{run.latest_step(which)})"
        state, _ = run.restore(None, which)
    if not isinstance(state, dict) or state.get("opt_state") is None:
        raise OptimizerStateError(f"{where} stores no optimiser state; use --fisher=empirical")
    try:
        fisher = adam_fisher(state["opt_state"])
    except ValueError as e:
        raise OptimizerStateError(f"{where}: {e}; use --fisher=empirical") from e
    want = {k: np.shape(v) for k, v in to_flat_dict(state["params"]).items()}
    have = {k: np.shape(v) for k, v in to_flat_dict(fisher).items()} if isinstance(fisher, dict) else {}
    if have != want:
        raise OptimizerStateError(f"{where}: the Adam second moment does not have the parameters' leaves")
    _log.info("[fuse] Fisher of %s: Adam second moment (no pass over the data)", source_dir)
    return jax.tree_util.tree_map(np.asarray, fisher)


def _read_fisher_cache(cache: str, key: dict, shapes: dict) -> dict | None:
    """The cached Fisher if ``cache`` holds one for ``key`` with these leaf shapes, else None."""
    if os.path.isfile(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                flat = {k: z[k] for k in z.files if k != "__key__"}
                same = json.loads(str(z["__key__"])) == key
            if same and {k: v.shape for k, v in flat.items()} == shapes:
                return from_flat_dict(flat)
            _log.info("[fuse] Fisher cache %s is of another checkpoint or setting; recomputing", cache)
        except Exception as e:  # a torn or foreign file of any kind: recompute it
            _log.warning("[fuse] Fisher cache %s unreadable (%s); recomputing", cache, type(e).__name__)
    return None


#: seed of the Fisher's patch sampler (fixed: the Fisher of a checkpoint is one number)
_FISHER_SEED = 0


def fisher_patches(cases, task, train_cfg: TrainConfig, patches_per_case: int, batch_size: int = 1):
    """The Fisher's examples: ``patches_per_case`` patches of every case, ``(image, target)`` of
    ``train_cfg.patch_shape`` each, drawn by the training pipeline's sampler with the source's
    foreground rate, without augmentation and with seed 0 — each case once per round, in a seeded
    order (the sampler's epochs), so every case contributes exactly ``patches_per_case``. Yields
    batches of up to ``batch_size`` patches (the last may be smaller)."""
    sampler = PatchSampler(
        cases,
        task,
        train_cfg.patch_shape,
        seed=_FISHER_SEED,
        foreground_rate=train_cfg.foreground_rate,
        augment=False,
    )
    n = len(cases) * patches_per_case
    for start in range(0, n, batch_size):
        samples = [sampler(i) for i in range(start, min(start + batch_size, n))]
        yield np.stack([s["image"] for s in samples]), np.stack([s["target"] for s in samples])


def _compute_fisher(source_dir, model, params, meta, kind, max_examples, train_cfg, key, cache, dp) -> dict:
    data = resolve(DataSpec.from_dict(meta["data"]))
    ids = list(meta.get("train_ids") or data.train_ids)
    if max_examples:
        ids = ids[:max_examples]
    cases = data.load(ids, mmap=True)
    per_case = key["patches_per_case"]
    n = len(ids) * per_case
    apply_fn = lambda p, xb: model.apply({"params": p}, xb)  # noqa: E731
    _log.info(
        "[fuse] Fisher of %s (%s) on %d patches %s of %d training cases of task %s",
        source_dir,
        kind,
        n,
        "x".join(str(p) for p in train_cfg.patch_shape),
        len(ids),
        data.task.name,
    )
    # patches of one shape: memory does not grow with the data set
    batches = fisher_patches(cases, data.task, train_cfg, per_case, batch_size=dp.num_devices)
    if kind == "empirical":
        ll = segmentation_log_likelihood(apply_fn)
    else:
        ll = sampled_segmentation_log_likelihood(apply_fn)
        batches = with_sample_keys(batches, jax.random.PRNGKey(0))
    with bar(n, f"[fuse] Fisher of {os.path.basename(source_dir)}", "patch") as progress:
        done = [0]

        def seen(count: int) -> None:
            fault("fisher.case")
            progress.update(count - done[0])
            if count // 50 > done[0] // 50:
                _log.info("[fuse] Fisher: %d/%d patches", count, n)
            done[0] = count

        fisher = fisher_diagonal(
            ll,
            jax.tree_util.tree_map(jnp.asarray, params) if dp.mesh is None else dp.replicate(params),
            batches,
            chunk_size=dp.num_devices,
            progress=seen,
            mesh=dp.mesh,
        )
    fisher = jax.tree_util.tree_map(np.asarray, fisher)
    with writing(cache):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        # a unique temporary file, renamed: two processes computing the same cache never mix
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), suffix=".tmp.npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, __key__=json.dumps(key), **to_flat_dict(fisher))
            fault("fisher.cache", tmp)
            os.replace(tmp, cache)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return fisher


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
    out_dir: str,
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
    """T-IMM stage 1 in ``<out_dir>/adaption`` (resumable); returns the best epoch's
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
    with RunDir.create(os.path.join(out_dir, "adaption"), adapt_meta) as run:
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
    out_dir: str,
    params: dict,
    meta: dict,
    ratios: dict[str, list[float]],
    source_names: list[str],
    spread: dict[str, list[float]] | None = None,
) -> None:
    """The ``fused`` run directory: ``mixing_ratios.{json,csv,png}`` (by process 0 of a
    multi-process run), then the checkpoint (by every process) — the checkpoint is written last,
    since a run directory with one counts as finished."""
    with writing(out_dir):
        if jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "mixing_ratios.json"), "w") as f:
                extra = {} if spread is None else {"ratio_sd_over_channels": spread}
                json.dump({"sources": source_names, "ratios": ratios, **extra}, f, indent=2)
            fault("ratios.write", out_dir)
            with open(os.path.join(out_dir, "mixing_ratios.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["layer", *source_names])
                for layer, r in ratios.items():
                    w.writerow([layer, *[f"{a:.6f}" for a in r]])
            png = plot_mixing_ratios(
                ratios, source_names, os.path.join(out_dir, "mixing_ratios.png"), spread=spread
            )
            with Events(out_dir) as events:
                events.image("mixing_ratios", matplotlib.image.imread(png))
    with RunDir.create(out_dir, meta) as run:
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
    one device, no mesh; ``DeviceConfig()``: every visible device, as ``fuse.py`` does)."""
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
            out_dir,
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
    save_fusion(out_dir, params, meta, ratios, sources.names, spread)
    _log.info("[fuse] wrote fused checkpoint and mixing ratios to %s", out_dir)
    return meta
