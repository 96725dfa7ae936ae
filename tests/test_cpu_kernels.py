"""The hand-written CPU kernels (timm_jax/nn/csrc/) against XLA: the 3×3×3 convolution against
XLA's native 3D convolution (outputs, both gradients, borders, strides, odd shapes, vmap,
determinism, errors, the AVX2 build) and instance normalisation against its JAX formulation."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timm_jax.nn import cpu_kernels
from timm_jax.nn.cpu_kernels import conv3d_direct
from timm_jax.nn.ops import instance_norm as _instance_norm
from timm_jax.nn.unet import conv3d


def instance_norm(x, scale, bias, epsilon, use_kernels=False):
    return _instance_norm(x, scale, bias, epsilon, cpu_kernels if use_kernels else None)


pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels")


def _fresh_process(script: str, **env) -> str:
    """Runs `script` in a new Python with extra environment variables; returns its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _native(x, kernel, stride):
    return conv3d(x, kernel, stride, "native")


def _data(batch, spatial, cin, cout, seed=0):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, *spatial, cin))
    kernel = jax.random.normal(kk, (3, 3, 3, cin, cout)) / np.sqrt(27 * cin)
    return x, kernel


def test_kernels_build_and_load():
    assert cpu_kernels.available(), "the C++ kernels did not build; see the warning"
    assert cpu_kernels.library_path().exists()


@pytest.mark.parametrize(
    "batch,spatial,cin,cout,stride",
    [
        (2, (8, 8, 8), 8, 8, 1),
        (1, (7, 5, 6), 3, 16, 1),  # odd sizes, Cin not a multiple of 8 (XLA input gradient)
        (2, (6, 9, 4), 16, 24, 1),  # Cout = 24: three 8-wide vectors per tile
        (1, (1, 2, 3), 8, 8, 1),  # dims of 1-3 voxels: every voxel is a border voxel
        (1, (4, 4, 35), 8, 32, 1),  # long rows: every tile width 16/8/4/2/1 is used
        (2, (8, 8, 8), 8, 16, 2),  # stride 2, even sizes: padding on the high side only
        (1, (7, 5, 6), 16, 8, 2),  # stride 2, odd sizes: padding on both sides
        (1, (3, 6, 7), 8, 64, 2),
    ],
)
def test_matches_native_convolution(batch, spatial, cin, cout, stride):
    x, kernel = _data(batch, spatial, cin, cout)
    assert cpu_kernels.supports(x, kernel, (stride,) * 3)
    y = jax.jit(conv3d_direct, static_argnums=2)(x, kernel, stride)
    y_ref = _native(x, kernel, stride)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

    dy = jax.random.normal(jax.random.key(7), y_ref.shape)
    vjp = lambda f: jax.jit(lambda x, k, dy: jax.vjp(lambda x, k: f(x, k, stride), x, k)[1](dy))
    dx, dk = vjp(conv3d_direct)(x, kernel, dy)
    dx_ref, dk_ref = vjp(_native)(x, kernel, dy)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)


def test_gradient_matches_finite_differences():
    # an independent check of the custom VJP: directional derivative of a scalar loss
    x, kernel = _data(1, (4, 5, 3), 8, 8, seed=3)
    g = jax.random.normal(jax.random.key(4), (1, 4, 5, 3, 8))
    loss = lambda x, k: jnp.sum(conv3d_direct(x, k) * g)
    dx, dk = jax.grad(loss, argnums=(0, 1))(x, kernel)
    vx, vk = jax.random.normal(jax.random.key(5), x.shape), jax.random.normal(jax.random.key(6), kernel.shape)
    eps = 1e-2  # the loss is bilinear, so central differences are exact up to rounding
    fd = (loss(x + eps * vx, kernel + eps * vk) - loss(x - eps * vx, kernel - eps * vk)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(dx, vx) + jnp.vdot(dk, vk), fd, rtol=2e-3)


