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
called outside ``jax.jit``; :func:`check_fishers` is the same value check on its own, for callers
that want it before any merge (the fuse workflow, which names the source runs).

Error messages name a leaf by its path with ``/`` between the keys (``conv_enc0_in/kernel``).

**Dtype policy.** Inputs may be float32, bfloat16 or float16 (or float64 under x64). The ratios
and the weighted sums are computed in ``promote_types(dtype, float32)`` — float32 for the low
precision types — and only the result is cast back to the parameters' dtype, so a bfloat16 merge
is as accurate as a float32 one up to the final rounding. In mode-IMM the weights α_t F_t of each
element are divided by their largest value over the sources before the sums (and ε by the same
number, which leaves θ^i unchanged), so any finite Fishers, from 0 and 1e-30 to 1e38, with any
logits give a finite θ^i between the smallest and the largest θ_t^i, and finite gradients;
all-zero weights give 0, as the formula says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from timm_jax.core import PyTree

Granularity = Literal["leaf", "layer", "global", "channel"]

DEFAULT_EPS = 1e-8


def leaf_path(path: tuple) -> str:
    """A pytree key path as ``conv_enc0_in/kernel`` (``<root>`` for a bare array)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts) or "<root>"


def _paths_and_leaves(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [leaf_path(p) for p, _ in flat], [x for _, x in flat], treedef


def _compute_dtype(dtype) -> Any:
    """float32 for bfloat16 / float16 / integers, float64 for float64: where the maths runs."""
    return jnp.promote_types(dtype, jnp.float32)


def _ratios(b: jax.Array) -> jax.Array:
    """α in the compute dtype (see the module docstring), along the last axis."""
    b = jnp.asarray(b)
    return jax.nn.softmax(jax.nn.log_sigmoid(b.astype(_compute_dtype(b.dtype))), axis=-1)


def mixing_ratios(logits: PyTree) -> PyTree:
    """α = σ(β) / Σ_t σ(β_t) along the last axis of every leaf (shape (T,) per leaf, or (C, T)
    for channel granularity: one ratio vector per output channel).

    Computed as ``softmax(log σ(β))``, which is the same quantity but finite for any logit
    (σ(β) itself underflows to 0 for β ≲ -88 in float32, making the plain ratio 0/0). The
    softmax runs in float32 (float64 for float64 logits) and the ratios come back in the logits'
    floating dtype (float32 for integer logits).
    """

    def one(b):
        b = jnp.asarray(b)
        out_dtype = b.dtype if jnp.issubdtype(b.dtype, jnp.floating) else jnp.float32
        return _ratios(b).astype(out_dtype)

    return jax.tree_util.tree_map(one, logits)


def uniform_logits(params: PyTree, num_sources: int) -> PyTree:
    """Per-leaf logits that give equal ratios α_t = 1/T: the plain IMM baseline."""
    return jax.tree_util.tree_map(lambda _: jnp.zeros((num_sources,), jnp.float32), params)


def init_logits(params: PyTree, num_sources: int, granularity: Granularity, value: float = 0.0) -> PyTree:
    """Trainable logits at a granularity: one (T,) vector per leaf, per layer or for the model,
    or one per output channel of each layer.

    ``"leaf"``: a pytree like ``params`` with (T,) leaves. ``"layer"``: a dict keyed by the layer
    (the leaf's parent path, e.g. ``"['conv_enc0_in']"``), so a conv's kernel and bias share one
    vector. ``"global"``: a single (T,) array. ``"channel"``: a dict keyed by the layer like
    ``"layer"``, with a (C, T) array per layer, C the size of the last axis of the layer's leaves
    (a conv or dense kernel's output channels, its bias, a norm's scale); row c mixes channel c.
    Pass the result through :func:`expand_logits` before :func:`imm_merge`; gradients flow back
    to the shared vectors.
    """
    vec = lambda *lead: jnp.full((*lead, num_sources), value, jnp.float32)  # noqa: E731
    if granularity == "leaf":
        return jax.tree_util.tree_map(lambda _: vec(), params)
    if granularity == "layer":
        return {layer: vec() for layer in layer_names(params)}
    if granularity == "global":
        return vec()
    if granularity == "channel":
        return {layer: vec(c) for layer, c in layer_channels(params).items()}
    raise ValueError(f"granularity must be 'leaf', 'layer', 'global' or 'channel', got {granularity!r}")


def layer_channels(params: PyTree) -> dict[str, int]:
    """The output-channel count of each layer (the last axis of its leaves), for ``"channel"``
    granularity. Raises ValueError, naming the leaf, for a scalar leaf or a layer whose leaves
    disagree on the size of their last axis."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    out: dict[str, int] = {}
    for path, x in flat:
        layer = jax.tree_util.keystr(path[:-1]) or "<root>"
        shape = jnp.shape(x)
        if not shape:
            raise ValueError(f"channel granularity: leaf {leaf_path(path)} is a scalar (no channel axis)")
        if out.setdefault(layer, shape[-1]) != shape[-1]:
            raise ValueError(
                f"channel granularity: leaf {leaf_path(path)} has {shape[-1]} channels on its last axis, "
                f"other leaves of layer {layer} have {out[layer]}"
            )
    return out


def layer_names(params: PyTree) -> list[str]:
    """The layer of each leaf is its parent path; returns them in leaf order, without repeats."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    seen: dict[str, None] = {}
    for path, _ in flat:
        seen.setdefault(jax.tree_util.keystr(path[:-1]) or "<root>", None)
    return list(seen)


def expand_logits(logits: PyTree, params: PyTree, granularity: Granularity) -> PyTree:
    """Broadcast compact logits (see :func:`init_logits`) to one (T,) vector per leaf — or, for
    ``"channel"``, one (C, T) array per leaf, which :func:`imm_merge` broadcasts against the
    leaf's last axis (no per-element logits are formed)."""
    if granularity == "leaf":
        return logits
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if granularity == "global":
        return jax.tree_util.tree_unflatten(treedef, [logits for _ in flat])
    if granularity in ("layer", "channel"):
        leaves = []
        for path, _ in flat:
            layer = jax.tree_util.keystr(path[:-1]) or "<root>"
            if layer not in logits:
                raise KeyError(f"no mixing logits for layer {layer}; have {sorted(logits)}")
            leaves.append(logits[layer])
        return jax.tree_util.tree_unflatten(treedef, leaves)
    raise ValueError(f"granularity must be 'leaf', 'layer', 'global' or 'channel', got {granularity!r}")


def normalise_fisher_per_layer(fisher: PyTree) -> PyTree:
    """One source's Fisher scaled to unit mean per layer (a layer: the leaves sharing a parent path,
    as for ``"layer"`` granularity): every leaf of layer l is divided by the mean of all the
    layer's elements. A layer whose Fisher is all zero is left as it is.

    The log-likelihood sums over voxels, so a source whose task labels more voxels has a Fisher
    many times larger everywhere, and mode-IMM then follows that source whatever the ratios
    (``--fisher_normalisation=layer``; after FusionBench's ``normalize_fisher_weight``, which scales
    each source's Fisher per parameter tensor)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(fisher)
    sums: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for path, x in flat:
        layer = jax.tree_util.keystr(path[:-1]) or "<root>"
        sums[layer] = sums.get(layer, 0.0) + jnp.sum(jnp.asarray(x, jnp.float32))
        sizes[layer] = sizes.get(layer, 0) + int(np.prod(jnp.shape(x)))
    leaves = []
    for path, x in flat:
        layer = jax.tree_util.keystr(path[:-1]) or "<root>"
        mean = sums[layer] / sizes[layer]
        x = jnp.asarray(x, jnp.float32)
        leaves.append(jnp.where(mean > 0, x / jnp.where(mean > 0, mean, 1.0), x))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _host_array(x) -> np.ndarray:
    """A concrete leaf as a NumPy array NumPy's ufuncs understand (bfloat16 → float32, exactly)."""
    a = np.asarray(x)
    if a.dtype.kind not in "biufc":  # ml_dtypes' bfloat16 and friends
        a = a.astype(np.float32)
    return a


def _fisher_leaf_problem(f) -> str | None:
    """What is wrong with the values of one concrete Fisher leaf (NaN / Inf / negative), or None."""
    a = _host_array(f)
    if a.dtype.kind == "c":
        return f"is complex ({a.dtype}); a Fisher diagonal is real and ≥ 0"
    if a.size == 0:
        return None
    if a.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(a)))
        n_inf = int(np.count_nonzero(np.isinf(a)))
        if n_nan or n_inf:
            found = ", ".join(s for n, s in ((n_nan, f"{n_nan} NaN"), (n_inf, f"{n_inf} Inf")) if n)
            return f"has non-finite values ({found} of {a.size})"
    n_neg = int(np.count_nonzero(a < 0))
    if n_neg:
        return (
            f"has negative values ({n_neg} of {a.size}, min {float(a.min()):.3g}); a Fisher diagonal is ≥ 0"
        )
    return None


