"""Property-based tests of imm_merge / mixing_ratios against a float64 NumPy transcription.

Random nested parameter dicts (1-3 levels, scalar and zero-size leaves), T = 1..8 sources,
float32 / bfloat16 / float16, logits at ±1e4, all equal or one huge, Fishers with zeros, 1e-30
and 1e30, at leaf / layer / global granularity: the merge is finite and equals the reference
within the dtype's rounding. Invalid inputs (other structure or shapes, a wrong number of logits
or Fishers, NaN / Inf / negative Fishers) raise ValueError naming the source and the leaf.

The reference is written here from docs/method.md (sections 3-4), not from the library:

    α_t = σ(β_t) / Σ_s σ(β_s)
    mode-IMM:  θ = Σ_t α_t F_t θ_t / (Σ_t α_t F_t + ε),  ε = 1e-8
    mean-IMM:  θ = Σ_t α_t θ_t
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fuzz_record import FUZZ, Tally
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from timm_jax.core.merge import expand_logits, imm_merge, init_logits, mixing_ratios

EPS = 1e-8
TALLY = Tally("imm_merge / mixing_ratios (timm_jax/core/merge.py)")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# |got - reference| ≤ RTOL · max_t |θ_t| + ATOL (the result is a convex combination, so |θ| ≤
# max_t |θ_t|): float32 compute error for float32, else the final rounding to the dtype (half an
# ulp: 2^-8 for bfloat16, 2^-11 for float16) with a factor 2 to spare; ATOL covers float16's
# subnormals (absolute spacing 2^-24)
RTOL = {"float32": 1e-5, "bfloat16": 2**-7, "float16": 2**-10}
ATOL = {"float32": 1e-30, "bfloat16": 1e-30, "float16": 2**-24}
KEYS = ("conv_a", "conv_b", "block", "kernel", "bias", "scale")
SHAPES = ((), (0, 3), (3,), (2, 3), (1, 2, 2), (4, 0))
# extreme Fishers within what each dtype can hold (float16 stops at 65504 and 6e-8)
EXTREME_FISHER = {"float32": (1e-30, 1e30), "bfloat16": (1e-30, 1e30), "float16": (6e-8, 6e4)}
LOGIT_KINDS = ("±1e4", "all equal", "one huge", "one very negative", "moderate (control)")
FISHER_KINDS = ("zero", "tiny", "huge", "moderate", "mixed")


@pytest.fixture(scope="module", autouse=True)
def _record():
    yield
    TALLY.write()


# ------------------------------------------------------------------------ generated inputs
@st.composite
def shape_trees(draw, depth=1, max_depth=None):
    """A nested dict (1-3 levels) whose leaves are array shapes."""
    if max_depth is None:
        max_depth = draw(st.integers(1, 3))
    n = draw(st.integers(1, 3 if depth == 1 else 2))
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=n, max_size=n, unique=True))
    out = {}
    for k in keys:
        if depth < max_depth and draw(st.booleans()):
            out[k] = draw(shape_trees(depth + 1, max_depth))
        else:
            out[k] = draw(st.sampled_from(SHAPES))
    return out


def leaf_specs(tree, prefix=()):
    """(path, shape) of every leaf, in JAX's flattening order (sorted dict keys)."""
    out = []
    for k in sorted(tree):
        if isinstance(tree[k], dict):
            out += leaf_specs(tree[k], prefix + (k,))
        else:
            out.append((prefix + (k,), tree[k]))
    return out


def build(tree, fn, prefix=()):
    """A pytree like ``tree`` with ``fn(path, shape)`` at each leaf."""
    return {
        k: build(v, fn, prefix + (k,)) if isinstance(v, dict) else fn(prefix + (k,), v)
        for k, v in tree.items()
    }


def layer_key(path):
    """The library's layer name of a leaf: its parent path in ``keystr`` form (docs/method.md §3)."""
    return "".join(f"['{k}']" for k in path[:-1]) or "<root>"


def logit_vector(rng, kind, T):
    if kind == "±1e4":
        return rng.choice([-1e4, 1e4], size=T)
    if kind == "all equal":
        return np.full(T, rng.choice([-1e4, -3.0, 0.0, 2.5, 1e4]))
    b = rng.normal(0.0, 2.0, size=T)
    if kind == "one huge":
        b[rng.integers(T)] = 1e4
    elif kind == "one very negative":
        b[rng.integers(T)] = -1e4
    return b


def fisher_array(rng, kind, shape, dtype_name):
    tiny, huge = EXTREME_FISHER[dtype_name]
    if kind == "zero":
        return np.zeros(shape)
    if kind == "tiny":
        return np.full(shape, tiny) * rng.uniform(1, 2, size=shape)
    if kind == "huge":
        return np.full(shape, huge) * rng.uniform(0.5, 1, size=shape)
    if kind == "moderate":
        return rng.exponential(1.0, size=shape)
    choices = np.array([0.0, tiny, huge, 1.0])
    return choices[rng.integers(4, size=shape)] * rng.uniform(0.5, 1, size=shape)


