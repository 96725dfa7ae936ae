"""``fuse.py``'s work: Fishers of the sources, then IMM or T-IMM into a fused checkpoint.

1. Each source's diagonal Fisher is computed on its own task's training cases (whole volumes,
   per-example gradients) and cached in ``<source>/fisher/``; it is reused while the source's
   checkpoint and the settings are unchanged.
2. ``imm``: equal ratios (α = 1/T), mode-IMM (Fisher-weighted) or mean-IMM.
   ``timm``: the adaption stage on the target task — the mixing logits and the freshly
   initialised task-specific leaves are trained through the merge until the validation loss
   stops improving; the fusion with the best validation loss is kept.
3. The result is a run directory whose checkpoint holds the full target params (``kind:
   fused``), plus the learned mixing ratios per layer as JSON, CSV and a PNG (paper Fig. 5).
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from timm_jax.checkpoint import CheckpointError, RunCheckpoints, find_run, load_params
from timm_jax.config import ModelConfig, TrainConfig
from timm_jax.data.pipeline import make_train_dataset
from timm_jax.experiment import DataSpec, resolve
from timm_jax.fisher import (fisher_diagonal, sampled_segmentation_log_likelihood,
                             segmentation_log_likelihood, with_sample_keys)
from timm_jax.merge import expand_logits, init_logits, layer_names, mixing_ratios
from timm_jax.model import init_params
from timm_jax.partition import (Partition, default_is_transferable, from_flat_dict, select_like, split,
                                to_flat_dict)
from timm_jax.runs import check_workdir, model_config_for, run_key
from timm_jax.steps import (create_state, fused_params, make_adaption_eval_step,
                            make_adaption_optimizer, make_adaption_step)
from timm_jax.training import fit, pad_to_multiple, volume_evaluator

PyTree = dict


def source_fisher(source_dir: str, *, kind: str = "empirical", max_examples: int = 0, log: Callable[[str], None] = print) -> dict:
    """Diagonal Fisher of a trained run on its own training cases (cached beside its checkpoint).

    ``kind="empirical"`` uses the reference labels, ``"true"`` labels sampled from the model.
    """
    source_dir = find_run(source_dir)
    params, meta = load_params(source_dir)
    ckpt = RunCheckpoints(source_dir)
    step = ckpt.latest_step("best") or ckpt.latest_step("latest")
    ckpt.close()
    key = {"step": step, "kind": kind, "max_examples": max_examples, "run_key": meta.get("run_key")}
    cache = os.path.join(source_dir, "fisher", f"fisher_{kind}.npz")
    if os.path.isfile(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if json.loads(str(z["__key__"])) == key:
                    flat = {k: z[k] for k in z.files if k != "__key__"}
                    log(f"[fuse] Fisher of {source_dir}: cached ({cache})")
                    return from_flat_dict(flat)
        except (OSError, ValueError, KeyError):
            log(f"[fuse] Fisher cache {cache} unreadable; recomputing")
    model_cfg = ModelConfig.from_dict(meta["model"])
    data = resolve(DataSpec.from_dict(meta["data"]))
    ids = list(meta.get("train_ids") or data.train_ids)
    if max_examples:
        ids = ids[:max_examples]
    cases = data.load(ids)
    model = model_cfg.build()
    apply_fn = lambda p, xb: model.apply({"params": p}, xb)  # noqa: E731
    log(f"[fuse] Fisher of {source_dir} ({kind}) on {len(ids)} training cases of task {data.task.name}")
    # one whole volume per batch (padded only to the network's divisor): memory does not grow
    # with the data set, and no case is padded to another case's size
    batches = ((pad_to_multiple(c.image, model_cfg.divisor)[None],
                pad_to_multiple(data.task.targets(c.labels), model_cfg.divisor)[None]) for c in cases)
    if kind == "empirical":
        ll = segmentation_log_likelihood(apply_fn)
    elif kind == "true":
        ll = sampled_segmentation_log_likelihood(apply_fn)
        batches = with_sample_keys(batches, jax.random.PRNGKey(0))
    else:
        raise ValueError(f"Fisher kind must be 'empirical' or 'true', got {kind!r}")
    fisher = fisher_diagonal(ll, jax.tree_util.tree_map(jnp.asarray, params), batches, chunk_size=1)
    fisher = jax.tree_util.tree_map(np.asarray, fisher)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), suffix=".tmp.npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, __key__=json.dumps(key), **{k: np.asarray(v) for k, v in to_flat_dict(fisher).items()})
    os.replace(tmp, cache)
    return fisher


def layer_ratios(logits_per_leaf: PyTree) -> dict[str, list[float]]:
    """Mixing ratios per layer (the kernel's, in network order) for reports."""
    ratios = mixing_ratios(logits_per_leaf)
    out = {}
    for layer in _network_order(layer_names(ratios)):
        name = layer.strip("[]'").split("']['")[0]
        node = ratios[name]
        leaf = node["kernel"] if "kernel" in node else next(iter(node.values()))
        out[name] = [float(a) for a in np.asarray(leaf)]
    return out


def _network_order(layers: Sequence[str]) -> list[str]:
    def key(layer):
        name = layer.strip("[]'").split("']['")[0]
        part = name.split("_")
        if len(part) >= 3 and part[1].startswith(("enc", "dec")):
            lvl = int(part[1][3:])
            pos = {"in": 0, "ctx1": 1, "ctx2": 2, "up": 0, "loc1": 1, "loc2": 2}.get(part[2], 3)
            return (0, lvl, pos) if part[1].startswith("enc") else (1, -lvl, pos)
        return (2, 0, name)
    return sorted(layers, key=key)


def write_ratios(ratios: dict[str, list[float]], source_names: list[str], out_dir: str) -> None:
    from timm_jax.report import plot_mixing_ratios
    with open(os.path.join(out_dir, "mixing_ratios.json"), "w") as f:
        json.dump({"sources": source_names, "ratios": ratios}, f, indent=2)
    with open(os.path.join(out_dir, "mixing_ratios.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", *source_names])
        for layer, r in ratios.items():
            w.writerow([layer, *[f"{a:.6f}" for a in r]])
    plot_mixing_ratios(ratios, source_names, os.path.join(out_dir, "mixing_ratios.png"))


def fuse_models(source_dirs: Sequence[str], target: DataSpec, out_dir: str, *, method: str = "timm",
                imm_mode: str = "mode", granularity: str = "layer", fisher_kind: str = "empirical",
                fisher_max_examples: int = 0, adapt_cfg: TrainConfig = TrainConfig(),
                logits_learning_rate: float = 0.05, log: Callable[[str], None] = print) -> dict:
    """Fuse T ≥ 1 trained runs into an initialisation for ``target``; returns a summary dict."""
    if method not in ("imm", "timm"):
        raise ValueError(f"--method must be 'imm' or 'timm', got {method!r}")
    if imm_mode not in ("mode", "mean"):
        raise ValueError(f"--imm_mode must be 'mode' or 'mean', got {imm_mode!r}")
    if not source_dirs:
        raise ValueError("fuse needs at least one --source run directory")
    sources = [load_params(d) for d in source_dirs]          # fails early on bad checkpoints
    for d, (_, m) in zip(source_dirs, sources):
        if m.get("kind", "train") != "train":
            raise CheckpointError(f"source {d} is a {m.get('kind')!r} run; fuse sources must be "
                                  "models trained with train.py")
    archs = [ModelConfig.from_dict(m["model"]) for _, m in sources]
    # everything the result depends on: a second call with the same request reuses the result
    request = {"sources": [[os.path.abspath(d), m.get("run_key"), m.get("run", {}).get("best_epoch")]
                           for d, (_, m) in zip(source_dirs, sources)],
               "target": target.to_dict(), "method": method, "imm_mode": imm_mode,
               "granularity": granularity, "fisher_kind": fisher_kind,
               "fisher_max_examples": fisher_max_examples, "logits_learning_rate": logits_learning_rate,
               "adapt": adapt_cfg.to_dict() if method == "timm" else None}
    request_key = run_key(request)
    if os.path.isdir(os.path.join(out_dir, "checkpoints", "best")):
        ckpt = RunCheckpoints(out_dir)
        try:
            old = ckpt.restore_meta("best") if ckpt.latest_step("best") is not None else {}
        finally:
            ckpt.close()
        if old.get("request_key") == request_key:
            log(f"[fuse] {out_dir} already holds this fusion; nothing to do")
            return old
        if old:
            raise CheckpointError(f"{out_dir} already holds a different fusion (sources, target or "
                                  "settings differ); use a new --out")
    for d, a in zip(source_dirs[1:], archs[1:]):
        if not a.same_architecture(archs[0]):
            raise CheckpointError(f"source {d} (base {a.base_filters}, depth {a.depth}) is of another "
                                  f"architecture than {source_dirs[0]} (base {archs[0].base_filters}, "
                                  f"depth {archs[0].depth})")
    data = resolve(target)
    model_cfg = model_config_for(data, archs[0])
    model = model_cfg.build()
    patch = tuple(adapt_cfg.patch_shape)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(adapt_cfg.seed))
    fresh = init_params(model, init_rng, (1, *patch, model_cfg.in_channels))
    # leaves mismatched against ANY source are task-specific
    mismatched = sorted({m for p, _ in sources for m in split(fresh, reference=p).mismatched})
    part: Partition = split(fresh, is_transferable=lambda names: (
        default_is_transferable(names) and "/".join(names) not in mismatched))
    part.mismatched = mismatched
    src_tr = [jax.tree_util.tree_map(jnp.asarray, select_like(p, part.transferable)) for p, _ in sources]
    fishers = None
    if imm_mode == "mode":
        fishers = [jax.tree_util.tree_map(jnp.asarray, select_like(
            source_fisher(d, kind=fisher_kind, max_examples=fisher_max_examples, log=log),
            part.transferable)) for d in source_dirs]
    T = len(source_dirs)
    names = [os.path.basename(os.path.normpath(d)) for d in source_dirs]
    log(f"[fuse] {method.upper()} ({imm_mode}-IMM) of {T} source(s) {names} for task {data.task.name}; "
        f"{len(jax.tree_util.tree_leaves(part.transferable))} transferable leaves, "
        f"{len(jax.tree_util.tree_leaves(part.task_specific))} task-specific"
        + (f" (shape-mismatched: {', '.join(mismatched)})" if mismatched else ""))
    logits = init_logits(part.transferable, T, granularity)
    task_specific = part.task_specific
    summary = {"method": method, "imm_mode": imm_mode, "granularity": granularity, "sources": list(source_dirs)}
    if method == "timm":
        train_cases = data.load(data.train_ids)
        val_cases = data.load(data.splits["val"])
        optimizer = make_adaption_optimizer(logits_learning_rate, adapt_cfg.learning_rate)
        state = create_state({"logits": logits, "task": task_specific}, optimizer, state_rng)
        step = make_adaption_step(model, optimizer, granularity=granularity, loss=adapt_cfg.loss)
        eval_step = make_adaption_eval_step(model, granularity=granularity, loss=adapt_cfg.loss)
        evaluate = volume_evaluator(lambda p, b: eval_step(p, src_tr, fishers, b), val_cases, data.task,
                                    model_cfg.divisor)

        def batches_from(start):
            return iter(make_train_dataset(
                train_cases, data.task, patch_shape=patch, batch_size=adapt_cfg.batch_size,
                seed=adapt_cfg.seed, foreground_rate=adapt_cfg.foreground_rate,
                augment=adapt_cfg.augment, num_workers=adapt_cfg.num_workers, start_step=start))

        meta = {"kind": "adaption", "model": model_cfg.to_dict(), "train": adapt_cfg.to_dict(),
                "data": target.to_dict(), "request": request}
        meta["run_key"] = run_key(meta)
        adapt_dir = os.path.join(out_dir, "adaption")
        check_workdir(adapt_dir, meta["run_key"])
        final, run = fit(workdir=adapt_dir, state=state,
                         train_step=lambda s, b: step(s, src_tr, fishers, b), evaluate=evaluate,
                         batches_from=batches_from, cfg=adapt_cfg, meta=meta, name="adapt", log=log)
        ckpt = RunCheckpoints(adapt_dir)
        try:
            best, _ = ckpt.restore({"step": final.step, "params": final.params,
                                    "opt_state": final.opt_state, "rng": final.rng}, which="best")
        finally:
            ckpt.close()
        logits, task_specific = best["params"]["logits"], best["params"]["task"]
        summary.update(best_epoch=run["best_epoch"], best_val_loss=run["best_loss"])
    params = jax.tree_util.tree_map(np.asarray, jax.jit(
        lambda s, f, l, t: fused_params(s, f, l, t, granularity=granularity))(src_tr, fishers, logits, task_specific))
    ratios = layer_ratios(expand_logits(logits, part.transferable, granularity))
    meta = {"kind": "fused", "model": model_cfg.to_dict(), "data": target.to_dict(),
            "task": data.task.to_dict(), "splits": data.splits, "train_ids": data.train_ids,
            **summary, "ratios": ratios, "mismatched": mismatched, "request_key": request_key}
    meta["run_key"] = run_key(meta)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = RunCheckpoints(out_dir)
    try:
        ckpt.save(0, {"params": params}, meta, best=True)
    finally:
        ckpt.close()
    write_ratios(ratios, names, out_dir)
    log(f"[fuse] wrote fused checkpoint and mixing ratios to {out_dir}")
    return meta
