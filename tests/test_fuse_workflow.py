"""The pieces of the fusion workflow (timm_jax.workflows.fuse) in-process, and layer_order.

Two tiny parcellation sources (base 4, depth 3, one training step) are trained once per module
on a tiny demo data set (6 mm); the fusion target is the 4-channel BraTS task.
"""

import json
import logging
import os
import random
import re
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from _demo import tiny_demo

from timm_jax.config import FuseConfig, ModelConfig, TrainConfig
from timm_jax.core.merge import expand_logits, init_logits
from timm_jax.core.partition import select_like, to_flat_dict
from timm_jax.data.spec import DataSpec, resolve
from timm_jax.errors import CheckpointError
from timm_jax.nn.unet import build_model, init_params, layer_order
from timm_jax.runs.fisher_cache import source_fisher
from timm_jax.runs.models import model_config_for
from timm_jax.training.rundir import RunDir, load_run, make_meta
from timm_jax.workflows.fuse import (
    fuse_models,
    fusion_partition,
    layer_ratios,
    load_sources,
    materialise_fusion,
)
from timm_jax.workflows.train import train_model

NET = ModelConfig(base_filters=4, depth=3)
SCHED = TrainConfig(patch_shape=(16, 16, 16), batch_size=2, steps_per_epoch=1, max_epochs=1)
ADAPT = TrainConfig(patch_shape=(16, 16, 16))
DEPTH = NET.depth