@st.composite
def merge_cases(draw, dtype=None):
    tree = draw(shape_trees())
    T = draw(st.integers(1, 8))
    return {
        "tree": tree,
        "T": T,
        "dtype": dtype or draw(st.sampled_from(sorted(DTYPES))),
        "granularity": draw(st.sampled_from(("leaf", "layer", "global"))),
        "logits": draw(st.sampled_from(LOGIT_KINDS)),
        "fishers": draw(st.none() | st.lists(st.sampled_from(FISHER_KINDS), min_size=T, max_size=T)),
        "theta_scale": draw(st.sampled_from((1.0, 100.0))),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def make_inputs(case):
    """Parameters, Fishers and compact logits in the case's dtype (as jax arrays)."""
    rng = np.random.default_rng(case["seed"])
    dtype, name, T = DTYPES[case["dtype"]], case["dtype"], case["T"]
    params = [
        build(case["tree"], lambda _p, s: jnp.asarray(rng.normal(0, case["theta_scale"], size=s), dtype))
        for _ in range(T)
    ]
    fishers = None
    if case["fishers"] is not None:
        fishers = [
            build(case["tree"], lambda _p, s, k=k: jnp.asarray(fisher_array(rng, k, s, name), dtype))
            for k in case["fishers"]
        ]
    vec = lambda: jnp.asarray(logit_vector(rng, case["logits"], T), dtype)
    specs = leaf_specs(case["tree"])
    if case["granularity"] == "leaf":
        logits = build(case["tree"], lambda _p, _s: vec())
    elif case["granularity"] == "layer":
        logits = {layer: vec() for layer in dict.fromkeys(layer_key(p) for p, _ in specs)}
    else:
        logits = vec()
    return params, fishers, logits


# ------------------------------------------------------------------- the float64 reference
def ref_ratios(beta):
    """α_t = σ(β_t)/Σσ(β_s); numerator and denominator scaled by 1/max σ (no 0/0 at β = -1e4)."""
    log_sig = -np.logaddexp(0.0, -np.asarray(beta, np.float64))
    sig = np.exp(log_sig - log_sig.max())
    return sig / sig.sum()


def ref_merge(thetas, fishers, beta):
    alpha = ref_ratios(beta)
    thetas = [np.asarray(t, np.float64) for t in thetas]
    if fishers is None:
        return sum(a * t for a, t in zip(alpha, thetas))
    fishers = [np.asarray(f, np.float64) for f in fishers]
    num = sum(a * f * t for a, f, t in zip(alpha, fishers, thetas))
    den = sum(a * f for a, f in zip(alpha, fishers))
    return num / (den + EPS)


def leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def leaf_logits(logits, granularity, path):
    if granularity == "leaf":
        return leaf(logits, path)
    if granularity == "layer":
        return logits[layer_key(path)]
    return logits


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32) if x.dtype != jnp.float64 else x, np.float64)


# ------------------------------------------------------------------------------- properties
def check_merge(case):
    params, fishers, logits = make_inputs(case)
    T, gran, name = case["T"], case["granularity"], case["dtype"]
    if gran == "layer":  # the library names layers as this test does
        assert set(init_logits(params[0], T, "layer")) == set(logits)
    got = imm_merge(params, fishers, expand_logits(logits, params[0], gran))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params[0])
    for path, shape in leaf_specs(case["tree"]):
        g = leaf(got, path)
        assert g.shape == shape and g.dtype == DTYPES[name], path
        g = f64(g)
        thetas = [f64(leaf(p, path)) for p in params]
        fs = None if fishers is None else [f64(leaf(f, path)) for f in fishers]
        want = ref_merge(thetas, fs, f64(leaf_logits(logits, gran, path)))
        assert np.all(np.isfinite(g)), path
        scale = np.max(np.abs(np.stack(thetas)), axis=0) if thetas[0].size else 0.0
        err = np.abs(g - want)
        assert np.all(err <= RTOL[name] * scale + ATOL[name]), (path, float(np.max(err, initial=0)))
    for b in jax.tree_util.tree_leaves(logits):
        r = mixing_ratios({"b": b})["b"]
        assert r.dtype == b.dtype and r.shape == (T,)
        r = f64(r)
        assert np.all(np.isfinite(r)) and np.all(r >= 0)
        np.testing.assert_allclose(r, ref_ratios(f64(b)), rtol=RTOL[name], atol=ATOL[name])
    same = "finite; equal to the float64 NumPy reference within the dtype's rounding"
    TALLY.add(f"logits: {case['logits']}", same)
    for kind in ["none (mean-IMM)"] if case["fishers"] is None else sorted(set(case["fishers"])):
        TALLY.add(f"Fishers: {kind}", same)
    TALLY.add(f"{name} parameters, Fishers and logits", same + "; dtype and structure kept")
    leaves = [s for _, s in leaf_specs(case["tree"])]
    if () in leaves or any(0 in s for s in leaves):
        TALLY.add("scalar or zero-size leaves", "merged with the right shape and dtype")


