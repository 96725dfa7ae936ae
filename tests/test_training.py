"""The epoch loop: checkpoints, resume after a crash gives the same result, plateau/early stop."""

import functools
import json
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from timm_jax.config import ModelConfig, TrainConfig
from timm_jax.errors import CheckpointError
from timm_jax.nn.unet import build_model, init_params
from timm_jax.training.inference import make_predictor
from timm_jax.training.loop import fit, window_evaluator
from timm_jax.training.rundir import RunDir, load_run, make_meta
from timm_jax.training.steps import create_state, make_optimizer, make_train_step

MODEL = ModelConfig(in_channels=2, out_channels=2, base_filters=2, depth=2, dropout_rate=0.3)
CFG = TrainConfig(
    batch_size=2,
    patch_shape=(8, 8, 8),
    steps_per_epoch=2,
    max_epochs=4,
    plateau_patience=1,
    early_stopping_patience=10,
)


def batches_from(start):
    step = start
    while True:
        rng = np.random.default_rng(step)
        x = rng.standard_normal((2, 8, 8, 8, 2)).astype(np.float32)
        yield {"image": x, "target": (x > 0.5).astype(np.float32)}
        step += 1


class Task(SimpleNamespace):
    channel_names = ("one", "two")

    def targets(self, labels):
        return np.stack([labels == 1, labels == 2], -1).astype(np.float32)


@functools.cache
def _compiled():
    """Model, optimiser and jitted steps, built once so the tests compile once."""
    model, _ = build_model(MODEL)
    opt = make_optimizer(1e-2)
    rng = np.random.default_rng(5)
    cases = [
        SimpleNamespace(
            image=rng.standard_normal((8, 8, 6, 2)).astype(np.float32), labels=rng.integers(0, 3, (8, 8, 6))
        )
        for _ in range(2)
    ]
    evaluate = window_evaluator(make_predictor(model, (8, 8, 8), overlap=0.5), cases, Task())
    return model, opt, make_train_step(model, opt), evaluate


def setup():
    model, opt, step, evaluate = _compiled()
    params = init_params(model, jax.random.PRNGKey(0), (1, 8, 8, 8, 2))
    return create_state(params, opt, jax.random.PRNGKey(1)), step, evaluate


META = make_meta("train", model=MODEL, data={"what": "random batches"})


def run(workdir, meta=META, **kw):
    state, step, evaluate = setup()
    with RunDir.create(str(workdir), meta) as rd:
        return fit(
            rd,
            state=state,
            train_step=step,
            evaluate=evaluate,
            batches_from=batches_from,
            cfg=kw.pop("cfg", CFG),
            **kw,
        )


def test_resume_after_crash_equals_uninterrupted(tmp_path, caplog):
    full, run_full = run(tmp_path / "a")

    class Crash(Exception):
        pass

    def crash(epoch):
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        run(tmp_path / "b", after_epoch=crash)
    caplog.set_level("INFO", logger="timm_jax")
    resumed, run_res = run(tmp_path / "b")
    assert "resuming from checkpoint at step 4 (epoch 2)" in caplog.text
    assert int(resumed.step) == int(full.step) == 8
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["val_loss"] for r in run_full["history"]] == [r["val_loss"] for r in run_res["history"]]
    # metrics.jsonl holds one line per epoch, plateau reduced the learning rate at some point
    lines = open(tmp_path / "b" / "metrics.jsonl").read().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4]
    # a finished run is not trained again
    caplog.clear()
    run(tmp_path / "b")
    assert "already finished" in caplog.text
    params, meta = load_run(str(tmp_path / "b"))
    assert meta["run"]["best_epoch"] >= 1 and "conv_enc0_in" in params


def test_plateau_and_early_stopping(tmp_path):
    cfg = TrainConfig(
        batch_size=2,
        patch_shape=(8, 8, 8),
        steps_per_epoch=1,
        max_epochs=30,
        plateau_patience=1,
        early_stopping_patience=2,
        learning_rate=0.0,
    )
    state, step, _ = setup()
    calls = iter([1.0, 0.5, 0.7, 0.8, 0.1])
    with RunDir.create(str(tmp_path), META) as rd:
        final, summary = fit(
            rd,
            state=state,
            train_step=step,
            evaluate=lambda p: {"loss": next(calls), "dice": [0.0], "dice_mean": 0.0},
            batches_from=batches_from,
            cfg=cfg,
        )
    assert summary["epoch"] == 4 and summary["best_epoch"] == 2  # stopped after 2 bad epochs
    lrs = [r["lr"] for r in summary["history"]]
    assert lrs[3] == pytest.approx(lrs[2] * 0.5)  # reduced once after the first bad epoch


def test_other_run_and_corrupt_checkpoint_errors(tmp_path):
    run(tmp_path / "a", cfg=TrainConfig(batch_size=2, patch_shape=(8, 8, 8), steps_per_epoch=1, max_epochs=1))
    with pytest.raises(CheckpointError, match="train run with another configuration"):
        run(tmp_path / "a", meta=make_meta("train", model=MODEL, data={"what": "other batches"}))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(str(tmp_path / "nope"))
    # damage the array data of the checkpoint
    root = tmp_path / "a" / "checkpoints"
    for d, _, files in os.walk(root):
        for f in files:
            if "state" in d and not f.startswith("_"):
                with open(os.path.join(d, f), "wb") as fh:
                    fh.write(b"garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_run(str(tmp_path / "a"))
