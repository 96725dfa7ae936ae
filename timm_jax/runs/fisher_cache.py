"""A source's diagonal Fisher on its own training data, and its cache in the source's run directory.

:func:`source_fisher` is what ``fuse.py`` (and a model bundle's export) calls for each source:
the empirical or true Fisher over training-size patches drawn as the source was trained
(:func:`fisher_patches`; docs/method.md §5), cached in ``<source>/fisher/fisher_<kind>.npz`` and
reused while the source's checkpoint and the settings are unchanged — the cache's key holds them
all, so a cache of another sampling (e.g. of whole volumes) is recomputed, never served. Writing the
cache into the source run takes that run's lock. :func:`adam_source_fisher` reads the Adam second
moment of the checkpoint instead (no pass over the data, nothing cached).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from timm_jax.atomic import atomic_write
from timm_jax.config import FISHERS, FuseConfig, TrainConfig
from timm_jax.core.fisher import (
    adam_fisher,
    fisher_diagonal,
    sampled_segmentation_log_likelihood,
    segmentation_log_likelihood,
    with_sample_keys,
)
from timm_jax.core.partition import from_flat_dict, to_flat_dict
from timm_jax.data.pipeline import PatchSampler
from timm_jax.data.spec import DataSpec, resolve
from timm_jax.errors import OptimizerStateError, RunLockedError
from timm_jax.faults import fault
from timm_jax.progress import bar
from timm_jax.runs.models import load_model
from timm_jax.training.parallel import DataParallel
from timm_jax.training.rundir import RunDir

__all__ = ["adam_source_fisher", "fisher_patches", "source_fisher"]

_log = logging.getLogger(__name__)
#: seconds between looks at a source whose Fisher cache another process is computing
_LOCK_POLL_S = 2.0


def source_fisher(
    source_dir: str,
    *,
    kind: str = FuseConfig.fisher,
    max_examples: int = FuseConfig.fisher_examples,
    patches_per_case: int = FuseConfig.fisher_patches,
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
    if kind not in FISHERS:
        raise ValueError(f"Fisher kind must be one of {FISHERS}, got {kind!r}")
    if kind == "adam":
        return adam_source_fisher(source_dir)
    source_dir, model, _, params, meta = load_model(source_dir, kinds=("train",))
    with RunDir.open(source_dir, ("train",)) as run:
        step = run.latest_step(run.best_or_latest())
        cache = run.fisher_cache(kind)
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
    shapes = {k: np.shape(v) for k, v in to_flat_dict(params).items()}
    cached = _read_fisher_cache(cache, key, shapes)
    # every process of a multi-process run must take the same branch (the computation is collective)
    if dp.agree(cached is not None):
        _log.info("[fuse] Fisher of %s: cached (%s)", source_dir, cache)
        return cached
    # writing into the source run: hold its lock (a source being trained right now is refused; one
    # whose cache another process is computing is waited for, and its cache read)
    while True:
        try:
            with RunDir.open(source_dir, ("train",)) as run, run.lock("fisher"):
                cached = _read_fisher_cache(cache, key, shapes) if os.path.exists(cache) else None
                if dp.agree(cached is not None):
                    _log.info("[fuse] Fisher of %s: cached by another process (%s)", source_dir, cache)
                    return cached
                fault("fisher.compute")
                fisher = _compute_fisher(
                    source_dir, model, params, meta, kind, max_examples, train_cfg, key, dp
                )
                if jax.process_index() == 0:
                    with atomic_write(cache, "wb", fault_point="fisher.cache") as f:
                        np.savez(f, __key__=json.dumps(key), **to_flat_dict(fisher))
                return fisher
        except RunLockedError as e:
            if (getattr(e, "holder", None) or {}).get("purpose") != "fisher":
                raise
            _log.info("[fuse] %s; waiting for it", e)
            time.sleep(_LOCK_POLL_S)


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
    if os.path.exists(cache):
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


def _compute_fisher(source_dir, model, params, meta, kind, max_examples, train_cfg, key, dp) -> dict:
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
    return jax.tree_util.tree_map(np.asarray, fisher)
