"""Damaged files, a full disk, concurrent runs and non-finite training, in-process (fast).

The crash (SIGKILL) matrix is in test_crash_matrix.py. Each case that passes is recorded for
docs/reliability.md when ``TIMM_JAX_RELIABILITY_RESULTS`` is set (``make reliability``).
"""

import functools
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from _demo import tiny_demo
from _reliability import record

from timm_jax import faults
from timm_jax.config import ModelConfig, TrainConfig
from timm_jax.errors import CheckpointError, DiskFullError, DivergenceError, RunLockedError, UserError
from timm_jax.nn.unet import build_model, init_params
from timm_jax.training.inference import make_predictor
from timm_jax.training.loop import fit, window_evaluator
from timm_jax.training.rundir import LOCK_FILE, RunDir, load_run, make_meta, read_metrics
from timm_jax.training.steps import create_state, make_optimizer, make_train_step

MODEL = ModelConfig(in_channels=2, out_channels=2, base_filters=2, depth=2)
CFG = TrainConfig(batch_size=2, patch_shape=(8, 8, 8), steps_per_epoch=2, max_epochs=3, plateau_patience=1)
META = make_meta("train", model=MODEL, data={"what": "random batches"})


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
    model, _ = build_model(MODEL)
    opt = make_optimizer(1e-2)
    rng = np.random.default_rng(5)
    cases = [
        SimpleNamespace(
            image=rng.standard_normal((8, 8, 6, 2)).astype(np.float32), labels=rng.integers(0, 3, (8, 8, 6))
        )
    ]
    return (
        model,
        opt,
        make_train_step(model, opt),
        window_evaluator(make_predictor(model, (8, 8, 8), overlap=0.5), cases, Task()),
    )


