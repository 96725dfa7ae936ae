"""`make demo`'s pipeline at smoke scale: every stage runs, the report has the table and figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _demo import FAST_COMPILE_ENV, FAST_XLA_FLAGS

pytestmark = pytest.mark.e2e  # scripts in subprocesses: left out by `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(FAST_COMPILE_ENV, XLA_FLAGS=FAST_XLA_FLAGS, PYTHONPATH=str(ROOT))  # as in-process
    out = tmp_path / "demo"
    p = subprocess.run(
        [sys.executable, "-m", "timm_jax.experiments.demo", f"--out={out}", "--scale=smoke"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for method in ("no transfer", "M1", "M2", "IMM", "T-IMM"):
        assert f"| {method} |" in p.stdout
    assert f"report: {out}/report.md" in p.stdout
    report = (out / "report.md").read_text()
    assert "synthetic" in report and "Forgetting" in report
    for fig in ("mixing_ratios.png", "per_case.png", "prediction.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
        assert f"figures/{fig}" in report
    # a second invocation reuses every finished run
    p2 = subprocess.run(
        [sys.executable, "-m", "timm_jax.experiments.demo", f"--out={out}", "--scale=smoke"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p2.returncode == 0
    assert "already finished" in p2.stdout  # the sources (train.py's own resume check)
    assert "[train] epoch" not in p2.stdout and "[adapt] epoch" not in p2.stdout  # nothing retrained
    assert "[fuse]" not in p2.stdout  # finished fusions and evaluations are reused, not reopened