# one run per dtype, so each gets its share of examples
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_merge_matches_reference(dtype, data):
    check_merge(data.draw(merge_cases(dtype)))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_merge_matches_reference_long(dtype, data):
    check_merge(data.draw(merge_cases(dtype)))


# --------------------------------------------------------------------------- invalid inputs
CORRUPTIONS = (
    "params: other structure",
    "params: other leaf shape",
    "fishers: other leaf shape",
    "fishers: NaN",
    "fishers: Inf",
    "fishers: negative",
    "fishers: wrong count",
    "logits: wrong count",
    "logits: NaN",
    "params: Inf",
)


def replace_leaf(tree, path, value):
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = replace_leaf(tree[path[0]], path[1:], value)
    return out


def drop_leaf(tree, path):
    out = dict(tree)
    if len(path) == 1:
        del out[path[0]]
    else:
        out[path[0]] = drop_leaf(tree[path[0]], path[1:])
    return out


def check_invalid(case, corruption, pick):
    case = dict(case, granularity="leaf", fishers=case["fishers"] or ["moderate"] * case["T"])
    params, fishers, logits = make_inputs(case)
    T, dtype = case["T"], DTYPES[case["dtype"]]
    specs = leaf_specs(case["tree"])
    nonempty = [(p, s) for p, s in specs if int(np.prod(s)) > 0]
    if corruption.startswith("params:") and corruption != "params: Inf":
        assume(T > 1)
    if corruption in ("fishers: NaN", "fishers: Inf", "fishers: negative", "params: Inf", "logits: NaN"):
        assume(nonempty)
        path, shape = nonempty[pick % len(nonempty)]
    else:
        path, shape = specs[pick % len(specs)]
    name = "/".join(path)
    t = 1 + pick % (T - 1) if T > 1 else 0
    if corruption == "params: other structure":
        params[t] = drop_leaf(params[t], path)
        match = rf"params_list\[{t}\] does not have the structure .*'{name}'"
    elif corruption == "params: other leaf shape":
        params[t] = replace_leaf(params[t], path, jnp.zeros(shape + (2,), dtype))
        match = rf"params_list\[{t}\] leaf {name} has shape"
    elif corruption == "fishers: other leaf shape":
        fishers[t] = replace_leaf(fishers[t], path, jnp.zeros((5,) + shape, dtype))
        match = rf"fishers\[{t}\] leaf {name} has shape"
    elif corruption in ("fishers: NaN", "fishers: Inf", "fishers: negative"):
        bad = {"fishers: NaN": np.nan, "fishers: Inf": np.inf, "fishers: negative": -0.5}[corruption]
        value = np.array(leaf(fishers[t], path), np.float32).reshape(-1)
        value[pick % value.size] = bad
        fishers[t] = replace_leaf(fishers[t], path, jnp.asarray(value.reshape(shape), dtype))
        found = {"fishers: NaN": "1 NaN", "fishers: Inf": "1 Inf", "fishers: negative": "negative values"}
        match = rf"fishers\[{t}\] leaf {name} has .*{found[corruption]}"
    elif corruption == "fishers: wrong count":
        fishers = fishers + fishers[:1] if pick % 2 or T == 1 else fishers[:-1]
        match = rf"got {len(fishers)} Fishers for {T} source models"
    elif corruption == "logits: wrong count":
        logits = replace_leaf(logits, path, jnp.zeros((T + 1 + pick % 2,), dtype))
        match = rf"logits leaf {name} has shape .*expected \({T},\)"
    elif corruption == "logits: NaN":
        logits = replace_leaf(logits, path, jnp.full((T,), jnp.nan, dtype))
        match = rf"logits leaf {name} has non-finite values"
    else:  # params: Inf
        value = np.array(leaf(params[t], path), np.float32).reshape(-1)
        value[pick % value.size] = np.inf
        params[t] = replace_leaf(params[t], path, jnp.asarray(value.reshape(shape), dtype))
        match = rf"params_list\[{t}\] leaf {name} has non-finite values"
    with pytest.raises(ValueError, match=match):
        imm_merge(params, fishers, logits)
    if corruption == "fishers: wrong count":
        TALLY.add(f"invalid input ({corruption})", "ValueError giving both counts")
    elif corruption.startswith("logits:"):
        TALLY.add(f"invalid input ({corruption})", "ValueError naming the leaf")
    elif corruption == "params: other structure":
        TALLY.add(f"invalid input ({corruption})", "ValueError naming the source and the missing leaf")
    else:
        TALLY.add(f"invalid input ({corruption})", "ValueError naming the source and the leaf")


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@settings(FUZZ, max_examples=8)
@given(case=merge_cases(), pick=st.integers(0, 2**16))
def test_invalid_inputs_name_the_leaf(corruption, case, pick):
    check_invalid(case, corruption, pick)


@pytest.mark.slow
@pytest.mark.parametrize("corruption", CORRUPTIONS)
@settings(FUZZ, max_examples=60)
@given(case=merge_cases(), pick=st.integers(0, 2**16))
def test_invalid_inputs_name_the_leaf_long(corruption, case, pick):
    check_invalid(case, corruption, pick)