def test_per_example_gradients_under_vmap_match_a_loop():
    x, kernel = _data(3, (4, 4, 4), 8, 8, seed=1)
    loss = lambda k, xi: jnp.sum(jnp.tanh(conv3d_direct(xi[None], k)))
    batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(kernel, x)
    looped = jnp.stack([jax.grad(loss)(kernel, x[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)


def test_results_are_deterministic():
    # the weight gradient sums fixed per-chunk partials in order: bitwise repeatable
    x, kernel = _data(2, (16, 16, 16), 16, 16, seed=2)
    dy = jax.random.normal(jax.random.key(9), (2, 16, 16, 16, 16))
    f = jax.jit(lambda x, k, dy: jax.vjp(conv3d_direct, x, k)[1](dy))
    first = f(x, kernel, dy)
    for _ in range(3):
        for a, b in zip(first, f(x, kernel, dy)):
            np.testing.assert_array_equal(a, b)


def test_unsupported_inputs_fall_back_to_xla():
    x, kernel = _data(1, (4, 4, 4), 8, 8)
    assert cpu_kernels.supports(x, kernel, (1, 1, 1))
    assert not cpu_kernels.supports(x.astype(jnp.bfloat16), kernel, (1, 1, 1))  # float32 only
    assert not cpu_kernels.supports(x, kernel[..., :6], (1, 1, 1))  # Cout % 8 != 0
    assert not cpu_kernels.supports(x, kernel[:1, :1, :1], (1, 1, 1))  # 1³ kernel
    assert not cpu_kernels.supports(x, kernel, (2, 1, 2))  # unequal strides
    # conv3d(impl="direct") still computes those, through the depth-folded 2D formulation
    y = conv3d(x, kernel[..., :6], (2, 1, 2), "direct")
    np.testing.assert_allclose(y, _native(x, kernel[..., :6], (2, 1, 2)), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_inconsistent_shapes_with_a_clear_error():
    x, kernel = _data(1, (4, 4, 4), 8, 8)
    wrong = jax.ShapeDtypeStruct((1, 4, 4, 4, 12), jnp.float32)  # Cout 12 ≠ kernel's 8
    call = jax.ffi.ffi_call(cpu_kernels._FORWARD, wrong)
    attrs = {k: np.int64(v) for k, v in dict(stride=1, pad_d=1, pad_h=1, pad_w=1).items()}
    with pytest.raises(Exception, match="conv3d_cpu: kernel must be"):
        jax.block_until_ready(call(x, kernel, **attrs))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction-set levels")
@pytest.mark.e2e
def test_avx2_build_matches_native(tmp_path):
    # The machines here have AVX-512, which selects the larger tiles and the narrow-output
    # kernels; build for AVX2 (x86-64-v3) in a fresh process to test the other code path.
    script = (
        "import jax, numpy as np\n"
        "from timm_jax.nn import cpu_kernels\n"
        "from timm_jax.nn.unet import conv3d\n"
        "assert cpu_kernels.available()\n"
        "cases = [(8, 8, 1, (5, 6, 7)), (16, 24, 1, (4, 4, 9)), (8, 16, 2, (7, 5, 6))]\n"
        "for cin, cout, stride, shape in cases:\n"
        "    x = jax.random.normal(jax.random.key(0), (2, *shape, cin))\n"
        "    k = jax.random.normal(jax.random.key(1), (3, 3, 3, cin, cout)) * 0.1\n"
        "    loss = lambda x, k, impl: (conv3d(x, k, stride, impl) ** 2).sum()\n"
        "    f = lambda impl: jax.value_and_grad(loss, (0, 1))(x, k, impl)\n"
        "    (v1, g1), (v2, g2) = f('direct'), f('native')\n"
        "    np.testing.assert_allclose(v1, v2, rtol=1e-5)\n"
        "    for a, b in zip(g1, g2):\n"
        "        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)\n"
        "print(cpu_kernels.library_path())\n"
    )
    out = _fresh_process(script, TIMM_JAX_MARCH="x86-64-v3", TIMM_JAX_CACHE=str(tmp_path))
    assert str(tmp_path) in out


@pytest.mark.parametrize("shape", [(2, 3 * 4096 + 5, 8), (1, 7, 3), (3, 1, 16), (2, 64, 24)])
def test_instance_norm_kernels_match_the_jax_formulation(shape):
    # several 4096-voxel blocks plus a remainder, channels not a multiple of 8, one voxel
    x = jax.random.normal(jax.random.key(0), shape) * 3.0 + 1.0
    c = shape[-1]
    scale, bias = jnp.linspace(0.5, 1.5, c), jnp.linspace(-0.1, 0.1, c)
    dy = jax.random.normal(jax.random.key(1), shape)

    def run(cpu_kernel):
        f = lambda x, s, b: instance_norm(x, s, b, 1e-5, cpu_kernel)
        y, vjp = jax.vjp(f, x, scale, bias)
        return (y, *vjp(dy))

    assert cpu_kernels.norm_supported(x)
    for got, want in zip(jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * max(1.0, float(jnp.abs(want).max())))


def test_instance_norm_kernels_per_example_under_vmap_and_deterministic():
    x = jax.random.normal(jax.random.key(2), (3, 1, 5000, 8))
    scale, bias = jnp.full((8,), 1.3), jnp.full((8,), 0.2)
    loss = lambda s, xi, k: jnp.sum(jnp.tanh(instance_norm(xi, s, bias, 1e-5, k)))
    per_example = lambda k: jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, None)), static_argnums=2)(
        scale, x, k
    )
    np.testing.assert_allclose(per_example(True), per_example(False), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(per_example(True), per_example(True))


@pytest.mark.e2e
def test_without_a_compiler_everything_falls_back_to_xla_after_one_warning(tmp_path):
    script = (
        "import warnings, jax, jax.numpy as jnp\n"
        "from timm_jax.nn.unet import UNet3D, init_params, resolve_conv_impl\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert resolve_conv_impl('auto') == 'depth2d'\n"
        "    model = UNet3D(out_channels=2, base_filters=8, depth=2, num_segmentation_levels=1)\n"
        "    p = init_params(model, jax.random.key(0), (1, 8, 8, 8, 1))\n"
        "    assert model.apply({'params': p}, jnp.ones((1, 8, 8, 8, 1))).shape == (1, 8, 8, 8, 2)\n"
        "print(len([x for x in w if 'CPU kernels unavailable' in str(x.message)]))\n"
        "try:\n"
        "    resolve_conv_impl('direct')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    lines = _fresh_process(script, CXX="false", TIMM_JAX_CACHE=str(tmp_path)).splitlines()
    assert lines[0] == "1"  # one warning, however many convolutions asked
    assert "conv_impl='direct' needs" in lines[1]
