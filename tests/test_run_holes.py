"""Run directories tried as an adversarial user would: each hole found is one ``error:`` line or
correct behaviour now.

Read-only run directories, two sources whose folders share a name, two fusions into one
``--out``, a killed evaluation between its two result files, paths of the wrong kind, a source
given twice, and a compiled-kernel cache that others could write.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _demo import script_env, tiny_demo

from timm_jax.atomic import atomic_write
from timm_jax.config import DataSpec, EvalConfig, FuseConfig, ModelConfig, TrainConfig
from timm_jax.errors import CheckpointError, ConfigError, DiskFullError, NotWritableError, RunLockedError
from timm_jax.training.metrics import write_results
from timm_jax.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
NET = ModelConfig(base_filters=2, depth=2, conv_impl="depth2d")
SCHED = TrainConfig(patch_shape=(16, 16, 16), batch_size=1, steps_per_epoch=1, max_epochs=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from timm_jax.workflows.train import train_model

    tmp = tmp_path_factory.mktemp("holes")
    tiny_demo(tmp / "data", n_parc_task1=2, n_brats_train=2)
    parc = DataSpec(data_dir=str(tmp / "data" / "parcellation"), layout="parcellation", task_key="task1")
    m1 = str(tmp / "runs" / "m1")
    train_model(parc, NET, SCHED, m1)
    target = DataSpec(data_dir=str(tmp / "data" / "brats"), layout="brats", task_key="task3")
    return SimpleNamespace(tmp=tmp, m1=m1, parc=parc, target=target)


def test_the_same_source_twice_is_refused(env, tmp_path):
    from timm_jax.workflows.fuse import fuse_models

    with pytest.raises(ConfigError, match="the same run twice"):
        fuse_models([env.m1, env.m1 + "/"], env.target, str(tmp_path / "f"), FuseConfig(method="imm"), SCHED)
    assert not (tmp_path / "f").exists()


def test_forgetting_of_two_sources_whose_folders_share_a_name_keeps_both(env, tmp_path):
    from timm_jax.workflows.evaluate import evaluate_forgetting

    a, b = tmp_path / "a" / "m1", tmp_path / "b" / "m1"
    for d in (a, b):
        shutil.copytree(env.m1, d)
    out = tmp_path / "forgetting"
    results = evaluate_forgetting(env.m1, [str(a), str(b)], EvalConfig(hd95=False), out_dir=str(out))
    assert sorted(results) == ["a_m1", "b_m1"]
    assert json.loads((out / "forgetting.json").read_text()).keys() == {"a_m1", "b_m1"}
    for name in ("a_m1", "b_m1"):
        assert (out / name / "summary.json").is_file() and (out / name / "per_case.csv").is_file()


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another live process that holds ``path``'s run lock (as a run writing there does)."""
    code = (
        "import time\n"
        "from timm_jax.training import run_lock\n"
        f"run_lock.acquire({str(path)!r})\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=script_env(path.parent, ROOT)
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_fusion_into_a_held_out_is_refused_before_any_fisher(env, tmp_path):
    from timm_jax.workflows.fuse import fuse_models

    out = tmp_path / "fused"
    holder = _hold_lock(out)
    try:
        cache = Path(env.m1) / "fisher"
        shutil.rmtree(cache, ignore_errors=True)
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}"):
            fuse_models([env.m1], env.target, str(out), FuseConfig(method="imm"), SCHED)
        assert not cache.exists()  # refused before a Fisher was computed or loaded
    finally:
        holder.kill()
        holder.wait()


def test_a_fisher_cache_is_not_written_into_a_source_another_process_is_writing(env, tmp_path):
    from timm_jax.runs.fisher_cache import source_fisher

    src = tmp_path / "src"
    shutil.copytree(env.m1, src)
    holder = _hold_lock(src)
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}"):
            source_fisher(str(src), patches_per_case=1)
        assert not (src / "fisher").exists()
    finally:
        holder.kill()
        holder.wait()


