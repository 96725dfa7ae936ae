"""Crash consistency: ``train.py`` and ``fuse.py --method=timm`` killed with SIGKILL at named points.

Each case runs the real script in a subprocess on a tiny demo data set with a tiny network, kills
it at a point named by ``TIMM_JAX_FAULT`` (``timm_jax/faults.py``: the process sends itself
SIGKILL there — during a training step, validation, an orbax checkpoint write, the Fisher
computation and its cache write, the adaption stage, the fused checkpoint and the mixing-ratio
files), possibly several times in a row, then runs the same command again without a fault. The
re-run must finish, and its final parameters (latest and best), its metrics and — for a
fusion — its Fisher cache and mixing ratios must equal an uninterrupted run's bit for bit.

One kill case, the full-disk and the lock cases run in the default suite; the rest of the
matrix is marked ``slow`` (``make test-all``; ``make reliability`` records it in
docs/reliability.md).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _demo import script_env, tiny_demo
from _reliability import record

pytestmark = pytest.mark.e2e  # scripts in subprocesses: left out by `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
NET = ["--base_filters=2", "--depth=2"]
SCHED = ["--patch=16,16,16", "--batch_size=1", "--steps_per_epoch=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    # a snapshot of the code: every run of the matrix runs the same code, even while the working
    # tree is being edited (a bitwise comparison would otherwise compare two versions)
    code = tmp / "code"
    shutil.copytree(ROOT / "timm_jax", code / "timm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for script in ("train.py", "fuse.py"):
        shutil.copy(ROOT / script, code / script)
    e = script_env(tmp, code, drop=("TIMM_JAX_FAULT",))
    tiny_demo(tmp / "data", n_parc_task1=3, n_parc_task2=2, n_brats_train=2)
    w = SimpleNamespace(tmp=tmp, env=e, code=code)
    w.train_args = [
        f"--data_dir={tmp}/data/parcellation",
        "--layout=parcellation",
        "--task_key=task1",
        *NET,
        *SCHED,
        "--max_epochs=3",
    ]
    w.fuse_args = [
        f"--data_dir={tmp}/data/brats",
        "--layout=brats",
        "--task_key=task3",
        "--method=timm",
        *SCHED,
        "--max_epochs=2",
    ]
    w.train_ref = tmp / "ref_train"
    w.train_trace = _run(w, "train.py", *w.train_args, f"--workdir={w.train_ref}", trace=tmp / "train.trace")
    # the fusion's source: the reference run before any Fisher cache was written into it
    w.source = tmp / "source"
    shutil.copytree(w.train_ref, w.source)
    return w


def _source_copy(w, name):
    """A fresh copy of the fusion's source, always named ``source`` (its name is in the ratios)."""
    dst = w.tmp / "sources" / name / "source"
    shutil.copytree(w.source, dst)
    return dst


@pytest.fixture(scope="module")
def fuse_ref(world):
    src = _source_copy(world, "ref")
    out = world.tmp / "ref_fuse"
    trace = _run(
        world, "fuse.py", f"--source={src}", *world.fuse_args, f"--out={out}", trace=world.tmp / "f.trace"
    )
    return SimpleNamespace(out=out, source=src, trace=trace)


