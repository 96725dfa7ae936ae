"""The 3D U-Net of Isensee et al. (2017), in Flax Linen, channels-last.

Reference: F. Isensee, P. Kickingereder, W. Wick, M. Bendszus, K. H. Maier-Hein,
"Brain tumor segmentation and radiomics survival prediction: contribution to the
BRATS 2017 challenge", BrainLes 2017 (arXiv:1802.10508).

Architecture (level ``l`` has ``f_l = base_filters * 2**l`` filters):

* Encoder level ``l = 0 .. depth-1``: input convolution 3³ (stride 1 at level 0,
  stride 2 below), then a *context module* (conv 3³ → spatial dropout → conv 3³),
  and a residual addition of the input-convolution output and the context output.
* Decoder level ``l = depth-2 .. 0``: nearest-neighbour upsampling ×2 followed by a
  3³ convolution to ``f_l`` filters, concatenation ``[skip_l, up]`` along channels,
  then a *localisation module* (conv 3³ ``2f_l → f_l``, conv 1³ ``f_l → f_l``).
* Deep supervision: 1³ segmentation heads on the localisation outputs of the
  ``num_segmentation_levels`` finest levels; starting from the coarsest head, each
  map is upsampled ×2 (nearest) and added to the next finer one. The level-0 sum
  is the output (logits, no final activation).

Every convolution except the heads is followed by instance normalisation and a
leaky ReLU. With the defaults (``base_filters=16``, ``depth=5``), 4 input channels
and 3 outputs the network has 30 convolutions, 27 instance norms and 8,269,561
parameters.

Parameter naming (a contract used by :func:`timm_jax.core.partition.default_is_transferable`):
the params dict is flat, with entries ``conv_enc{l}_{in,ctx1,ctx2}``, ``conv_dec{l}_{up,loc1,loc2}``
(each ``{"kernel": (kd, kh, kw, Cin, Cout), "bias": (Cout,)}``), a ``norm_*`` entry
with the same suffix after every such convolution (``{"scale": (C,), "bias": (C,)}``)
and ``head{l}`` for the segmentation heads.

Three implementations of the 3D convolution give the same numbers (``conv_impl``):
``"native"`` and ``"depth2d"`` (pure JAX, :mod:`timm_jax.nn.ops`) and ``"direct"``, the
hand-written CPU kernels (:mod:`timm_jax.nn.cpu_kernels`, XLA FFI) for the 3³ float32
convolutions and the instance norms, several times faster than XLA's backward pass on CPU.
``"auto"`` picks ``"direct"`` on the CPU backend (``"depth2d"`` if the kernels cannot be built
there) and ``"native"`` elsewhere. It is resolved once, when the module is constructed (never
inside a jit trace), so ``UNet3D(...).conv_impl`` is always the implementation that runs and
is what checkpoints record.

Layer names and order (:func:`layer_order`) are this network's business: reports that list
layers in network order (the mixing-ratio figure) ask this module, not the fusion code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from timm_jax.config import CONV_IMPLS, ModelConfig
from timm_jax.nn import cpu_kernels, ops
from timm_jax.nn.ops import as_triple, instance_norm, upsample_nearest

__all__ = [
    "Conv3D",
    "InstanceNorm",
    "UNet3D",
    "build_model",
    "conv3d",
    "count_convs",
    "count_norms",
    "count_params",
    "init_params",
    "instance_norm",
    "layer_order",
    "resolve_conv_impl",
    "upsample_nearest",
]


def resolve_conv_impl(impl: str) -> str:
    """Resolve ``"auto"``: ``"direct"`` on the CPU backend when its kernels build there,
    else ``"depth2d"``; ``"native"`` on other backends. ``"direct"`` asked for explicitly
    must be usable."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "native"
        return "direct" if cpu_kernels.available() else "depth2d"
    if impl == "direct" and not (jax.default_backend() == "cpu" and cpu_kernels.available()):
        raise ValueError(
            "conv_impl='direct' needs the CPU backend and the compiled kernels of "
            "timm_jax/csrc/conv3d_cpu.cc (see the warning above); use 'auto' or 'depth2d'"
        )
    return impl


def conv3d(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    impl: str = "native",
    precision: Any = None,
) -> jax.Array:
    """SAME-padded 3D convolution of ``x`` (B, D, H, W, Cin) with ``kernel`` (kd, kh, kw, Cin, Cout)
    by any implementation: ``"native"`` / ``"depth2d"`` (:func:`timm_jax.nn.ops.conv3d`) or
    ``"direct"`` (:func:`timm_jax.nn.cpu_kernels.conv3d`); ``"auto"`` is resolved first."""
    impl = resolve_conv_impl(impl)
    if impl == "direct":
        return cpu_kernels.conv3d(x, kernel, strides)
    return ops.conv3d(x, kernel, strides, impl, precision)


