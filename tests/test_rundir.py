"""The run directory (timm_jax.training.rundir): metadata, run keys, refusals, closing, best/latest."""

import json
import logging
import os
import re

import jax
import numpy as np
import pytest

from timm_jax.config import ModelConfig, TrainConfig
from timm_jax.errors import CheckpointError
from timm_jax.training.rundir import RunDir, load_run, make_meta, run_key

MODEL = ModelConfig(in_channels=2, out_channels=3, base_filters=4, depth=3, conv_impl="native")
TRAIN = TrainConfig(batch_size=2, patch_shape=(8, 8, 8), steps_per_epoch=1, max_epochs=3)
DATA = {"data_dir": "/data/parcellation", "layout": "parcellation", "labels": (1, 2)}


def params(value: float = 1.0) -> dict:
    return {
        "conv_a": {
            "kernel": np.full((2, 2), value, np.float32),
            "bias": np.arange(2, dtype=np.float32) * value,
        },
        "norm_a": {"scale": np.ones(3, np.float32) * value},
    }


def meta(**kw) -> dict:
    args = dict(
        model=MODEL,
        data=DATA,
        train=TRAIN,
        splits={"train": ("a", "b"), "val": ("c",)},
        seed=np.int64(7),
    )
    args.update(kw)
    return make_meta("train", **args)


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def assert_tree_equal(got: dict, want: dict) -> None:
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want)
    for k in want:
        assert isinstance(got[k], np.ndarray), k
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def snapshot(root) -> dict:
    """Every file under ``root`` with its size and mtime."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def write(path, m, steps=(1,), value=1.0) -> None:
    with RunDir.create(str(path), m) as run:
        for s in steps:
            run.save(s, {"params": params(value * s)}, {**m, "run": {"epoch": s}}, best=s == steps[0])


# ---------------------------------------------------------------------------- metadata


def test_meta_round_trip(tmp_path):
    m = meta()
    assert m["kind"] == "train"
    assert m["model"] == MODEL.to_dict() and m["train"]["patch_shape"] == [8, 8, 8]
    assert m["data"]["labels"] == [1, 2] and m["splits"]["train"] == ["a", "b"]
    assert m["seed"] == 7 and type(m["seed"]) is int  # numpy scalar stored as a plain int
    saved = {**m, "run": {"epoch": 1, "best_loss": np.float32(0.25), "history": [(1, 2)]}}
    want = json.loads(json.dumps({**saved, "run": {"epoch": 1, "best_loss": 0.25, "history": [[1, 2]]}}))
    p = params()
    with RunDir.create(str(tmp_path), m) as run:
        assert run.meta == m and run.previous is None
        run.save(1, {"params": p}, saved, best=True)
    # config.json is written by create and holds the metadata
    assert json.loads((tmp_path / "config.json").read_text()) == m
    with RunDir.open(str(tmp_path)) as run:
        assert run.kind == "train"
        assert run.meta == want
        assert run.path == str(tmp_path)
        got, got_meta = run.load_params()
    assert got_meta == want
    assert_tree_equal(got, p)
    # the checkpoints folder is accepted as the run's path, and load_run gives the same
    with RunDir.open(str(tmp_path / "checkpoints")) as run:
        assert run.path == str(tmp_path)
    got, got_meta = load_run(str(tmp_path), kinds=("train",))
    assert got_meta == want
    assert_tree_equal(got, p)


def test_make_meta_refusals():
    with pytest.raises(ValueError, match="run kind must be one of"):
        make_meta("finetune", model=MODEL, data=DATA)
    with pytest.raises(TypeError, match="cannot store object"):
        make_meta("train", model=MODEL, data=DATA, thing=object())


def test_run_key_ignores_progress_and_conv_impl():
    m = meta()
    assert m["run_key"] == run_key(m)
    assert run_key({**m, "run": {"epoch": 5, "best_epoch": 3}}) == m["run_key"]
    assert run_key({**m, "run_key": "something else"}) == m["run_key"]
    assert meta(run={"epoch": 9})["run_key"] == m["run_key"]
    for impl in ("auto", "depth2d", "direct"):
        assert meta(model=MODEL.replace(conv_impl=impl))["run_key"] == m["run_key"]


def _changed(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, list):
        return [*v, 1]
    if v is None:
        return 1
    raise AssertionError(f"no change defined for {v!r}")


def test_run_key_changes_with_every_config_value():
    m = meta()
    keys = {m["run_key"]}
    changes = 0
    for section in ("model", "train", "data"):
        for field, value in m[section].items():
            if section == "model" and field == "conv_impl":
                continue
            other = {**m, section: {**m[section], field: _changed(value)}}
            k = run_key(other)
            assert k != m["run_key"], f"{section}.{field} does not change the run key"
            keys.add(k)
            changes += 1
    # through make_meta, and for the kind and extra fields
    for other in (
        meta(model=MODEL.replace(base_filters=8)),
        meta(train=TRAIN.replace(learning_rate=1e-3)),
        meta(train=TRAIN.replace(patch_shape=(16, 8, 8))),
        meta(data={**DATA, "labels": (1, 3)}),
        meta(splits={"train": ("a",), "val": ("c",)}),
        meta(seed=8),
        meta(train=None),
        meta(init="transfer"),
        {**m, "kind": "fused"},
    ):
        assert run_key(other) != m["run_key"]
        keys.add(run_key(other))
        changes += 1
    assert len(keys) == changes + 1  # all different from each other, too


# ---------------------------------------------------------------------------- refusals


def test_other_configuration_is_refused_and_nothing_changes(tmp_path, monkeypatch):
    a = meta()
    write(tmp_path, a, steps=(1, 2))
    config = (tmp_path / "config.json").read_bytes()
    before = snapshot(tmp_path / "checkpoints")
    assert before
    closed = []
    original_close = RunDir.close
    monkeypatch.setattr(RunDir, "close", lambda self: (closed.append(self), original_close(self))[1])
    b = meta(train=TRAIN.replace(batch_size=4))
    with pytest.raises(CheckpointError, match="another configuration") as e:
        RunDir.create(str(tmp_path), b)
    assert str(tmp_path) in str(e.value)
    assert a["run_key"] in str(e.value) and b["run_key"] in str(e.value)
    assert len(closed) == 1  # the refused run's managers were closed
    # config.json is written only after the check: still the original configuration
    assert (tmp_path / "config.json").read_bytes() == config
    assert snapshot(tmp_path / "checkpoints") == before
    with RunDir.open(str(tmp_path)) as run:
        assert run.meta["run_key"] == a["run_key"]
        assert run.latest_step("latest") == 2 and run.latest_step("best") == 1
    # the original configuration is still accepted, and sees the previous progress
    with RunDir.create(str(tmp_path), a) as run:
        assert run.previous["run"] == {"epoch": 2}


def test_other_conv_impl_warns_and_is_accepted(tmp_path, log):
    a = meta()
    write(tmp_path, a)
    with RunDir.create(str(tmp_path), a) as run:
        assert run.previous["run_key"] == a["run_key"]
    assert not [r for r in log.records if r.levelno >= logging.WARNING]
    b = meta(model=MODEL.replace(conv_impl="depth2d"))
    assert b["run_key"] == a["run_key"]
    with RunDir.create(str(tmp_path), b) as run:
        assert run.previous["model"]["conv_impl"] == "native"
        assert run.meta == b
        run.save(2, {"params": params(2.0)}, {**b, "run": {"epoch": 2}})
    warnings = [r for r in log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "conv_impl=native" in text and "conv_impl=depth2d" in text and str(tmp_path) in text
    assert json.loads((tmp_path / "config.json").read_text())["model"]["conv_impl"] == "depth2d"
    with RunDir.open(str(tmp_path)) as run:
        assert run.latest_step("latest") == 2


def test_open_refusals(tmp_path):
    write(tmp_path / "run", meta())
    with pytest.raises(CheckpointError, match="'train' run directory; expected 'fused'") as e:
        RunDir.open(str(tmp_path / "run"), kinds=("fused",))
    assert str(tmp_path / "run") in str(e.value)
    with pytest.raises(CheckpointError, match="expected 'fused' or 'adaption'"):
        load_run(str(tmp_path / "run"), kinds=("fused", "adaption"))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / 'missing'))} does not exist"):
        RunDir.open(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a run directory"):
        RunDir.open(str(tmp_path / "plain"))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        RunDir.open(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------- closing


def test_context_manager_completes_the_save(tmp_path):
    m = meta()
    with RunDir.create(str(tmp_path), m) as run:
        run.save(3, {"params": params(3.0)}, m)
    with RunDir.open(str(tmp_path)) as other:
        assert other.latest_step("latest") == 3 and other.latest_step("best") is None
        assert other.best_or_latest() == "latest"
        got, _ = other.load_params()
    assert_tree_equal(got, params(3.0))
    other.close()  # closing twice is harmless


def test_exception_inside_with_closes_managers_and_propagates(tmp_path, monkeypatch):
    m = meta()
    calls = []

    class Boom(Exception):
        pass

    err = Boom("inside the run")
    with pytest.raises(Boom) as e:
        with RunDir.create(str(tmp_path), m) as run:
            assert set(run._store._managers) == {"latest", "best"}
            for name, manager in run._store._managers.items():
                original = manager.close
                monkeypatch.setattr(
                    manager, "close", lambda n=name, f=original: (calls.append(n), f())[1], raising=False
                )
            run.save(1, {"params": params()}, m, best=True)
            raise err
    assert e.value is err and str(e.value) == "inside the run"
    assert sorted(calls) == ["best", "latest"]
    with RunDir.open(str(tmp_path)) as run:
        assert run.latest_step("latest") == 1 and run.latest_step("best") == 1


# ---------------------------------------------------------------------------- best / latest


def test_latest_and_best(tmp_path):
    m = meta()
    with RunDir.create(str(tmp_path), m) as run:
        for step in (1, 2, 3):
            run.save(step, {"params": params(float(step))}, {**m, "run": {"epoch": step}}, best=step == 1)
        assert run._store._managers["latest"].all_steps() == [2, 3]  # max_to_keep=2
    with RunDir.open(str(tmp_path)) as run:
        assert run.latest_step("latest") == 3
        assert run.latest_step("best") == 1
        assert run.best_or_latest() == "best"
        assert run.meta["run"] == {"epoch": 1}
        got, got_meta = run.load_params()
        assert got_meta["run"] == {"epoch": 1}
        assert_tree_equal(got, params(1.0))
        got, got_meta = run.load_params("latest")
        assert got_meta["run"] == {"epoch": 3}
        assert_tree_equal(got, params(3.0))
        assert run.read_meta("latest", step=2)["run"] == {"epoch": 2}
    # a newer best replaces the old one (one best is kept); a step already there is not rewritten
    with RunDir.create(str(tmp_path), m) as run:
        assert run.previous["run"] == {"epoch": 3}
        run.save(4, {"params": params(4.0)}, {**m, "run": {"epoch": 4}}, best=True)
        run.save(4, {"params": params(5.0)}, {**m, "run": {"epoch": 5}}, best=True)
        assert run._store._managers["best"].all_steps() == [4]
    got, got_meta = load_run(str(tmp_path))
    assert got_meta["run"] == {"epoch": 4}
    assert_tree_equal(got, params(4.0))


def test_load_params_reads_only_the_params_of_a_full_state(tmp_path):
    """A training state (params, optimiser moments, step): load_params gives the params exactly as
    a full restore does, without reading the rest; a state without params is one clear error."""
    m, p = meta(), params(2.0)
    state = {"params": p, "opt_state": {"mu": params(3.0), "count": np.int32(5)}, "step": np.int64(9)}
    with RunDir.create(str(tmp_path / "a"), m) as run:
        run.save(1, state, m, best=True)
    with RunDir.open(str(tmp_path / "a")) as run:
        full, _ = run.restore(None, "best")
        got, got_meta = run.load_params()
    assert got_meta == m
    assert_tree_equal(got, p)
    assert_tree_equal(got, jax.tree_util.tree_map(np.asarray, full["params"]))
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(got))
    with RunDir.create(str(tmp_path / "b"), m) as run:
        run.save(1, {"weights": p}, m)
    with RunDir.open(str(tmp_path / "b")) as run, pytest.raises(CheckpointError, match="holds no 'params'"):
        run.load_params()


def test_corrupt_checkpoint(tmp_path):
    write(tmp_path, meta())
    damaged = 0
    for d, _, files in os.walk(tmp_path / "checkpoints"):
        for f in files:
            if "state" in d and not f.startswith("_"):
                with open(os.path.join(d, f), "wb") as fh:
                    fh.write(b"garbage")
                damaged += 1
    assert damaged
    with RunDir.open(str(tmp_path)) as run:
        assert run.kind == "train"  # the metadata is intact
        with pytest.raises(CheckpointError, match="could not be read") as e:
            run.load_params()
    assert str(tmp_path / "checkpoints" / "best" / "1") in str(e.value)
