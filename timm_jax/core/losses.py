"""Segmentation losses and metrics (multi-label sigmoid outputs, channels last).

The network predicts K independent channels (BraTS regions WT/TC/ET, or one channel per
parcellation label). Conventions follow the original T-IMM code: the soft Dice is computed per
(sample, channel) on sigmoid probabilities with smooth = 1e-5 and averaged over both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SMOOTH = 1e-5


def _spatial_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim - 1))


def soft_dice(probs: jax.Array, targets: jax.Array, smooth: float = SMOOTH) -> jax.Array:
    """Per (sample, channel) soft Dice  (2 Σ p·y + s) / (Σ p + Σ y + s); shape (B, K)."""
    axes = _spatial_axes(probs)
    inter = jnp.sum(probs * targets, axis=axes)
    denom = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
    return (2.0 * inter + smooth) / (denom + smooth)


def soft_dice_loss(logits: jax.Array, targets: jax.Array, smooth: float = SMOOTH) -> jax.Array:
    """1 − mean over (sample, channel) of the soft Dice of σ(logits); inputs (B, D, H, W, K)."""
    return 1.0 - jnp.mean(soft_dice(jax.nn.sigmoid(logits), targets, smooth))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Voxel-wise binary cross-entropy of sigmoid outputs, mean over all voxels and channels."""
    ll = targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits)
    return -jnp.mean(ll)


def binary_entropy(logits: jax.Array) -> jax.Array:
    """Mean over voxels, channels (and samples) of the binary entropy of σ(logits), in nats.

    The network's K channels are independent sigmoids, so each voxel and channel is a Bernoulli
    variable with p = σ(z) and H = −p log p − (1 − p) log(1 − p). Written in the logits as
    ``p·softplus(−z) + (1 − p)·softplus(z)`` (since −log p = softplus(−z)), finite for any z.
    Needs no labels: the label-free adaption objective (after AdaMerging, Yang et al. 2024).
    """
    p = jax.nn.sigmoid(logits)
    return jnp.mean(p * jax.nn.softplus(-logits) + (1.0 - p) * jax.nn.softplus(logits))


def probability_loss(probs: jax.Array, targets: jax.Array, kind: str = "dice") -> jax.Array:
    """A training loss of *probabilities* (B, D, H, W, K) — e.g. a sliding-window prediction, which
    averages window probabilities and has no logits: ``"dice"`` = 1 − mean soft Dice (as
    :func:`soft_dice_loss`), ``"ce"`` = voxel-wise binary cross-entropy (as :func:`cross_entropy`,
    with p clipped to [1e-7, 1 − 1e-7]), ``"dice+ce"`` their sum, ``"entropy"`` the mean binary
    entropy (as :func:`binary_entropy`; ``targets`` not read). For ``probs = σ(logits)`` each equals
    its logit form (up to the clipping)."""
    p = jnp.clip(probs, 1e-7, 1.0 - 1e-7)
    ce = lambda: -jnp.mean(targets * jnp.log(p) + (1 - targets) * jnp.log1p(-p))  # noqa: E731
    dice = lambda: 1.0 - jnp.mean(soft_dice(probs, targets))  # noqa: E731
    if kind == "dice":
        return dice()
    if kind == "ce":
        return ce()
    if kind == "dice+ce":
        return dice() + ce()
    if kind == "entropy":
        return -jnp.mean(p * jnp.log(p) + (1 - p) * jnp.log1p(-p))
    raise ValueError(f"unknown loss {kind!r}; use 'dice', 'ce', 'dice+ce' or 'entropy'")


def hard_dice(pred: jax.Array, targets: jax.Array) -> jax.Array:
    """Per (sample, channel) Dice of binary masks, shape (B, K). Both empty → 1 (perfect)."""
    pred = pred.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    axes = _spatial_axes(pred)
    inter = jnp.sum(pred * targets, axis=axes)
    denom = jnp.sum(pred, axis=axes) + jnp.sum(targets, axis=axes)
    return jnp.where(denom > 0, 2.0 * inter / jnp.maximum(denom, 1e-12), 1.0)


def brats_regions(labels: jax.Array) -> jax.Array:
    """BraTS label map (0/1/2/4) → float32 region channels (..., 3): WT={1,2,4}, TC={1,4}, ET={4}."""
    wt = (labels == 1) | (labels == 2) | (labels == 4)
    tc = (labels == 1) | (labels == 4)
    et = labels == 4
    return jnp.stack([wt, tc, et], axis=-1).astype(jnp.float32)
