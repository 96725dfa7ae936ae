"""The scripts' error policy: a user error is one line and exit status 2; a bug keeps its traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # scripts in subprocesses: left out by `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def _script(script: str, args: list[str], patch: str = "") -> str:
    """Run ``script`` as __main__ with ``args``, after ``patch`` (code run first)."""
    return (
        f"import sys, runpy\n{patch}\nsys.argv = [{script!r}, *{args!r}]\n"
        f"runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
    )


def test_user_error_is_one_line_and_exit_2(tmp_path):
    p = _run(_script("train.py", ["--workdir=w", "--data_dir=nowhere", "--layout=brats"]), tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: data directory nowhere (--data_dir) does not exist"]


@pytest.mark.parametrize("exc", ["RuntimeError", "ValueError", "KeyError"])
def test_a_bug_in_a_workflow_keeps_its_traceback(tmp_path, exc):
    patch = (
        "import timm_jax.workflows.train as t\n"
        f"def boom(spec):\n    raise {exc}('a bug in resolve')\n"
        "t.resolve = boom\n"
    )
    p = _run(_script("train.py", ["--workdir=w", "--data_dir=d", "--layout=brats"], patch), tmp_path)
    assert p.returncode == 1
    assert "Traceback (most recent call last)" in p.stderr
    assert f"{exc}: " in p.stderr and "a bug in resolve" in p.stderr
    assert "in train_model" in p.stderr  # the frame of the workflow is shown
    assert "error: " not in p.stderr.splitlines()[-1]


def test_a_bug_in_fuse_keeps_its_traceback(tmp_path):
    patch = (
        "import timm_jax.workflows.fuse as f\n"
        "def boom(dirs):\n    raise RuntimeError('a bug in load_sources')\n"
        "f.load_sources = boom\n"
    )
    p = _run(
        _script("fuse.py", ["--source=a,b", "--out=o", "--data_dir=d", "--layout=brats"], patch), tmp_path
    )
    assert p.returncode == 1 and "Traceback" in p.stderr and "RuntimeError: a bug in load_sources" in p.stderr


def test_flag_errors_are_one_line(tmp_path):
    p = _run(_script("evaluate.py", ["--run=r", "--patch=1,2"]), tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --patch must be three integers D,H,W, got [1, 2]"
    ]
    p = _run(_script("train.py", ["--workdir=w", "stray"]), tmp_path)
    assert p.returncode == 2 and "unexpected positional arguments" in p.stderr