class Conv3D(nn.Module):
    """3D convolution with SAME padding, owning ``kernel`` (kd, kh, kw, Cin, Cout) and ``bias``.

    Kernel initialised Glorot/Xavier uniform, bias zeros ("no transfer" initialisation of
    the T-IMM paper). ``impl`` selects :func:`conv3d`'s implementation.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    impl: str = "auto"
    dtype: Any | None = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ks = as_triple(self.kernel_size, "kernel_size")
        kernel = self.param("kernel", self.kernel_init, (*ks, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, kernel)
        y = conv3d(x.astype(dtype), kernel.astype(dtype), self.strides, self.impl)
        return y + bias.astype(dtype)


class InstanceNorm(nn.Module):
    """Instance normalisation: per sample and channel over the spatial axes (1, 2, 3).

    ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with learnable ``scale`` (ones) and
    ``bias`` (zeros) of shape (C,); see :func:`timm_jax.nn.ops.instance_norm` (``cpu_kernel``: with
    the CPU kernels, which :class:`UNet3D` uses with ``conv_impl="direct"``). Statistics are computed in at
    least float32 (float64 inputs stay float64, so finite-difference checks work). Requires a
    batched 5-D input, so a lone volume can never be mistaken for a batch.
    """

    epsilon: float = 1e-5
    dtype: Any | None = None
    param_dtype: Any = jnp.float32
    cpu_kernel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 5:
            raise ValueError(f"InstanceNorm expects a 5-D (B, D, H, W, C) input, got {x.shape}")
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
        acc = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(acc).reshape(x.shape[0], -1, c)
        kernels = cpu_kernels if self.cpu_kernel else None
        y = instance_norm(xf, scale.astype(acc), bias.astype(acc), self.epsilon, kernels)
        return y.reshape(x.shape).astype(self.dtype if self.dtype is not None else x.dtype)


class UNet3D(nn.Module):
    """Isensee et al. (2017) 3D U-Net; input (B, D, H, W, C) → logits (B, D, H, W, out_channels).

    Isensee et al., "Brain tumor segmentation and radiomics survival prediction:
    contribution to the BRATS 2017 challenge", BrainLes 2017.

    Attributes:
      out_channels: number of output maps (logits; no final activation).
      base_filters: filters at the finest level; level ``l`` has ``base_filters * 2**l``.
      depth: number of resolution levels; spatial sizes must be divisible by ``2**(depth-1)``.
      dropout_rate: spatial dropout rate in the context modules (one Bernoulli per
        (sample, channel)); active only with ``train=True`` and an rng named ``"dropout"``.
      negative_slope: leaky ReLU slope.
      num_segmentation_levels: number of deep-supervision heads (finest levels);
        at most ``depth - 1``.
      conv_impl: ``"native"``, ``"depth2d"``, ``"direct"`` or ``"auto"`` (see :func:`conv3d`);
        resolved when the module is constructed (``"auto"`` never survives construction).
      dtype: computation dtype of the activations (``None``: float32 / the input's; e.g.
        ``jnp.bfloat16`` for mixed precision). Parameters stay float32 and the returned logits
        are float32.
    """

    out_channels: int
    base_filters: int = 16
    depth: int = 5
    dropout_rate: float = 0.3
    negative_slope: float = 1e-2
    num_segmentation_levels: int = 3
    conv_impl: str = "auto"
    dtype: Any | None = None

    def __post_init__(self):
        # resolve "auto" here, outside any trace: the C++ kernels are built (or found missing)
        # once, and the attribute then names the implementation that runs
        object.__setattr__(self, "conv_impl", resolve_conv_impl(self.conv_impl))
        super().__post_init__()

    def _check(self, x: jax.Array) -> None:
        if self.depth < 2:
            raise ValueError(f"UNet3D needs depth >= 2, got depth={self.depth}")
        if not 1 <= self.num_segmentation_levels <= self.depth - 1:
            raise ValueError(
                f"num_segmentation_levels must be in [1, depth-1] = [1, {self.depth - 1}], "
                f"got {self.num_segmentation_levels}"
            )
        if x.ndim != 5:
            raise ValueError(
                f"UNet3D expects a 5-D channels-last input (B, D, H, W, C), got shape "
                f"{tuple(x.shape)} ({x.ndim}-D); add the batch axis with x[None] for one volume"
            )
        div = 2 ** (self.depth - 1)
        spatial = tuple(x.shape[1:4])
        if any(s % div for s in spatial):
            raise ValueError(
                f"UNet3D with depth={self.depth} needs spatial sizes divisible by "
                f"2**(depth-1) = {div}; got input shape {tuple(x.shape)} (spatial {spatial}). "
                f"Pad or crop the volume to a multiple of {div}."
            )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        self._check(x)
        if train and self.dropout_rate > 0 and not self.is_initializing() and not self.has_rng("dropout"):
            raise ValueError(
                "UNet3D(train=True) applies spatial dropout and needs an rng: "
                "apply(..., train=True, rngs={'dropout': key})"
            )
        impl = self.conv_impl
        if self.dtype is not None:
            x = x.astype(self.dtype)

        def conv_norm_act(h, name, features, kernel_size=3, strides=1):
            h = Conv3D(features, kernel_size, strides, impl, dtype=self.dtype, name=f"conv_{name}")(h)
            h = InstanceNorm(
                epsilon=1e-5, dtype=self.dtype, cpu_kernel=impl == "direct", name=f"norm_{name}"
            )(h)
            return nn.leaky_relu(h, negative_slope=self.negative_slope)

        # Encoder: input conv + context module (conv, spatial dropout, conv) + residual add.
        skips = []
        h = x
        for l in range(self.depth):
            f = self.base_filters * 2**l
            h_in = conv_norm_act(h, f"enc{l}_in", f, 3, 1 if l == 0 else 2)
            c = conv_norm_act(h_in, f"enc{l}_ctx1", f)
            c = nn.Dropout(rate=self.dropout_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(c)
            c = conv_norm_act(c, f"enc{l}_ctx2", f)
            h = h_in + c
            skips.append(h)

        # Decoder: upsample + conv, concat with skip, localisation (3³ conv, 1³ conv).
        loc_outputs = {}
        for l in range(self.depth - 2, -1, -1):
            f = self.base_filters * 2**l
            up = conv_norm_act(upsample_nearest(h), f"dec{l}_up", f)
            h = jnp.concatenate([skips[l], up], axis=-1)
            h = conv_norm_act(h, f"dec{l}_loc1", f, 3)
            h = conv_norm_act(h, f"dec{l}_loc2", f, 1)
            loc_outputs[l] = h

        # Deep supervision: 1³ heads, summed coarse to fine with nearest upsampling.
        seg = None
        for l in range(self.num_segmentation_levels - 1, -1, -1):
            s = Conv3D(self.out_channels, 1, 1, impl, dtype=self.dtype, name=f"head{l}")(loc_outputs[l])
            seg = s if seg is None else s + upsample_nearest(seg)
        # logits leave the network in (at least) float32 whatever the activations' dtype, so that losses,
        # Dice and the Fisher's log-likelihood sum over voxels in float32
        return seg.astype(jnp.promote_types(seg.dtype, jnp.float32))


def init_params(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict:
    """Initialises ``model`` on a zero input of ``input_shape`` (B, D, H, W, C); returns the params dict.

    The initialisation is jitted (one compilation instead of op-by-op dispatch) and traceable:
    ``jax.eval_shape(lambda k: init_params(model, k, shape), rng)`` gives the parameter shapes
    without computing anything.
    """
    shape = tuple(int(s) for s in input_shape)

    @jax.jit
    def _init(key):
        return model.init({"params": key}, jnp.zeros(shape, jnp.float32), train=False)["params"]

    return _init(rng)


def _flat(params: Mapping) -> dict:
    return traverse_util.flatten_dict(dict(params)) if params else {}


def count_convs(params: Mapping) -> int:
    """Number of convolutions (modules holding a ``kernel``), heads included."""
    return sum(1 for path in _flat(params) if path[-1] == "kernel")


def count_norms(params: Mapping) -> int:
    """Number of normalisation layers (modules holding a ``scale``)."""
    return sum(1 for path in _flat(params) if path[-1] == "scale")


def count_params(params: Mapping) -> int:
    """Total number of scalar parameters (works on arrays and ``jax.ShapeDtypeStruct`` leaves)."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


