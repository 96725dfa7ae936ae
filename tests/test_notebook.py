"""docs/notebooks/fusion_api.ipynb runs top to bottom (its cells assert what they show)."""

import os
import time
from pathlib import Path

import pytest
from _demo import FAST_COMPILE_ENV, FAST_XLA_FLAGS

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the 'test' extra")
from nbclient import NotebookClient  # noqa: E402

pytestmark = pytest.mark.e2e  # scripts in subprocesses: left out by `make test-fast`

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "fusion_api.ipynb"


def test_fusion_api_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.delenv("TIMM_JAX_NOTEBOOK_RUNS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", FAST_XLA_FLAGS)  # one device in the kernel, as for a user
    for k, v in FAST_COMPILE_ENV.items():  # as in-process: faster compiles
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.time()
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.time() - t0
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "transferable leaves" in text and "Fisher of M1" in text
    assert "mean-IMM equals the average: True" in text
    assert "merge/copy bandwidth ratio" in text
    assert "finite difference" in text and "after 10 steps" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the ratio figure is displayed"
    assert elapsed < 600, f"the notebook took {elapsed:.0f} s"
    assert os.environ.get("TIMM_JAX_NOTEBOOK_RUNS") is None
