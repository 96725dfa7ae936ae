"""fisher_diagonal against an explicit loop of per-example gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timm_jax.core.fisher import (
    bernoulli_log_likelihood,
    fisher_diagonal,
    sampled_segmentation_log_likelihood,
    segmentation_log_likelihood,
    with_sample_keys,
)


def log_likelihood(params, x, y):
    """A small non-linear model; one example, no batch axis."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    z = h @ params["w2"]["k"]
    return bernoulli_log_likelihood(z, y)


def setup(n=7, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.standard_normal((5, 6)).astype(np.float32),
        "b1": rng.standard_normal(6).astype(np.float32),
        "w2": {"k": rng.standard_normal((6, 3)).astype(np.float32)},
    }
    x = rng.standard_normal((n, 5)).astype(np.float32)
    y = (rng.random((n, 3)) < 0.5).astype(np.float32)
    return params, x, y


def loop_reference(params, x, y):
    acc = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float64), params)
    for i in range(x.shape[0]):
        g = jax.grad(log_likelihood)(params, x[i], y[i])
        acc = jax.tree_util.tree_map(lambda a, gi: a + np.asarray(gi, np.float64) ** 2, acc, g)
    return jax.tree_util.tree_map(lambda a: a / x.shape[0], acc)


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7])
def test_equals_explicit_loop_for_any_chunk_size(chunk):
    params, x, y = setup()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]  # uneven batches
    got = fisher_diagonal(log_likelihood, params, batches, chunk_size=chunk)
    want = loop_reference(params, x, y)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-7)


def test_differs_from_squared_batch_gradient():
    params, x, y = setup()
    fisher = fisher_diagonal(log_likelihood, params, [(x, y)])
    batch_grad = jax.grad(lambda p: jnp.mean(jax.vmap(log_likelihood, (None, 0, 0))(p, x, y)))(params)
    sq = jax.tree_util.tree_map(jnp.square, batch_grad)
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(fisher), jax.tree_util.tree_leaves(sq))
    ]
    assert max(diffs) > 1e-2
    # and the empirical Fisher is ≥ the squared mean gradient (Jensen), element-wise
    for a, b in zip(jax.tree_util.tree_leaves(fisher), jax.tree_util.tree_leaves(sq)):
        assert np.all(np.asarray(a) >= np.asarray(b) - 1e-6)


def test_empty_and_mismatched_batches():
    params, x, y = setup()
    with pytest.raises(ValueError, match="no examples"):
        fisher_diagonal(log_likelihood, params, [])
    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        fisher_diagonal(log_likelihood, params, [(x[:3], y[:2])])


def test_segmentation_log_likelihood_readds_batch_axis_and_true_fisher():
    seen = []

    def apply_fn(params, xb):
        seen.append(xb.shape)
        return xb[..., :1] * params["a"] + params["b"]

    params = {"a": jnp.float32(0.7), "b": jnp.float32(-0.2)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 4, 5, 2)).astype(np.float32)
    y = (rng.random((4, 3, 4, 5, 1)) < 0.5).astype(np.float32)
    ll = segmentation_log_likelihood(apply_fn)
    f = fisher_diagonal(ll, params, [(x, y)])
    assert seen[-1] == (1, 3, 4, 5, 2)
    ga = [jax.grad(ll)(params, x[i], y[i])["a"] for i in range(4)]
    np.testing.assert_allclose(f["a"], np.mean(np.square(ga)), rtol=1e-5)
    # true Fisher: labels sampled from the model; deterministic for a key; differs from empirical
    keyed = list(with_sample_keys([(x, y)], jax.random.PRNGKey(0)))
    assert keyed[0][1].shape == (4, 2)
    sll = sampled_segmentation_log_likelihood(apply_fn)
    t1 = fisher_diagonal(sll, params, keyed)
    t2 = fisher_diagonal(sll, params, list(with_sample_keys([(x, y)], jax.random.PRNGKey(0))))
    assert float(t1["a"]) == float(t2["a"]) and float(t1["a"]) > 0
    assert abs(float(t1["a"]) - float(f["a"])) > 1e-3


@pytest.mark.parametrize("n_devices", [1, 2, 4])
def test_data_parallel_fisher_equals_single_device(n_devices):
    """The pitfall in core/fisher.py's docstring: per-example grads of a sharded batch, on 1, 2
    and 4 fake CPU devices (conftest). Summing gradients over devices before squaring (the
    plausible failure) gives a different, smaller Fisher and fails this."""
    devices = jax.devices()
    assert len(devices) == 4, "tests/conftest.py forces 4 host devices"
    mesh = jax.sharding.Mesh(np.array(devices[:n_devices]), ("data",))
    params, x, y = setup(n=10)
    want = loop_reference(params, x, y)
    got = fisher_diagonal(log_likelihood, params, [(x[:6], y[:6]), (x[6:], y[6:])], chunk_size=4, mesh=mesh)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-7)
    if n_devices > 1:
        with pytest.raises(ValueError, match=f"multiple of the {n_devices} devices"):
            fisher_diagonal(log_likelihood, params, [(x, y)], chunk_size=n_devices + 1, mesh=mesh)
