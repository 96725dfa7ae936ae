"""Incremental mode matching: the fusion of T source models (the maths of T-IMM).

For every transferable leaf ``i`` (one array of the parameter pytree) and every source ``t``
there is a parameter ``θ_t^i``, a diagonal Fisher ``F_t^i`` of the same shape and a scalar
mixing logit ``β_t^i``. Following the T-IMM paper (Eqs. 3-5, restated in docs/method.md):

    α_t^i = σ(β_t^i) / Σ_s σ(β_s^i)                                (mixing ratios, Σ_t α_t^i = 1)
    θ^i   = (Σ_t α_t^i F_t^i θ_t^i) / (Σ_t α_t^i F_t^i + ε)          (mode-IMM, element-wise)

Mean-IMM is the case F ≡ 1 (computed as ``Σ_t α_t θ_t``, where the ε guard has no purpose), and
the plain IMM baseline of Lee et al. (2017) uses equal ratios α_t = 1/T (all logits equal).

Everything here is pure and jittable; :func:`imm_merge` is differentiable w.r.t. the logits, which
is what the T-IMM adaption stage trains. Shape and structure checks run at trace time; value
checks (negative or non-finite Fishers) run only when the inputs are concrete arrays, i.e. when
called outside ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from timm_jax.core import PyTree

Granularity = Literal["leaf", "layer", "global"]

DEFAULT_EPS = 1e-8


def _paths_and_leaves(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in flat], [x for _, x in flat], treedef


def mixing_ratios(logits: PyTree) -> PyTree:
    """α = σ(β) / Σ_t σ(β_t) along the last axis of every leaf (shape (T,) per leaf).

    Computed as ``softmax(log σ(β))``, which is the same quantity but finite for any logit
    (σ(β) itself underflows to 0 for β ≲ -88 in float32, making the plain ratio 0/0).
    """
    return jax.tree_util.tree_map(lambda b: jax.nn.softmax(jax.nn.log_sigmoid(b), axis=-1), logits)


def uniform_logits(params: PyTree, num_sources: int) -> PyTree:
    """Per-leaf logits that give equal ratios α_t = 1/T: the plain IMM baseline."""
    return jax.tree_util.tree_map(lambda _: jnp.zeros((num_sources,), jnp.float32), params)


def init_logits(
    params: PyTree, num_sources: int, granularity: Granularity = "leaf", value: float = 0.0
) -> PyTree:
    """Trainable logits at a granularity: one (T,) vector per leaf, per layer or for the model.

    ``"leaf"``: a pytree like ``params`` with (T,) leaves. ``"layer"``: a dict keyed by the layer
    (the leaf's parent path, e.g. ``"['conv_enc0_in']"``), so a conv's kernel and bias share one
    vector. ``"global"``: a single (T,) array. Pass the result through :func:`expand_logits`
    before :func:`imm_merge`; gradients flow back to the shared vectors.
    """
    vec = lambda: jnp.full((num_sources,), value, jnp.float32)  # noqa: E731
    if granularity == "leaf":
        return jax.tree_util.tree_map(lambda _: vec(), params)
    if granularity == "layer":
        return {layer: vec() for layer in layer_names(params)}
    if granularity == "global":
        return vec()
    raise ValueError(f"granularity must be 'leaf', 'layer' or 'global', got {granularity!r}")


def layer_names(params: PyTree) -> list[str]:
    """The layer of each leaf is its parent path; returns them in leaf order, without repeats."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    seen: dict[str, None] = {}
    for path, _ in flat:
        seen.setdefault(jax.tree_util.keystr(path[:-1]) or "<root>", None)
    return list(seen)


def expand_logits(logits: PyTree, params: PyTree, granularity: Granularity = "leaf") -> PyTree:
    """Broadcast compact logits (see :func:`init_logits`) to one (T,) vector per leaf."""
    if granularity == "leaf":
        return logits
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if granularity == "global":
        return jax.tree_util.tree_unflatten(treedef, [logits for _ in flat])
    if granularity == "layer":
        leaves = []
        for path, _ in flat:
            layer = jax.tree_util.keystr(path[:-1]) or "<root>"
            if layer not in logits:
                raise KeyError(f"no mixing logits for layer {layer}; have {sorted(logits)}")
            leaves.append(logits[layer])
        return jax.tree_util.tree_unflatten(treedef, leaves)
    raise ValueError(f"granularity must be 'leaf', 'layer' or 'global', got {granularity!r}")


def _check_inputs(params_list, fishers, logits):
    """Structure/shape checks (trace time) and value checks (concrete inputs only)."""
    if len(params_list) == 0:
        raise ValueError("imm_merge needs at least one source model (params_list is empty)")
    num_sources = len(params_list)
    ref_paths, ref_leaves, ref_def = _paths_and_leaves(params_list[0])

    def same_structure(tree, what):
        paths, leaves, treedef = _paths_and_leaves(tree)
        if treedef != ref_def:
            missing = sorted(set(ref_paths) - set(paths))
            extra = sorted(set(paths) - set(ref_paths))
            raise ValueError(
                f"{what} does not have the structure of params_list[0]: "
                f"missing leaves {missing[:5]}, unexpected leaves {extra[:5]}"
            )
        return leaves

    for t in range(1, num_sources):
        leaves = same_structure(params_list[t], f"params_list[{t}]")
        for path, a, b in zip(ref_paths, ref_leaves, leaves):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"params_list[{t}] leaf {path} has shape {jnp.shape(b)}, "
                    f"params_list[0] has {jnp.shape(a)}"
                )
    if fishers is not None:
        if len(fishers) != num_sources:
            raise ValueError(f"got {len(fishers)} Fishers for {num_sources} source models")
        for t, fisher in enumerate(fishers):
            leaves = same_structure(fisher, f"fishers[{t}]")
            for path, a, f in zip(ref_paths, ref_leaves, leaves):
                if jnp.shape(a) != jnp.shape(f):
                    raise ValueError(
                        f"fishers[{t}] leaf {path} has shape {jnp.shape(f)}, the parameter has {jnp.shape(a)}"
                    )
                if not isinstance(f, jax.core.Tracer):
                    f = np.asarray(f)
                    if not np.all(np.isfinite(f)):
                        raise ValueError(f"fishers[{t}] leaf {path} has non-finite values")
                    if np.any(f < 0):
                        raise ValueError(
                            f"fishers[{t}] leaf {path} has negative values "
                            f"(min {f.min():.3g}); a Fisher diagonal is ≥ 0"
                        )
    logit_leaves = same_structure(logits, "logits")
    for path, b in zip(ref_paths, logit_leaves):
        if jnp.shape(b) != (num_sources,):
            raise ValueError(
                f"logits leaf {path} has shape {jnp.shape(b)}, expected "
                f"({num_sources},) (one logit per source model)"
            )
        if not isinstance(b, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(b))):
            raise ValueError(f"logits leaf {path} has non-finite values")
    for t, tree in enumerate(params_list):
        for path, a in zip(ref_paths, _paths_and_leaves(tree)[1]):
            if not isinstance(a, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(a))):
                raise ValueError(f"params_list[{t}] leaf {path} has non-finite values")


