"""Command-line protocol: train -> fuse (IMM, T-IMM) -> train from fused -> evaluate; resume; errors.

Runs the real scripts in subprocesses on a tiny generated demo set (6 mm, 32^3 volumes) with a
tiny network, sharing a persistent compilation cache.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _demo import script_env, tiny_demo

pytestmark = pytest.mark.e2e  # scripts in subprocesses: left out by `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
NET = ["--base_filters=4", "--depth=3"]
SCHED = ["--patch=16,16,16", "--batch_size=2", "--steps_per_epoch=2", "--max_epochs=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    e = script_env(tmp, ROOT)
    tiny_demo(tmp / "data", n_parc_task1=4, n_parc_task2=4, n_brats_train=4, n_brats_test=2)
    return tmp, e


def run(env, script, *args, check=True):
    tmp, e = env
    p = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        env=e,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def parc(tmp, key):
    return [f"--data_dir={tmp}/data/parcellation", "--layout=parcellation", f"--task_key={key}"]


def brats(tmp):
    return [f"--data_dir={tmp}/data/brats", "--layout=brats", "--task_key=task3"]


def test_protocol_end_to_end(env):
    tmp, _ = env
    r = tmp / "runs"
    out = run(env, "train.py", *parc(tmp, "task1"), f"--workdir={r}/m1", *NET, *SCHED).stdout
    assert "epoch 2/2" in out and "val_dice" in out and "Mvox/s" in out
    out = run(
        env,
        "train.py",
        *parc(tmp, "task2"),
        f"--workdir={r}/m2",
        "--init=transfer",
        f"--init_from={r}/m1",
        *NET,
        *SCHED,
    ).stdout
    assert "transfer from" in out and "task-specific leaves re-initialised" in out
    out = run(
        env,
        "fuse.py",
        f"--source={r}/m1,{r}/m2",
        *brats(tmp),
        "--method=imm",
        f"--out={r}/imm",
        "--patch=16,16,16",
    ).stdout
    assert "shape-mismatched: conv_enc0_in/kernel" in out
    assert (r / "m1" / "fisher" / "fisher_empirical.npz").is_file()
    out = run(
        env,
        "fuse.py",
        f"--source={r}/m1,{r}/m2",
        *brats(tmp),
        "--method=timm",
        "--granularity=layer",
        f"--out={r}/timm",
        *SCHED,
    ).stdout
    assert "Fisher of" in out and "cached" in out and "[adapt] epoch 2/2" in out
    ratios = json.loads((r / "timm" / "mixing_ratios.json").read_text())
    assert ratios["sources"] == ["m1", "m2"]
    assert all(abs(sum(v) - 1) < 1e-5 for v in ratios["ratios"].values())
    assert (r / "timm" / "mixing_ratios.png").stat().st_size > 1000
    assert (r / "timm" / "mixing_ratios.csv").read_text().startswith("layer,m1,m2")
    out = run(
        env,
        "train.py",
        *brats(tmp),
        f"--workdir={r}/t3",
        "--init=fused",
        f"--init_from={r}/timm",
        *NET,
        *SCHED,
    ).stdout
    assert "initialised from fused checkpoint" in out
    lines = (r / "t3" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    run(env, "evaluate.py", f"--run={r}/t3", "--save_predictions")
    rows = list(csv.DictReader(open(r / "t3" / "eval_test" / "per_case.csv")))
    assert len(rows) == 2 and list(rows[0])[0] == "case"
    for k in ("dice_WT", "dice_TC", "dice_ET", "hd95_WT", "dice_mean"):
        assert k in rows[0]
        assert all(0 <= float(x[k]) <= 1 for x in rows) if k.startswith("dice") else True
    summary = json.loads((r / "t3" / "eval_test" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["extra"]["channels"] == ["WT", "TC", "ET"]
    mean = np.mean([float(x["dice_mean"]) for x in rows])
    assert abs(summary["metrics"]["dice_mean"]["mean"] - mean) < 1e-6
    import nibabel as nib

    pred = nib.load(r / "t3" / "eval_test" / "predictions" / f"{rows[0]['case']}.nii.gz")
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
    # forgetting mode (paper Table 4): fused transferable leaves + each source's task-specific ones
    run(env, "evaluate.py", f"--run={r}/timm", f"--forgetting={r}/m1,{r}/m2", "--nohd95")
    forgetting = json.loads((r / "timm" / "forgetting" / "forgetting.json").read_text())
    assert set(forgetting) == {"m1", "m2"} and all(0 <= v["mean"] <= 1 for v in forgetting.values())
    m1_rows = list(csv.DictReader(open(r / "timm" / "forgetting" / "m1" / "per_case.csv")))
    assert "dice_thalamus" in m1_rows[0]


def _final_params(run_dir):
    from timm_jax.core.partition import to_flat_dict
    from timm_jax.training.rundir import RunDir

    with RunDir.open(str(run_dir)) as run:
        params = run.load_params("latest")[0]
    return {k: np.asarray(v) for k, v in to_flat_dict(params).items()}


def test_kill_and_resume_gives_the_same_result(env):
    tmp, e = env
    sched = ["--patch=16,16,16", "--batch_size=2", "--steps_per_epoch=2", "--max_epochs=4"]
    args = [*parc(tmp, "task1"), *NET, *sched]
    run(env, "train.py", *args, f"--workdir={tmp}/full")
    killed = tmp / "killed"
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, f"--workdir={killed}"],
        env=e,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    latest = killed / "checkpoints" / "latest"
    while time.time() < deadline and p.poll() is None:
        if latest.is_dir() and any(d.name.isdigit() for d in latest.iterdir()):
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    out = run(env, "train.py", *args, f"--workdir={killed}").stdout
    assert "resuming from checkpoint at step" in out, out
    a, b = _final_params(tmp / "full"), _final_params(killed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    full = [json.loads(l) for l in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    res = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [x["val_loss"] for x in full] == [x["val_loss"] for x in res]


@pytest.mark.parametrize(
    "case",
    [
        ("train.py", ["--layout=parcellation"], "missing required flag: --workdir"),
        ("train.py", ["--workdir=W", "--layout=parcellation"], "missing required flag(s): --data_dir"),
        ("train.py", ["--workdir=W", "PARC1", "--init=transfer"], "--init=transfer needs --init_from"),
        ("train.py", ["--workdir=W", "PARC1", "--init_from=RUNS/m1"], "--init=random"),
        ("train.py", ["--workdir=W", "PARC1", "--init=transfer", "--init_from=nowhere"], "run directory"),
        ("train.py", ["--workdir=W", "PARC1", "--patch=10,16,16"], "must be divisible by 16"),
        ("train.py", ["--workdir=W", "PARC1", "--patch=16,16"], "--patch must be three integers"),
        (
            "train.py",
            ["--workdir=W", "--data_dir=DATA/brats", "--layout=parcellation", "--task_key=task3"],
            "is a brats task",
        ),
        ("train.py", ["--workdir=W", "--data_dir=nowhere", "--layout=brats"], "does not exist"),
        ("fuse.py", ["--out=O", "PARC1"], "missing required flag: --source"),
        ("evaluate.py", [], "missing required flag: --run"),
        ("evaluate.py", ["--run=nowhere"], "does not exist"),
    ],
)
def test_bad_flags_give_clear_errors(env, case):
    tmp, _ = env
    script, args, msg = case
    sub = {
        "PARC1": parc(tmp, "task1"),
    }
    full = []
    for a in args:
        full += sub.get(a, [a.replace("DATA", f"{tmp}/data").replace("RUNS", f"{tmp}/runs")])
    p = run(env, script, *full, check=False)
    assert p.returncode != 0
    assert msg in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_checkpoint_errors(env):
    tmp, _ = env
    r = tmp / "ckerr"
    run(
        env,
        "train.py",
        *parc(tmp, "task1"),
        f"--workdir={r}/src",
        "--base_filters=2",
        "--depth=3",
        "--patch=16,16,16",
        "--steps_per_epoch=1",
        "--max_epochs=1",
    )
    # another architecture
    p = run(
        env,
        "train.py",
        *parc(tmp, "task2"),
        f"--workdir={r}/x",
        "--init=transfer",
        f"--init_from={r}/src",
        *NET,
        "--patch=16,16,16",
        check=False,
    )
    assert p.returncode == 2 and "another architecture" in p.stderr
    # a fused init from a plain run and vice versa
    p = run(
        env,
        "train.py",
        *parc(tmp, "task2"),
        f"--workdir={r}/x",
        "--init=fused",
        f"--init_from={r}/src",
        "--base_filters=2",
        "--depth=3",
        "--patch=16,16,16",
        check=False,
    )
    assert p.returncode == 2 and "not a fuse.py output" in p.stderr
    # same workdir, other configuration
    p = run(
        env,
        "train.py",
        *parc(tmp, "task1"),
        f"--workdir={r}/src",
        "--base_filters=2",
        "--depth=3",
        "--patch=16,16,16",
        "--steps_per_epoch=1",
        "--max_epochs=1",
        "--learning_rate=0.1",
        check=False,
    )
    assert p.returncode == 2 and "another configuration" in p.stderr
    # corrupt checkpoint data
    for d, _, files in os.walk(r / "src" / "checkpoints"):
        for f in files:
            if "state" in d and not f.startswith("_"):
                Path(d, f).write_bytes(b"garbage")
    p = run(
        env,
        "train.py",
        *parc(tmp, "task2"),
        f"--workdir={r}/y",
        "--init=transfer",
        f"--init_from={r}/src",
        "--base_filters=2",
        "--depth=3",
        "--patch=16,16,16",
        check=False,
    )
    assert p.returncode == 2 and "could not be read" in p.stderr and "src" in p.stderr
    # the one-line error names the checkpoint (orbax's background threads may interleave their
    # own tracebacks of the same failed read before it, so look for it on its own line)
    assert any(
        line.strip().startswith("error: checkpoint ") and "could not be read" in line
        for line in p.stderr.splitlines()
    ), p.stderr[-2000:]


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_event_files_of_train_fuse_and_evaluate(env):
    tmp, _ = env
    r = tmp / "tb"
    sched = ["--patch=16,16,16", "--batch_size=2", "--steps_per_epoch=2", "--max_epochs=2"]
    run(env, "train.py", *parc(tmp, "task1"), f"--workdir={r}/m1", *NET, *sched)
    run(
        env,
        "train.py",
        *parc(tmp, "task2"),
        f"--workdir={r}/m2",
        *NET,
        *sched,
        "--init=transfer",
        f"--init_from={r}/m1",
    )
    run(env, "fuse.py", f"--source={r}/m1,{r}/m2", *brats(tmp), "--method=timm", f"--out={r}/timm", *sched)
    run(env, "evaluate.py", f"--run={r}/m1")
    train = _events(r / "m1")
    tags = set(train.Tags()["scalars"])
    assert {
        "train/loss",
        "val/loss",
        "val/dice_mean",
        "lr",
        "perf/step_time_s",
        "perf/voxels_per_s",
        "val/dice/thalamus",
        "val/dice/amygdala",
    } <= tags
    assert [e.step for e in train.Scalars("train/loss")] == [2, 4]  # one point per epoch, global step
    metrics = [json.loads(l) for l in (r / "m1" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in train.Scalars("val/loss")] == pytest.approx([m["val_loss"] for m in metrics])
    adapt = _events(r / "timm" / "adaption")
    ratio_tags = [t for t in adapt.Tags()["scalars"] if t.startswith("ratios/")]
    assert "ratios/conv_enc1_in/m1" in ratio_tags and "ratios/conv_enc1_in/m2" in ratio_tags
    assert len(adapt.Scalars("ratios/conv_enc1_in/m1")) == 2
    a1 = adapt.Scalars("ratios/conv_enc1_in/m1")[-1].value
    a2 = adapt.Scalars("ratios/conv_enc1_in/m2")[-1].value
    assert a1 + a2 == pytest.approx(1, abs=1e-5)
    assert "mixing_ratios" in _events(r / "timm").Tags()["images"]
    ev = _events(r / "m1" / "eval_test")
    assert "eval/test/dice_mean" in ev.Tags()["scalars"]
    assert any(t.startswith("predictions/") for t in ev.Tags()["images"])


def _run_in_pty(args, env):
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    # a terminal of 24 x 80 (a fresh pseudo-terminal reports 0 x 0, which tqdm draws as nothing)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                data = b""
            if not data and p.poll() is not None:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    p.wait()
    os.close(master)
    return p.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_plain_lines_otherwise(env):
    tmp, e = env
    e = {k: v for k, v in e.items() if k != "TIMM_JAX_PROGRESS"}
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        *parc(tmp, "task1"),
        *NET,
        "--patch=16,16,16",
        "--steps_per_epoch=3",
        "--max_epochs=1",
    ]
    rc, out = _run_in_pty([*args, f"--workdir={tmp}/tty"], e)
    assert rc == 0, out[-2000:]
    assert "\r" in out.replace("\r\n", "\n") and ("step/s" in out or "s/step" in out)  # a tqdm bar
    assert "epoch 1/1" in out
    p = subprocess.run(
        [*args, f"--workdir={tmp}/notty"], env=e, cwd=tmp, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0
    both = p.stdout + p.stderr
    assert "epoch 1/1" in both and "\r" not in both and "step/s" not in both and "s/step" not in both


def test_help_groups_the_flags_and_config_relaunches_a_run(env):
    """--help lists the script's own flags by concern; --config=<run>/config.json re-creates a run's
    flags (it resumes the same run, and a flag given beside it overrides a recorded one)."""
    tmp, _ = env
    out = run(env, "train.py", "--help").stdout
    for group in ("Data:", "Network:", "Training:", "Devices and processes:", "Relaunch:", "This script:"):
        assert group in out, group
    assert out.index("  --workdir:") > out.index("This script:") > out.index("  --patch:")
    assert "--helpfull" in out and "--flagfile" in out
    work = tmp / "relaunch"
    run(env, "train.py", *parc(tmp, "task1"), *NET, *SCHED, f"--workdir={work}")
    again = run(env, "train.py", f"--config={work}/config.json")
    assert "relaunching with the settings of" in again.stdout and "run already finished" in again.stdout
    longer = run(env, "train.py", f"--config={work}", "--max_epochs=3", check=False)
    assert longer.returncode == 2 and "another configuration" in longer.stderr  # max_epochs is keyed
    bad = run(env, "train.py", f"--config={tmp}/nowhere.json", check=False)
    assert (
        bad.returncode == 2
        and bad.stderr.startswith("error: --config=")
        and len(bad.stderr.splitlines()) == 1
    )
