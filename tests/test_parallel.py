"""Data parallelism: the sharded train step, adaption step, Fisher and sliding-window inference on
1, 2 and 4 fake CPU devices (tests/conftest.py forces 4) equal the single-device computation on
the same global batch; per-process shares of the input pipeline; clear errors.

The steps here use plain SGD, so the parameters after 3 steps are a linear function of the
gradients and agree leaf by leaf to 1e-5 relative. (Adam divides every gradient component by its
own running magnitude, which turns the float-rounding differences of components whose gradient is
≈ 0 — above all the conv biases in front of an instance norm, whose gradient is exactly zero in
exact arithmetic — into differences of a sizeable fraction of a learning-rate step; the Adam runs
of train.py are compared accordingly in tests/test_parallel_cli.py.)
"""

import functools

import jax
import numpy as np
import optax
import pytest

from timm_jax.config import DeviceConfig, ModelConfig
from timm_jax.core.fisher import fisher_diagonal, segmentation_log_likelihood
from timm_jax.core.merge import init_logits
from timm_jax.core.partition import split
from timm_jax.data.pipeline import make_train_batches
from timm_jax.errors import ConfigError
from timm_jax.nn.unet import build_model, init_params
from timm_jax.training.inference import sliding_window_predict
from timm_jax.training.parallel import DataParallel, make_mesh
from timm_jax.training.steps import (
    create_state,
    make_adaption_step,
    make_optimizer,
    make_train_step,
)

B, PATCH, C_IN, C_OUT = 4, (8, 8, 8), 2, 2


def tiny(impl="native"):
    cfg = ModelConfig(in_channels=C_IN, out_channels=C_OUT, base_filters=4, depth=2, conv_impl=impl)
    return build_model(cfg)[0]


def batches(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((B, *PATCH, C_IN)).astype(np.float32)
        out.append({"image": x, "target": (x[..., :C_OUT] > 0.3).astype(np.float32)})
    return out


def flat(tree) -> dict:
    return {
        "/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_same_params(got, want, rtol=1e-5):
    g, w = flat(got), flat(want)
    assert g.keys() == w.keys()
    for k in w:
        np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=1e-7, err_msg=k)


def dp_on(n):
    return DataParallel(None) if n == 0 else DataParallel(make_mesh(n))


@functools.lru_cache
def train_run(n):
    """Params and losses after 3 SGD steps on ``n`` devices (0: no mesh); checks the shardings."""
    model = tiny()
    params = jax.device_get(init_params(model, jax.random.PRNGKey(0), (1, *PATCH, C_IN)))
    opt = optax.sgd(0.1)
    dp = dp_on(n)
    state = dp.replicate(create_state(params, opt, jax.random.PRNGKey(1)))
    step = make_train_step(model, opt, mesh=dp.mesh)
    losses = []
    for b in batches():
        state, m = step(state, dp.shard(b))
        losses.append(float(m["loss"]))
    if dp.mesh is not None:  # state and loss stay replicated over the mesh
        assert state.params["head0"]["kernel"].sharding.is_fully_replicated
        assert m["loss"].sharding.is_fully_replicated
    return params, jax.device_get(state.params), losses


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sharded_train_step_equals_single_device(n):
    init, want, want_losses = train_run(0)
    _, got, losses = train_run(n)
    assert_same_params(got, want)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    moved = np.abs(flat(want)["head0/kernel"] - flat(init)["head0/kernel"]).max()
    assert moved > 1e-3, "the parameters did not move: the comparison would be vacuous"


@functools.lru_cache
def adaption_run(n):
    """Logits and task-specific leaves after 3 SGD adaption steps on ``n`` devices (0: no mesh)."""
    model = tiny()
    shape = (1, *PATCH, C_IN)
    parts = [split(jax.device_get(init_params(model, jax.random.PRNGKey(k), shape))) for k in range(2)]
    sources = [p.transferable for p in parts]
    rng = np.random.default_rng(3)
    fishers = [jax.tree_util.tree_map(lambda a: rng.random(a.shape).astype(np.float32), s) for s in sources]
    opt = optax.multi_transform(
        {"logits": optax.sgd(10.0), "task": optax.sgd(0.1)}, {"logits": "logits", "task": "task"}
    )
    trainable = jax.device_get(
        {"logits": init_logits(sources[0], 2, "layer"), "task": parts[0].task_specific}
    )
    dp = dp_on(n)
    state = dp.replicate(create_state(trainable, opt, jax.random.PRNGKey(1)))
    src, fis = dp.replicate(sources), dp.replicate(fishers)
    step = make_adaption_step(model, opt, granularity="layer", mesh=dp.mesh)
    for b in batches():
        state, _ = step(state, src, fis, dp.shard(b))
    return jax.device_get(state.params)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_sharded_adaption_step_equals_single_device(n):
    want = adaption_run(0)
    # the mixing logits and the task-specific leaves (norms, heads): all gradients non-trivial
    assert_same_params(adaption_run(n), want)
    moved = np.abs(jax.tree_util.tree_leaves(want["logits"])[0]).max()
    assert moved > 1e-3, "the logits did not move: the comparison would be vacuous"


@pytest.mark.parametrize("n, impl", [(2, "native"), (4, "native"), (4, "direct")])
def test_per_example_fisher_of_the_unet_on_a_mesh_equals_single_device(n, impl):
    """Also with the C++ kernels (``direct``: 8 base filters, so that they apply), whose custom
    VJPs must keep the device-varying type inside shard_map."""
    model = build_model(
        ModelConfig(in_channels=C_IN, out_channels=C_OUT, base_filters=8, depth=2, conv_impl=impl)
    )[0]
    params = init_params(model, jax.random.PRNGKey(0), (1, *PATCH, C_IN))
    ll = segmentation_log_likelihood(lambda p, x: model.apply({"params": p}, x))
    data = batches(2, seed=4)
    pairs = [(b["image"], b["target"]) for b in data]
    want = fisher_diagonal(ll, params, pairs, chunk_size=1)
    got = fisher_diagonal(ll, params, pairs, chunk_size=n, mesh=make_mesh(n))
    g, w = flat(got), flat(want)
    for k in w:
        np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-5 * np.abs(w[k]).max() + 1e-30)


