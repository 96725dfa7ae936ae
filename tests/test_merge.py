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
    # σ(β_t)/Σσ(β_s) with numerator and denominator scaled by 1/max σ: the same number, but no 0/0
    # in float64 when every σ(β) underflows (β ≲ -745)
    log_sig = -np.logaddexp(0.0, -betas)
    sig = np.exp(log_sig - log_sig.max())
    alpha = sig / sig.sum()
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
    with pytest.raises(ValueError, match=r"params_list\[1\] leaf conv_a/kernel has shape"):
        imm_merge([params[0], bad], fishers, logits)
    missing = {k: v for k, v in params[1].items() if k != "scalar"}
    with pytest.raises(ValueError, match=r"params_list\[1\].*structure.*'scalar'"):
        imm_merge([params[0], missing], None, logits)
    neg = [
        fishers[0],
        dict(fishers[1], block={"conv_b": dict(fishers[1]["block"]["conv_b"], bias=-np.ones(4, np.float32))}),
    ]
    with pytest.raises(ValueError, match=r"fishers\[1\] leaf block/conv_b/bias has negative"):
        imm_merge(params, neg, logits)
    nan = [dict(fishers[0], scalar=np.float32(np.nan)), fishers[1]]
    with pytest.raises(ValueError, match=r"fishers\[0\] leaf scalar has non-finite values \(1 NaN of 1\)"):
        imm_merge(params, nan, logits)
    with pytest.raises(ValueError, match="got 1 Fishers for 2"):
        imm_merge(params, fishers[:1], logits)
    with pytest.raises(ValueError, match=r"logits leaf .* expected \(2,\)"):
        imm_merge(params, fishers, uniform_logits(params[0], 3))
    nanp = [params[0], dict(params[1], scalar=np.float32(np.inf))]
    with pytest.raises(ValueError, match=r"params_list\[1\] leaf scalar has non-finite"):
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


def test_check_fishers_names_source_leaf_and_what_was_found():
    from timm_jax.core.merge import check_fishers

    rng = np.random.default_rng(8)
    good = [make_tree(rng, positive=True) for _ in range(2)]
    check_fishers(good, names=["m1", "m2"])  # clean Fishers pass silently
    check_fishers([jax.tree_util.tree_map(np.zeros_like, good[0])])  # zeros are legal
    kernel = good[1]["conv_a"]["kernel"].copy()
    kernel[0, 0, 0, 0, :2] = np.nan
    kernel[1, 0, 0, 0, 0] = np.inf
    bad = dict(good[1], conv_a=dict(good[1]["conv_a"], kernel=kernel))
    with pytest.raises(
        ValueError,
        match=r"^Fisher of source m2 \(index 1\): leaf conv_a/kernel has non-finite values "
        r"\(2 NaN, 1 Inf of 216\)$",
    ):
        check_fishers([good[0], bad], names=["m1", "m2"])
    neg = dict(good[0], scalar=np.float32(-0.5))
    with pytest.raises(
        ValueError, match=r"^fishers\[0\] leaf scalar has negative values \(1 of 1, min -0\.5\)"
    ):
        check_fishers([neg, good[1]])
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), bad)
    with pytest.raises(
        ValueError, match=r"Fisher of source b \(index 0\): leaf conv_a/kernel .*2 NaN, 1 Inf"
    ):
        check_fishers([bf16], names=["b"])
    with pytest.raises(ValueError, match="2 names for 1 Fishers"):
        check_fishers([good[0]], names=["a", "b"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_zero_fishers_and_huge_logits_stay_finite_and_accurate(dtype):
    """float32 compute for every input dtype: the result is the float64 formula up to its final rounding."""
    rng = np.random.default_rng(9)
    T = 3
    params = [jax.tree_util.tree_map(lambda x: jnp.asarray(x * 50, dtype), make_tree(rng)) for _ in range(T)]
    fishers = [
        jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), make_tree(rng, positive=True))
        for _ in range(T)
    ]
    zero = dict(fishers[0], conv_a=jax.tree_util.tree_map(jnp.zeros_like, fishers[0]["conv_a"]))
    fishers = [zero, *fishers[1:]]  # one source with zero Fisher on a layer
    all_zero = [jax.tree_util.tree_map(jnp.zeros_like, f) for f in fishers]
    # round the resolution of the dtype: it is one ulp of the largest |θ| (the result is a convex combination)
    rtol = {jnp.float32: 1e-5, jnp.bfloat16: 2**-8, jnp.float16: 2**-10}[dtype]
    for b in ([1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, 1e4], [0.0, 0.0, 1e4], [-1e4, 3.0, -2.0]):
        logits = jax.tree_util.tree_map(lambda _, b=b: jnp.asarray(b, dtype), params[0])
        np_params = [jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), p) for p in params]
        np_logits = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), logits)
        for fs in (fishers, all_zero, None):
            np_fs = (
                None
                if fs is None
                else [jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), f) for f in fs]
            )
            got = jax.jit(imm_merge)(params, fs, logits)
            for g, want, *thetas in zip(
                jax.tree_util.tree_leaves(got),
                np_merge_tree(np_params, np_fs, np_logits),
                *(jax.tree_util.tree_leaves(p) for p in np_params),
            ):
                assert g.dtype == dtype
                g = np.asarray(g, np.float64)
                assert np.all(np.isfinite(g))
                scale = np.max(np.abs(np.stack(thetas)), axis=0)
                assert np.all(np.abs(g - want) <= rtol * scale + 1e-30), (b, fs is None)
        for r in jax.tree_util.tree_leaves(mixing_ratios(logits)):
            assert r.dtype == dtype and np.all(np.isfinite(np.asarray(r, np.float32)))


