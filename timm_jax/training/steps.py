"""Jitted training steps: plain training, and the T-IMM adaption stage through the merge.

Adaption (T-IMM stage 1): the trainable state is (mixing logits β, task-specific params 𝒮); the
transferable params are ``imm_merge(sources, fishers, β)`` of *frozen* source models, evaluated
inside the loss so that ``jax.grad`` differentiates through the fusion. Fine-tuning (stage 2)
starts from :func:`materialise` and is a plain training run.

All steps take a global batch ``{"image": (B, D, H, W, C), "target": (B, D, H, W, K)}``. Given a
``mesh`` (:mod:`timm_jax.training.parallel`), the training and adaption steps split that batch
over the mesh's ``data`` axis and keep everything else replicated; the losses are means over the
global batch, so the gradients (all-reduced by XLA) are the single-device ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax
import jax
import jax.numpy as jnp
import optax

from timm_jax.config import ADAPTION_OBJECTIVES, FuseConfig, TrainConfig
from timm_jax.core import PyTree, losses
from timm_jax.core.merge import DEFAULT_EPS, Granularity, expand_logits, imm_merge
from timm_jax.core.partition import join
from timm_jax.training.parallel import data_parallel_jit

Batch = dict


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``params`` is the model's params dict (or, for adaption, the
    dict ``{"logits": β, "task": 𝒮}``)."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array


def make_optimizer(learning_rate: float = TrainConfig.learning_rate) -> optax.GradientTransformation:
    """Adam (the original's optimiser, lr 5e-4) with the learning rate as a mutable
    hyperparameter, so reduce-on-plateau can change it between epochs (see :func:`scale_learning_rate`)."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def create_state(params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


def make_adaption_optimizer(
    logits_learning_rate: float = FuseConfig.logits_learning_rate,
    learning_rate: float = TrainConfig.learning_rate,
    *,
    train_task: bool = True,
) -> optax.GradientTransformation:
    """Adam for the adaption state ``{"logits", "task"}``: the mixing logits get their own
    (larger) rate, the freshly initialised task-specific leaves the ordinary training rate.
    ``train_task=False`` freezes the task-specific leaves (their updates are zero; the state keeps
    its structure, so checkpoints and :func:`materialise` are unchanged): the entropy objective."""
    task = make_optimizer(learning_rate) if train_task else optax.set_to_zero()
    return optax.multi_transform(
        {"logits": make_optimizer(logits_learning_rate), "task": task}, {"logits": "logits", "task": "task"}
    )


def _is_hyper(x) -> bool:
    return hasattr(x, "hyperparams") and hasattr(x, "_replace") and "learning_rate" in x.hyperparams


def _hyper_states(opt_state) -> list:
    return [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_hyper) if _is_hyper(x)]


def learning_rate(state: TrainState) -> float:
    """The (last) injected learning rate; for the adaption optimiser, the task-specific one."""
    hs = _hyper_states(state.opt_state)
    if not hs:
        raise ValueError("the optimiser has no injected learning rate (use make_optimizer)")
    return float(hs[-1].hyperparams["learning_rate"])


def scale_learning_rate(state: TrainState, factor: float, minimum: float = 0.0) -> TrainState:
    """Multiply every injected learning rate by ``factor`` (not below ``minimum``)."""

    def scale(x):
        if not _is_hyper(x):
            return x
        hp = dict(x.hyperparams)
        lr = jnp.asarray(hp["learning_rate"])
        hp["learning_rate"] = jnp.maximum(lr * factor, jnp.asarray(minimum, lr.dtype)).astype(lr.dtype)
        return x._replace(hyperparams=hp)

    return state.replace(opt_state=jax.tree_util.tree_map(scale, state.opt_state, is_leaf=_is_hyper))


def segmentation_loss(logits: jax.Array, targets: jax.Array, kind: str = TrainConfig.loss) -> jax.Array:
    """``"dice"`` (the original's soft Dice), ``"ce"``, or ``"dice+ce"``."""
    if kind == "dice":
        return losses.soft_dice_loss(logits, targets)
    if kind == "ce":
        return losses.cross_entropy(logits, targets)
    if kind == "dice+ce":
        return losses.soft_dice_loss(logits, targets) + losses.cross_entropy(logits, targets)
    raise ValueError(f"unknown loss {kind!r}; use 'dice', 'ce' or 'dice+ce'")


