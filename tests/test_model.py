"""Tests for timm_jax.nn.unet: the Isensee et al. (2017) 3D U-Net and its two conv implementations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timm_jax.nn import cpu_kernels
from timm_jax.nn.unet import (
    Conv3D,
    InstanceNorm,
    UNet3D,
    conv3d,
    count_convs,
    count_norms,
    count_params,
    init_params,
    instance_norm,
    resolve_conv_impl,
    upsample_nearest,
)

# A tiny network for everything but the count test: 3 levels, 4 base filters, 8³ volumes.
TINY = dict(out_channels=3, base_filters=4, depth=3, num_segmentation_levels=2)
TINY_SHAPE = (2, 8, 8, 8, 2)


def _tiny(**kw):
    return UNet3D(**{**TINY, **kw})


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(_tiny(), jax.random.key(0), TINY_SHAPE)


def _apply(model, **kw):
    """A jitted ``model.apply`` (one compilation instead of slow op-by-op dispatch)."""
    return jax.jit(lambda v, x, rngs=None: model.apply(v, x, rngs=rngs, **kw))


def _expected_param_count(cin, cout, base, depth, n_heads):
    """Independent per-layer count: conv = Cin·Cout·k³ + Cout, norm = 2·C."""

    def conv(ci, co, k):
        return ci * co * k**3 + co

    total, prev = 0, cin
    f = [base * 2**l for l in range(depth)]
    for l in range(depth):  # input conv, two context convs, three norms
        total += conv(prev, f[l], 3) + 2 * conv(f[l], f[l], 3) + 3 * 2 * f[l]
        prev = f[l]
    for l in range(depth - 1):  # up conv, loc 3³ (2f→f), loc 1³, three norms
        total += conv(f[l + 1], f[l], 3) + conv(2 * f[l], f[l], 3) + conv(f[l], f[l], 1)
        total += 3 * 2 * f[l]
    for l in range(n_heads):
        total += conv(f[l], cout, 1)
    return total


def test_default_network_counts():
    model = UNet3D(out_channels=3)
    params = jax.eval_shape(lambda k: init_params(model, k, (1, 16, 16, 16, 4)), jax.random.key(0))
    assert count_convs(params) == 30
    assert count_norms(params) == 27
    n = count_params(params)  # 8,269,561 for 4 inputs, 3 outputs, base 16, depth 5
    assert n == _expected_param_count(4, 3, 16, 5, 3) == 8_269_561
    assert abs(n - 8.27e6) / 8.27e6 < 0.01


def test_param_names_follow_contract():
    model = _tiny()
    params = init_params(model, jax.random.key(0), (1, 8, 8, 8, 2))
    expected = set()
    for l in range(3):
        for s in ("in", "ctx1", "ctx2"):
            expected |= {f"conv_enc{l}_{s}", f"norm_enc{l}_{s}"}
    for l in range(2):
        for s in ("up", "loc1", "loc2"):
            expected |= {f"conv_dec{l}_{s}", f"norm_dec{l}_{s}"}
    expected |= {"head0", "head1"}
    assert set(params) == expected
    for name, sub in params.items():
        if name.startswith("norm_"):
            assert set(sub) == {"scale", "bias"}
            assert sub["scale"].ndim == 1 and sub["bias"].shape == sub["scale"].shape
        else:
            assert set(sub) == {"kernel", "bias"}
            assert sub["kernel"].ndim == 5 and sub["bias"].shape == (sub["kernel"].shape[-1],)
    assert params["conv_enc0_in"]["kernel"].shape == (3, 3, 3, 2, 4)
    assert params["conv_enc2_ctx1"]["kernel"].shape == (3, 3, 3, 16, 16)
    assert params["conv_dec1_up"]["kernel"].shape == (3, 3, 3, 16, 8)
    assert params["conv_dec0_loc1"]["kernel"].shape == (3, 3, 3, 8, 4)
    assert params["conv_dec0_loc2"]["kernel"].shape == (1, 1, 1, 4, 4)
    assert params["head1"]["kernel"].shape == (1, 1, 1, 8, 3)
    assert params["norm_dec0_up"]["scale"].shape == (4,)
    assert count_params(params) == _expected_param_count(2, 3, 4, 3, 2)
    # Glorot-uniform kernels, zero biases, unit scales.
    k = params["conv_enc1_ctx1"]["kernel"]
    limit = np.sqrt(6.0 / (27 * 8 + 27 * 8))
    assert float(jnp.max(jnp.abs(k))) <= limit and float(jnp.std(k)) > 0.3 * limit
    assert not np.any(params["conv_enc1_ctx1"]["bias"])
    np.testing.assert_array_equal(params["norm_enc0_in"]["scale"], 1.0)


def test_output_shape_equals_input_shape(tiny_params):
    model = _tiny()
    x = jax.random.normal(jax.random.key(1), TINY_SHAPE)
    params = tiny_params
    y = _apply(model)({"params": params}, x)
    assert y.shape == TINY_SHAPE[:-1] + (3,)
    assert y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("shape", [(1, 8, 8, 6, 2), (1, 10, 8, 8, 2), (1, 8, 12, 9, 2)])
def test_non_divisible_spatial_size_raises(shape):
    model = _tiny()
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(depth-1\) = 4") as err:
        model.init(jax.random.key(0), jnp.zeros(shape))
    assert str(shape) in str(err.value)


@pytest.mark.parametrize("shape", [(8, 8, 8, 2), (1, 1, 8, 8, 8, 2)])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError, match="5-D") as err:
        _tiny().init(jax.random.key(0), jnp.zeros(shape))
    assert str(shape) in str(err.value)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="conv_impl"):
        _tiny(conv_impl="fft").init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 2)))
    with pytest.raises(ValueError, match="num_segmentation_levels"):
        _tiny(num_segmentation_levels=3).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 2)))


def test_auto_impl_is_direct_on_cpu():
    # The project's machines have a C++ compiler, so the hand-written kernels must build.
    assert jax.default_backend() == "cpu"
    assert cpu_kernels.available()
    assert resolve_conv_impl("auto") == "direct"
    assert resolve_conv_impl("native") == "native"
    assert resolve_conv_impl("depth2d") == "depth2d"


@pytest.mark.parametrize("kernel_size,strides", [(3, 1), (3, 2), (1, 1), (1, 2), ((3, 1, 3), (2, 1, 2))])
@pytest.mark.parametrize("spatial", [(8, 6, 4), (7, 5, 6)])
def test_conv3d_depth2d_matches_native(kernel_size, strides, spatial):
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
    kx, kk, kg = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (2, *spatial, 3))
    kernel = jax.random.normal(kk, (*ks, 3, 5))
    y_nat = conv3d(x, kernel, strides, "native")
    y_d2d = conv3d(x, kernel, strides, "depth2d")
    assert y_nat.shape == y_d2d.shape
    np.testing.assert_allclose(y_d2d, y_nat, rtol=1e-5, atol=1e-5)

    g = jax.random.normal(kg, y_nat.shape)

    def loss(impl):
        return lambda x, k: jnp.sum(conv3d(x, k, strides, impl) * g)

    gx_n, gk_n = jax.grad(loss("native"), argnums=(0, 1))(x, kernel)
    gx_d, gk_d = jax.grad(loss("depth2d"), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(gx_d, gx_n, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gk_d, gk_n, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel_size,strides", [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("features", [6, 8])
def test_conv3d_module_impls_agree(kernel_size, strides, features):
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 8, 4))
    impls = ("native", "depth2d", "direct")
    mods = {impl: Conv3D(features, kernel_size, strides, impl) for impl in impls}
    params = mods["native"].init(jax.random.key(0), x)
    assert params["params"]["kernel"].shape == (kernel_size,) * 3 + (4, features)
    ys = {impl: m.apply(params, x) for impl, m in mods.items()}
    for impl in impls[1:]:
        np.testing.assert_allclose(ys[impl], ys["native"], rtol=1e-5, atol=1e-5, err_msg=impl)


def test_unet_impls_give_same_outputs_and_gradients(tiny_params):
    x = jax.random.normal(jax.random.key(4), TINY_SHAPE)
    target = jax.random.normal(jax.random.key(5), TINY_SHAPE[:-1] + (3,))
    params = tiny_params

    def loss(impl):
        model = _tiny(conv_impl=impl)

        def f(p):
            y = model.apply({"params": p}, x)
            return jnp.mean((y - target) ** 2), y

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (l_n, y_n), g_n = loss("native")(params)
    # Biases of convs followed by instance norm have zero true gradient (the norm removes
    # them); compare those, like everything, against the overall gradient scale.
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(g_n))
    assert float(jnp.max(jnp.abs(g_n["conv_enc0_in"]["kernel"]))) > 1e-3 * scale
    for impl in ("depth2d", "direct"):
        (l_d, y_d), g_d = loss(impl)(params)
        np.testing.assert_allclose(y_d, y_n, rtol=1e-5, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(l_d, l_n, rtol=1e-5, err_msg=impl)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_n), jax.tree_util.tree_leaves(g_d)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{impl} {path}")


def test_dropout_only_in_training(tiny_params):
    model = _tiny(dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(6), TINY_SHAPE)
    v = {"params": tiny_params}
    evaluate, train = _apply(model, train=False), _apply(model, train=True)
    y_eval = evaluate(v, x)
    np.testing.assert_array_equal(evaluate(v, x), y_eval)
    # Eval mode ignores a dropout rng; it equals training with dropout disabled.
    np.testing.assert_array_equal(evaluate(v, x, {"dropout": jax.random.key(9)}), y_eval)
    y_nodrop = _apply(_tiny(dropout_rate=0.0), train=True)(v, x)
    np.testing.assert_allclose(y_nodrop, y_eval, rtol=1e-6, atol=1e-6)

    y_a = train(v, x, {"dropout": jax.random.key(1)})
    y_a2 = train(v, x, {"dropout": jax.random.key(1)})
    y_b = train(v, x, {"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(y_a, y_a2)
    assert not np.allclose(y_a, y_eval)
    assert not np.allclose(y_a, y_b)
    with pytest.raises(ValueError, match="dropout"):
        model.apply(v, x, train=True)


def test_spatial_dropout_drops_whole_channels():
    layer = nn.Dropout(rate=0.5, broadcast_dims=(1, 2, 3), deterministic=False)
    x = jnp.ones((2, 4, 4, 4, 16))
    y = layer.apply({}, x, rngs={"dropout": jax.random.key(0)})
    per_channel = y.reshape(2, -1, 16)
    # Every (sample, channel) map is either all zero or all 1/(1-rate).
    assert bool(jnp.all(jnp.ptp(per_channel, axis=1) == 0))
    assert set(np.unique(np.asarray(per_channel))) <= {0.0, 2.0}


def test_instance_norm_is_per_sample():
    x = jax.random.normal(jax.random.key(7), (2, 4, 4, 4, 3)) * 3.0 + 1.0
    norm = InstanceNorm()
    v = norm.init(jax.random.key(0), x)
    assert set(v["params"]) == {"scale", "bias"}
    y = norm.apply(v, x)
    np.testing.assert_allclose(jnp.mean(y, axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, axis=(1, 2, 3)), 1.0, rtol=1e-3)
    x2 = x.at[1].multiply(10.0).at[1].add(5.0)
    np.testing.assert_array_equal(norm.apply(v, x2)[0], y[0])
    with pytest.raises(ValueError, match="5-D"):
        norm.apply(v, x[0])


def test_instance_norm_gradient_matches_autodiff_of_the_formula():
    # instance_norm's hand-written VJP against autodiff of the textbook formula
    def reference(x, scale, bias, eps=1e-5):
        mean = jnp.mean(x, axis=1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, axis=1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + eps) * scale + bias

    kx, kg = jax.random.split(jax.random.key(11))
    x = jax.random.normal(kx, (3, 50, 4)) * 2.0 + 0.5
    scale, bias = jnp.array([0.5, 1.0, 1.5, -2.0]), jnp.array([0.1, -0.2, 0.0, 0.3])
    g = jax.random.normal(kg, x.shape)
    ours = jax.vjp(lambda *a: instance_norm(*a, 1e-5), x, scale, bias)
    ref = jax.vjp(reference, x, scale, bias)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1](g), ref[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_instance_norm_is_exact_when_the_mean_dwarfs_the_spread():
    # two-pass statistics: with mean/std = 1e4 a one-pass E[x²] - E[x]² keeps no digit of
    # the variance in float32 (ulp(E[x²]) ≈ 1e-3 > var = 1e-4)
    x = (np.random.default_rng(0).standard_normal((1, 4096, 2)) * 0.01 + 100.0).astype(np.float32)
    y = instance_norm(jnp.asarray(x), jnp.ones(2), jnp.zeros(2), 0.0)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(1, keepdims=True)) / x64.std(1, keepdims=True)
    np.testing.assert_allclose(y, want, atol=5e-3)


def test_network_output_is_per_sample(tiny_params):
    model = _tiny()
    x = jax.random.normal(jax.random.key(8), TINY_SHAPE)
    params = tiny_params
    apply = _apply(model)
    y = apply({"params": params}, x)
    x2 = x.at[1].set(jax.random.normal(jax.random.key(9), TINY_SHAPE[1:]) * 5.0)
    y2 = apply({"params": params}, x2)
    np.testing.assert_allclose(y2[0], y[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y2[1], y[1])
    # A lone sample gives the same output as within the batch.
    y_single = apply({"params": params}, x[:1])
    np.testing.assert_allclose(y_single[0], y[0], rtol=1e-5, atol=1e-5)


def test_upsample_nearest():
    x = jnp.arange(8.0).reshape(1, 2, 2, 2, 1)
    y = upsample_nearest(x)
    assert y.shape == (1, 4, 4, 4, 1)
    np.testing.assert_array_equal(
        y[0, :, :, :, 0], np.repeat(np.repeat(np.repeat(x[0, ..., 0], 2, 0), 2, 1), 2, 2)
    )


def test_bfloat16_compute_keeps_float32_params_and_logits():
    """bfloat16 activations; parameters and the returned logits stay float32 (losses, Dice and the
    Fisher's log-likelihood sum over voxels in float32)."""
    model = _tiny(dtype=jnp.bfloat16)
    params = init_params(model, jax.random.key(0), TINY_SHAPE)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    y = _apply(model)({"params": params}, jnp.ones(TINY_SHAPE))
    assert y.dtype == jnp.float32 and y.shape == TINY_SHAPE[:-1] + (3,)
    y32 = _apply(_tiny())({"params": params}, jnp.ones(TINY_SHAPE))
    assert 0 < float(jnp.abs(y - y32).max()) <= 0.05 * float(jnp.abs(y32).max())  # really bfloat16 inside
