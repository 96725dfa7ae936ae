"""Test-only fault injection at named points of the code (crash-consistency tests).

``TIMM_JAX_FAULT="<point>:<n>[:<action>]"`` (several separated by commas) makes the ``n``-th call
of :func:`fault` with that ``point`` in this process

* ``kill`` (the default) — send SIGKILL to the process itself, as a power cut or the OOM killer
  would: no ``finally``, no flushing;
* ``enospc`` — raise ``OSError(ENOSPC)``, as a write to a full disk does;
* ``eacces`` — raise ``PermissionError(EACCES)``, as a write into a read-only folder does (the
  tests run as root, whom no permission bit stops).

``TIMM_JAX_FAULT_LOG=<file>`` appends the name of every point reached to ``<file>`` (one per
line), so a test can choose "the last checkpoint write" from an uninterrupted run's trace.
Without either variable :func:`fault` returns at once. The points sit at I/O and at named
stages, never inside a per-step or per-case loop (``tests/test_crash_matrix.py`` and
``docs/reliability.md`` list where each one sits):
``train.epoch`` / ``adapt.epoch`` (before the steps of each epoch of the loop ``train`` / ``adapt``
— nothing is written within an epoch, so this is a mid-epoch kill), ``train.validate`` /
``adapt.validate`` (before each epoch's validation), ``checkpoint.best`` / ``checkpoint.latest``
(while orbax writes that checkpoint), ``metrics.write`` (``metrics.jsonl`` written to its temporary
file, not renamed), ``results.summary`` (an evaluation's ``summary.json`` likewise),
``fisher.compute`` (a source's Fisher computation starting, its lock held), ``fisher.cache`` (the
cache written to its temporary file, not renamed), ``lock.create`` (a run's lock file being
created), ``write.probe`` (a folder to write into being checked), ``ratios.write`` (between the
mixing-ratio files of a fusion), ``preprocess.cache`` (a preprocessed case's record not yet
renamed into the cache).
The atomic writes (:mod:`timm_jax.atomic`) carry the "written, not renamed" points.
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
        if action and action[0] == "eacces":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path or point)
        os.kill(os.getpid(), signal.SIGKILL)