#: network order of the transferable layers for depth 3
ORDER = [
    *(f"conv_enc{l}_{s}" for l in range(DEPTH) for s in ("in", "ctx1", "ctx2")),
    *(f"conv_dec{l}_{s}" for l in range(DEPTH - 2, -1, -1) for s in ("up", "loc1", "loc2")),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuse")
    tiny_demo(tmp / "data", n_parc_task1=4, n_parc_task2=4, n_brats_train=4, n_brats_test=2)
    parc = lambda key: DataSpec(
        data_dir=str(tmp / "data" / "parcellation"), layout="parcellation", task_key=key
    )
    m1, m2 = str(tmp / "runs" / "m1"), str(tmp / "runs" / "m2")
    train_model(parc("task1"), NET, SCHED, m1)
    train_model(parc("task2"), NET, SCHED, m2, init="transfer", init_from=m1)
    target = DataSpec(data_dir=str(tmp / "data" / "brats"), layout="brats", task_key="task3")
    return SimpleNamespace(tmp=tmp, m1=m1, m2=m2, target=target)


@pytest.fixture(scope="module")
def sources(env):
    return load_sources([env.m1, env.m2])


@pytest.fixture(scope="module")
def fishers(env, sources):
    """Both sources' Fishers, computed (the first call of the module)."""
    return [source_fisher(d) for d in sources.dirs]


@pytest.fixture(scope="module")
def target(env, sources):
    """The BraTS target network's fresh params (as fuse_models initialises them) and its partition."""
    model, cfg = build_model(model_config_for(resolve(env.target), sources.model_cfg))
    init_rng, _ = jax.random.split(jax.random.PRNGKey(ADAPT.seed))
    fresh = jax.tree_util.tree_map(
        np.asarray, init_params(model, init_rng, (1, *ADAPT.patch_shape, cfg.in_channels))
    )
    return SimpleNamespace(cfg=cfg, fresh=fresh, part=fusion_partition(fresh, sources))


def fake_run(path, kind: str, model: ModelConfig) -> str:
    meta = make_meta(kind, model=model, data={"data_dir": "nowhere"})
    with RunDir.create(str(path), meta) as run:
        run.save(0, {"params": {"conv_enc0_in": {"bias": np.zeros(2, np.float32)}}}, meta, best=True)
    return str(path)


def assert_trees_equal(a: dict, b: dict) -> None:
    fa, fb = to_flat_dict(a), to_flat_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def ratios_of(beta) -> np.ndarray:
    """α = σ(β) / Σ σ(β), written out in NumPy."""
    s = 1.0 / (1.0 + np.exp(-np.asarray(beta, np.float64)))
    return s / s.sum()


def mode_imm(sources, fishers, keys, alpha_of) -> dict:
    """NumPy transcription of mode-IMM: θ = Σ α F θ / (Σ α F + 1e-8), per leaf ``keys``."""
    thetas = [to_flat_dict(p) for p in sources.params]
    fs = [to_flat_dict(f) for f in fishers]
    out = {}
    for k in keys:
        alpha = alpha_of(k)
        num = sum(a * f[k].astype(np.float64) * t[k].astype(np.float64) for a, f, t in zip(alpha, fs, thetas))
        den = sum(a * f[k].astype(np.float64) for a, f in zip(alpha, fs))
        out[k] = num / (den + 1e-8)
    return out


def uniform(_key):
    return [0.5, 0.5]


# ---------------------------------------------------------------------------- load_sources


def test_load_sources(env, sources):
    assert sources.names == ["m1", "m2"]
    assert sources.dirs == [os.path.abspath(env.m1), os.path.abspath(env.m2)]
    assert [m["kind"] for m in sources.metas] == ["train", "train"]
    assert (sources.model_cfg.base_filters, sources.model_cfg.depth, sources.model_cfg.in_channels) == (
        4,
        3,
        2,
    )
    for d, p, m in zip(sources.dirs, sources.params, sources.metas):
        want, want_meta = load_run(d)
        assert m == want_meta
        assert_trees_equal(p, want)
    req = sources.request()
    assert req[0] == [sources.dirs[0], sources.metas[0]["run_key"], 1]
    assert req[0][1] != req[1][1]
    # a trailing slash does not change the short name
    assert load_sources([env.m1 + os.sep]).names == ["m1"]


def test_load_sources_refusals(env, tmp_path):
    other = fake_run(
        tmp_path / "narrow", "train", ModelConfig(in_channels=2, out_channels=8, base_filters=2, depth=3)
    )
    with pytest.raises(CheckpointError, match="another architecture") as e:
        load_sources([env.m1, other])
    assert other in str(e.value) and "base 2" in str(e.value)
    fused = fake_run(tmp_path / "fused", "fused", NET)
    with pytest.raises(CheckpointError, match="--source") as e:
        load_sources([env.m1, fused])
    assert "'fused'" in str(e.value) and fused in str(e.value)
    with pytest.raises(CheckpointError, match="--source .*does not exist"):
        load_sources([str(tmp_path / "missing"), env.m1])
    with pytest.raises(CheckpointError, match="at least one --source"):
        load_sources([])


# ---------------------------------------------------------------------------- source_fisher


def test_source_fisher_and_its_cache(env, sources, fishers, log):
    for params, fisher in zip(sources.params, fishers):
        fp, ff = to_flat_dict(params), to_flat_dict(fisher)
        assert sorted(ff) == sorted(fp)
        for k, f in ff.items():
            assert isinstance(f, np.ndarray) and f.dtype == np.float32, k
            assert f.shape == fp[k].shape, k
            assert np.all(np.isfinite(f)) and np.all(f >= 0), k
        assert sum(float(f.sum()) for f in ff.values()) > 0
    cache = os.path.join(env.m1, "fisher", "fisher_empirical.npz")
    mtime = os.stat(cache).st_mtime_ns
    again = source_fisher(env.m1)
    assert "cached" in log.text and cache in log.text
    assert_trees_equal(again, fishers[0])
    assert os.stat(cache).st_mtime_ns == mtime
    # other settings are not served from the cache
    log.clear()
    one = source_fisher(env.m1, max_examples=1)
    assert "cached" not in log.text and "on 4 patches 16x16x16 of 1 training cases" in log.text
    ff, fo = to_flat_dict(fishers[0]), to_flat_dict(one)
    assert any(not np.array_equal(ff[k], fo[k]) for k in ff)
    log.clear()
    assert_trees_equal(source_fisher(env.m1), fishers[0])  # recomputed for the original settings
    assert "cached" not in log.text
    with pytest.raises(ValueError, match="Fisher kind"):
        source_fisher(env.m1, kind="observed")


def test_corrupt_fisher_cache_is_recomputed(env, fishers, log):
    cache = os.path.join(env.m2, "fisher", "fisher_empirical.npz")
    with open(cache, "wb") as f:
        f.write(b"garbage")
    got = source_fisher(env.m2)
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert any("unreadable" in w and "recomputing" in w and cache in w for w in warnings)
    assert_trees_equal(got, fishers[1])
    log.clear()
    assert_trees_equal(source_fisher(env.m2), fishers[1])
    assert "cached" in log.text  # the recomputed cache is valid again


def test_truncated_fisher_cache_is_recomputed(env, fishers):
    cache = os.path.join(env.m2, "fisher", "fisher_empirical.npz")
    good = open(cache, "rb").read()
    try:
        with open(cache, "wb") as f:
            f.write(good[: len(good) // 2])
        assert_trees_equal(source_fisher(env.m2), fishers[1])
    finally:
        with open(cache, "wb") as f:
            f.write(good)


def test_fuse_refuses_non_finite_fisher_by_source_and_leaf(env, fishers, tmp_path):
    """A cached Fisher with NaN / Inf / negative entries is a CheckpointError naming source and leaf."""
    cache = os.path.join(env.m2, "fisher", "fisher_empirical.npz")
    good = open(cache, "rb").read()
    try:
        for bad, found in ((np.nan, r"non-finite values \(1 NaN of"), (-1.0, "negative values")):
            with np.load(cache) as z:
                flat = {k: z[k] for k in z.files}
            kernel = flat["conv_enc1_ctx1/kernel"].copy()
            kernel.flat[3] = bad
            with open(cache, "wb") as f:
                np.savez(f, **{**flat, "conv_enc1_ctx1/kernel": kernel})
            source = rf"Fisher of source {re.escape(env.m2)} \(index 1\)"
            match = rf"{source}: leaf conv_enc1_ctx1/kernel has {found}"
            with pytest.raises(CheckpointError, match=match):
                fuse_models(
                    [env.m1, env.m2], env.target, str(tmp_path / "out"), FuseConfig(method="imm"), ADAPT
                )
    finally:
        with open(cache, "wb") as f:
            f.write(good)


# ---------------------------------------------------------------------------- partition, merge


def test_fusion_partition(sources, target):
    part = target.part
    fresh, tr, ts = (
        to_flat_dict(target.fresh),
        to_flat_dict(part.transferable),
        to_flat_dict(part.task_specific),
    )
    assert not set(tr) & set(ts)
    assert set(tr) | set(ts) == set(fresh)
    # 4 BraTS modalities vs 2 parcellation ones: the first kernel does not fit
    assert target.cfg.in_channels == 4 and sources.model_cfg.in_channels == 2
    assert "conv_enc0_in/kernel" in part.mismatched
    assert "conv_enc0_in/kernel" in ts and "conv_enc0_in/kernel" not in tr
    assert ts["conv_enc0_in/kernel"].shape == (3, 3, 3, 4, 4)
    assert "conv_enc0_in/bias" in tr
    src = to_flat_dict(sources.params[0])
    for k in part.mismatched:
        assert k in ts and fresh[k].shape != src[k].shape, k
    for k in fresh:
        if k.startswith(("norm_", "head")):
            assert k in ts, k
        elif k != "conv_enc0_in/kernel":
            assert k.startswith("conv_") and k in tr, k
    assert len(tr) == 2 * len(ORDER) - 1
    for k in ts:
        np.testing.assert_array_equal(ts[k], fresh[k])


def test_materialise_fusion_is_mode_imm(sources, fishers, target):
    part = target.part
    src_tr = [select_like(p, part.transferable) for p in sources.params]
    f_tr = [select_like(f, part.transferable) for f in fishers]
    logits = init_logits(part.transferable, 2, "layer")
    got = to_flat_dict(materialise_fusion(src_tr, f_tr, logits, part.task_specific, "layer"))
    tr, ts = to_flat_dict(part.transferable), to_flat_dict(part.task_specific)
    assert sorted(got) == sorted(to_flat_dict(target.fresh))
    want = mode_imm(sources, fishers, tr, uniform)
    for k in tr:
        assert got[k].dtype == np.float32 and got[k].shape == tr[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7, err_msg=k)
    for k in ts:
        np.testing.assert_array_equal(got[k], ts[k], err_msg=k)
    # the Fisher weighting matters: somewhere the result is not the plain average
    thetas = [to_flat_dict(p) for p in sources.params]
    assert any(not np.allclose(got[k], (thetas[0][k] + thetas[1][k]) / 2, rtol=1e-3) for k in tr)
    # per-layer logits reach every leaf of their layer (kernel and bias), and only those
    key = next(k for k in logits if "'conv_enc1_ctx1'" in k)
    beta = np.array([1.5, -0.5], np.float32)
    logits = {**logits, key: beta}
    got = to_flat_dict(materialise_fusion(src_tr, f_tr, logits, part.task_specific, "layer"))
    want = mode_imm(
        sources, fishers, tr, lambda k: ratios_of(beta) if k.startswith("conv_enc1_ctx1/") else [0.5, 0.5]
    )
    for k in ("conv_enc1_ctx1/kernel", "conv_enc1_ctx1/bias", "conv_enc1_ctx2/kernel", "conv_enc0_in/bias"):
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7, err_msg=k)
    assert not np.allclose(
        got["conv_enc1_ctx1/kernel"], mode_imm(sources, fishers, tr, uniform)["conv_enc1_ctx1/kernel"]
    )


# ---------------------------------------------------------------------------- ratios, order


def test_layer_ratios_in_network_order(target):
    part = target.part
    conv_layers = {k.split("/")[0] for k in to_flat_dict(target.fresh) if k.startswith("conv_")}
    assert set(ORDER) == conv_layers
    logits = init_logits(part.transferable, 2, "layer")
    key = next(k for k in logits if "'conv_dec1_loc1'" in k)
    logits = {**logits, key: np.array([-1.0, 2.0], np.float32)}
    ratios = layer_ratios(expand_logits(logits, part.transferable, "layer"))
    assert list(ratios) == ORDER
    for name, row in ratios.items():
        assert len(row) == 2 and abs(sum(row) - 1) < 1e-6, name
        want = ratios_of([-1.0, 2.0]) if name == "conv_dec1_loc1" else [0.5, 0.5]
        np.testing.assert_allclose(row, want, rtol=1e-5, err_msg=name)
    # per leaf: a layer's ratios are its kernel's, else (conv_enc0_in: bias only) its first leaf's
    leaf = init_logits(part.transferable, 2, "leaf")
    leaf["conv_enc1_in"] = {
        "kernel": np.array([2.0, 0.0], np.float32),
        "bias": np.array([0.0, 2.0], np.float32),
    }
    leaf["conv_enc0_in"] = {"bias": np.array([-1.0, 1.0], np.float32)}
    ratios = layer_ratios(leaf)
    assert list(ratios) == ORDER
    np.testing.assert_allclose(ratios["conv_enc1_in"], ratios_of([2.0, 0.0]), rtol=1e-5)
    np.testing.assert_allclose(ratios["conv_enc0_in"], ratios_of([-1.0, 1.0]), rtol=1e-5)


def test_layer_order():
    names = [*ORDER, "head1", "mystery", "head0"]
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != names
    assert layer_order(shuffled) == [*ORDER, "head0", "head1", "mystery"]
    assert layer_order(list(reversed(ORDER))) == ORDER
    # levels compare as numbers; deeper decoder levels come first
    assert layer_order(["conv_dec2_up", "conv_enc10_in", "conv_dec10_up", "conv_enc2_in"]) == [
        "conv_enc2_in",
        "conv_enc10_in",
        "conv_dec10_up",
        "conv_dec2_up",
    ]
    assert layer_order([]) == []


# ---------------------------------------------------------------------------- fuse_models


def snapshot(root) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_fuse_models_imm(env, sources, fishers, target, log):
    out = str(env.tmp / "imm")
    meta = fuse_models([env.m1, env.m2], env.target, out, FuseConfig(method="imm"), ADAPT)
    assert meta["kind"] == "fused" and meta["fuse"]["method"] == "imm" and meta["fuse"]["imm_mode"] == "mode"
    assert meta["train"] is None and meta["adaption"] == {}
    assert "conv_enc0_in/kernel" in meta["mismatched"]
    assert [s[0] for s in meta["sources"]] == sources.dirs
    assert "shape-mismatched: conv_enc0_in/kernel" in log.text
    with RunDir.open(out) as run:
        assert run.kind == "fused"
    with pytest.raises(CheckpointError, match="'fused' run directory"):
        RunDir.open(out, kinds=("train",))
    params, stored = load_run(out, kinds=("fused",))
    assert stored == json.loads(json.dumps(meta))
    # the checkpoint: mode-IMM of the sources on 𝒫, fresh task-specific leaves
    got, fresh = to_flat_dict(params), to_flat_dict(target.fresh)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in fresh.items()}
    tr = to_flat_dict(target.part.transferable)
    want = mode_imm(sources, fishers, tr, uniform)
    for k in tr:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7, err_msg=k)
    src = to_flat_dict(sources.params[0])
    assert not np.allclose(src["norm_enc0_in/scale"], 1.0)
    np.testing.assert_array_equal(got["norm_enc0_in/scale"], np.ones_like(fresh["norm_enc0_in/scale"]))
    # the mixing ratios: uniform, per layer, in network order
    mixing = json.loads(open(os.path.join(out, "mixing_ratios.json")).read())
    assert mixing["sources"] == ["m1", "m2"]
    assert list(mixing["ratios"]) == ORDER and meta["ratios"] == mixing["ratios"]
    assert all(np.allclose(r, [0.5, 0.5]) for r in mixing["ratios"].values())
    lines = open(os.path.join(out, "mixing_ratios.csv")).read().splitlines()
    assert lines[0] == "layer,m1,m2" and lines[1] == "conv_enc0_in,0.500000,0.500000"
    assert [line.split(",")[0] for line in lines[1:]] == ORDER
    with open(os.path.join(out, "mixing_ratios.png"), "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    # the same request again: the stored result, nothing recomputed
    before = snapshot(os.path.join(out, "checkpoints"))
    ratios_mtime = os.stat(os.path.join(out, "mixing_ratios.json")).st_mtime_ns
    log.clear()
    again = fuse_models([env.m1, env.m2], env.target, out, FuseConfig(method="imm"), ADAPT)
    assert again == stored
    assert "already holds this fusion" in log.text and "Fisher of" not in log.text
    assert snapshot(os.path.join(out, "checkpoints")) == before
    assert os.stat(os.path.join(out, "mixing_ratios.json")).st_mtime_ns == ratios_mtime
    # another request in the same directory is refused before anything is computed
    log.clear()
    with pytest.raises(CheckpointError, match="another configuration") as e:
        fuse_models([env.m1, env.m2], env.target, out, FuseConfig(method="imm", imm_mode="mean"), ADAPT)
    assert out in str(e.value)
    assert "Fisher of" not in log.text
    assert snapshot(os.path.join(out, "checkpoints")) == before
    assert load_run(out)[1] == stored


def test_fuse_models_mean_imm(env, sources, target, log):
    out = str(env.tmp / "mean")
    meta = fuse_models([env.m1, env.m2], env.target, out, FuseConfig(method="imm", imm_mode="mean"), ADAPT)
    assert meta["fuse"]["imm_mode"] == "mean"
    assert "Fisher of" not in log.text  # mean-IMM needs no Fisher
    got, _ = load_run(out, kinds=("fused",))
    got, thetas = to_flat_dict(got), [to_flat_dict(p) for p in sources.params]
    for k in to_flat_dict(target.part.transferable):
        np.testing.assert_allclose(got[k], (thetas[0][k] + thetas[1][k]) / 2, rtol=1e-6, atol=1e-8, err_msg=k)


def test_fuse_models_entropy_adam_channel(env, sources, target, monkeypatch, log):
    """The three options beyond the paper through fuse_models: the entropy stage sees no labels and
    trains only the logits; the Fisher is each source checkpoint's bias-corrected Adam ν; the merge
    has one ratio vector per output channel (checked against a NumPy mode-IMM)."""
    import timm_jax.workflows.fuse as fuse_module
    from timm_jax.training.rundir import read_metrics

    seen = []
    real = fuse_module.train_batches

    def spy(cases, task, cfg, dp):
        seen.append(([np.asarray(c.labels) for c in cases], cfg.foreground_rate))
        return real(cases, task, cfg, dp)

    monkeypatch.setattr(fuse_module, "train_batches", spy)
    cfg = FuseConfig(method="timm", adaption_objective="entropy", fisher="adam", granularity="channel")
    out = str(env.tmp / "entropy_adam_channel")
    meta = fuse_models([env.m1, env.m2], env.target, out, cfg, ADAPT.replace(steps_per_epoch=2, max_epochs=1))
    labels, foreground_rate = seen[0]
    assert labels and all(not lab.any() for lab in labels) and foreground_rate == 0.0
    assert meta["adaption"]["objective"] == "entropy" and meta["fuse"]["fisher"] == "adam"
    assert "Adam second moment" in log.text and "(empirical) on" not in log.text
    assert np.isnan(read_metrics(os.path.join(out, "adaption"))[0]["val_dice_mean"])
    params, _ = load_run(out, kinds=("fused",))
    got, fresh = to_flat_dict(params), to_flat_dict(target.fresh)
    for k in to_flat_dict(target.part.task_specific):  # frozen during the entropy stage
        np.testing.assert_array_equal(got[k], fresh[k], err_msg=k)
    # the Fishers by hand from the source checkpoints, the per-channel ratios from the best logits
    fishers = []
    for d in sources.dirs:
        with RunDir.open(d) as run:
            state, _ = run.restore(None, run.best_or_latest())
        adam = state["opt_state"]["inner_state"][0]
        b2, t = float(state["opt_state"]["hyperparams"]["b2"]), int(adam["count"])
        correction = 1 - b2**t
        fishers.append(
            jax.tree_util.tree_map(lambda v, c=correction: np.asarray(v, np.float64) / c, adam["nu"])
        )
    with RunDir.open(os.path.join(out, "adaption")) as run:
        best, _ = run.restore(None, "best")
    logits = {k: np.asarray(v, np.float64) for k, v in best["params"]["logits"].items()}
    assert {k: v.shape for k, v in logits.items()}["['conv_enc1_in']"] == (8, 2)  # (C_out, T)

    def alpha_of(key):
        s = 1 / (1 + np.exp(-logits[f"['{key.split('/')[0]}']"]))
        return list((s / s.sum(axis=1, keepdims=True)).T)  # per source, a (C_out,) vector

    tr = to_flat_dict(target.part.transferable)
    want = mode_imm(sources, fishers, tr, alpha_of)
    for k in tr:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-7, err_msg=k)
    mixing = json.loads(open(os.path.join(out, "mixing_ratios.json")).read())
    assert list(mixing["ratio_sd_over_channels"]) == ORDER
