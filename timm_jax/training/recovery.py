"""What a resumed run does with checkpoints it cannot read: set them aside, never delete them.

* :func:`restore_newest` — resume from the newest readable checkpoint (``latest`` newest first,
  then ``best``); the unreadable ones before it are moved to ``checkpoints/corrupt/`` with a
  warning. If checkpoints exist but none is readable, one :class:`~timm_jax.errors.CheckpointError`
  names them and nothing is moved.
* :func:`check_best` — at resume, a ``best`` checkpoint that cannot be read is set aside and, when
  its step is still among the ``latest`` checkpoints, written again from there.

In a multi-process run process 0 moves the files and the others wait for it
(:func:`set_aside`). docs/reliability.md lists the damage each case was tested against.
"""

from __future__ import annotations

import logging
import os

import jax

from timm_jax.core import PyTree
from timm_jax.errors import CheckpointError, writing
from timm_jax.training.checkpoints import CheckpointStore

__all__ = ["check_best", "restore_newest", "set_aside"]

_log = logging.getLogger(__name__)


def set_aside(store: CheckpointStore, which: str, step: int) -> str:
    """Move an unreadable checkpoint to ``checkpoints/corrupt/<which>-<step>[-k]``; returns where."""
    src = store.path(which, step)
    dst = os.path.join(store.root, "corrupt", f"{which}-{step}")
    k = 0
    while os.path.exists(dst + (f"-{k}" if k else "")):
        k += 1
    dst += f"-{k}" if k else ""
    if jax.process_index() == 0:
        with writing(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"timm_jax set aside {which}-{step}")
    store.reload(which)
    return dst


def restore_newest(store: CheckpointStore, target: PyTree) -> tuple[PyTree, dict] | None:
    """``(state, meta)`` of the newest readable checkpoint, for resuming (see the module
    docstring); ``None`` if there is no checkpoint."""
    candidates = [("latest", s) for s in reversed(store.all_steps("latest"))]
    candidates += [("best", s) for s in reversed(store.all_steps("best"))]
    bad = []
    for which, step in candidates:
        try:
            out = store.restore(target, which, step)
        except CheckpointError as e:
            bad.append((which, step, e))
            continue
        for bad_which, bad_step, e in bad:
            moved = set_aside(store, bad_which, bad_step)
            _log.warning(
                "%s; moved it to %s and resumed from the previous good checkpoint (%s step %d)",
                e,
                moved,
                which,
                step,
            )
        return out
    if bad:
        raise CheckpointError(
            f"no checkpoint of {os.path.dirname(store.root)} can be read: {bad[0][2]}; nothing was "
            "changed — move the run directory aside to start again"
        )
    return None


def check_best(store: CheckpointStore, target: PyTree) -> None:
    """At resume: a ``best`` checkpoint that cannot be read is set aside with a warning and,
    when its step is still among the ``latest`` checkpoints, written again from there (else the
    run's next improving epoch writes a new one; readers fall back to ``latest``)."""
    step = store.latest_step("best")
    if step is None:
        return
    try:
        store.restore(target, "best", step)
        return
    except CheckpointError as e:
        moved = set_aside(store, "best", step)
        problem = f"{e}; moved it to {moved}"
    if step in store.all_steps("latest"):
        state, meta = store.restore(target, "latest", step)
        store.save(step, state, meta, best=True)
        _log.warning("%s and wrote it again from the latest checkpoint of the same step", problem)
    else:
        _log.warning(
            "%s; that step is no longer among the latest checkpoints, so the run has no best "
            "checkpoint until an epoch improves on it (readers use the latest meanwhile)",
            problem,
        )
