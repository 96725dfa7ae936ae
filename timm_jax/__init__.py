"""timm_jax: T-IMM (Transfer Incremental Mode Matching) in JAX/Flax.

The package is layered; each layer imports only from the ones above it in this list
(``docs/architecture.md`` is the map):

1. ``timm_jax.core`` — the maths, pure and jittable: merge, Fisher, partition, losses.
2. ``timm_jax.nn`` — the 3D U-Net, its ops and the optional CPU kernels.
3. ``timm_jax.training`` — steps, the epoch loop, the run directory and its checkpoints,
   sliding-window inference and metrics.
4. ``timm_jax.workflows`` — what ``train.py``, ``fuse.py`` and ``evaluate.py`` call.
5. ``timm_jax.experiments`` — the demo data set and the demo pipeline.

``timm_jax.data`` (reading, checking, preprocessing and batching cases) stands beside layers
1-3 and imports none of them; ``timm_jax.config`` and ``timm_jax.errors`` are leaves every
layer may use.

Public API (imported lazily, so ``import timm_jax.data`` in input-pipeline workers stays light):
:func:`imm_merge`, :func:`mixing_ratios`, :func:`uniform_logits`, :func:`init_logits`,
:func:`expand_logits`, :func:`fisher_diagonal`, :func:`segmentation_log_likelihood`,
:class:`UNet3D`, :func:`init_params`, :func:`split`, :func:`join`, the losses, and the steps
(:func:`make_train_step`, :func:`make_adaption_step`, :func:`materialise`, ...).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "core.merge": ("imm_merge", "mixing_ratios", "uniform_logits", "init_logits", "expand_logits"),
    "core.fisher": ("fisher_diagonal", "segmentation_log_likelihood", "sampled_segmentation_log_likelihood"),
    "core.partition": ("split", "join"),
    "core.losses": ("soft_dice_loss", "hard_dice", "brats_regions"),
    "nn.unet": ("UNet3D", "init_params", "build_model"),
    "training.steps": (
        "TrainState",
        "make_optimizer",
        "create_state",
        "make_train_step",
        "make_adaption_step",
        "materialise",
        "fused_params",
    ),
    "config": ("ModelConfig", "TrainConfig", "FuseConfig", "EvalConfig"),
    "errors": ("UserError",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"timm_jax.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'timm_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
