"""The maths of T-IMM, pure and jittable: the merge (:mod:`~timm_jax.core.merge`), the diagonal
Fisher (:mod:`~timm_jax.core.fisher`), the transferable / task-specific partition
(:mod:`~timm_jax.core.partition`) and the losses (:mod:`~timm_jax.core.losses`). No I/O, no
flags, no printing; nothing here imports from the rest of the package."""

from typing import Any

#: Any nested structure of arrays that ``jax.tree_util`` understands (params, Fishers, logits).
PyTree = Any