def _run(w, script, *args, fault="", trace=None):
    """Run a script; with ``fault`` it must die of SIGKILL there; ``trace``: the points it passed."""
    env = dict(w.env)
    if fault:
        env["TIMM_JAX_FAULT"] = fault
    if trace is not None:
        env["TIMM_JAX_FAULT_LOG"] = str(trace)
    p = subprocess.run(
        [sys.executable, str(w.code / script), *args],
        env=env,
        cwd=w.tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if fault:
        assert p.returncode == -signal.SIGKILL, (
            f"{script} with TIMM_JAX_FAULT={fault} was not killed (status {p.returncode}):\n"
            f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        )
    else:
        assert p.returncode == 0, f"{script} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return Path(trace).read_text().split() if trace is not None else p.stdout + p.stderr


def _resolve(spec: str, trace: list[str]) -> str:
    """``point:last`` -> ``point:<n>`` with n the point's last visit in an uninterrupted run."""
    point, n = spec.split(":")
    hits = trace.count(point)
    assert hits, f"the uninterrupted run never reached {point}"
    n = hits if n == "last" else int(n)
    assert n <= hits, f"{point} is reached {hits} times, not {n}"
    return f"{point}:{n}"


def _params(run_dir, which):
    from timm_jax.core.partition import to_flat_dict
    from timm_jax.training.rundir import RunDir

    with RunDir.open(str(run_dir)) as run:
        params = run.load_params(which)[0]
    return {k: np.asarray(v) for k, v in to_flat_dict(params).items()}


def _assert_same_params(a_dir, b_dir, which):
    a, b = _params(a_dir, which), _params(b_dir, which)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{which} {k}")


def _metrics(run_dir):
    from timm_jax.training.rundir import read_metrics

    return [
        {k: v for k, v in r.items() if k not in ("epoch_s", "voxels_per_s")}
        for r in read_metrics(str(run_dir))
    ]


def _no_lock_left(run_dir):
    assert not (Path(run_dir) / "run.lock").exists(), f"{run_dir}/run.lock left behind by a finished run"


#: (id, faults in order, where) — train.py: 3 epochs of 2 steps, one validation case
TRAIN = [
    ("train-step-first", ["train.epoch:1"], "train.py: before the first epoch's steps (nothing saved yet)"),
    (
        "train-step-mid",
        ["train.epoch:2"],
        "train.py: in epoch 2 before its steps (epoch 1 checkpointed; nothing is written within an epoch)",
    ),
    ("train-validate", ["train.validate:2"], "train.py: before the validation of epoch 2"),
    ("train-ckpt-best", ["checkpoint.best:1"], "train.py: while orbax writes the first best checkpoint"),
    (
        "train-ckpt-latest",
        ["checkpoint.latest:2"],
        "train.py: while orbax writes epoch 2's latest checkpoint (its best already written)",
    ),
    ("train-ckpt-final", ["checkpoint.latest:last"], "train.py: while writing the final checkpoint"),
    (
        "train-metrics",
        ["metrics.write:2"],
        "train.py: metrics.jsonl written to its temporary file, not renamed",
    ),
    (
        "train-twice",
        ["checkpoint.latest:2", "checkpoint.latest:1"],
        "train.py: twice in a row while writing epoch 2's latest checkpoint",
    ),
    (
        "train-preprocess",
        ["preprocess.cache:2"],
        "train.py: while writing the preprocessed-data cache (fresh cache)",
    ),
]
FAST = {"train-ckpt-latest"}  # the default suite: one kill (during a checkpoint write)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c[0], marks=() if c[0] in FAST else pytest.mark.slow) for c in TRAIN],
)
def test_train_killed_and_rerun_equals_uninterrupted(world, case):
    name, faults, where = case
    work = world.tmp / name
    args = [*world.train_args, f"--workdir={work}"]
    if name == "train-preprocess":
        args.append(f"--cache_dir={world.tmp / name}-cache")
    for spec in faults:
        _run(world, "train.py", *args, fault=_resolve(spec, world.train_trace))
    out = _run(world, "train.py", *args)
    if not faults[0].startswith(("train.epoch:1", "preprocess", "checkpoint.best:1")):
        assert "resuming from checkpoint" in out, out[-2000:]
    assert "took over the lock left by process" in out, out[-2000:]  # the killed run's run.lock
    for which in ("latest", "best"):
        _assert_same_params(world.train_ref, work, which)
    assert _metrics(work) == _metrics(world.train_ref)
    _no_lock_left(work)
    record(
        "SIGKILL",
        where,
        len(faults),
        "re-run finished; latest and best params and metrics.jsonl bitwise equal to an uninterrupted run",
    )