def _merge_leaf(thetas, fishers, alpha, eps):
    """One leaf. Unrolled over sources so XLA emits a single fused element-wise loop."""
    dtype = thetas[0].dtype
    acc_dtype = jnp.promote_types(dtype, jnp.float32)
    if fishers is None:
        out = sum(alpha[t] * thetas[t].astype(acc_dtype) for t in range(len(thetas)))
    else:
        weights = [alpha[t] * fishers[t].astype(acc_dtype) for t in range(len(thetas))]
        num = sum(w * th.astype(acc_dtype) for w, th in zip(weights, thetas))
        out = num / (sum(weights) + eps)
    return out.astype(dtype)


def imm_merge(
    params_list: Sequence[PyTree],
    fishers: Sequence[PyTree] | None,
    logits: PyTree,
    *,
    eps: float = DEFAULT_EPS,
) -> PyTree:
    """Fuse T source models by (mode-)IMM with per-leaf mixing ratios.

    Args:
      params_list: T pytrees of the same structure (the transferable parameters θ_t).
      fishers: T pytrees like ``params_list[0]`` holding diagonal Fishers F_t ≥ 0, or ``None``
        for mean-IMM (F ≡ 1).
      logits: a pytree like ``params_list[0]`` whose leaves have shape (T,): the mixing logits β.
        Use :func:`uniform_logits` for plain IMM, :func:`expand_logits` for coarser granularity.
      eps: the ε of the denominator; guards leaves whose Fisher is zero in every source (they
        come out as 0, exactly as the formula says).

    Returns:
      The fused pytree θ, same structure and dtypes as ``params_list[0]``:
      θ^i = Σ_t α_t^i F_t^i θ_t^i / (Σ_t α_t^i F_t^i + ε),  α^i = σ(β^i) / Σ_t σ(β_t^i).
    """
    params_list = list(params_list)
    fishers = None if fishers is None else list(fishers)
    _check_inputs(params_list, fishers, logits)
    _, _, treedef = _paths_and_leaves(params_list[0])
    theta_leaves = [jax.tree_util.tree_leaves(p) for p in params_list]
    fisher_leaves = None if fishers is None else [jax.tree_util.tree_leaves(f) for f in fishers]
    alpha_leaves = jax.tree_util.tree_leaves(mixing_ratios(logits))
    out = []
    for i, alpha in enumerate(alpha_leaves):
        thetas = [leaves[i] for leaves in theta_leaves]
        fs = None if fisher_leaves is None else [leaves[i] for leaves in fisher_leaves]
        out.append(_merge_leaf(thetas, fs, alpha, eps))
    return jax.tree_util.tree_unflatten(treedef, out)