def build_model(cfg: ModelConfig) -> tuple[UNet3D, ModelConfig]:
    """The network of a :class:`~timm_jax.config.ModelConfig`, and the config with ``conv_impl``
    resolved (what a checkpoint should record)."""
    model = UNet3D(
        out_channels=cfg.out_channels,
        base_filters=cfg.base_filters,
        depth=cfg.depth,
        dropout_rate=cfg.dropout_rate,
        conv_impl=cfg.conv_impl,
        num_segmentation_levels=min(3, cfg.depth - 1),
        dtype=None if cfg.precision == "float32" else jnp.dtype(cfg.precision),
    )
    return model, cfg.replace(conv_impl=model.conv_impl)


_STAGE = {"in": 0, "ctx1": 1, "ctx2": 2, "up": 0, "loc1": 1, "loc2": 2}


def layer_order(names: Sequence[str]) -> list[str]:
    """Module names (``conv_enc0_in``, ``conv_dec2_up``, ``head0``, ...) sorted in network order:
    encoder levels top-down, then decoder levels bottom-up, each stage in order, then the rest."""

    def key(name: str):
        part = name.split("_")
        if len(part) >= 3 and part[1][:3] in ("enc", "dec") and part[1][3:].isdigit():
            lvl = int(part[1][3:])
            pos = _STAGE.get(part[2], 3)
            return (0, lvl, pos, name) if part[1].startswith("enc") else (1, -lvl, pos, name)
        return (2, 0, 0, name)

    return sorted(names, key=key)