#: fuse.py --method=timm of one source: Fisher on 2 cases, adaption 2 epochs of 2 steps
FUSE = [
    ("fuse-fisher-case", ["fisher.compute:1"], "fuse.py: as the Fisher computation starts (source locked)"),
    (
        "fuse-fisher-cache",
        ["fisher.cache:1"],
        "fuse.py: Fisher cache written to its temporary file, not renamed",
    ),
    ("fuse-adapt-step", ["adapt.epoch:2"], "fuse.py: adaption stage, in epoch 2 before its steps"),
    ("fuse-adapt-validate", ["adapt.validate:1"], "fuse.py: before the adaption stage's first validation"),
    (
        "fuse-adapt-ckpt",
        ["checkpoint.latest:1"],
        "fuse.py: while writing the adaption stage's first checkpoint",
    ),
    ("fuse-ratios", ["ratios.write:1"], "fuse.py: between the mixing-ratio files (json written, csv not)"),
    ("fuse-fused-best", ["checkpoint.best:last"], "fuse.py: while writing the fused checkpoint (best)"),
    ("fuse-fused-latest", ["checkpoint.latest:last"], "fuse.py: while writing the fused checkpoint (latest)"),
    (
        "fuse-twice",
        ["fisher.cache:1", "fisher.cache:1"],
        "fuse.py: twice in a row with the Fisher cache written but not renamed",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", FUSE, ids=[c[0] for c in FUSE])
def test_fuse_killed_and_rerun_equals_uninterrupted(world, fuse_ref, case):
    name, faults, where = case
    src = _source_copy(world, name)
    out_dir = world.tmp / name
    args = [f"--source={src}", *world.fuse_args, f"--out={out_dir}"]
    for spec in faults:
        _run(world, "fuse.py", *args, fault=_resolve(spec, fuse_ref.trace))
    _run(world, "fuse.py", *args)
    _assert_same_params(fuse_ref.out, out_dir, "best")
    ref_ratios = json.loads((fuse_ref.out / "mixing_ratios.json").read_text())
    assert json.loads((out_dir / "mixing_ratios.json").read_text()) == ref_ratios
    ref_csv = (fuse_ref.out / "mixing_ratios.csv").read_text()
    assert (out_dir / "mixing_ratios.csv").read_text() == ref_csv
    with np.load(fuse_ref.source / "fisher" / "fisher_empirical.npz") as a:
        with np.load(src / "fisher" / "fisher_empirical.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    _assert_same_params(fuse_ref.out / "adaption", out_dir / "adaption", "best")
    _no_lock_left(out_dir)
    _no_lock_left(out_dir / "adaption")
    record(
        "SIGKILL",
        where,
        len(faults),
        "re-run finished; fused params, mixing ratios and Fisher cache bitwise equal to an uninterrupted run",
    )


def test_disk_full_ends_with_one_line_and_the_run_resumes(world):
    """ENOSPC (injected at the metrics write of epoch 2): ``error: disk full ... <path>``, exit 2;
    re-run after space is freed: same result as an uninterrupted run."""
    work = world.tmp / "disk-full"
    args = [*world.train_args, f"--workdir={work}"]
    env = dict(world.env, TIMM_JAX_FAULT="metrics.write:2:enospc")
    p = subprocess.run(
        [sys.executable, str(world.code / "train.py"), *args],
        env=env,
        cwd=world.tmp,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "disk full" in errors[0] and str(work / "metrics.jsonl") in errors[0], (
        p.stderr
    )
    assert "Traceback" not in p.stderr
    assert not (work / "run.lock").exists()  # released on the way out
    _run(world, "train.py", *args)
    for which in ("latest", "best"):
        _assert_same_params(world.train_ref, work, which)
    assert _metrics(work) == _metrics(world.train_ref)
    record(
        "ENOSPC",
        "train.py: metrics.jsonl write after epoch 2 (subprocess)",
        1,
        "one line 'error: disk full ... <path>', exit 2; re-run resumed, params and metrics bitwise equal",
    )


def test_a_second_train_py_on_a_held_workdir_refuses(world):
    """A live process holds the workdir: another train.py there stops with one line naming it."""
    from timm_jax.training.rundir import RunDir, make_meta

    work = world.tmp / "held"
    with RunDir.create(str(work), make_meta("train", model={}, data={})):
        p = subprocess.run(
            [sys.executable, str(world.code / "train.py"), *world.train_args, f"--workdir={work}"],
            env=world.env,
            cwd=world.tmp,
            capture_output=True,
            text=True,
        )
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {work} is in use by process {os.getpid()}")
    assert "Traceback" not in p.stderr
    record(
        "second process",
        "train.py on a workdir a live process holds (subprocess)",
        1,
        "refused with one line",
    )


@pytest.mark.slow
def test_two_processes_computing_one_fisher_cache(world, fuse_ref):
    """Two processes want the same source's Fisher cache at once: both finish — one computes it
    holding the source's lock, the other waits for that lock and reads the cache — and the cache is
    the uninterrupted run's, bit for bit."""
    src = _source_copy(world, "concurrent")
    code = f"from timm_jax.runs.fisher_cache import source_fisher; source_fisher({str(src)!r})"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=world.env, cwd=world.tmp, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    assert [p.name for p in (src / "fisher").iterdir()] == ["fisher_empirical.npz"]  # no temporary left
    with np.load(fuse_ref.source / "fisher" / "fisher_empirical.npz") as a:
        with np.load(src / "fisher" / "fisher_empirical.npz") as b:
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    record(
        "two concurrent processes",
        "the same source's Fisher cache (fuse.py)",
        1,
        "both finish; cache bitwise equal to a single run's, no temporary file left",
    )