def check_fishers(fishers: Sequence[PyTree], names: Sequence[str] | None = None) -> None:
    """Reject Fishers with NaN, Inf or negative entries, naming the source and the leaf.

    Pure host-side check (no I/O) for concrete arrays; traced leaves (inside ``jax.jit``) are
    skipped. :func:`imm_merge` runs the same check on concrete inputs; call this one first where
    the sources have names worth reporting (e.g. their run directories).

    Args:
      fishers: one pytree of diagonal Fishers per source.
      names: optional name per source, used in the message instead of ``fishers[t]``.

    Raises:
      ValueError: ``"Fisher of source <name>: leaf conv_enc0_in/kernel has non-finite values
        (3 NaN of 864)"`` — for the first bad leaf found, source by source.
    """
    fishers = list(fishers)
    if names is not None and len(names) != len(fishers):
        raise ValueError(f"check_fishers got {len(names)} names for {len(fishers)} Fishers")
    for t, fisher in enumerate(fishers):
        label = f"fishers[{t}]" if names is None else f"Fisher of source {names[t]} (index {t}):"
        paths, leaves, _ = _paths_and_leaves(fisher)
        for path, f in zip(paths, leaves):
            if isinstance(f, jax.core.Tracer):
                continue
            what = _fisher_leaf_problem(f)
            if what is not None:
                raise ValueError(f"{label} leaf {path} {what}")


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
        check_fishers(fishers)
    logit_leaves = same_structure(logits, "logits")
    for path, a, b in zip(ref_paths, ref_leaves, logit_leaves):
        per_channel = jnp.ndim(a) >= 1 and jnp.shape(b) == (jnp.shape(a)[-1], num_sources)
        if jnp.shape(b) != (num_sources,) and not per_channel:
            channels = f" or ({jnp.shape(a)[-1]}, {num_sources}) per channel" if jnp.ndim(a) else ""
            raise ValueError(
                f"logits leaf {path} has shape {jnp.shape(b)}, expected "
                f"({num_sources},) (one logit per source model){channels}"
            )
        if not isinstance(b, jax.core.Tracer) and not np.all(np.isfinite(_host_array(b))):
            raise ValueError(f"logits leaf {path} has non-finite values")
    for t, tree in enumerate(params_list):
        for path, a in zip(ref_paths, _paths_and_leaves(tree)[1]):
            if not isinstance(a, jax.core.Tracer) and not np.all(np.isfinite(_host_array(a))):
                raise ValueError(f"params_list[{t}] leaf {path} has non-finite values")