def test_sliding_window_on_a_mesh_equals_single_device():
    model = tiny()
    params = init_params(model, jax.random.PRNGKey(0), (1, *PATCH, C_IN))
    image = np.random.default_rng(5).standard_normal((13, 10, 12, C_IN)).astype(np.float32)
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    want = sliding_window_predict(fn, params, image, patch_shape=PATCH, overlap=0.5, batch_size=4)
    dp = dp_on(4)
    got = sliding_window_predict(
        fn, dp.replicate(params), image, patch_shape=PATCH, overlap=0.5, batch_size=4, mesh=dp.mesh
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    whole = sliding_window_predict(fn, dp.replicate(params), image, patch_shape=None, divisor=2, mesh=dp.mesh)
    np.testing.assert_allclose(
        whole, sliding_window_predict(fn, params, image, patch_shape=None, divisor=2), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="multiple of the mesh's 4 devices"):
        sliding_window_predict(fn, params, image, patch_shape=PATCH, batch_size=3, mesh=dp.mesh)


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_reads_its_rows_of_the_same_global_batches(processes):
    from timm_jax.data.io import Case
    from timm_jax.data.tasks import brats_regions

    rng = np.random.default_rng(0)
    cases = [
        Case(
            f"c{i}",
            rng.standard_normal((12, 12, 12, 4)).astype(np.float32),
            rng.choice([0, 1, 2, 4], size=(12, 12, 12)).astype(np.int16),
            np.eye(4),
            ("t1", "t1ce", "t2", "flair"),
        )
        for i in range(3)
    ]
    kw = dict(patch_shape=(8, 8, 8), batch_size=4, seed=7)
    full = make_train_batches(cases, brats_regions(), **kw, num_steps=5)
    shares = [
        make_train_batches(
            cases, brats_regions(), **kw, num_steps=5, process_index=p, process_count=processes
        )
        for p in range(processes)
    ]
    for s in range(5):
        joined = np.concatenate([sh[s]["image"] for sh in shares])
        np.testing.assert_array_equal(joined, full[s]["image"])
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        make_train_batches(cases, brats_regions(), **kw, process_index=0, process_count=3)


def test_a_batch_that_does_not_divide_over_the_devices_is_a_config_error():
    dp = DataParallel.setup(DeviceConfig(num_devices=4))
    assert dp.num_devices == 4 and dp.check_batch(8) == 8
    with pytest.raises(ConfigError, match=r"--batch_size=6 does not divide over the 4 devices"):
        dp.check_batch(6)
    with pytest.raises(ConfigError, match="--num_devices=5 but only 4 device"):
        make_mesh(5)
    assert DataParallel.setup(DeviceConfig()).num_devices == len(jax.devices())
    assert DataParallel.setup(None).mesh is None


def test_bfloat16_activations_keep_float32_parameters_logits_and_optimiser():
    f32, bf16 = (
        build_model(ModelConfig(in_channels=C_IN, out_channels=C_OUT, base_filters=4, depth=2, precision=p))[
            0
        ]
        for p in ("float32", "bfloat16")
    )
    params = jax.device_get(init_params(bf16, jax.random.PRNGKey(0), (1, *PATCH, C_IN)))
    assert {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype("float32")}
    x = batches(1)[0]["image"]
    y16, y32 = (np.asarray(m.apply({"params": params}, x)) for m in (bf16, f32))
    assert y16.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: close to, but not equal to, the float32 network
    assert 0 < np.abs(y16 - y32).max() <= 0.05 * np.abs(y32).max()
    opt = make_optimizer(1e-3)
    state = create_state(params, opt, jax.random.PRNGKey(1))
    state, m = make_train_step(bf16, opt)(state, batches(1)[0])
    assert np.isfinite(float(m["loss"])) and np.asarray(m["loss"]).dtype == np.float32
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    assert {np.asarray(x).dtype for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating)} == {
        np.dtype("float32")
    }


def test_auto_convolution_is_native_off_cpu(monkeypatch):
    from timm_jax.nn.unet import resolve_conv_impl

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_conv_impl("auto") == "native"
    with pytest.raises(ValueError, match="needs the CPU backend"):
        resolve_conv_impl("direct")
