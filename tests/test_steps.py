"""T-IMM adaption step: differentiates through the merge, moves ratios toward the right source."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from timm_jax.core.merge import init_logits, mixing_ratios
from timm_jax.core.partition import split
from timm_jax.nn.unet import UNet3D, init_params
from timm_jax.training.steps import (
    create_state,
    fused_params,
    make_adaption_step,
    make_optimizer,
    make_train_step,
    materialise,
    segmentation_loss,
)


def test_adaption_moves_ratios_toward_the_right_source_and_keeps_sources():
    model = UNet3D(out_channels=1, base_filters=4, depth=2, dropout_rate=0.0, num_segmentation_levels=1)
    shape = (2, 8, 8, 8, 1)
    good = init_params(model, jax.random.PRNGKey(0), shape)
    bad = init_params(model, jax.random.PRNGKey(1), shape)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), shape))
    # the target task is exactly what the "good" source predicts
    y = (model.apply({"params": good}, x) > 0).astype(np.float32)
    batch = {"image": x, "target": y}
    pg, pb = split(good), split(bad)
    sources = [pg.transferable, pb.transferable]
    copies = jax.tree_util.tree_map(np.array, sources)
    fishers = None
    opt = optax.adam(0.1)
    trainable = {"logits": init_logits(sources[0], 2, "global"), "task": pg.task_specific}
    state = create_state(trainable, opt, jax.random.PRNGKey(3))
    step = make_adaption_step(model, opt, granularity="global")

    def val_loss(tr):
        params = fused_params(sources, fishers, tr["logits"], tr["task"], granularity="global")
        return float(segmentation_loss(model.apply({"params": params}, x), y))

    first = val_loss(state.params)
    for _ in range(15):
        state, m = step(state, sources, fishers, batch)
    last = val_loss(state.params)
    alpha = np.asarray(mixing_ratios(state.params["logits"]))
    assert alpha[0] > 0.6, alpha  # moved from 0.5 toward the good source
    assert last < first - 0.02, (first, last)
    for a, b in zip(jax.tree_util.tree_leaves(sources), jax.tree_util.tree_leaves(copies)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # materialised params equal the on-the-fly fusion, and have the model's full structure
    full = materialise(sources, fishers, state.params, granularity="global")
    ref = fused_params(sources, fishers, state.params["logits"], state.params["task"], granularity="global")
    assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(good)
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_adaption_gradient_through_merge_matches_finite_difference():
    model = UNet3D(out_channels=1, base_filters=2, depth=2, dropout_rate=0.0, num_segmentation_levels=1)
    shape = (1, 4, 4, 4, 1)
    ps = [split(init_params(model, jax.random.PRNGKey(k), shape)) for k in range(2)]
    sources = [p.transferable for p in ps]
    fishers = [jax.tree_util.tree_map(lambda a: jnp.abs(a) + 0.1, s) for s in sources]
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), shape))
    y = (x > 0).astype(np.float32)
    with jax.enable_x64(True):
        cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        src, fis, task = cast(sources), cast(fishers), cast(ps[0].task_specific)

        @jax.jit
        def loss(logits):
            params = fused_params(src, fis, logits, task, granularity="global")
            out = model.apply({"params": params}, jnp.asarray(x, jnp.float64))
            return jnp.mean((jax.nn.sigmoid(out) - y) ** 2)

        b = jnp.asarray([0.3, -0.4])
        g = jax.grad(loss)(b)
        h = 1e-6
        fd = [(loss(b.at[k].add(h)) - loss(b.at[k].add(-h))) / (2 * h) for k in range(2)]
        np.testing.assert_allclose(np.asarray(g), np.asarray(fd), rtol=1e-4, atol=1e-10)
        assert float(jnp.abs(g).max()) > 0


def test_plain_train_step_reduces_loss():
    model = UNet3D(out_channels=1, base_filters=4, depth=2, dropout_rate=0.0, num_segmentation_levels=1)
    shape = (2, 8, 8, 8, 1)
    params = init_params(model, jax.random.PRNGKey(0), shape)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), shape))
    batch = {"image": x, "target": (x > 0.5).astype(np.float32)}
    opt = make_optimizer(1e-2)
    state = create_state(params, opt, jax.random.PRNGKey(0))
    step = make_train_step(model, opt)
    losses = []
    for _ in range(10):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05 and int(state.step) == 10


def test_adaption_optimizer_has_two_rates_and_plateau_scales_both():
    from timm_jax.training.steps import learning_rate, make_adaption_optimizer, scale_learning_rate

    params = {"logits": {"a": jnp.zeros(2)}, "task": {"b": jnp.zeros(3)}}
    opt = make_adaption_optimizer(0.1, 0.01)
    state = create_state(params, opt, jax.random.PRNGKey(0))
    assert learning_rate(state) == np.float32(0.01)
    grads = {"logits": {"a": jnp.ones(2)}, "task": {"b": jnp.ones(3)}}
    updates, _ = opt.update(grads, state.opt_state, params)
    np.testing.assert_allclose(updates["logits"]["a"], -0.1, rtol=1e-4)  # Adam's first step = -lr
    np.testing.assert_allclose(updates["task"]["b"], -0.01, rtol=1e-4)
    half = scale_learning_rate(state, 0.5, minimum=0.0075)
    updates, _ = opt.update(grads, half.opt_state, params)
    np.testing.assert_allclose(updates["logits"]["a"], -0.05, rtol=1e-4)
    np.testing.assert_allclose(updates["task"]["b"], -0.0075, rtol=1e-4)  # clipped at the minimum
