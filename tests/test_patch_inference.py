"""Every consumer predicts at the training patch: evaluation, validation, the adaption stage, the Fisher.

A small network is trained on 16³ patches of 24×32×24-voxel tumour cases (the tiny demo data set at
6 mm), so its training patch is smaller than the volume: one-pass whole-volume prediction is then a
different function (instance norm sees the statistics of the padded volume, not of a patch).
"""

import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from _demo import tiny_demo

from timm_jax.config import EvalConfig, FuseConfig, ModelConfig, TrainConfig
from timm_jax.core.fisher import segmentation_log_likelihood
from timm_jax.core.partition import to_flat_dict
from timm_jax.data.pipeline import PatchSampler
from timm_jax.data.spec import DataSpec, resolve
from timm_jax.errors import CheckpointError
from timm_jax.runs.fisher_cache import fisher_patches, source_fisher
from timm_jax.runs.models import load_model, training_patch
from timm_jax.training.inference import sliding_window_predict
from timm_jax.training.rundir import RunDir, read_metrics
from timm_jax.workflows.evaluate import _inference_patch, evaluate_model
from timm_jax.workflows.fuse import fuse_models
from timm_jax.workflows.train import train_model

PATCH = (16, 16, 16)
NET = ModelConfig(base_filters=4, depth=3)
SCHED = TrainConfig(patch_shape=PATCH, batch_size=2, steps_per_epoch=3, max_epochs=3, learning_rate=3e-3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("patch")
    tiny_demo(tmp / "data", n_brats_train=3, n_brats_val=2, n_brats_test=2)
    spec = DataSpec(data_dir=str(tmp / "data" / "brats"), layout="brats", task_key="task3")
    run = str(tmp / "runs" / "t3")
    train_model(spec, NET, SCHED, run)
    return SimpleNamespace(tmp=tmp, spec=spec, run=run)


def test_evaluation_predicts_with_sliding_windows_at_the_training_patch(env, tmp_path):
    """The default evaluation (what evaluate.py runs without --patch) equals an explicit
    sliding-window prediction at the training patch voxel for voxel, and differs from one pass."""
    out = tmp_path / "eval"
    evaluate_model(env.run, EvalConfig(split="test", save_predictions=True, hd95=False), out_dir=str(out))
    _, model, cfg, params, meta = load_model(env.run)
    assert training_patch(meta) == PATCH
    data = resolve(env.spec)
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    rows = {r["case"]: r for r in _csv(out / "per_case.csv")}
    differs = 0
    for cid, case in zip(data.splits["test"], data.load(data.splits["test"])):
        assert any(s > p for s, p in zip(case.image.shape[:3], PATCH))  # the patch is smaller
        windows = sliding_window_predict(fn, params, case.image, patch_shape=PATCH, overlap=0.5)
        whole = sliding_window_predict(fn, params, case.image, patch_shape=None, divisor=cfg.divisor)
        saved = np.asarray(nib.load(str(out / "predictions" / f"{cid}.nii.gz")).dataobj)
        np.testing.assert_array_equal(saved, data.task.decode(windows))
        assert float(rows[cid]["dice_mean"]) == pytest.approx(
            np.mean(
                [_dice(windows[..., k] > 0.5, data.task.targets(case.labels)[..., k] > 0.5) for k in range(3)]
            )
        )
        assert float(np.abs(windows - whole).max()) > 1e-3
        differs += int(np.any(data.task.decode(whole) != saved))
    assert differs, "one-pass whole-volume labels equal the sliding-window labels on every case"


def test_validation_dice_is_evaluate_split_val_on_the_best_checkpoint(env):
    """One inference, not two: metrics.jsonl's validation Dice at the best epoch is what
    evaluate.py --split=val reports for the best checkpoint."""
    history = read_metrics(env.run)
    with RunDir.open(env.run) as run:
        best_epoch = run.meta["run"]["best_epoch"]
    best = next(r for r in history if r["epoch"] == best_epoch)
    summary = evaluate_model(env.run, EvalConfig(split="val", hd95=False))
    assert summary["metrics"]["dice_mean"]["mean"] == pytest.approx(best["val_dice_mean"], abs=1e-4)
    for k, c in enumerate(("WT", "TC", "ET")):
        assert summary["metrics"][f"dice_{c}"]["mean"] == pytest.approx(best["val_dice"][k], abs=1e-4)


def test_adaption_stage_validation_is_evaluate_on_the_fused_params(env):
    """The adaption stage validates the fused parameters as evaluate.py predicts them: its best
    epoch's validation Dice equals evaluate.py --split=val on the fused run (its materialised best
    epoch)."""
    out = str(env.tmp / "runs" / "fused")
    adapt = SCHED.replace(max_epochs=2, steps_per_epoch=2)
    fuse_models([env.run], env.spec, out, FuseConfig(method="timm", fisher_patches=1), adapt)
    history = read_metrics(os.path.join(out, "adaption"))
    with RunDir.open(os.path.join(out, "adaption")) as run:
        best_epoch = run.meta["run"]["best_epoch"]
    best = next(r for r in history if r["epoch"] == best_epoch)
    summary = evaluate_model(out, EvalConfig(split="val", hd95=False))
    assert summary["metrics"]["dice_mean"]["mean"] == pytest.approx(best["val_dice_mean"], abs=1e-4)


def test_fisher_is_the_mean_squared_gradient_over_training_patches(env):
    """source_fisher equals an explicit loop over the patches the source's sampler draws: k per case,
    the training patch shape, one jax.grad per patch."""
    got = source_fisher(env.run, max_examples=2, patches_per_case=2)
    _, model, _, params, meta = load_model(env.run)
    data = resolve(env.spec)
    cases = data.load(meta["train_ids"][:2])
    train_cfg = TrainConfig.from_dict(meta["train"])
    patches = list(fisher_patches(cases, data.task, train_cfg, 2))
    assert len(patches) == 4 and all(x.shape == (1, *PATCH, 4) for x, _ in patches)
    sampler = PatchSampler(cases, data.task, PATCH, seed=0, foreground_rate=train_cfg.foreground_rate)
    assert sorted(sampler.case_index(i) for i in range(4)) == [0, 0, 1, 1]  # each case twice
    ll = segmentation_log_likelihood(lambda p, x: model.apply({"params": p}, x))
    grad = jax.jit(jax.grad(ll))
    acc = None
    for x, y in patches:
        g = grad(jax.tree_util.tree_map(jnp.asarray, params), x[0], y[0])
        sq = {k: np.asarray(v, np.float64) ** 2 for k, v in to_flat_dict(g).items()}
        acc = sq if acc is None else {k: acc[k] + sq[k] for k in acc}
    ref = {k: v / len(patches) for k, v in acc.items()}
    flat = to_flat_dict(got)
    # the biases of convolutions followed by an instance norm are inert (their gradient is float
    # rounding noise, ~1e-9 here): an absolute floor far below the Fisher's scale
    floor = 1e-6 * max(float(v.max()) for v in ref.values())
    for k in ref:
        np.testing.assert_allclose(flat[k], ref[k], rtol=2e-4, atol=floor, err_msg=k)


def test_a_whole_volume_fisher_cache_is_recomputed_not_reused(env, log):
    """A Fisher cache as written before the Fisher was computed on patches (keyed only by step,
    kind, max_examples and run key) is of another setting: recomputed, never served."""
    with RunDir.open(env.run) as run:
        step = run.latest_step(run.best_or_latest())
        run_key = run.meta["run_key"]
    _, _, _, params, _ = load_model(env.run)
    cache = os.path.join(env.run, "fisher", "fisher_empirical.npz")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    old_key = {"step": step, "kind": "empirical", "max_examples": 0, "run_key": run_key}
    stale = {k: np.full(np.shape(v), 7.0, np.float32) for k, v in to_flat_dict(params).items()}
    with open(cache, "wb") as f:
        np.savez(f, __key__=json.dumps(old_key), **stale)
    log.clear()
    got = to_flat_dict(source_fisher(env.run, patches_per_case=1))
    assert "of another checkpoint or setting; recomputing" in log.text
    assert not any(np.all(got[k] == 7.0) for k in got)
    with np.load(cache) as z:
        key = json.loads(str(z["__key__"]))
    assert key["examples"] == "patches" and key["patch_shape"] == list(PATCH)


def test_runs_from_before_patch_validation_are_evaluated_at_their_patch_with_one_line(log):
    old = {"kind": "train", "train": {"patch_shape": [32, 32, 32], "max_epochs": 3}}  # no val_overlap
    assert _inference_patch("runs/old", old, EvalConfig()) == (32, 32, 32)
    assert "written before validation used sliding windows" in log.text
    log.clear()
    assert _inference_patch("runs/old", old, EvalConfig(patch=(16, 16, 16))) == (16, 16, 16)
    assert _inference_patch(
        "runs/imm", {"kind": "fused", "train": None, "patch": [8, 8, 8]}, EvalConfig()
    ) == (
        8,
        8,
        8,
    )
    assert "written before" not in log.text
    with pytest.raises(CheckpointError, match="records no training patch; pass --patch"):
        _inference_patch("runs/x", {"kind": "fused", "train": None}, EvalConfig())


def _csv(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def _dice(p, t):
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else 2.0 * (p & t).sum() / denom


def test_a_patch_larger_than_every_volume_is_one_warning(env, log, tmp_path):
    """--patch 48³ on 24×32×24 volumes: legitimate (whole-volume training), said once."""
    big = SCHED.replace(patch_shape=(48, 48, 48), max_epochs=1, steps_per_epoch=1)
    train_model(env.spec, NET, big, str(tmp_path / "big"))
    warnings = [
        r.getMessage() for r in log.records if r.levelname == "WARNING" and "--patch" in r.getMessage()
    ]
    assert len(warnings) == 1 and "larger than every training volume along axis 0,1,2" in warnings[0]