def test_an_evaluation_killed_between_its_files_leaves_no_mismatched_pair(tmp_path, monkeypatch):
    csv_path, json_path = tmp_path / "per_case.csv", tmp_path / "summary.json"
    write_results([{"case": "a", "dice_mean": 0.5}], csv_path, json_path, extra={"split": "val"})
    monkeypatch.setenv("TIMM_JAX_FAULT", "results.summary:1:enospc")
    with pytest.raises(DiskFullError):
        write_results([{"case": "b", "dice_mean": 0.9}], csv_path, json_path, extra={"split": "test"})
    # the new CSV, and no summary: the evaluation counts as unfinished (its summary is written last)
    assert "b" in csv_path.read_text() and not json_path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_paths_of_the_wrong_kind_are_one_line(env, tmp_path):
    from timm_jax.runs.fisher_cache import source_fisher
    from timm_jax.workflows.evaluate import evaluate_model

    src = tmp_path / "src"
    shutil.copytree(env.m1, src)
    (src / "fisher" / "fisher_empirical.npz").mkdir(parents=True)  # a folder where the cache file goes
    with pytest.raises(NotWritableError, match="fisher_empirical.npz: the path is a directory"):
        source_fisher(str(src), patches_per_case=1)
    out = tmp_path / "eval_out"
    out.write_text("a file where a folder should be")
    with pytest.raises(NotWritableError, match=str(out)):
        evaluate_model(str(src), EvalConfig(hd95=False), out_dir=str(out))
    with pytest.raises(CheckpointError, match="is a file, not a run directory"):
        RunDir.open(str(out))
    with pytest.raises(NotWritableError, match="is a directory"):
        with atomic_write(tmp_path) as f:
            f.write("x")


@pytest.mark.e2e
def test_a_read_only_run_directory_is_one_error_line(env, tmp_path):
    """Resume (train.py) and evaluate (evaluate.py) a run in a folder that may not be written: the
    permission bits are taken away; as root (whom they do not stop) the first write is refused by
    the fault injector at the point where a read-only folder refuses it."""
    run = tmp_path / "run"
    shutil.copytree(env.m1, run)
    for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    root = os.getuid() == 0
    train = [f"--data_dir={env.parc.data_dir}", "--layout=parcellation", "--task_key=task1"]
    train += ["--base_filters=2", "--depth=2", "--conv_impl=depth2d", "--patch=16,16,16"]
    train += ["--batch_size=1", "--steps_per_epoch=1", "--max_epochs=2", f"--workdir={run}"]
    cmds = [
        (["train.py", *train], "lock.create:1:eacces"),
        (["evaluate.py", f"--run={run}", "--split=test", "--nohd95"], "write.probe:1:eacces"),
    ]
    try:
        for cmd, fault in cmds:
            before = sorted(str(p) for p in run.rglob("*"))
            e = {**script_env(tmp_path, ROOT), **({"TIMM_JAX_FAULT": fault} if root else {})}
            r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=e, capture_output=True, text=True)
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            assert r.returncode == 2, (cmd[0], r.stderr[-3000:])
            assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {run}"), (cmd[0], r.stderr)
            assert "Permission denied" in lines[0] and "nothing was changed" in lines[0]
            assert sorted(str(p) for p in run.rglob("*")) == before  # nothing written
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_a_kernel_cache_others_could_write_is_refused(tmp_path):
    from timm_jax.nn.cpu_kernels import KernelCacheError, check_cache

    cache = tmp_path / "kcache"
    cache.mkdir(mode=0o700)
    lib = cache / "cpu_kernels-0123.so"
    check_cache(lib)  # a private folder without the library yet: fine
    lib.write_bytes(b"\x7fELF")
    lib.chmod(0o755)
    check_cache(lib)
    lib.chmod(0o777)
    with pytest.raises(KernelCacheError, match="writable by the group and others"):
        check_cache(lib)
    lib.chmod(0o755)
    cache.chmod(0o757)
    with pytest.raises(KernelCacheError, match=f"{cache} is writable by others"):
        check_cache(lib)
    cache.chmod(0o700)
    link = cache / "cpu_kernels-4567.so"
    link.symlink_to(lib)
    with pytest.raises(KernelCacheError, match="is a symbolic link"):
        check_cache(link)
    if os.getuid() == 0:
        os.chown(lib, 65534, 65534)
        with pytest.raises(KernelCacheError, match="owned by uid 65534"):
            check_cache(lib)


@pytest.mark.e2e
def test_a_script_with_a_writable_kernel_cache_stops_with_one_line(env, tmp_path):
    cache = tmp_path / "open-cache"
    cache.mkdir()
    cache.chmod(0o777)
    e = {**script_env(tmp_path, ROOT), "TIMM_JAX_CACHE": str(cache)}
    args = [
        f"--data_dir={env.parc.data_dir}",
        "--layout=parcellation",
        "--task_key=task1",
        "--base_filters=2",
    ]
    args += [
        "--depth=2",
        "--conv_impl=auto",
        "--patch=16,16,16",
        "--max_epochs=1",
        f"--workdir={tmp_path / 'w'}",
    ]
    r = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(
        f"error: the compiled-kernel cache {cache} is writable by the group and others"
    )
    assert not list(cache.iterdir())  # nothing built there