def _apply(model, params, image, rng, train):
    rngs = {"dropout": rng} if train else None
    return model.apply({"params": params}, image, train=train, rngs=rngs)


def make_train_step(
    model, optimizer: optax.GradientTransformation, loss: str = TrainConfig.loss, *, mesh=None
):
    """``step(state, batch) -> (state, {"loss"})``: one Adam step on the segmentation loss.
    With ``mesh``, data parallel: the batch is split over its ``data`` axis, the state replicated."""

    def loss_fn(params, batch, rng):
        logits = _apply(model, params, batch["image"], rng, True)
        return segmentation_loss(logits, batch["target"], loss)

    def step(state: TrainState, batch: Batch):
        rng, sub = jax.random.split(state.rng)
        value, grads = jax.value_and_grad(loss_fn)(state.params, batch, sub)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return (TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), {"loss": value})

    return data_parallel_jit(step, mesh, batch_argnums=(1,), nargs=2, donate_argnums=(0,))


def fused_params(
    sources: Sequence[PyTree],
    fishers: Sequence[PyTree] | None,
    logits: PyTree,
    task_specific: PyTree,
    *,
    granularity: Granularity = FuseConfig.granularity,
    eps: float = DEFAULT_EPS,
) -> dict:
    """Full model params: ``imm_merge`` of the sources' transferable leaves, joined with 𝒮."""
    per_leaf = expand_logits(logits, sources[0], granularity)
    return join(imm_merge(sources, fishers, per_leaf, eps=eps), task_specific)


def materialise(
    sources,
    fishers,
    adaption_params: dict,
    *,
    granularity: Granularity = FuseConfig.granularity,
    eps: float = DEFAULT_EPS,
) -> dict:
    """The fine-tuning stage's initialisation from an adaption state's ``{"logits", "task"}``."""
    return jax.jit(partial(fused_params, granularity=granularity, eps=eps))(
        sources, fishers, adaption_params["logits"], adaption_params["task"]
    )


def _check_objective(objective: str) -> None:
    if objective not in ADAPTION_OBJECTIVES:
        raise ValueError(f"unknown adaption objective {objective!r}; use 'supervised' or 'entropy'")


def adaption_objective(logits: jax.Array, batch: Batch, loss: str, objective: str) -> jax.Array:
    """The adaption stage's loss: ``"supervised"`` = :func:`segmentation_loss` against the
    batch's targets; ``"entropy"`` = mean binary prediction entropy (the targets are not read)."""
    _check_objective(objective)
    if objective == "entropy":
        return losses.binary_entropy(logits)
    return segmentation_loss(logits, batch["target"], loss)


def make_adaption_step(
    model,
    optimizer: optax.GradientTransformation,
    *,
    granularity: Granularity = FuseConfig.granularity,
    eps: float = DEFAULT_EPS,
    loss: str = TrainConfig.loss,
    objective: str = FuseConfig.adaption_objective,
    mesh=None,
):
    """``step(state, sources, fishers, batch) -> (state, {"loss"})`` for T-IMM stage 1.

    ``state.params = {"logits": β (compact, see merge.init_logits), "task": 𝒮}``; ``sources``
    (T transferable trees) and ``fishers`` (T trees or None) are frozen inputs, passed as
    arguments (not closed over) so they are neither baked into the program nor differentiated.
    With ``mesh``, the batch is split over its ``data`` axis; the state, sources and Fishers are
    replicated (the merge runs on every device, the loss gradient is all-reduced).
    ``objective="entropy"``: the label-free loss of :func:`adaption_objective` (``batch["target"]``
    is not read); pair it with ``make_adaption_optimizer(..., train_task=False)``.
    """
    _check_objective(objective)

    def loss_fn(trainable, sources, fishers, batch, rng):
        params = fused_params(
            sources, fishers, trainable["logits"], trainable["task"], granularity=granularity, eps=eps
        )
        logits = _apply(model, params, batch["image"], rng, True)
        return adaption_objective(logits, batch, loss, objective)

    def step(state: TrainState, sources, fishers, batch: Batch):
        rng, sub = jax.random.split(state.rng)
        value, grads = jax.value_and_grad(loss_fn)(state.params, sources, fishers, batch, sub)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return (TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), {"loss": value})

    return data_parallel_jit(step, mesh, batch_argnums=(3,), nargs=4, donate_argnums=(0,))
