"""Test-only fault injection at named points of the code (crash-consistency tests).

``TIMM_JAX_FAULT="<point>:<n>[:<action>]"`` (several separated by commas) makes the ``n``-th call
of :func:`fault` with that ``point`` in this process

* ``kill`` (the default) — send SIGKILL to the process itself, as a power cut or the OOM killer
  would: no ``finally``, no flushing;
* ``enospc`` — raise ``OSError(ENOSPC)``, as a write to a full disk does.

``TIMM_JAX_FAULT_LOG=<file>`` appends the name of every point reached to ``<file>`` (one per
line), so a test can choose "the last checkpoint write" from an uninterrupted run's trace.
Without either variable :func:`fault` returns at once. The points (``tests/test_crash_matrix.py``
and ``docs/reliability.md`` list where each one sits): ``train.step`` / ``adapt.step`` (before
each training step of the epoch loop ``train`` / ``adapt``), ``validate`` (before each
validation volume), ``checkpoint.best`` / ``checkpoint.latest`` (while orbax writes that
checkpoint), ``metrics.write`` (before ``metrics.jsonl`` is replaced), ``fisher.case`` (after
each case of a Fisher computation), ``fisher.cache`` (the cache written to its temporary file,
not yet renamed), ``ratios.write`` (between the mixing-ratio files of a fusion),
``preprocess.cache`` (before a preprocessed case is renamed into the cache).
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["fault"]

_hits: dict[str, int] = {}


def fault(point: str, path: str = "") -> None:
    """Count a visit of ``point``; kill the process or fail the write to ``path`` when
    ``TIMM_JAX_FAULT`` asks for this visit."""
    log = os.environ.get("TIMM_JAX_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(point + "\n")
    spec = os.environ.get("TIMM_JAX_FAULT")
    if not spec:
        return
    _hits[point] = _hits.get(point, 0) + 1
    for item in spec.split(","):
        name, n, *action = item.strip().split(":")
        if name != point or int(n) != _hits[point]:
            continue
        if action and action[0] == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or point)
        os.kill(os.getpid(), signal.SIGKILL)