def _merge_leaf(thetas, fishers, alpha, eps):
    """One leaf. Unrolled over sources so XLA emits a single fused element-wise loop.

    ``alpha`` is (T,) or (C, T); ``alpha[..., t]`` is then a scalar or a (C,) vector that
    broadcasts against the leaf's last axis (channel granularity).

    Runs in the compute dtype and casts the result back (module docstring, dtype policy). In
    mode-IMM each element's weights α_t F_t are divided by their largest value m (ε too):

        θ = Σ_t α_t r_t θ_t / (Σ_t α_t r_t + ε/m),   r_t = F_t / m,   m = max_t α_t F_t

    is the same quotient, but the largest normalised weight is 1, so the sums neither overflow
    for huge Fishers nor flush to zero for tiny ones. m and r_t are constants for autodiff: θ does
    not depend on m, so the gradient with respect to the logits is exact, and it is formed as
    ``cotangent · r_t`` (never ``cotangent / m``, which underflows for m ≈ 1e38).
    """
    thetas = [jnp.asarray(th) for th in thetas]
    dtype = thetas[0].dtype
    acc_dtype = _compute_dtype(jnp.result_type(dtype, alpha.dtype))
    alpha = alpha.astype(acc_dtype)
    if fishers is None:
        out = sum(alpha[..., t] * thetas[t].astype(acc_dtype) for t in range(len(thetas)))
    else:
        fs = [jnp.asarray(f).astype(acc_dtype) for f in fishers]
        const = jax.lax.stop_gradient
        m = const(alpha[..., 0] * fs[0])
        for t in range(1, len(fs)):
            m = jnp.maximum(m, const(alpha[..., t] * fs[t]))
        m = jnp.where(m > 0, m, jnp.ones_like(m))  # all weights 0: r_t α_t = 0, the result is 0
        # r_t ≤ 1/α_t; only a flushed α_t = 0 can make it inf, and then α_t r_t must be 0, not NaN
        top = jnp.finfo(acc_dtype).max
        ratios = [jnp.minimum(f / m, top) for f in fs]
        weights = [alpha[..., t] * r for t, r in enumerate(ratios)]
        num = sum(w * th.astype(acc_dtype) for w, th in zip(weights, thetas))
        out = num / (sum(weights) + eps / m)
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
      logits: a pytree like ``params_list[0]`` whose leaves have shape (T,): the mixing logits β;
        or (C, T) for a leaf whose last axis has size C: one logit vector per channel, broadcast
        along that axis. Use :func:`uniform_logits` for plain IMM, :func:`expand_logits` for
        shared (layer / global / channel) logits.
      eps: the ε of the denominator; guards leaves whose Fisher is zero in every source (they
        come out as 0, exactly as the formula says).

    Raises:
      ValueError: mismatched tree structures or leaf shapes, a logits leaf not of shape (T,) or (C, T),
        a Fisher count other than T, or (concrete inputs only) NaN / Inf anywhere or negative
        Fishers; the message names the source and the leaf (``conv_enc0_in/kernel``).

    Returns:
      The fused pytree θ, same structure and dtypes as ``params_list[0]``, computed in float32
      for bfloat16 / float16 inputs (module docstring, dtype policy):
      θ^i = Σ_t α_t^i F_t^i θ_t^i / (Σ_t α_t^i F_t^i + ε),  α^i = σ(β^i) / Σ_t σ(β_t^i).
    """
    params_list = list(params_list)
    fishers = None if fishers is None else list(fishers)
    _check_inputs(params_list, fishers, logits)
    _, _, treedef = _paths_and_leaves(params_list[0])
    theta_leaves = [jax.tree_util.tree_leaves(p) for p in params_list]
    fisher_leaves = None if fishers is None else [jax.tree_util.tree_leaves(f) for f in fishers]
    alpha_leaves = [_ratios(b) for b in jax.tree_util.tree_leaves(logits)]
    out = []
    for i, alpha in enumerate(alpha_leaves):
        thetas = [leaves[i] for leaves in theta_leaves]
        fs = None if fisher_leaves is None else [leaves[i] for leaves in fisher_leaves]
        out.append(_merge_leaf(thetas, fs, alpha, eps))
    return jax.tree_util.tree_unflatten(treedef, out)
