"""Split a parameter pytree into the transferable set 𝒫 and the task-specific set 𝒮.

T-IMM (docs/method.md) fuses only the transferable leaves: every convolution kernel and bias except
the segmentation heads. Instance-norm scales/offsets, the heads, and any leaf whose shape differs
between a source and the target model (e.g. the first convolution with 2 vs 4 input channels)
are task-specific: they are freshly initialised for the target task.

Parameters are nested dicts (Flax Linen ``params``); a split gives two *partial* nested dicts
holding disjoint leaves, and :func:`join` puts them back together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp


def _keyname(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_names(path) -> tuple[str, ...]:
    """A tree_util key path as plain strings, e.g. ('conv_enc0_in', 'kernel')."""
    return tuple(_keyname(k) for k in path)


def default_is_transferable(names: tuple[str, ...]) -> bool:
    """UNet3D naming: modules ``conv_*`` are transferable; ``norm_*`` and ``head*`` are not."""
    return any(n.startswith("conv_") for n in names) and not any(n.startswith("head") for n in names)


def _set(tree: dict, names: tuple[str, ...], value) -> None:
    for n in names[:-1]:
        tree = tree.setdefault(n, {})
    tree[names[-1]] = value


def _flatten(params: Mapping) -> list[tuple[tuple[str, ...], Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [(path_names(p), x) for p, x in flat]


@dataclass
class Partition:
    """Result of :func:`split`: disjoint partial trees plus the shape-mismatched leaf paths."""

    transferable: dict
    task_specific: dict
    mismatched: list[str] = field(default_factory=list)


def to_flat_dict(tree: Mapping) -> dict[str, Any]:
    """``{"a/b": leaf}`` for a nested dict (e.g. to store a params-like tree in an .npz)."""
    return {"/".join(names): x for names, x in _flatten(tree)}


def from_flat_dict(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`to_flat_dict`."""
    out: dict = {}
    for path, x in flat.items():
        _set(out, tuple(path.split("/")), x)
    return out


def shape_mismatches(params: Mapping, reference: Mapping) -> list[str]:
    """Paths ('a/b') of leaves of ``params`` whose shape differs from (or is absent in) ``reference``."""
    ref = {names: jnp.shape(x) for names, x in _flatten(reference)}
    return ["/".join(names) for names, x in _flatten(params) if ref.get(names) != jnp.shape(x)]


def split(
    params: Mapping,
    reference: Mapping | None = None,
    *,
    is_transferable: Callable[[tuple[str, ...]], bool] = default_is_transferable,
) -> Partition:
    """Split ``params`` into transferable and task-specific partial trees.

    Args:
      params: nested dict of arrays (e.g. the target model's params).
      reference: optional other model (e.g. a source). Leaves of ``params`` whose shape differs
        from the reference's leaf at the same path, or that the reference lacks, are
        task-specific whatever their name; their paths are listed in ``Partition.mismatched``.
      is_transferable: the naming rule, given a leaf's path as a tuple of names.
    """
    mismatched = shape_mismatches(params, reference) if reference is not None else []
    bad = set(mismatched)
    transferable: dict = {}
    task: dict = {}
    for names, x in _flatten(params):
        if is_transferable(names) and "/".join(names) not in bad:
            _set(transferable, names, x)
        else:
            _set(task, names, x)
    return Partition(transferable, task, mismatched)


def join(*parts: Mapping) -> dict:
    """Union of disjoint partial trees (inverse of :func:`split`). Overlapping leaves are an error."""
    out: dict = {}
    for part in parts:
        for names, x in _flatten(part):
            node = out
            for n in names[:-1]:
                node = node.setdefault(n, {})
                if not isinstance(node, dict):
                    raise ValueError(f"leaf {'/'.join(names)} collides with a leaf on its path")
            if names[-1] in node:
                raise ValueError(f"leaf {'/'.join(names)} appears in more than one part")
            node[names[-1]] = x
    return out


def select_like(params: Mapping, template: Mapping) -> dict:
    """The leaves of ``params`` at the paths of ``template`` (e.g. a source's transferable subset)."""
    have = dict(_flatten(params))
    out: dict = {}
    for names, _ in _flatten(template):
        if names not in have:
            raise KeyError(f"params have no leaf {'/'.join(names)}")
        _set(out, names, have[names])
    return out
