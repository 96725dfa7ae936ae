"""Hand-written CPU kernels for the network's hot spots, called through the XLA FFI.

XLA:CPU runs a 3D convolution's backward pass poorly: the weight gradient becomes a
convolution over transposed activations (benchmarks/README.md). ``csrc/conv3d_cpu.cc``
computes the forward map and the weight gradient of 3×3×3 convolutions directly on
channels-last data; the input gradient of a stride-1 convolution is the forward map of the
output gradient with the flipped, in/out-swapped kernel. :func:`conv3d_direct` ties them
together with a ``custom_vjp``. ``csrc/instance_norm_cpu.cc`` does instance normalisation's
reductions over the voxels, which XLA:CPU ran up to 40× below memory speed
(:func:`instance_norm_forward` / :func:`instance_norm_backward`, passed to
:func:`timm_jax.nn.ops.instance_norm` by the network).

This module builds on the pure-JAX ops (:mod:`timm_jax.nn.ops`) for what the kernels do not
cover; the ops never import it. :func:`conv3d` is the network's entry point.

The C++ sources are compiled on first use (a few seconds) with the system C++ compiler (``$CXX``,
else ``c++``) for this machine (``-march=native``; ``$TIMM_JAX_MARCH`` overrides it, e.g.
``x86-64-v3`` for a build that also runs on AVX2-only nodes) and cached under
``$TIMM_JAX_CACHE`` (default ``~/.cache/timm_jax``), keyed by the source, the flags, jaxlib's
version and the CPU model, so a shared home directory never loads a build for another CPU. If
the build fails (no compiler, no jaxlib headers), :func:`available` returns False after one
warning and callers fall back to the pure-XLA convolution and norm. A cache folder or library
that anyone but this user could write (group/other-writable, another owner, a symbolic link) is
refused with one line (:class:`KernelCacheError`), as ssh refuses such key files: the library is
loaded into every training process.

The kernels pick their register tiles at compile time: with AVX-512 (32 vector registers)
larger tiles, and for 8 output channels a variant vectorised along the contraction; without
it, smaller tiles. Both builds are tested (tests/test_cpu_kernels.py).

Constraints of the kernels (checked by :func:`supports`): float32, kernel (3, 3, 3, Cin, Cout)
with ``Cout % 8 == 0``, the same stride on every axis, SAME padding, CPU backend. The input
gradient of a strided convolution (and of one with ``Cin % 8 != 0``) is left to XLA. Under
``vmap`` the calls run sequentially over the mapped axis.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from timm_jax.atomic import atomic_path
from timm_jax.errors import UserError, writing
from timm_jax.nn import ops

__all__ = [
    "available",
    "conv3d",
    "conv3d_direct",
    "instance_norm_backward",
    "instance_norm_forward",
    "library_path",
    "norm_supported",
    "supports",
]

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (_CSRC / "conv3d_cpu.cc", _CSRC / "instance_norm_cpu.cc")
_HEADERS = (_CSRC / "parallel.h",)
_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC", "-w")
_FORWARD = "timm_jax_conv3d_forward"
_WEIGHT_GRAD = "timm_jax_conv3d_weight_grad"
_NORM_FORWARD = "timm_jax_instance_norm_forward"
_NORM_BACKWARD = "timm_jax_instance_norm_backward"
_log = logging.getLogger(__name__)


class KernelCacheError(UserError):
    """The compiled-kernel cache could be written by someone else (see :func:`check_cache`)."""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(info)))
    except OSError:
        return platform.processor()


def _flags() -> tuple[str, ...]:
    return (*_FLAGS, f"-march={os.environ.get('TIMM_JAX_MARCH', 'native')}")


def library_path() -> Path:
    """Where the compiled kernels for this machine live (built or not)."""
    key = hashlib.sha256()
    for part in (
        *(f.read_bytes() for f in _SOURCES + _HEADERS),
        " ".join(_flags()).encode(),
        jaxlib.__version__.encode(),
        platform.machine().encode(),
        _cpu_model().encode(),
    ):
        key.update(part)
    cache = Path(os.environ.get("TIMM_JAX_CACHE", Path.home() / ".cache" / "timm_jax"))
    return cache / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def check_cache(path: Path) -> None:
    """Refuse a kernel cache that anyone but this user could have written, as ssh refuses such
    key files: the library at its hashed path is loaded into every training process, so a cache
    folder or file that is writable by the group or others, not owned by this user, or a symbolic
    link, is a way to run someone else's code. Raises :class:`KernelCacheError` (one line)."""
    uid = os.getuid()
    for p in (path.parent, path):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            problem = "is a symbolic link"
        elif st.st_uid != uid:
            problem = f"is owned by uid {st.st_uid}, not by this user ({uid})"
        elif st.st_mode & 0o022:
            who = {0o020: "the group", 0o002: "others", 0o022: "the group and others"}[st.st_mode & 0o022]
            problem = f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
        else:
            continue
        raise KernelCacheError(
            f"the compiled-kernel cache {p} {problem}; a library there would run in every training "
            f"process — make it yours and private (chmod go-w), remove it, or set TIMM_JAX_CACHE to a "
            "folder of your own"
        )