def train(workdir, *, step_wrapper=None, cfg=CFG, **kw):
    model, opt, step, evaluate = _compiled()
    state = create_state(
        init_params(model, jax.random.PRNGKey(0), (1, 8, 8, 8, 2)), opt, jax.random.PRNGKey(1)
    )
    with RunDir.create(str(workdir), META) as rd:
        return fit(
            rd,
            state=state,
            train_step=step_wrapper(step) if step_wrapper else step,
            evaluate=evaluate,
            batches_from=batches_from,
            cfg=cfg,
            **kw,
        )


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_same(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run."""
    path = tmp_path_factory.mktemp("ref") / "run"
    state, progress = train(path)
    return SimpleNamespace(path=path, state=state, progress=progress)


class Stop(Exception):
    pass


def stop_after(n):
    def after(epoch):
        if epoch == n:
            raise Stop

    return after


@pytest.fixture
def fault_env(monkeypatch):
    """Set TIMM_JAX_FAULT for this test with fresh visit counts."""
    monkeypatch.setattr(faults, "_hits", {})

    def set_(spec):
        monkeypatch.setattr(faults, "_hits", {})
        monkeypatch.setenv("TIMM_JAX_FAULT", spec)

    return set_


# ------------------------------------------------------------------- damaged checkpoints
def _damage(folder: Path, how: str) -> int:
    n = 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if how == "truncated":
            p.write_bytes(data[: len(data) // 2])
        elif how == "zeroed":
            p.write_bytes(bytes(len(data)))
        elif how == "foreign":
            p.write_bytes(b'{"this is": "not an orbax checkpoint"}\n')
        n += 1
    return n


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        pytest.param("zeroed", marks=pytest.mark.slow),
        pytest.param("foreign", marks=pytest.mark.slow),
    ],
)
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, reference, log, how):
    with pytest.raises(Stop):
        train(tmp_path, after_epoch=stop_after(2))  # checkpoints at steps 2 and 4
    assert _damage(tmp_path / "checkpoints" / "latest" / "4", how)
    log.clear()
    state, progress = train(tmp_path)
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert any(
        "checkpoints/latest/4" in w and "resumed from the previous good checkpoint" in w for w in warnings
    )
    assert "resuming from checkpoint at step 2 (epoch 1)" in log.text
    assert (tmp_path / "checkpoints" / "corrupt" / "latest-4").is_dir()  # set aside, not deleted
    assert_same(state.params, reference.state.params)
    assert [r["val_loss"] for r in read_metrics(str(tmp_path))] == [
        r["val_loss"] for r in reference.progress["history"]
    ]
    record(
        f"{how} files",
        "latest checkpoint (checkpoints/latest/<newest step>)",
        1,
        "warning naming it; set aside to checkpoints/corrupt/; resumed from the previous checkpoint; "
        "final params bitwise equal",
    )


def test_no_readable_checkpoint_stops_with_one_line_and_moves_nothing(tmp_path):
    with pytest.raises(Stop):
        train(tmp_path, after_epoch=stop_after(2))
    for folder in (tmp_path / "checkpoints").iterdir():
        _damage(folder, "zeroed")
    with pytest.raises(CheckpointError) as e:
        train(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoints/latest/4" in msg and "move the run directory aside" in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir()) == ["2", "4"]
    assert not (tmp_path / "checkpoints" / "corrupt").exists()
    assert not (tmp_path / LOCK_FILE).exists()  # released after the error
    record(
        "zeroed files",
        "every checkpoint of a run (latest and best)",
        1,
        "stops with one line naming the checkpoint; nothing moved, no restart from scratch",
    )


@pytest.mark.slow
def test_damaged_state_with_intact_metadata_also_falls_back(tmp_path, reference):
    with pytest.raises(Stop):
        train(tmp_path, after_epoch=stop_after(2))
    _damage(tmp_path / "checkpoints" / "latest" / "4" / "state", "truncated")
    state, _ = train(tmp_path)
    assert_same(state.params, reference.state.params)


@pytest.mark.parametrize("how", ["truncated", "zeroed"])
def test_damaged_best_checkpoint_is_named_by_its_readers(tmp_path, how):
    train(tmp_path, cfg=CFG.replace(max_epochs=1))
    _damage(tmp_path / "checkpoints" / "best", how)
    with pytest.raises(CheckpointError) as e:
        load_run(str(tmp_path))
    assert str(tmp_path / "checkpoints" / "best" / "2") in str(e.value) and "\n" not in str(e.value)
    record(
        f"{how} files",
        "best checkpoint, read by evaluate.py / fuse.py / --init_from",
        1,
        "stops with one line naming the checkpoint",
    )


def test_damaged_best_checkpoint_found_at_resume_is_rewritten_from_latest(tmp_path, reference, log):
    with pytest.raises(Stop):
        train(tmp_path, after_epoch=stop_after(2))  # latest at steps 2 and 4; best at one of them
    best = tmp_path / "checkpoints" / "best"
    (step,) = [int(p.name) for p in best.iterdir() if p.name.isdigit()]
    assert _damage(best / str(step), "truncated")
    log.clear()
    state, _ = train(tmp_path)
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert any(
        f"checkpoints/best/{step}" in w and "wrote it again from the latest checkpoint" in w for w in warnings
    ), warnings
    assert (tmp_path / "checkpoints" / "corrupt" / f"best-{step}").is_dir()
    assert_same(state.params, reference.state.params)
    load_run(str(tmp_path))  # the finished run's best checkpoint is readable
    record(
        "truncated files",
        "best checkpoint, found when training resumes",
        1,
        "warning naming it; set aside to checkpoints/corrupt/; written again from the latest checkpoint "
        "of the same step; final params bitwise equal",
    )


def test_damaged_fused_checkpoint_given_to_init_fused(tmp_path):
    from timm_jax.workflows.train import load_init

    model, *_ = _compiled()
    params = init_params(model, jax.random.PRNGKey(0), (1, 8, 8, 8, 2))
    meta = make_meta("fused", model=MODEL, data={"what": "x"})
    with RunDir.create(str(tmp_path), meta) as run:
        run.save(0, {"params": params}, meta, best=True)
    assert load_init("fused", str(tmp_path), MODEL)[0] is not None
    _damage(tmp_path / "checkpoints", "truncated")
    with pytest.raises(CheckpointError) as e:
        load_init("fused", str(tmp_path), MODEL)
    assert str(tmp_path / "checkpoints") in str(e.value)
    record("truncated files", "fused checkpoint given to train.py --init=fused", 1, "one line naming it")


# ------------------------------------------------------------------------ metrics.jsonl
def test_torn_last_line_of_metrics_is_tolerated_and_repaired(tmp_path, reference, log):
    with pytest.raises(Stop):
        train(tmp_path, after_epoch=stop_after(2))
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    assert [r["epoch"] for r in read_metrics(str(tmp_path))] == [1]
    assert "last line is incomplete" in log.text
    path.write_text(lines[0][:10] + "\n" + lines[1] + "\n")
    with pytest.raises(CheckpointError, match="line 1 is not a JSON record"):
        read_metrics(str(path))
    path.write_text(lines[0] + "\n" + lines[1][:7])
    train(tmp_path)  # the resumed run rewrites it from the checkpoint's history
    assert [r["epoch"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    assert [r["val_loss"] for r in read_metrics(str(tmp_path))] == [
        r["val_loss"] for r in reference.progress["history"]
    ]
    record(
        "torn last line", "metrics.jsonl", 1, "skipped with a warning by read_metrics; rewritten on resume"
    )


# ------------------------------------------------------------------ preprocessed cache
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    tiny_demo(tmp / "data")
    return tmp


@pytest.mark.parametrize("how", ["truncated", "zeroed", "foreign"])
@pytest.mark.parametrize("part", ["record", "image", "labels"])
def test_damaged_preprocessed_cache_entry_is_rebuilt(demo, tmp_path, log, how, part):
    from timm_jax.data.preprocess import load_preprocessed

    root = demo / "data" / "parcellation"
    cid = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
    good = load_preprocessed(root, cid, "parcellation", cache_dir=tmp_path)
    (rec_path,) = list(tmp_path.glob("*.json"))
    entry = rec_path if part == "record" else rec_path.with_suffix(f".{part}.npy")
    if how == "foreign":  # another program's file of the same name
        if part == "record":
            entry.write_text('{"labels": [0, 0, 0], "something": 1}')
        else:
            np.save(entry, np.zeros(3))
    else:
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 2] if how == "truncated" else bytes(len(data)))
    log.clear()
    for mmap in (False, True):
        again = load_preprocessed(root, cid, "parcellation", cache_dir=tmp_path, mmap=mmap)
        np.testing.assert_array_equal(again.image, good.image)
        np.testing.assert_array_equal(again.labels, good.labels)
    assert "unreadable" in log.text and "rebuilding" in log.text and str(rec_path) in log.text
    assert log.text.count("rebuilding") == 1  # rebuilt in place once, then read
    np.testing.assert_array_equal(np.load(rec_path.with_suffix(".image.npy")), good.image)
    record(f"{how} file", f"preprocessed-data cache entry ({part})", 1, "warning naming it; rebuilt")


# ------------------------------------------------------------------------------ disk full
def test_disk_full_writing_metrics_stops_and_resume_after_space_is_freed(tmp_path, reference, fault_env):
    fault_env("metrics.write:2:enospc")
    with pytest.raises(DiskFullError) as e:
        train(tmp_path)
    assert isinstance(e.value, UserError)
    assert "disk full" in str(e.value) and str(tmp_path / "metrics.jsonl") in str(e.value)
    with RunDir.open(str(tmp_path)) as run:
        assert run.latest_step() == 4  # the checkpoint before the failed write is intact
    fault_env("")
    state, _ = train(tmp_path)
    assert_same(state.params, reference.state.params)
    record(
        "ENOSPC",
        "metrics.jsonl write (epoch 2)",
        1,
        "DiskFullError naming the path; checkpoint intact; resumed after freeing space, params bitwise equal",
    )


def test_disk_full_writing_a_checkpoint(tmp_path, reference, monkeypatch):
    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.save
    calls = []

    def full(self, step, *a, **k):
        calls.append(step)
        if step == 4:  # tensorstore reports a full disk in its message
            raise ValueError("Error writing local file: [OS error 28: No space left on device]")
        return real(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(DiskFullError) as e:
        train(tmp_path)
    assert str(tmp_path / "checkpoints") in str(e.value) and "/4" in str(e.value)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    with RunDir.open(str(tmp_path)) as run:
        assert run.latest_step() == 2
    state, _ = train(tmp_path)
    assert_same(state.params, reference.state.params)
    record(
        "ENOSPC",
        "orbax checkpoint write (epoch 2)",
        1,
        "DiskFullError naming the checkpoint; previous checkpoint intact; resumed, params bitwise equal",
    )


@pytest.mark.parametrize("point", ["preprocess.cache:1:enospc"])
def test_disk_full_writing_the_preprocessed_cache(demo, tmp_path, fault_env, point):
    from timm_jax.data.preprocess import load_preprocessed

    root = demo / "data" / "parcellation"
    cid = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
    fault_env(point)
    with pytest.raises(DiskFullError, match="disk full") as e:
        load_preprocessed(root, cid, "parcellation", cache_dir=tmp_path)
    assert str(tmp_path) in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no temporary file left (neither the arrays nor the record)
    fault_env("")
    assert load_preprocessed(root, cid, "parcellation", cache_dir=tmp_path).image.size
    record(
        "ENOSPC", "preprocessed-data cache write", 1, "DiskFullError naming the path; no partial file left"
    )


# ---------------------------------------------------------------------------------- locks
def _lock(tmp_path, pid, host=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def test_a_run_held_by_a_live_process_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, holder.pid)
        with pytest.raises(RunLockedError) as e:
            RunDir.create(str(tmp_path), META)
        msg = str(e.value)
        assert f"process {holder.pid} on {socket.gethostname()}" in msg and LOCK_FILE in msg
        assert "\n" not in msg
        assert not (tmp_path / "checkpoints").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    record("second process", "RunDir.create of a run a live process holds", 1, "refused with one line")


def test_a_lock_of_another_host_is_refused(tmp_path):
    _lock(tmp_path, 1, host="elsewhere.example")
    with pytest.raises(RunLockedError, match="on elsewhere.example"):
        RunDir.create(str(tmp_path), META)


def test_a_dead_process_lock_is_taken_over(tmp_path, log):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(tmp_path, dead.pid)
    with RunDir.create(str(tmp_path), META):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held == {"pid": os.getpid(), "host": socket.gethostname(), "purpose": "run"}
        with pytest.raises(RunLockedError, match="already open for writing in this process"):
            RunDir.create(str(tmp_path), META)
    assert f"took over the lock left by process {dead.pid}" in log.text
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text("")  # an empty lock (its writer died at once), not new
    os.utime(tmp_path / LOCK_FILE, (0, 0))
    with RunDir.create(str(tmp_path), META):
        pass
    record("stale lock", "run.lock of a dead process on this host", 1, "taken over with a warning")


@pytest.mark.parametrize("zero_locked", [True, False])
def test_only_process_zero_takes_the_lock_and_every_process_learns_the_outcome(
    tmp_path, monkeypatch, zero_locked
):
    """Process 1 of 2 (simulated) neither takes nor checks the lock file; it receives process 0's
    outcome (a broadcast) and stops with one line when process 0 could not take the lock."""
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    sent = []
    monkeypatch.setattr(
        multihost_utils, "broadcast_one_to_all", lambda x: sent.append(int(x)) or np.int32(zero_locked)
    )
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, holder.pid)
        # (the lock step of RunDir's constructor; orbax itself needs a real distributed system)
        from timm_jax.training.run_lock import acquire_once as _acquire_lock_once

        if zero_locked:
            assert _acquire_lock_once(str(tmp_path)) is None  # went on, holding nothing
        else:
            with pytest.raises(RunLockedError, match="process 0 could not take the run's lock"):
                _acquire_lock_once(str(tmp_path))
        assert sent == [1]  # process 1 took part in the broadcast (its own value is ignored)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------- numerics
def _poison(at_step, what):
    """Wrap a train step so that global step ``at_step`` gives a NaN loss or NaN parameters."""

    def wrap(step):
        def poisoned(state, batch):
            new, m = step(state, batch)
            if int(new.step) == at_step:
                if what == "loss":
                    m = {"loss": np.float32(np.nan)}
                else:
                    new = new.replace(params=jax.tree_util.tree_map(lambda x: x * np.nan, new.params))
            return new, m

        return poisoned

    return wrap


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(DivergenceError) as e:
        train(tmp_path, step_wrapper=_poison(3, "loss"))
    msg = str(e.value)
    assert "epoch 2, step 1/2 (global step 3)" in msg and str(tmp_path) in msg and "\n" not in msg
    params, meta = load_run(str(tmp_path))
    assert meta["run"]["epoch"] == 1 and all(np.isfinite(x).all() for x in leaves(params))
    record(
        "NaN loss",
        "training step 3 (epoch 2, step 1)",
        1,
        "stops naming epoch and step; epoch-1 checkpoint kept",
    )


def test_nan_gradient_on_the_last_step_is_caught_before_the_checkpoint(tmp_path):
    with pytest.raises(DivergenceError, match="non-finite parameters in epoch 2"):
        train(tmp_path, step_wrapper=_poison(4, "params"))
    with RunDir.open(str(tmp_path)) as run:
        assert run.latest_step() == 2  # the NaN state of step 4 was not saved
    record(
        "NaN gradient",
        "training step 4 (last step of epoch 2)",
        1,
        "stops before the checkpoint; epoch-1 checkpoint kept",
    )


@pytest.mark.parametrize("what", ["loss", pytest.param("params", marks=pytest.mark.slow)])
def test_skip_nonfinite_steps_drops_the_update_and_counts_it(tmp_path, log, what):
    state, progress = train(
        tmp_path, step_wrapper=_poison(3, what), cfg=CFG.replace(skip_nonfinite_steps=True)
    )
    assert int(state.step) == 6 and progress["epoch"] == 3  # the pipeline and the step counter moved on
    assert all(np.isfinite(x).all() for x in leaves(state.params))
    assert [r["skipped_steps"] for r in read_metrics(str(tmp_path))] == [0, 1, 1]
    assert "skipped a non-finite step in epoch 2, step 1/2 (global step 3)" in log.text
    record(
        f"NaN {'loss' if what == 'loss' else 'gradient'}",
        "training step 3 with --skip_nonfinite_steps",
        1,
        "step skipped (update dropped), counted as skipped_steps in metrics.jsonl; run finishes",
    )


# ------------------------------------------------------------------------- the written record
def _render_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "reliability" / "render.py"
    spec = importlib.util.spec_from_file_location("reliability_render", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_makes_both_tables_and_checks_the_row_schema(tmp_path):
    render = _render_module()
    row = {"fault": "SIGKILL", "where": "a | b", "times": 2, "outcome": "ok", "data_lost": "none"}
    (tmp_path / "h.json").write_text(json.dumps([row]))
    text = render.render(tmp_path / "h.json", tmp_path / "missing.json")
    assert "| SIGKILL | a \\| b | 2 | ok | none |" in text and "Fuzzed inputs" not in text
    (tmp_path / "f.json").write_text(json.dumps([dict(row, fault="fuzzed NIfTI header")]))
    text = render.render(tmp_path / "h.json", tmp_path / "f.json")
    assert "## Fuzzed inputs (1 cases)" in text and "| fuzzed NIfTI header |" in text
    (tmp_path / "bad.json").write_text(json.dumps([dict(row, extra=1)]))
    with pytest.raises(SystemExit, match="expected exactly"):
        render.render(tmp_path / "bad.json", tmp_path / "missing.json")


def test_committed_reliability_doc_is_rendered_from_the_committed_results():
    render = _render_module()
    docs = Path(__file__).resolve().parents[1] / "docs"
    expected = render.render(
        docs / "reliability" / "harness_results.json", docs / "reliability" / "fuzz_results.json"
    )
    assert (docs / "reliability.md").read_text() == expected, (
        "docs/reliability.md is not what docs/reliability/render.py makes of the results files: run it"
    )


def test_skip_nonfinite_steps_at_its_default_keeps_older_runs_keys():
    from timm_jax.training.rundir import run_key

    meta = make_meta("train", model=MODEL, data={}, train=CFG)
    older = dict(meta, train={k: v for k, v in meta["train"].items() if k != "skip_nonfinite_steps"})
    assert run_key(older) == meta["run_key"]  # a run written before the setting existed resumes
    assert (
        make_meta("train", model=MODEL, data={}, train=CFG.replace(skip_nonfinite_steps=True))["run_key"]
        != meta["run_key"]
    )
