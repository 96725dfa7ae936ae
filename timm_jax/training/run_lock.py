"""The run lock: one writer per run directory, on one host or across the processes of a run.

``<run>/run.lock`` holds the pid and host of the process writing the run. It is created
atomically (``O_EXCL``): a second writer is refused with :class:`~timm_jax.errors.RunLockedError`
naming the holder; a lock left by a process of this host that is no longer running (a kill, a
restarted container) is taken over with a warning. In a multi-process run (``jax.distributed``)
process 0 takes it and every process learns the outcome (:func:`acquire_once`), so that all of
them stop with the same one line. A read-only run directory is one line too
(:class:`~timm_jax.errors.NotWritableError`). :class:`~timm_jax.training.rundir.RunDir` is the door:
``RunDir.create`` and ``RunDir.lock`` hold this lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import jax
import numpy as np

from timm_jax.errors import RunLockedError, UserError, writing
from timm_jax.faults import fault

__all__ = ["LOCK_FILE", "acquire", "acquire_once", "release"]

_log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_held: set[str] = set()  # the lock files this process holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def acquire(run_path: str, purpose: str = "run") -> str:
    """Create ``<run>/run.lock`` holding this process's pid, host and ``purpose`` (``run``: it
    writes the run; ``fisher``: it writes a Fisher cache into it), atomically (``O_EXCL``).
    A lock of a live process refuses with :class:`RunLockedError` (its ``holder`` attribute is the
    lock's content); one left by a dead process of this host (its pid is not running, or is this
    very process's: a container restarted) is taken over with a warning."""
    path = os.path.join(run_path, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose}
    with writing(path):
        os.makedirs(run_path, exist_ok=True)
    for _ in range(20):
        try:
            with writing(path):  # a read-only run directory: one line, not a traceback
                fault("lock.create", path)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with writing(path), os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _held.add(path)
            return path
        try:
            with open(path) as f:
                holder = json.load(f)
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            continue  # released meanwhile: try again
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)  # being written by its holder right now, or damaged: look again
            try:
                if time.time() - os.path.getmtime(path) < 2.0:
                    continue
            except FileNotFoundError:
                continue
            pid, host = -1, me["host"]  # a damaged lock nobody is writing: stale
        if path in _held:
            raise RunLockedError(f"{run_path} is already open for writing in this process (lock file {path})")
        if host == me["host"] and (pid == me["pid"] or pid < 0 or not _pid_alive(pid)):
            stale = f"{path}.stale-{os.getpid()}"
            try:
                with writing(path):
                    os.rename(path, stale)  # only one of several racing processes gets the file
            except FileNotFoundError:
                continue
            os.unlink(stale)
            _log.warning(
                "%s: took over the lock left by process %d on %s, which is not running", run_path, pid, host
            )
            continue
        what = "computing a Fisher cache in" if holder.get("purpose") == "fisher" else "in use by"
        error = RunLockedError(
            f"{run_path} is {what} process {pid} on {host} (lock file {path}); wait for it to "
            "finish, or delete the lock file if that process is no longer running"
        )
        error.holder = holder
        raise error
    raise RunLockedError(
        f"could not take the lock {path}: it keeps changing; is another process starting here?"
    )


def acquire_once(run_path: str, purpose: str = "run") -> str | None:
    """Process 0 takes the lock; in a multi-process run every process learns whether it did, so
    that all of them stop with the same one line (instead of waiting in collectives for a
    process 0 that has left)."""
    if jax.process_count() == 1:
        return acquire(run_path, purpose)
    from jax.experimental import multihost_utils

    held, error = None, None
    if jax.process_index() == 0:
        try:
            held = acquire(run_path, purpose)
        except UserError as e:  # held by another process, or not writable
            error = e
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise RunLockedError(f"{run_path}: process 0 could not take the run's lock (see its error)")
    return held


def release(path: str) -> None:
    """Remove the lock if it is still this process's."""
    _held.discard(path)
    try:
        with open(path) as f:
            holder = json.load(f)
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.unlink(path)
    except (OSError, ValueError):
        pass
