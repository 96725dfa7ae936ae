"""The network's operations, in pure JAX: 3D convolution, instance normalisation, upsampling.

Two implementations of the SAME-padded 3D convolution give the same numbers:

* ``"native"``: :func:`jax.lax.conv_general_dilated` with NDHWC/DHWIO layouts (cuDNN on GPU).
* ``"depth2d"``: the sum over the ``kd`` depth taps of 2D convolutions of depth-shifted slices,
  with depth folded into the batch axis; XLA's CPU backend runs 2D convolutions several times
  faster than 3D ones. A 1³ stride-1 kernel is a matrix product.

The hand-written CPU kernels (:mod:`timm_jax.nn.cpu_kernels`) build on this module, never the
other way round; :mod:`timm_jax.nn.unet` chooses between them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["as_triple", "conv3d", "instance_norm", "upsample_nearest"]

Triple = tuple[int, int, int]


def as_triple(v: int | Sequence[int], name: str) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 3:
        raise ValueError(f"{name} must be an int or a sequence of 3 ints, got {v!r}")
    return v  # type: ignore[return-value]


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """SAME padding exactly as XLA/lax computes it: ``out = ceil(size/s)``, extra on the high side."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def conv3d(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    impl: str = "native",
    precision: Any = None,
) -> jax.Array:
    """SAME-padded 3D convolution of ``x`` (B, D, H, W, Cin) with ``kernel`` (kd, kh, kw, Cin, Cout).

    ``impl="native"`` calls :func:`jax.lax.conv_general_dilated` directly (cuDNN on GPU).
    ``impl="depth2d"`` computes the same map as

        y[:, d] = Σ_k conv2d(x_pad[:, d·s_d + k], kernel[k])

    where ``x_pad`` is ``x`` padded along depth with lax's SAME padding: for each depth tap
    ``k`` the strided slice ``x_pad[:, k::s_d][:D_out]`` is reshaped to (B·D_out, H, W, Cin)
    and convolved in 2D (SAME, strides ``(s_h, s_w)``) with ``kernel[k]``. With both, a 1³
    stride-1 kernel is a matrix product over the channels.
    """
    if x.ndim != 5:
        raise ValueError(f"conv3d expects a 5-D (B, D, H, W, C) input, got shape {x.shape}")
    strides = as_triple(strides, "strides")
    if impl not in ("native", "depth2d"):
        raise ValueError(
            f"ops.conv3d implements 'native' and 'depth2d', got {impl!r} "
            "(the network's conv3d dispatches 'direct' to the CPU kernels)"
        )
    if impl == "depth2d" and kernel.shape[:3] == (1, 1, 1) and strides == (1, 1, 1):
        # a 1³ convolution is a matrix product; as such XLA:CPU differentiates it without
        # the channel-major transposes of its convolution backward (4× faster at 64³×16)
        y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[3:]), precision=precision)
        return y.reshape(*x.shape[:-1], kernel.shape[-1])
    if impl == "native":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding="SAME",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            precision=precision,
        )
    b, d, h, w, c = x.shape
    kd = kernel.shape[0]
    sd = strides[0]
    d_out = -(-d // sd)
    lo, hi = _same_pads(d, kd, sd)
    if lo or hi:
        x = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
    out = None
    for k in range(kd):
        xs = jax.lax.slice_in_dim(x, k, k + (d_out - 1) * sd + 1, stride=sd, axis=1)
        xs = xs.reshape(b * d_out, h, w, c)
        yk = jax.lax.conv_general_dilated(
            xs,
            kernel[k],
            window_strides=strides[1:],
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
        out = yk if out is None else out + yk
    return out.reshape(b, d_out, *out.shape[1:])


def _instance_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per (sample, channel) mean and variance of ``x`` (B, V, C) over V, in two passes (exact
    when |mean| >> std), as contractions: XLA:CPU's reduction over a middle axis ran 40×
    below memory speed at (1, 64³, 16) (100 ms vs 2.5 ms), its contractions did not."""
    v = x.shape[1]
    mean = jnp.einsum("bvc,v->bc", x, jnp.full((v,), 1.0 / v, x.dtype))
    centred = x - mean[:, None]
    return mean, jnp.einsum("bvc,bvc->bc", centred, centred) / v


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def instance_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, kernels: Any = None
) -> jax.Array:
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` for ``x`` (B, V, C), statistics per
    (sample, channel) over V. The gradient is written out (the textbook batch-norm backward,
    per sample) so that autodiff emits no reductions of its own.

    ``kernels``: optional hand-written kernels (the module :mod:`timm_jax.nn.cpu_kernels`, passed
    in by the network so that this module never imports them) with ``norm_supported(x)``,
    ``instance_norm_forward`` and ``instance_norm_backward``; used where supported."""
    return _instance_norm_fwd(x, scale, bias, epsilon, kernels)[0]


def _instance_norm_fwd(x, scale, bias, epsilon, kernels):
    if kernels is not None and kernels.norm_supported(x):
        y, mean, rstd = kernels.instance_norm_forward(x, scale, bias, epsilon)
        return y, (x, mean, rstd, scale)
    mean, var = _instance_stats(x)
    rstd = jax.lax.rsqrt(var + epsilon)
    mul = rstd * scale
    y = x * mul[:, None] + (bias - mean * mul)[:, None]
    return y, (x, mean, rstd, scale)


def _instance_norm_bwd(epsilon, kernels, res, dy):
    x, mean, rstd, scale = res
    if kernels is not None and kernels.norm_supported(x):
        dx, sum_dy, sum_dy_xhat = kernels.instance_norm_backward(x, mean, rstd, scale, dy)
        return dx, sum_dy_xhat.sum(0), sum_dy.sum(0)
    v = x.shape[1]
    xhat = (x - mean[:, None]) * rstd[:, None]
    sum_dy = jnp.einsum("bvc,v->bc", dy, jnp.ones((v,), dy.dtype))
    sum_dy_xhat = jnp.einsum("bvc,bvc->bc", dy, xhat)
    dx = (scale * rstd)[:, None] * (dy - (sum_dy / v)[:, None] - xhat * (sum_dy_xhat / v)[:, None])
    return dx, sum_dy_xhat.sum(0), sum_dy.sum(0)


instance_norm.defvjp(_instance_norm_fwd, _instance_norm_bwd)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of the three spatial axes of (B, D, H, W, C) by ``factor``."""
    b, d, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :, None, :], (b, d, factor, h, factor, w, factor, c))
    return x.reshape(b, d * factor, h * factor, w * factor, c)
