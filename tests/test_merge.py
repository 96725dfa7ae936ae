"""imm_merge / mixing_ratios against a plain NumPy transcription of the T-IMM equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from timm_jax.core.merge import (
    expand_logits,
    imm_merge,
    init_logits,
    layer_names,
    mixing_ratios,
    uniform_logits,
)

EPS = 1e-8


def np_sigmoid(b):
    return 1.0 / (1.0 + np.exp(-b))


def np_merge_leaf(thetas, fishers, betas, eps=EPS):
    """The formula, literally: α_t = σ(β_t)/Σσ(β_s); θ = Σ α F θ / (Σ α F + ε)."""
    betas = np.asarray(betas, np.float64)
    alpha = np_sigmoid(betas) / np_sigmoid(betas).sum()
    if fishers is None:
        fishers = [np.ones_like(t) for t in thetas]
        eps = 0.0
    num = sum(a * f.astype(np.float64) * t.astype(np.float64) for a, f, t in zip(alpha, fishers, thetas))
    den = sum(a * f.astype(np.float64) for a, f in zip(alpha, fishers))
    return num / (den + eps)


def make_tree(rng, scale=1.0, positive=False):
    def arr(*shape):
        x = rng.standard_normal(shape).astype(np.float32) * scale
        return np.abs(x) if positive else x

    return {
        "conv_a": {"kernel": arr(3, 3, 3, 2, 4), "bias": arr(4)},
        "block": {"conv_b": {"kernel": arr(1, 1, 1, 4, 4), "bias": arr(4)}},
        "scalar": arr(),
    }


def np_merge_tree(params_list, fishers, logits):
    leaves = [jax.tree_util.tree_leaves(p) for p in params_list]
    fl = None if fishers is None else [jax.tree_util.tree_leaves(f) for f in fishers]
    out = []
    for i, b in enumerate(jax.tree_util.tree_leaves(logits)):
        out.append(
            np_merge_leaf([l[i] for l in leaves], None if fl is None else [f[i] for f in fl], np.asarray(b))
        )
    return out


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("use_fisher", [True, False])
def test_matches_numpy_transcription(T, use_fisher):
    rng = np.random.default_rng(T)
    params = [make_tree(rng) for _ in range(T)]
    fishers = [make_tree(rng, scale=2.0, positive=True) for _ in range(T)] if use_fisher else None
    logits = jax.tree_util.tree_map(lambda _: rng.standard_normal(T).astype(np.float32) * 2, params[0])
    got = jax.jit(imm_merge)(params, fishers, logits)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params[0])
    for g, want in zip(jax.tree_util.tree_leaves(got), np_merge_tree(params, fishers, logits)):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), want, rtol=2e-5, atol=1e-6)


def test_mixing_ratios_formula_and_sum():
    b = np.array([-1.0, 0.5, 3.0], np.float32)
    got = np.asarray(mixing_ratios({"x": jnp.asarray(b)})["x"])
    np.testing.assert_allclose(got, np_sigmoid(b) / np_sigmoid(b).sum(), rtol=1e-6)
    assert abs(got.sum() - 1) < 1e-6


def test_mean_imm_is_fisher_none_and_uniform_is_average():
    rng = np.random.default_rng(0)
    params = [make_tree(rng) for _ in range(3)]
    ones = [jax.tree_util.tree_map(np.ones_like, p) for p in params]
    logits = uniform_logits(params[0], 3)
    mean = imm_merge(params, None, logits)
    with_ones = imm_merge(params, ones, logits)
    avg = jax.tree_util.tree_map(lambda *xs: sum(xs) / 3, *params)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (mean, with_ones, avg))):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6)


def test_single_source_and_identical_sources_return_source():
    rng = np.random.default_rng(1)
    p = make_tree(rng)
    # Fishers away from 0: θ·F/(F + ε) differs from θ by a relative ε/F, the formula's own guard
    f = jax.tree_util.tree_map(lambda x: x + 0.1, make_tree(rng, positive=True))
    for T in (1, 3):
        logits = jax.tree_util.tree_map(lambda _, T=T: jnp.asarray(rng.standard_normal(T), jnp.float32), p)
        out = imm_merge([p] * T, [f] * T, logits)
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(p)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scaling_fishers_of_a_leaf_changes_nothing():
    rng = np.random.default_rng(2)
    params = [make_tree(rng) for _ in range(2)]
    fishers = [make_tree(rng, positive=True) for _ in range(2)]
    logits = jax.tree_util.tree_map(lambda _: jnp.asarray([0.3, -0.7]), params[0])
    scaled = [dict(f, conv_a=dict(f["conv_a"], kernel=f["conv_a"]["kernel"] * 37.0)) for f in fishers]
    a = imm_merge(params, fishers, logits)["conv_a"]["kernel"]
    b = imm_merge(params, scaled, logits)["conv_a"]["kernel"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_wrt_logits_matches_finite_differences():
    rng = np.random.default_rng(3)
    params = [jax.tree_util.tree_map(lambda x: x.astype(np.float64), make_tree(rng)) for _ in range(3)]
    fishers = [
        jax.tree_util.tree_map(lambda x: x.astype(np.float64), make_tree(rng, positive=True))
        for _ in range(3)
    ]
    w = jax.tree_util.tree_map(lambda x: rng.standard_normal(np.shape(x)), params[0])
    logits0 = jax.tree_util.tree_map(lambda _: rng.standard_normal(3), params[0])

    def objective(logits):
        out = imm_merge(params, fishers, logits)
        return sum(
            jnp.sum(a * b) for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(w))
        )

    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(jnp.asarray, params)
        fishers = jax.tree_util.tree_map(jnp.asarray, fishers)
        logits0 = jax.tree_util.tree_map(jnp.asarray, logits0)
        grad = jax.grad(objective)(logits0)
        flat, unravel = ravel_pytree(logits0)
        g_flat, _ = ravel_pytree(grad)
        h = 1e-6
        for k in range(flat.shape[0]):
            e = jnp.zeros_like(flat).at[k].set(h)
            fd = (objective(unravel(flat + e)) - objective(unravel(flat - e))) / (2 * h)
            np.testing.assert_allclose(g_flat[k], fd, rtol=1e-5, atol=1e-8)
        assert float(jnp.max(jnp.abs(g_flat))) > 1e-3  # the gradient is not trivially zero


def test_zero_fishers_and_extreme_logits_are_finite():
    rng = np.random.default_rng(4)
    params = [make_tree(rng) for _ in range(2)]
    zeros = [jax.tree_util.tree_map(np.zeros_like, p) for p in params]
    for b in ([80.0, -80.0], [-80.0, -80.0], [-200.0, 3.0], [80.0, 80.0]):
        logits = jax.tree_util.tree_map(lambda _, b=b: jnp.asarray(b, jnp.float32), params[0])
        for fishers in (zeros, [jax.tree_util.tree_map(np.abs, p) for p in params], None):
            out = jax.jit(imm_merge)(params, fishers, logits)
            assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(out))
        ratios = mixing_ratios(logits)
        assert all(
            np.all(np.isfinite(r)) and abs(float(r.sum()) - 1) < 1e-6
            for r in jax.tree_util.tree_leaves(ratios)
        )
    # all-zero Fishers give 0, as the formula says
    out = imm_merge(params, zeros, uniform_logits(params[0], 2))
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(out))


def test_granularities_expand_and_share_gradients():
    rng = np.random.default_rng(5)
    params = [make_tree(rng) for _ in range(2)]
    assert layer_names(params[0]) == ["['block']['conv_b']", "['conv_a']", "<root>"]
    for gran in ("leaf", "layer", "global"):
        compact = init_logits(params[0], 2, gran, value=0.25)
        per_leaf = expand_logits(compact, params[0], gran)
        assert jax.tree_util.tree_structure(per_leaf) == jax.tree_util.tree_structure(params[0])
        assert all(np.allclose(x, 0.25) and x.shape == (2,) for x in jax.tree_util.tree_leaves(per_leaf))
    layer = init_logits(params[0], 2, "layer")
    g = jax.grad(
        lambda l: jnp.sum(imm_merge(params, None, expand_logits(l, params[0], "layer"))["conv_a"]["kernel"])
    )(layer)
    assert np.any(g["['conv_a']"] != 0) and np.all(g["['block']['conv_b']"] == 0)
    with pytest.raises(ValueError, match="granularity"):
        init_logits(params[0], 2, "neuron")


def test_bad_inputs_name_the_leaf():
    rng = np.random.default_rng(6)
    params = [make_tree(rng) for _ in range(2)]
    fishers = [make_tree(rng, positive=True) for _ in range(2)]
    logits = uniform_logits(params[0], 2)
    with pytest.raises(ValueError, match="empty"):
        imm_merge([], None, logits)
    bad = dict(params[1], conv_a=dict(params[1]["conv_a"], kernel=np.zeros((3, 3, 3, 4, 4), np.float32)))
    with pytest.raises(ValueError, match=r"params_list\[1\] leaf \['conv_a'\]\['kernel'\] has shape"):
        imm_merge([params[0], bad], fishers, logits)
    missing = {k: v for k, v in params[1].items() if k != "scalar"}
    with pytest.raises(ValueError, match=r"params_list\[1\].*structure.*'scalar'"):
        imm_merge([params[0], missing], None, logits)
    neg = [
        fishers[0],
        dict(fishers[1], block={"conv_b": dict(fishers[1]["block"]["conv_b"], bias=-np.ones(4, np.float32))}),
    ]
    with pytest.raises(ValueError, match=r"fishers\[1\] leaf \['block'\]\['conv_b'\]\['bias'\] has negative"):
        imm_merge(params, neg, logits)
    nan = [dict(fishers[0], scalar=np.float32(np.nan)), fishers[1]]
    with pytest.raises(ValueError, match=r"fishers\[0\] leaf \['scalar'\] has non-finite"):
        imm_merge(params, nan, logits)
    with pytest.raises(ValueError, match="got 1 Fishers for 2"):
        imm_merge(params, fishers[:1], logits)
    with pytest.raises(ValueError, match=r"logits leaf .* expected \(2,\)"):
        imm_merge(params, fishers, uniform_logits(params[0], 3))
    nanp = [params[0], dict(params[1], scalar=np.float32(np.inf))]
    with pytest.raises(ValueError, match=r"params_list\[1\] leaf \['scalar'\] has non-finite"):
        imm_merge(nanp, fishers, logits)
    # shape errors are raised at trace time under jit as well
    with pytest.raises(ValueError, match="has shape"):
        jax.jit(imm_merge)([params[0], bad], fishers, logits)


def test_inputs_unchanged_and_dtype_preserved():
    rng = np.random.default_rng(7)
    params = [
        jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), make_tree(rng)) for _ in range(2)
    ]
    copies = jax.tree_util.tree_map(np.array, params)
    out = jax.jit(imm_merge)(params, None, uniform_logits(params[0], 2))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(out))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(copies)):
        np.testing.assert_array_equal(np.asarray(a), b)
