"""timm_jax: T-IMM (Transfer Incremental Mode Matching) in JAX/Flax.

Public API (imported lazily, so ``import timm_jax.data`` in input-pipeline workers stays light):

- :func:`imm_merge`, :func:`mixing_ratios`, :func:`uniform_logits`, :func:`init_logits`,
  :func:`expand_logits` — the fusion maths (``timm_jax.merge``).
- :func:`fisher_diagonal`, :func:`segmentation_log_likelihood` — per-example Fisher (``timm_jax.fisher``).
- :class:`UNet3D` — Isensee et al. 2017 3D U-Net (``timm_jax.model``).
- :func:`split`, :func:`join` — transferable / task-specific partition (``timm_jax.partition``).
- :func:`make_train_step`, :func:`make_adaption_step`, :func:`materialise` (``timm_jax.steps``).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "imm_merge": "merge", "mixing_ratios": "merge", "uniform_logits": "merge",
    "init_logits": "merge", "expand_logits": "merge",
    "fisher_diagonal": "fisher", "segmentation_log_likelihood": "fisher",
    "sampled_segmentation_log_likelihood": "fisher",
    "UNet3D": "model", "init_params": "model",
    "split": "partition", "join": "partition",
    "soft_dice_loss": "losses", "hard_dice": "losses", "brats_regions": "losses",
    "TrainState": "steps", "make_optimizer": "steps", "create_state": "steps",
    "make_train_step": "steps", "make_adaption_step": "steps", "materialise": "steps",
    "fused_params": "steps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"timm_jax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'timm_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