def _build(target: Path) -> None:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    with writing(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_path(target) as tmp:  # concurrent builders never see a partial file
        cmd = [cxx, *_flags(), f"-I{jax.ffi.include_dir()}", "-o", tmp, *map(str, _SOURCES)]
        _log.info("compiling %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")


@functools.cache
def available() -> bool:
    """True when the kernels are built (building them now if needed) and registered with XLA.
    A cache that others could write is refused (:func:`check_cache`), not silently used."""
    path = library_path()
    check_cache(path)
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.Conv3dForward), platform="cpu")
        jax.ffi.register_ffi_target(_WEIGHT_GRAD, jax.ffi.pycapsule(lib.Conv3dWeightGrad), platform="cpu")
        jax.ffi.register_ffi_target(_NORM_FORWARD, jax.ffi.pycapsule(lib.InstanceNormForward), platform="cpu")
        jax.ffi.register_ffi_target(
            _NORM_BACKWARD, jax.ffi.pycapsule(lib.InstanceNormBackward), platform="cpu"
        )
        return True
    except Exception as e:  # any failure means: use the XLA convolution instead
        warnings.warn(
            f"timm_jax: CPU kernels unavailable, using XLA's convolutions and norms ({e})", stacklevel=2
        )
        return False


def supports(x: jax.Array, kernel: jax.Array, strides) -> bool:
    """Whether :func:`conv3d_direct` can compute ``conv3d(x, kernel, strides)`` here."""
    return (
        jax.default_backend() == "cpu"
        and x.ndim == 5
        and tuple(kernel.shape[:3]) == (3, 3, 3)
        and kernel.shape[-1] % 8 == 0
        and len(set(strides)) == 1
        and x.dtype == jnp.float32
        and kernel.dtype == jnp.float32
        and available()
    )


