"""Diagonal Fisher information of a model on its own task's data.

The empirical Fisher (docs/method.md; Kirkpatrick et al. 2017, Lee et al. 2017) is

    F = (1/N) Σ_n (∂ log p(y_n | x_n, θ) / ∂θ)²

with *per-example* gradients — not the square of a batch gradient, which is a different (and
much smaller) quantity. Per-example gradients are a jitted ``vmap(grad)`` over a chunk of
examples; squared gradients are summed on the device chunk by chunk, so memory does not grow
with the data set. The "true" Fisher replaces the reference labels y_n by labels sampled from
the model's own predictive distribution (:func:`sampled_segmentation_log_likelihood`).
:func:`adam_fisher` reads a free proxy from a trained model's Adam state instead: the
bias-corrected second moment ν̂ = ν / (1 − β₂ᵗ), an average of squared (mini-batch) gradients
of the training loss, at no extra pass over the data.

Pitfalls measured on this stack (jax 0.10): a per-example function must re-add the batch axis
(``x[None]``) before calling a network with instance norm (Flax's norms would otherwise treat
depth as the batch axis); ``jit(vmap(grad))`` given a batch *sharded across devices* returned
wrong convolution-kernel gradients on CPU, and ``shard_map`` with default checks sums the
per-example gradients over devices. Here a chunk either lives on one device, or is split over a
mesh with ``shard_map`` after casting the parameters to device-varying (``lax.pcast``), which
is tested against the single-device result on 4 fake devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from timm_jax.core import PyTree

LogLikelihood = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


@functools.lru_cache(maxsize=16)
def _chunk_accumulator(log_likelihood: LogLikelihood):
    grad_fn = jax.grad(log_likelihood)

    def step(acc, params, x, y, mask):
        grads = jax.vmap(grad_fn, in_axes=(None, 0, 0))(params, x, y)
        m = mask.astype(jnp.float32)

        def add(a, g):
            g = g.astype(jnp.float32)
            return a + jnp.tensordot(m, g * g, axes=(0, 0))

        return jax.tree_util.tree_map(add, acc, grads)

    return jax.jit(step, donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def _sharded_chunk_accumulator(log_likelihood: LogLikelihood, mesh, axis: str):
    """Data-parallel version: the chunk is split over ``mesh[axis]``; each device takes the
    per-example gradients of its examples and the squared sums are ``psum``-ed.

    The parameters are cast to device-varying first (``lax.pcast``): otherwise shard_map would
    treat the gradient w.r.t. replicated parameters as a cross-device sum (the pitfall in the
    module docstring).
    """
    from jax.sharding import PartitionSpec as P

    grad_fn = jax.grad(log_likelihood)

    def local(acc, params, x, y, mask):
        params = jax.lax.pcast(params, axis, to="varying")
        grads = jax.vmap(grad_fn, in_axes=(None, 0, 0))(params, x, y)
        m = mask.astype(jnp.float32)
        part = jax.tree_util.tree_map(
            lambda g: jnp.tensordot(m, jnp.square(g.astype(jnp.float32)), axes=(0, 0)), grads
        )
        part = jax.lax.psum(part, axis)
        return jax.tree_util.tree_map(jnp.add, acc, part)

    step = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis), P(axis)), out_specs=P())
    # explicit shardings place host (numpy) chunks on the mesh, also one spanning several processes
    rep, data = (jax.sharding.NamedSharding(mesh, spec) for spec in (P(), P(axis)))
    return jax.jit(step, in_shardings=(rep, rep, data, data, data), out_shardings=rep, donate_argnums=(0,))


def _pad_to(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape[0] == n:
        return a
    reps = np.repeat(a[:1], n - a.shape[0], axis=0)
    return np.concatenate([a, reps], axis=0)


def _split_over(mesh, axis: str, a: np.ndarray) -> jax.Array:
    """A host array that every process holds in full → a global array split along axis 0."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def fisher_diagonal(
    log_likelihood: LogLikelihood,
    params: PyTree,
    batches: Iterable[tuple[Any, Any]],
    *,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    mesh=None,
    axis_name: str = "data",
) -> PyTree:
    """Empirical diagonal Fisher: mean over all examples of the squared per-example gradient.

    Args:
      log_likelihood: ``log_likelihood(params, x, y) -> scalar`` for ONE example (no batch axis).
      params: the pytree to differentiate (e.g. all params, or only the transferable subset with
        the rest closed over inside ``log_likelihood``).
      batches: iterable of ``(x, y)`` arrays with a leading batch axis (any batch sizes; ``y``
        may be anything ``log_likelihood`` accepts per example, e.g. PRNG keys).
      chunk_size: examples per ``vmap`` call (default: the first batch's size). A batch is cut
        into chunks of this size; the last chunk is padded and masked, so every chunk has the
        same shape and compiles once (per log-likelihood function, across calls). The result does
        not depend on it. On XLA CPU, 1 is fastest: batched per-example kernel gradients
        become grouped convolutions there (see benchmarks/README.md).
      progress: optional callback called with the number of examples seen so far.
      mesh: optional ``jax.sharding.Mesh``; each chunk is then split over its ``axis_name``
        axis (data parallel), so ``chunk_size`` must be a multiple of that axis' size. In a
        multi-process run every process passes the same batches (the whole chunk); each device
        takes its rows.

    Returns:
      A float32 pytree like ``params``.
    """
    if mesh is None:
        step = _chunk_accumulator(log_likelihood)
    else:
        step = _sharded_chunk_accumulator(log_likelihood, mesh, axis_name)
        n_dev = mesh.shape[axis_name]
    acc = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    count = 0
    for x, y in batches:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        y = np.asarray(y) if not isinstance(y, jax.Array) else y
        n = x.shape[0]
        if y.shape[0] != n:
            raise ValueError(f"batch has {n} inputs but {y.shape[0]} targets")
        if chunk_size is None:
            chunk_size = n if mesh is None else -(-n // n_dev) * n_dev
        if mesh is not None and chunk_size % n_dev:
            raise ValueError(
                f"chunk_size {chunk_size} must be a multiple of the {n_dev} devices "
                f"on mesh axis {axis_name!r}"
            )
        for start in range(0, n, chunk_size):
            xc, yc = x[start : start + chunk_size], y[start : start + chunk_size]
            k = xc.shape[0]
            mask = np.arange(chunk_size) < k
            xc, yc = (_pad_to(np.asarray(a), chunk_size) for a in (xc, yc))
            if mesh is not None:  # numpy may not be split over devices of other processes
                xc, yc, mask = (_split_over(mesh, axis_name, a) for a in (xc, yc, mask))
            acc = step(acc, params, xc, yc, mask)
            count += k
            if progress is not None:
                progress(count)
    if count == 0:
        raise ValueError("fisher_diagonal got no examples (the batches iterable was empty)")
    return jax.tree_util.tree_map(lambda a: a / count, acc)


def bernoulli_log_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Σ_voxels,channels [y log σ(z) + (1 − y) log(1 − σ(z))] for multi-label sigmoid outputs."""
    return jnp.sum(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))


def segmentation_log_likelihood(apply_fn: Callable[[PyTree, jax.Array], jax.Array]) -> LogLikelihood:
    """log p(y | x, θ) of one volume: voxel-wise Bernoulli log-likelihood, summed over voxels.

    ``apply_fn(params, x_batched) -> logits`` takes a batch (B, D, H, W, C); ``x`` here is one
    (D, H, W, C) volume and ``y`` its (D, H, W, K) binary targets. The batch axis is re-added
    before the network sees it (instance norm would otherwise normalise over depth).
    """

    def log_likelihood(params, x, y):
        logits = apply_fn(params, x[None])[0]
        return bernoulli_log_likelihood(logits, y)

    return log_likelihood


def sampled_segmentation_log_likelihood(apply_fn) -> LogLikelihood:
    """As :func:`segmentation_log_likelihood` but y ~ p(· | x, θ) is sampled from the model.

    The per-example "target" passed to it is a PRNG key (shape (2,) uint32, e.g. from
    ``jax.random.split``), so ``fisher_diagonal`` gives the *true* Fisher estimate.
    """

    def log_likelihood(params, x, key):
        logits = apply_fn(params, x[None])[0]
        y = jax.random.bernoulli(key, jax.nn.sigmoid(jax.lax.stop_gradient(logits)))
        return bernoulli_log_likelihood(logits, y.astype(logits.dtype))

    return log_likelihood


def with_sample_keys(batches: Iterable[tuple[Any, Any]], key: jax.Array):
    """Replace each batch's targets by one raw PRNG key per example (for the true Fisher).

    ``key`` is a raw key (``jax.random.PRNGKey(seed)``); the keys are a (B, 2) uint32 array.
    """
    for x, _ in batches:
        key, sub = jax.random.split(key)
        yield x, jax.random.split(sub, np.shape(x)[0])


def _as_mapping(node) -> dict | None:
    """A state node's fields by name: dicts as they are, NamedTuples (optax states) as dicts."""
    if isinstance(node, dict):
        return node
    if isinstance(node, tuple) and hasattr(node, "_asdict"):
        return node._asdict()
    return None


def _find_adam(node, b2, found: list) -> None:
    fields = _as_mapping(node)
    if fields is not None:
        hyper = fields.get("hyperparams")
        if isinstance(hyper, dict) and "b2" in hyper:
            b2 = hyper["b2"]  # optax.inject_hyperparams(optax.adam): b2 lives beside the inner state
        if "nu" in fields and "count" in fields:
            found.append((fields["nu"], fields["count"], b2))
            return
        children = fields.values()
    elif isinstance(node, (list, tuple)):
        children = node
    else:
        return
    for child in children:
        _find_adam(child, b2, found)


def adam_fisher(opt_state, *, b2: float | None = None) -> PyTree:
    """Diagonal Fisher proxy from a trained model's Adam state: ν / (1 − β₂ᵗ).

    Adam keeps ν, an exponential moving average (factor β₂) of the squared mini-batch gradients
    of the training loss, and t, its step count; dividing by 1 − β₂ᵗ removes the bias of the
    average's zero start. The result is the squared-gradient ("empirical Fisher") proxy of the
    last ~1/(1 − β₂) steps, read at no cost — but of the *loss* (e.g. soft Dice) on mini-batches,
    not of the per-example log-likelihood, so its scale and its ranking can differ from
    :func:`fisher_diagonal`'s.

    Args:
      opt_state: the optimiser state, as optax returns it or as a checkpoint restores it
        (nested dicts / lists): any tree holding exactly one node with ``nu`` and ``count``
        fields (``optax.adam``'s ``ScaleByAdamState``).
      b2: β₂; read from the state when it was built with ``optax.inject_hyperparams`` (as
        :func:`timm_jax.training.steps.make_optimizer` does), required otherwise.

    Returns:
      A float32 pytree shaped like ``nu`` (the parameters).

    Raises:
      ValueError: no Adam state (another optimiser, or the state is missing), more than one,
        an unknown β₂, a step count of 0, or a NaN / Inf / negative ν.
    """
    found: list = []
    _find_adam(opt_state, None, found)
    if not found:
        raise ValueError("the optimiser state holds no Adam second moment (no 'nu' with a 'count'): not Adam")
    if len(found) > 1:
        raise ValueError(f"the optimiser state holds {len(found)} Adam states; expected one")
    nu, count, stored_b2 = found[0]
    b2 = stored_b2 if b2 is None else b2
    if b2 is None:
        raise ValueError("Adam's b2 is not in the optimiser state (not inject_hyperparams); pass b2=")
    t = int(np.asarray(count))
    b2 = float(np.asarray(b2))
    if t < 1:
        raise ValueError(f"the Adam state is at step {t}; no gradient has been seen yet")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"Adam's b2 must be in [0, 1), got {b2}")
    correction = 1.0 - b2**t
    leaves, treedef = jax.tree_util.tree_flatten(nu)
    out = []
    for leaf in leaves:
        a = np.asarray(leaf, np.float64) / correction
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError("the Adam second moment has NaN, Inf or negative entries")
        out.append(jnp.asarray(a, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)
