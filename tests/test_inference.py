"""Sliding-window and whole-volume inference against direct whole-volume prediction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timm_jax.training import inference
from timm_jax.training.inference import sliding_window_predict, window_starts

W = jnp.array([0.7, -1.3], jnp.float32)


def voxelwise_apply(params, x):
    """Logits (B, d, h, w, 2) that depend on each voxel only: x[..., :1] * w * params."""
    return x[..., :1] * W * params


def direct(image, params=2.0):
    return 1.0 / (1.0 + np.exp(-(image[..., :1] * np.asarray(W) * params)))


def test_window_starts_examples():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(10, 4, 0.0) == [0, 3, 6]
    assert window_starts(4, 4, 0.5) == [0]
    assert window_starts(5, 4, 0.5) == [0, 1]
    assert window_starts(7, 3, 0.9) == list(range(5))  # step floor of 1 voxel
    with pytest.raises(ValueError, match="smaller than the patch"):
        window_starts(3, 4, 0.5)
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 1.0)


@pytest.mark.parametrize("size", [1, 4, 7, 13, 16, 31])
@pytest.mark.parametrize("patch", [1, 4, 5, 8])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_window_starts_cover_every_index(size, patch, overlap):
    if size < patch:
        return
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert starts == sorted(set(starts))
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()
    if len(starts) > 1:  # steps never exceed the target step (overlap at least as requested)
        # steps are the even spacing rounded, so at most ceil(target step) <= patch
        assert max(np.diff(starts)) <= np.ceil(max(patch * (1 - overlap), 1) - 1e-9)


@pytest.mark.parametrize(
    "shape,patch,overlap,gaussian,batch",
    [
        ((8, 8, 8), (4, 4, 4), 0.5, True, 1),
        ((9, 7, 11), (4, 5, 6), 0.5, True, 3),  # non-divisible sizes, ragged last batch
        ((5, 6, 7), (4, 4, 4), 0.0, False, 2),
        ((3, 10, 2), (4, 4, 4), 0.3, True, 2),  # smaller than the patch in two axes
        ((2, 3, 2), (4, 4, 4), 0.5, True, 1),  # smaller than the patch everywhere
    ],
)
def test_sliding_window_equals_direct_for_voxelwise_fn(shape, patch, overlap, gaussian, batch):
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape + (2,)).astype(np.float32)
    out = sliding_window_predict(
        voxelwise_apply,
        2.0,
        image,
        patch_shape=patch,
        overlap=overlap,
        batch_size=batch,
        gaussian=gaussian,
    )
    assert out.shape == shape + (2,) and out.dtype == np.float32
    np.testing.assert_allclose(out, direct(image), rtol=1e-5, atol=1e-6)


def test_every_voxel_covered_and_weights_positive():
    # a constant-one apply_fn: any uncovered voxel would give 0/0 = nan
    def ones(params, x):
        return jnp.full(x.shape[:4] + (1,), 50.0)

    out = sliding_window_predict(
        ones, None, np.zeros((11, 6, 9, 1), np.float32), patch_shape=(4, 4, 4), overlap=0.25
    )
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 1.0)
    g = inference.gaussian_importance_map((4, 6, 8))
    assert g.shape == (4, 6, 8) and g.min() > 0 and np.isclose(g.max(), 1.0)


def test_compiles_once_for_all_windows():
    traces = []

    def counting(params, x):
        traces.append(x.shape)
        return x * params

    image = np.ones((9, 9, 9, 1), np.float32)
    sliding_window_predict(counting, 1.0, image, patch_shape=(4, 4, 4), overlap=0.5, batch_size=4)
    sliding_window_predict(counting, 1.0, image, patch_shape=(4, 4, 4), overlap=0.5, batch_size=4)
    assert traces == [(4, 4, 4, 4, 1)]


def test_whole_volume_mode_pads_to_divisor_and_crops():
    seen = []

    def fn(params, x):
        seen.append(x.shape)
        return voxelwise_apply(params, x)

    rng = np.random.default_rng(1)
    image = rng.standard_normal((5, 17, 8, 2)).astype(np.float32)
    out = sliding_window_predict(fn, 2.0, image, patch_shape=None, divisor=8)
    assert seen == [(1, 8, 24, 8, 2)]
    assert out.shape == (5, 17, 8, 2)
    np.testing.assert_allclose(out, direct(image), rtol=1e-5, atol=1e-6)


def test_input_validation():
    img = np.zeros((4, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="channels-last"):
        sliding_window_predict(voxelwise_apply, 1.0, img[..., 0], patch_shape=(4, 4, 4))
    with pytest.raises(ValueError, match="patch_shape"):
        sliding_window_predict(voxelwise_apply, 1.0, img, patch_shape=(4, 4))
    with pytest.raises(ValueError, match="logits of shape"):
        sliding_window_predict(lambda p, x: x[:, ::2], 1.0, img, patch_shape=(4, 4, 4))


class TinyConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (3, 3, 3), padding="SAME")(x)


def test_tiny_conv_model_sliding_agrees_with_whole_volume_in_interior():
    # A 3x3x3 conv sees zero padding at window edges; the Gaussian weights make those
    # edge predictions nearly irrelevant, uniform weights do not.
    model = TinyConv()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 8, 1)))

    def apply_fn(p, x):
        return model.apply(p, x)

    image = np.random.default_rng(2).standard_normal((12, 10, 11, 1)).astype(np.float32)
    whole = sliding_window_predict(apply_fn, params, image, patch_shape=None, divisor=1)
    inner = (slice(1, -1),) * 3
    err = {}
    for g in (True, False):
        sliding = sliding_window_predict(
            apply_fn, params, image, patch_shape=(8, 8, 8), overlap=0.5, gaussian=g
        )
        err[g] = np.abs(sliding[inner] - whole[inner])
    assert err[True].max() < 5e-3 and err[True].mean() < 1e-3
    assert err[True].mean() < 0.1 * err[False].mean()
