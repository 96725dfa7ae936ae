"""T-IMM beyond the paper: the label-free entropy objective, the Fisher read from Adam's state,
channel-granularity mixing ratios — each against an independent NumPy reference — and their
configuration, run keys and one-line errors."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from timm_jax.config import FuseConfig
from timm_jax.core.fisher import adam_fisher
from timm_jax.core.losses import binary_entropy
from timm_jax.core.merge import expand_logits, imm_merge, init_logits, layer_channels
from timm_jax.core.partition import split, to_flat_dict
from timm_jax.errors import ConfigError, OptimizerStateError, UserError
from timm_jax.nn.unet import UNet3D, init_params
from timm_jax.runs.fisher_cache import adam_source_fisher
from timm_jax.training.loop import window_evaluator
from timm_jax.training.rundir import RunDir, make_meta, run_key
from timm_jax.training.steps import (
    create_state,
    fused_params,
    make_adaption_optimizer,
    make_adaption_step,
    make_optimizer,
)
from timm_jax.workflows.fuse import layer_ratio_spread, layer_ratios
from timm_jax.workflows.report import plot_mixing_ratios


def tiny_unet(base=2):
    return UNet3D(out_channels=2, base_filters=base, depth=2, dropout_rate=0.0, num_segmentation_levels=1)


# ------------------------------------------------------------------------------- entropy objective
def test_binary_entropy_matches_numpy_and_is_finite_for_large_logits():
    z = np.array([[-40.0, -3.0, -0.5], [0.0, 0.7, 50.0]], np.float32)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log(p) + (1 - p) * np.log1p(-p))
    h = np.nan_to_num(h)  # 0·log 0 = 0
    np.testing.assert_allclose(float(binary_entropy(jnp.asarray(z))), h.mean(), rtol=1e-5, atol=1e-7)
    assert abs(float(binary_entropy(jnp.zeros((3, 4)))) - np.log(2)) < 1e-6  # maximal at p = 1/2


def test_entropy_gradient_reaches_the_mixing_logits_finite_differences():
    model = tiny_unet()
    shape = (1, 4, 4, 4, 1)
    ps = [split(init_params(model, jax.random.PRNGKey(k), shape)) for k in range(2)]
    sources = [p.transferable for p in ps]
    fishers = [jax.tree_util.tree_map(lambda a: jnp.abs(a) + 0.1, s) for s in sources]
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), shape))
    with jax.enable_x64(True):
        cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        src, fis, task = cast(sources), cast(fishers), cast(ps[0].task_specific)
        base = init_logits(src[0], 2, "layer", value=0.0)
        layer = sorted(base)[1]

        def loss(b):  # only one layer's logits vary; the others stay at 0
            logits = {**base, layer: b}
            params = fused_params(src, fis, logits, task, granularity="layer")
            return binary_entropy(model.apply({"params": params}, jnp.asarray(x, jnp.float64)))

        b = jnp.asarray([0.3, -0.4])
        g = jax.jit(jax.grad(loss))(b)
        loss = jax.jit(loss)
        h = 1e-6
        fd = [(loss(b.at[k].add(h)) - loss(b.at[k].add(-h))) / (2 * h) for k in range(2)]
        np.testing.assert_allclose(np.asarray(g), np.asarray(fd), rtol=1e-4, atol=1e-12)
        assert float(jnp.abs(g).max()) > 1e-8  # the entropy does depend on the ratios


def test_entropy_adaption_step_trains_only_the_logits_without_targets():
    model = tiny_unet(2)
    shape = (2, 4, 4, 4, 1)
    ps = [split(init_params(model, jax.random.PRNGKey(k), shape)) for k in range(2)]
    sources = [p.transferable for p in ps]
    opt = make_adaption_optimizer(0.1, 1e-2, train_task=False)
    state = create_state(
        {"logits": init_logits(sources[0], 2, "layer"), "task": ps[0].task_specific},
        opt,
        jax.random.PRNGKey(0),
    )
    task0 = jax.tree_util.tree_map(np.array, state.params["task"])
    batch = {"image": np.asarray(jax.random.normal(jax.random.PRNGKey(3), shape))}  # no "target"
    step = make_adaption_step(model, opt, granularity="layer", objective="entropy")

    def entropy(tr):
        params = fused_params(sources, None, tr["logits"], tr["task"], granularity="layer")
        return float(binary_entropy(model.apply({"params": params}, batch["image"])))

    first = entropy(state.params)
    for _ in range(8):
        state, _ = step(state, sources, None, batch)
    last = entropy(state.params)
    assert last < first  # the entropy went down
    for a, b in zip(jax.tree_util.tree_leaves(state.params["task"]), jax.tree_util.tree_leaves(task0)):
        np.testing.assert_array_equal(np.asarray(a), b)  # 𝒮 frozen
    moved = max(float(jnp.abs(v).max()) for v in state.params["logits"].values())
    assert moved > 0.05
    with pytest.raises(ValueError, match="unknown adaption objective 'dice'"):
        make_adaption_step(model, opt, objective="dice")


def test_entropy_validation_reads_no_labels():
    cases = [SimpleNamespace(image=np.full((3, 5, 4, 1), v, np.float32)) for v in (0.2, 0.7)]  # no labels
    seen = []

    def predict(params, image):
        seen.append(image.shape)
        return np.full((*image.shape[:3], 2), params * image[0, 0, 0, 0], np.float32)

    out = window_evaluator(predict, cases, loss="entropy")(0.5)
    assert seen == [(3, 5, 4, 1)] * 2

    def h(p):
        return -(p * np.log(p) + (1 - p) * np.log1p(-p))

    assert out["loss"] == pytest.approx((h(0.1) + h(0.35)) / 2, rel=1e-5)
    assert out["dice"] == [] and np.isnan(out["dice_mean"])


# ------------------------------------------------------------------------------------ Adam Fisher
def adam_by_hand(grads: list[np.ndarray], b2: float) -> np.ndarray:
    nu = np.zeros_like(grads[0], np.float64)
    for g in grads:
        nu = b2 * nu + (1 - b2) * g.astype(np.float64) ** 2
    return nu / (1 - b2 ** len(grads))


def hand_built_state(b2=0.999, steps=5, inject=True):
    params = {"conv_a": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    if inject:  # as make_optimizer builds it, with b2 among the injected hyperparameters
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b2=b2)
    else:
        opt = optax.adam(1e-3, b2=b2)
    state = opt.init(params)
    rng = np.random.default_rng(0)
    grads = [
        jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        for _ in range(steps)
    ]
    for g in grads:
        _, state = opt.update(g, state, params)
    return params, state, grads


@pytest.mark.parametrize("inject", [True, False])
def test_adam_fisher_is_the_bias_corrected_second_moment(inject):
    b2 = 0.99
    params, state, grads = hand_built_state(b2=b2, steps=7, inject=inject)
    got = adam_fisher(state) if inject else adam_fisher(state, b2=b2)
    for key in ("kernel", "bias"):
        want = adam_by_hand([g["conv_a"][key] for g in grads], b2)
        np.testing.assert_allclose(np.asarray(got["conv_a"][key]), want, rtol=1e-5)
    if not inject:
        with pytest.raises(ValueError, match="b2 is not in the optimiser state"):
            adam_fisher(state)


def test_adam_fisher_refuses_other_optimisers_and_step_zero():
    params = {"w": np.ones(3, np.float32)}
    sgd = optax.sgd(0.1, momentum=0.9)
    with pytest.raises(ValueError, match="no Adam second moment.*not Adam"):
        adam_fisher(sgd.init(params))
    with pytest.raises(ValueError, match="at step 0"):
        adam_fisher(make_optimizer().init(params))


def save_source(path, state: dict) -> str:
    meta = make_meta("train", model={"base_filters": 2}, data={"data_dir": "nowhere"})
    with RunDir.create(str(path), meta) as run:
        run.save(7, state, meta, best=True)
    return str(path)


def test_adam_source_fisher_reads_the_checkpoint(tmp_path):
    params, state, grads = hand_built_state(b2=0.999, steps=5)
    run = save_source(tmp_path / "src", {"params": params, "opt_state": state, "step": np.int32(5)})
    got = to_flat_dict(adam_source_fisher(run))
    for key in ("kernel", "bias"):
        want = adam_by_hand([g["conv_a"][key] for g in grads], 0.999)
        np.testing.assert_allclose(got[f"conv_a/{key}"], want, rtol=1e-5)


def test_adam_source_fisher_one_line_errors(tmp_path):
    params = {"conv_a": {"kernel": np.ones((3, 2), np.float32)}}
    no_state = save_source(tmp_path / "nostate", {"params": params})
    sgd = optax.sgd(0.1, momentum=0.9)
    with_sgd = save_source(tmp_path / "sgd", {"params": params, "opt_state": sgd.init(params)})
    for run, what in ((no_state, "stores no optimiser state"), (with_sgd, "not Adam")):
        with pytest.raises(OptimizerStateError) as e:
            adam_source_fisher(run)
        msg = str(e.value)
        assert isinstance(e.value, UserError) and "\n" not in msg
        assert msg.startswith(f"--fisher=adam: source {run} (checkpoint best/7)") and what in msg
        assert "use --fisher=empirical" in msg


# ---------------------------------------------------------------------------- channel granularity
def channel_tree(rng):
    return {
        "conv_a": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=(4,))},
        "dense_b": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=(3,))},
    }


def test_channel_logits_shapes_and_no_per_element_expansion():
    tree = channel_tree(np.random.default_rng(0))
    logits = init_logits(tree, 3, "channel")
    assert {k: v.shape for k, v in logits.items()} == {"['conv_a']": (4, 3), "['dense_b']": (3, 3)}
    per_leaf = expand_logits(logits, tree, "channel")
    assert per_leaf["conv_a"]["kernel"].shape == (4, 3)  # (C_out, T), never the kernel's shape
    assert layer_channels(tree) == {"['conv_a']": 4, "['dense_b']": 3}
    bad = {"conv_a": {"kernel": np.zeros((3, 4)), "bias": np.zeros(5)}}
    with pytest.raises(ValueError, match="leaf conv_a/kernel has 4 channels.*have 5"):
        init_logits(bad, 2, "channel")
    with pytest.raises(ValueError, match="leaf s is a scalar"):
        init_logits({"s": np.float32(1.0)}, 2, "channel")


def test_channel_granularity_with_equal_logits_equals_layer_granularity():
    rng = np.random.default_rng(1)
    srcs = [jax.tree_util.tree_map(np.float32, channel_tree(rng)) for _ in range(3)]
    fis = [
        jax.tree_util.tree_map(lambda a: np.abs(a).astype(np.float32) + 0.1, channel_tree(rng))
        for _ in range(3)
    ]
    layer = {k: jnp.asarray(rng.normal(size=3), jnp.float32) for k in ("['conv_a']", "['dense_b']")}
    channel = {k: jnp.tile(v, (c, 1)) for (k, v), c in zip(layer.items(), (4, 3))}
    a = imm_merge(srcs, fis, expand_logits(layer, srcs[0], "layer"))
    b = imm_merge(srcs, fis, expand_logits(channel, srcs[0], "channel"))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_channel_merge_matches_numpy_transcription():
    rng = np.random.default_rng(2)
    T = 3
    srcs = [channel_tree(rng) for _ in range(T)]
    fis = [jax.tree_util.tree_map(lambda a: np.abs(a) + 0.05, channel_tree(rng)) for _ in range(T)]
    logits = {"['conv_a']": rng.normal(size=(4, T)) * 2, "['dense_b']": rng.normal(size=(3, T)) * 2}
    with jax.enable_x64(True):
        got = imm_merge(
            [jax.tree_util.tree_map(jnp.asarray, s) for s in srcs],
            [jax.tree_util.tree_map(jnp.asarray, f) for f in fis],
            expand_logits({k: jnp.asarray(v) for k, v in logits.items()}, srcs[0], "channel"),
        )
    for layer, key in (("conv_a", "['conv_a']"), ("dense_b", "['dense_b']")):
        sig = 1 / (1 + np.exp(-logits[key]))
        alpha = sig / sig.sum(axis=1, keepdims=True)  # (C, T)
        for leaf in ("kernel", "bias"):
            th = [s[layer][leaf] for s in srcs]
            f = [x[layer][leaf] for x in fis]
            # element [..., c] of source t is weighted by alpha[c, t]
            num = sum(alpha[:, t] * f[t] * th[t] for t in range(T))
            den = sum(alpha[:, t] * f[t] for t in range(T))
            np.testing.assert_allclose(np.asarray(got[layer][leaf]), num / (den + 1e-8), rtol=1e-10)
    with pytest.raises(
        ValueError, match=r"logits leaf conv_a/bias has shape \(5, 3\).*or \(4, 3\) per channel"
    ):
        imm_merge(
            srcs,
            fis,
            {
                "conv_a": {"kernel": jnp.zeros((4, T)), "bias": jnp.zeros((5, T))},
                "dense_b": {"kernel": jnp.zeros(T), "bias": jnp.zeros(T)},
            },
        )


def test_channel_ratio_summary_and_figure(tmp_path):
    logits = {"conv_enc0_in": {"kernel": jnp.asarray([[0.0, 0.0], [2.0, -2.0]]), "bias": jnp.zeros((2, 2))}}
    ratios = layer_ratios(logits)
    s = 1 / (1 + np.exp(-2.0))
    a1 = s / (s + 1 - s)  # σ(2) / (σ(2) + σ(−2))
    np.testing.assert_allclose(ratios["conv_enc0_in"], [(0.5 + a1) / 2, (0.5 + 1 - a1) / 2], rtol=1e-6)
    spread = layer_ratio_spread(logits)
    np.testing.assert_allclose(spread["conv_enc0_in"], [abs(a1 - 0.5) / 2] * 2, rtol=1e-6)
    assert layer_ratio_spread({"conv_enc0_in": {"kernel": jnp.zeros(2)}}) is None
    png = plot_mixing_ratios(ratios, ["m1", "m2"], str(tmp_path / "r.png"), spread=spread)
    assert open(png, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="spread has shape"):
        plot_mixing_ratios(ratios, ["m1", "m2"], str(tmp_path / "x.png"), spread={"conv_enc0_in": [0.1]})


# ------------------------------------------------------------------------- configuration, run keys
def test_new_fuse_settings_keep_old_run_keys_at_their_defaults():
    old = {
        "method": "timm",
        "imm_mode": "mode",
        "granularity": "layer",
        "fisher": "empirical",
        "fisher_examples": 0,
        "logits_learning_rate": 0.05,
    }  # a FuseConfig before issue 13
    meta = lambda fuse: make_meta("fused", model={"depth": 3}, data={"d": 1}, fuse=fuse)  # noqa: E731
    now = json.loads(json.dumps(FuseConfig().to_dict()))
    assert set(now) - set(old) == {
        "adaption_objective",
        "task_specific_from",
        "fisher_patches",
        "fisher_normalisation",
    }
    new = {k: v for k, v in now.items() if k != "fisher_patches"}  # issue 13's settings
    assert meta(new)["run_key"] == meta(old)["run_key"]
    # the Fisher's examples changed from whole volumes to patches (fisher_patches, keyed): a fusion
    # written before is another configuration, never reused
    assert meta(now)["run_key"] != meta(old)["run_key"]
    for change in (
        {"adaption_objective": "entropy"},
        {"task_specific_from": 0},
        {"fisher": "adam"},
        {"granularity": "channel"},
        {"fisher_normalisation": "layer"},
    ):
        assert meta({**new, **change})["run_key"] != meta(old)["run_key"], change
    assert run_key(meta(new)) == meta(new)["run_key"]


def test_fuse_config_refusals():
    with pytest.raises(ConfigError, match="--adaption_objective=entropy needs --method=timm"):
        FuseConfig(method="imm", adaption_objective="entropy")
    with pytest.raises(ConfigError, match="--task_specific_from must be -1"):
        FuseConfig(task_specific_from=-2)
    with pytest.raises(ConfigError, match="--granularity must be one of"):
        FuseConfig(granularity="element")
    with pytest.raises(ConfigError, match="--fisher must be one of"):
        FuseConfig(fisher="sgd")


def test_task_specific_from_takes_the_source_leaves_of_the_same_shape():
    from timm_jax.core.partition import Partition
    from timm_jax.workflows.fuse import source_task_specific

    fresh = {"norm_a": {"scale": np.ones(4), "bias": np.zeros(4)}, "head0": {"kernel": np.zeros((4, 3))}}
    source = {
        "norm_a": {"scale": np.full(4, 2.0), "bias": np.full(4, 0.5)},
        "head0": {"kernel": np.ones((4, 7))},  # another label set: 7 channels, not 3
        "conv_a": {"kernel": np.ones((3, 4))},  # transferable: not taken
    }
    got = to_flat_dict(source_task_specific(Partition({}, fresh), source, name="m1"))
    assert sorted(got) == ["head0/kernel", "norm_a/bias", "norm_a/scale"]
    np.testing.assert_array_equal(got["norm_a/scale"], np.full(4, 2.0))
    np.testing.assert_array_equal(got["norm_a/bias"], np.full(4, 0.5))
    np.testing.assert_array_equal(got["head0/kernel"], np.zeros((4, 3)))  # kept fresh


def test_fuse_refuses_a_task_specific_source_index_out_of_range(tmp_path):
    from timm_jax.data.spec import DataSpec
    from timm_jax.workflows.fuse import fuse_models

    with pytest.raises(ConfigError, match=r"--task_specific_from=2 names no source \(2 given\)"):
        fuse_models(
            ["a", "b"],
            DataSpec(data_dir="nowhere", layout="brats"),
            str(tmp_path / "out"),
            FuseConfig(task_specific_from=2),
        )
    assert not (tmp_path / "out").exists()