def test_huge_and_tiny_fishers_do_not_overflow_or_vanish():
    """Σ α F θ overflowed float32 for F ≈ 1e38 (inf or NaN); the weights are now normalised per element."""
    theta = [{"a": np.array([10.0, -7.0, 0.5], np.float32)}, {"a": np.array([-4.0, 2.0, 0.25], np.float32)}]
    logits = {"a": jnp.asarray([0.7, -0.2], jnp.float32)}
    for f in (1e38, 3e38, 1e30, 1e-30, 1e-38):
        fishers = [{"a": np.full(3, f, np.float32)}, {"a": np.full(3, f / 2, np.float32)}]
        got = np.asarray(imm_merge(theta, fishers, logits)["a"], np.float64)
        want = np_merge_leaf([t["a"] for t in theta], [x["a"] for x in fishers], logits["a"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30 * 10, err_msg=f"F={f}")
    # a source with a huge Fisher but ratio 0 (logit -1e4) must not drown the others: the weights
    # are normalised by max_t α_t F_t, not by max_t F_t (which gave 0 and NaN here)
    three = [*theta, {"a": np.array([0.02, 0.03, 0.2], np.float32)}]
    for small in (1e-7, 1e-30, 1.0):
        fishers = [{"a": np.full(3, f, np.float32)} for f in (1e30, small, 2 * small)]
        b = np.array([-1e4, 0.0, 0.5], np.float32)
        got = np.asarray(imm_merge(three, fishers, {"a": jnp.asarray(b)})["a"], np.float64)
        want = np_merge_leaf([t["a"] for t in three], [x["a"] for x in fishers], b)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=0, err_msg=f"others' F={small}")
    # the gradient with respect to the logits stays exact too (float64 finite differences of the formula)
    for f in (1e38, 1e-30):
        fishers = [{"a": np.full(3, f, np.float32)}, {"a": np.full(3, f / 2, np.float32)}]
        obj = lambda l, fishers=fishers: jnp.sum(imm_merge(theta, fishers, {"a": l})["a"])
        ref = lambda b, fishers=fishers: np_merge_leaf(
            [t["a"] for t in theta], [x["a"] for x in fishers], b
        ).sum()
        g = np.asarray(jax.grad(obj)(jnp.asarray([0.7, -0.2])))
        h = 1e-6
        fd = [
            (ref([0.7 + h, -0.2]) - ref([0.7 - h, -0.2])) / (2 * h),
            (ref([0.7, -0.2 + h]) - ref([0.7, -0.2 - h])) / (2 * h),
        ]
        assert min(abs(x) for x in fd) > 0  # a gradient that could be wrong (≈ 0.3 at 1e38, ≈ 3e-23 at 1e-30)
        np.testing.assert_allclose(g, fd, rtol=1e-4, err_msg=f"F={f}")


def test_fisher_normalised_per_layer_matches_numpy():
    """Each layer's Fisher (its leaves together) scaled to unit mean; an all-zero layer untouched."""
    from timm_jax.core.merge import normalise_fisher_per_layer

    rng = np.random.default_rng(0)
    fisher = {
        "conv_a": {
            "kernel": rng.random((3, 3, 3, 2, 4)).astype(np.float32) * 50,
            "bias": rng.random(4) * 1e-3,
        },
        "conv_b": {"kernel": np.zeros((1, 1, 1, 4, 2), np.float32), "bias": np.zeros(2, np.float32)},
    }
    got = normalise_fisher_per_layer(fisher)
    a = np.concatenate([fisher["conv_a"]["kernel"].ravel(), fisher["conv_a"]["bias"].ravel()]).astype(
        np.float64
    )
    for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(got["conv_a"][leaf], fisher["conv_a"][leaf] / a.mean(), rtol=1e-5)
        np.testing.assert_array_equal(got["conv_b"][leaf], fisher["conv_b"][leaf])
    both = np.concatenate([np.ravel(got["conv_a"]["kernel"]), np.ravel(got["conv_a"]["bias"])])
    assert abs(both.mean() - 1.0) < 1e-5
    # a source 20x larger everywhere weighs the same after normalisation: mode-IMM then mixes by
    # the ratios and the Fishers' relative shapes only
    big = jax.tree_util.tree_map(lambda x: 20 * np.asarray(x), fisher)
    for x, y in zip(
        jax.tree_util.tree_leaves(normalise_fisher_per_layer(big)), jax.tree_util.tree_leaves(got)
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5)