def _same(shape, stride: int) -> tuple[list[int], dict]:
    """Output spatial shape and kernel attributes of a SAME 3-tap convolution, padded as XLA
    pads it (any odd total on the high side)."""
    out = [-(-n // stride) for n in shape[1:4]]
    pads = [max((o - 1) * stride + 3 - n, 0) // 2 for o, n in zip(out, shape[1:4])]
    attrs = {"stride": stride, "pad_d": pads[0], "pad_h": pads[1], "pad_w": pads[2]}
    return out, {k: np.int64(v) for k, v in attrs.items()}


def _varying_like(out, *inputs):
    """Inside ``shard_map``, give the kernels' outputs the device-varying axes of their inputs.

    An FFI call's result carries no "varying over mesh axes" type, so a custom VJP whose inputs
    vary over ``data`` (the per-example Fisher on a mesh casts the parameters to varying) would
    return cotangents of another type than its primals; outside ``shard_map`` this is a no-op."""

    def varying(x) -> frozenset:  # the aval's manual-axis type (jax 0.10: ``aval.mat.varying``)
        return getattr(getattr(jax.typeof(x), "mat", None), "varying", frozenset())

    want = frozenset().union(*(varying(x) for x in inputs))

    def one(y):
        missing = tuple(sorted(want - varying(y)))
        return jax.lax.pcast(y, missing, to="varying") if missing else y

    return jax.tree_util.tree_map(one, out)


def _forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    out, attrs = _same(x.shape, stride)
    result = jax.ShapeDtypeStruct((x.shape[0], *out, kernel.shape[-1]), jnp.float32)
    return _varying_like(
        jax.ffi.ffi_call(_FORWARD, result, vmap_method="sequential")(x, kernel, **attrs), x, kernel
    )


def _weight_grad(x: jax.Array, dy: jax.Array, stride: int) -> jax.Array:
    _, attrs = _same(x.shape, stride)
    result = jax.ShapeDtypeStruct((3, 3, 3, x.shape[-1], dy.shape[-1]), jnp.float32)
    return _varying_like(
        jax.ffi.ffi_call(_WEIGHT_GRAD, result, vmap_method="sequential")(x, dy, **attrs), x, dy
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3d_direct(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """SAME-padded 3×3×3 convolution of ``x`` (B, D, H, W, Cin) with ``kernel``
    (3, 3, 3, Cin, Cout) and the same ``stride`` on every axis; float32, CPU,
    ``Cout % 8 == 0`` (see :func:`supports`). Equals
    ``lax.conv_general_dilated(x, kernel, (stride,) * 3, "SAME", ("NDHWC", "DHWIO", "NDHWC"))``."""
    return _forward(x, kernel, stride)


def _conv_fwd(x, kernel, stride):
    return _forward(x, kernel, stride), (x, kernel)


def _conv_bwd(stride, res, dy):
    x, kernel = res
    dk = _weight_grad(x, dy, stride)
    if stride == 1 and x.shape[-1] % 8 == 0:
        # SAME stride 1 pads one voxel per side, so the input gradient is the same
        # convolution of dy with the flipped kernel, in/out channels swapped
        dx = _forward(dy, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4), 1)
    else:  # strided, or Cin % 8 != 0 (the network's input layer): XLA's transposed conv
        # in the depth-folded 2D formulation, the fastest in XLA
        _, vjp = jax.vjp(lambda v: ops.conv3d(v, kernel, stride, "depth2d"), x)
        (dx,) = vjp(dy)
    return dx, dk


conv3d_direct.defvjp(_conv_fwd, _conv_bwd)


def conv3d(x: jax.Array, kernel: jax.Array, strides=1) -> jax.Array:
    """``conv3d(impl="direct")``: :func:`conv3d_direct` where it applies (:func:`supports`), else
    the depth-folded pure-JAX formulation (:func:`timm_jax.nn.ops.conv3d`, ``"depth2d"``)."""
    strides = ops.as_triple(strides, "strides")
    if supports(x, kernel, strides):
        return conv3d_direct(x, kernel, strides[0])
    return ops.conv3d(x, kernel, strides, "depth2d")


def norm_supported(x: jax.Array) -> bool:
    """Whether the instance-norm kernels can normalise ``x`` (B, V, C) here."""
    return jax.default_backend() == "cpu" and x.ndim == 3 and x.dtype == jnp.float32 and available()


def instance_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """``(y, mean, rstd)`` of instance normalisation of ``x`` (B, V, C), float32: per (b, c)
    ``y = (x - mean) * rstd * scale + bias`` with ``rstd = 1 / sqrt(var + epsilon)``."""
    b, _, c = x.shape
    stats = jax.ShapeDtypeStruct((b, c), jnp.float32)
    out = jax.ffi.ffi_call(
        _NORM_FORWARD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats), vmap_method="sequential"
    )(x, scale, bias, eps=np.float32(epsilon))
    return _varying_like(out, x, scale, bias)


def instance_norm_backward(x, mean, rstd, scale, dy):
    """``(dx, sum_dy, sum_dy_xhat)``: the input gradient and the per-(b, c) sums over the voxels
    of ``dy`` and ``dy * xhat`` (the bias and scale gradients before summing over b)."""
    b, _, c = x.shape
    stats = jax.ShapeDtypeStruct((b, c), jnp.float32)
    out = jax.ffi.ffi_call(
        _NORM_BACKWARD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats), vmap_method="sequential"
    )(x, mean, rstd, scale, dy)
    return _varying_like(out, x, mean, rstd, scale, dy)
