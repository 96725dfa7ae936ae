"""Losses and metrics against hand-computed values."""

import jax.numpy as jnp
import numpy as np

from timm_jax.core import losses


def test_soft_dice_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4, 5, 3)).astype(np.float32)
    y = (rng.random((2, 3, 4, 5, 3)) < 0.3).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    dice = [
        (2 * (p[b, ..., k] * y[b, ..., k]).sum() + 1e-5) / (p[b, ..., k].sum() + y[b, ..., k].sum() + 1e-5)
        for b in range(2)
        for k in range(3)
    ]
    np.testing.assert_allclose(losses.soft_dice_loss(logits, y), 1 - np.mean(dice), rtol=1e-5)
    # perfect confident prediction → loss ≈ 0
    assert float(losses.soft_dice_loss(jnp.where(y > 0, 50.0, -50.0), y)) < 1e-4


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, 2, 2, 2, 2)).astype(np.float32)
    y = (rng.random(z.shape) < 0.5).astype(np.float32)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    want = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    np.testing.assert_allclose(losses.cross_entropy(z, y), want, rtol=1e-5)


def test_hard_dice_per_channel_and_empty_case():
    pred = np.zeros((1, 2, 2, 1, 2), bool)
    tgt = np.zeros_like(pred)
    pred[0, 0, :, 0, 0] = True  # 2 voxels predicted
    tgt[0, :, 0, 0, 0] = True  # 2 voxels true, overlap 1
    d = np.asarray(losses.hard_dice(pred, tgt))
    np.testing.assert_allclose(d[0, 0], 2 * 1 / 4)
    assert d[0, 1] == 1.0  # both empty
    tgt[0, 0, 0, 0, 1] = True
    assert np.asarray(losses.hard_dice(pred, tgt))[0, 1] == 0.0


def test_brats_regions():
    labels = np.array([0, 1, 2, 4])
    r = np.asarray(losses.brats_regions(labels))
    np.testing.assert_array_equal(r, [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
