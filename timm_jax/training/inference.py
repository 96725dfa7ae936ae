"""Whole-volume inference: sliding-window prediction with importance-weighted averaging.

A network trained on patches is applied to a full volume by tiling it with overlapping
windows of the training patch size (the strategy of nnU-Net, Isensee et al. 2021). With
instance normalisation this is not an optimisation but a matter of correctness: the per-channel
statistics of a padded whole volume (mostly background) are not those of a training patch, so a
one-pass whole-volume prediction is a different network. :func:`make_predictor` is the one
prediction function of the project — validation inside training, fine-tuning and the adaption
stage, ``evaluate.py``, the forgetting evaluation and the reports' figures all call it with the
run's training patch:

* the volume is zero-padded (symmetrically) in every axis where it is smaller than the patch;
* along each axis the window starts are evenly spaced from 0 to ``size - patch`` (the last
  window is flush with the end), with the fewest windows whose step does not exceed
  ``patch * (1 - overlap)`` — so every voxel is covered;
* each window's sigmoid probabilities are accumulated with an importance map ``w`` (a
  Gaussian centred on the patch with sigma = patch / 8 per axis, or uniform ones) and the
  result is ``p(v) = Σ_windows w(v - start) p_window(v) / Σ_windows w(v - start)``;
* the padding is cropped off again.

With ``patch_shape=None`` the whole volume is predicted in one call after padding every
axis up to a multiple of ``divisor`` (the U-Net needs sizes divisible by 2**(depth-1)).

Conventions: ``image`` is a channels-last (D, H, W, C) array; ``apply_fn(params, x)`` maps a
batch (B, d, h, w, C) to logits (B, d, h, w, K) of K independent sigmoid channels. The
result is a float32 numpy array (D, H, W, K) of probabilities.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from timm_jax.config import EvalConfig
from timm_jax.training.parallel import AXIS, data_parallel_jit

__all__ = [
    "gaussian_importance_map",
    "make_predictor",
    "model_apply",
    "sliding_window_predict",
    "window_starts",
]

_COMPILED: dict[Callable, Callable] = {}
_MAX_COMPILED = 16


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``patch`` tiling an axis of length ``size``.

    The number of windows is ``n = ceil((size - patch) / (patch * (1 - overlap))) + 1`` (the
    fewest whose step is at most the target step ``patch * (1 - overlap)``, at least 1), and
    the starts are ``round(i * (size - patch) / (n - 1))`` for ``i = 0 .. n-1``: evenly
    spaced, first at 0, last at ``size - patch``, so every index in ``[0, size)`` is covered.

    Examples: ``window_starts(10, 4, 0.5) == [0, 2, 4, 6]``, ``window_starts(10, 4, 0.0) ==
    [0, 3, 6]``, ``window_starts(4, 4, 0.5) == [0]``.

    Raises:
      ValueError: if ``patch < 1``, ``size < patch`` (pad the axis first) or ``overlap`` is
        outside ``[0, 1)``.
    """
    size, patch = int(size), int(patch)
    if patch < 1:
        raise ValueError(f"window_starts: patch must be >= 1, got {patch}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"window_starts: overlap must be in [0, 1), got {overlap}")
    if size < patch:
        raise ValueError(
            f"window_starts: axis of size {size} is smaller than the patch {patch}; pad it first"
        )
    span = size - patch
    if span == 0:
        return [0]
    target_step = max(patch * (1.0 - overlap), 1.0)
    n = int(math.ceil(span / target_step - 1e-9)) + 1
    step = span / (n - 1)
    return [int(round(i * step)) for i in range(n)]


def gaussian_importance_map(patch_shape: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Separable Gaussian weights over a patch, float32, maximum 1.

    ``w(x) = Π_a exp(-(x_a - c_a)² / (2 σ_a²))`` with centre ``c_a = (p_a - 1) / 2`` and
    ``σ_a = sigma_scale * p_a``. Values are clipped below at 1e-6 so that no voxel of a
    window has zero weight (the denominator of the average never vanishes).
    """
    w = np.ones((), np.float64)
    for p in patch_shape:
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        sigma = max(sigma_scale * p, 1e-6)
        g = np.exp(-0.5 * (x / sigma) ** 2)
        w = np.multiply.outer(w, g)
    w = w / w.max()
    return np.maximum(w, 1e-6).astype(np.float32)


def _probability_fn(apply_fn: Callable, mesh=None, sharded: bool = False) -> Callable:
    """``jit(sigmoid ∘ apply_fn)``, cached per ``apply_fn`` (and mesh) so repeated calls reuse
    compilations. With ``mesh``, the input batch is split over its ``data`` axis if ``sharded``
    (else replicated); params and the output probabilities are replicated."""

    def make():
        fn = lambda params, x: jax.nn.sigmoid(apply_fn(params, x))  # noqa: E731
        return data_parallel_jit(fn, mesh, batch_argnums=(1,) if sharded else (), nargs=2)

    key = (apply_fn, mesh, sharded)
    try:
        hash(key)
    except TypeError:
        return make()
    fn = _COMPILED.get(key)
    if fn is None:
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.pop(next(iter(_COMPILED)))
        fn = _COMPILED[key] = make()
    return fn


def _pad_to(image: np.ndarray, target: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pads the spatial axes of (D, H, W, C) symmetrically up to ``target``; returns the crop."""
    pads, crop = [], []
    for s, t in zip(image.shape[:3], target):
        extra = max(int(t) - s, 0)
        before = extra // 2
        pads.append((before, extra - before))
        crop.append(slice(before, before + s))
    if any(p != (0, 0) for p in pads):
        image = np.pad(image, pads + [(0, 0)], mode="constant")
    return image, tuple(crop)


def _check_logits(probs: np.ndarray, batch: int, spatial: Sequence[int]) -> None:
    if probs.ndim != 5 or probs.shape[0] != batch or tuple(probs.shape[1:4]) != tuple(spatial):
        raise ValueError(
            f"apply_fn must return logits of shape (B, d, h, w, K) = ({batch}, "
            f"{', '.join(str(s) for s in spatial)}, K) for an input batch of that spatial "
            f"shape; got {probs.shape}"
        )


def sliding_window_predict(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    image: np.ndarray,
    *,
    patch_shape: Sequence[int] | None,
    overlap: float = EvalConfig.overlap,
    batch_size: int = 1,
    gaussian: bool = True,
    divisor: int = 16,
    mesh=None,
) -> np.ndarray:
    """Sigmoid probabilities (D, H, W, K) of a channels-last volume ``image`` (D, H, W, C).

    Sliding-window mode (``patch_shape`` = (pd, ph, pw)): the volume is zero-padded up to
    the patch where smaller, tiled with windows at :func:`window_starts` along each axis
    (fractional ``overlap`` in [0, 1)), predicted ``batch_size`` windows per call, and the
    window probabilities are averaged voxel-wise with importance weights
    (:func:`gaussian_importance_map` if ``gaussian`` else uniform):
    ``p(v) = Σ_j w_j(v) p_j(v) / Σ_j w_j(v)``. The padding is cropped off.

    Whole-volume mode (``patch_shape=None``): every axis is zero-padded up to a multiple of
    ``divisor``, the padded volume is predicted in one call and cropped back.

    ``sigmoid(apply_fn(params, x))`` is jitted once per ``apply_fn`` (and cached), and every
    window batch has the same shape — the last batch is completed with zero patches whose
    output is discarded — so sliding-window inference compiles once.

    Args:
      apply_fn: ``apply_fn(params, x)`` with x (B, d, h, w, C) → logits (B, d, h, w, K).
      params: the parameters passed through to ``apply_fn``.
      image: float array (D, H, W, C).
      patch_shape: window size (3 ints) or ``None`` for whole-volume prediction.
      overlap: fraction of a window shared with its neighbour, in [0, 1).
      batch_size: windows per network call.
      gaussian: Gaussian (sigma = patch/8) instead of uniform importance weights.
      divisor: whole-volume mode only: padded sizes are multiples of this.
      mesh: optional ``("data",)`` mesh (:mod:`timm_jax.training.parallel`): each batch of
        windows is split over its devices (``batch_size`` must be a multiple of the mesh size;
        a whole volume is replicated). Every process of a multi-process run passes the same
        image and gets the same result.

    Returns:
      float32 numpy array (D, H, W, K) of probabilities in [0, 1].
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(
            f"sliding_window_predict expects a channels-last (D, H, W, C) image, got shape "
            f"{image.shape}; add a channel axis with image[..., None] for one modality"
        )
    spatial = image.shape[:3]

    if patch_shape is None:
        fn = _probability_fn(apply_fn, mesh)
        divisor = int(divisor)
        if divisor < 1:
            raise ValueError(f"divisor must be >= 1, got {divisor}")
        target = [int(math.ceil(s / divisor)) * divisor for s in spatial]
        padded, crop = _pad_to(image, target)
        probs = np.asarray(jax.device_get(fn(params, padded[None])), dtype=np.float32)
        _check_logits(probs, 1, padded.shape[:3])
        return np.ascontiguousarray(probs[0][crop])

    patch = tuple(int(p) for p in patch_shape)
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ValueError(f"patch_shape must be 3 positive ints (pd, ph, pw), got {patch_shape}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's {mesh.size} devices")
    fn = _probability_fn(apply_fn, mesh, sharded=True)

    padded, crop = _pad_to(image, patch)
    pshape = padded.shape[:3]
    starts = [window_starts(s, p, overlap) for s, p in zip(pshape, patch)]
    corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    weight = gaussian_importance_map(patch) if gaussian else np.ones(patch, np.float32)

    weight_sum = np.zeros(pshape, np.float32)
    prob_sum: np.ndarray | None = None
    channels = padded.shape[3]
    for i in range(0, len(corners), batch_size):
        chunk = corners[i : i + batch_size]
        batch = np.zeros((batch_size, *patch, channels), np.float32)
        for j, (a, b, c) in enumerate(chunk):
            batch[j] = padded[a : a + patch[0], b : b + patch[1], c : c + patch[2]]
        if mesh is not None:  # every process holds the whole batch; each device takes its windows
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
            batch = jax.make_array_from_callback(batch.shape, sharding, lambda idx, b=batch: b[idx])
        probs = np.asarray(jax.device_get(fn(params, batch)), dtype=np.float32)
        _check_logits(probs, batch_size, patch)
        if prob_sum is None:
            prob_sum = np.zeros((*pshape, probs.shape[-1]), np.float32)
        for j, (a, b, c) in enumerate(chunk):
            sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            prob_sum[sl] += probs[j] * weight[..., None]
            weight_sum[sl] += weight
    assert prob_sum is not None  # at least one window always exists
    out = prob_sum / weight_sum[..., None]
    return np.ascontiguousarray(out[crop])


@functools.lru_cache(maxsize=_MAX_COMPILED)
def model_apply(model) -> Callable[[Any, Any], Any]:
    """``apply_fn(params, x) = model.apply({"params": params}, x)`` (inference mode), one function
    per (hashable, equal-by-configuration) Flax module, so its compilations are reused."""
    return lambda params, x: model.apply({"params": params}, x)


def make_predictor(
    model, patch_shape: Sequence[int], *, overlap: float, mesh=None, batch_size: int | None = None
) -> Callable[[Any, np.ndarray], np.ndarray]:
    """``predict(params, image) -> probabilities (D, H, W, K)``: :func:`sliding_window_predict`
    of ``model`` with Gaussian-weighted windows of ``patch_shape`` (the run's training patch) and
    ``overlap``. A volume that the patch covers is one window (zero-padded up to the patch, as
    the training patches of such a volume are). ``batch_size`` windows per network call (default:
    one per device of ``mesh``, else 1); with ``mesh`` the windows of a call are split over it."""
    patch = tuple(int(p) for p in patch_shape)
    if batch_size is None:
        batch_size = mesh.size if mesh is not None else 1
    apply_fn = model_apply(model)

    def predict(params, image: np.ndarray) -> np.ndarray:
        return sliding_window_predict(
            apply_fn, params, image, patch_shape=patch, overlap=overlap, batch_size=batch_size, mesh=mesh
        )

    return predict
