"""The one way the package writes a file: to a temporary file beside it, flushed to disk, renamed.

A reader therefore sees the old file or the new one, never a part: a process killed while
writing (``kill -9``, a power cut) leaves the previous version and, at worst, an orphaned
temporary file ``.tmp-<pid>-<random>-<name>`` beside it (the name last, so that writers that
choose the format by the extension — nibabel, numpy — write the right one). Every writer of the package —
``config.json``, ``metrics.jsonl``, evaluation results, the Fisher cache, the preprocessing cache,
the mixing ratios, the reproduction's records, the compiled CPU kernels — goes through
:func:`atomic_write` (a file object) or :func:`atomic_path` (a temporary path that a tool fills),
so that three things hold everywhere at once:

* a full disk raises :class:`~timm_jax.errors.DiskFullError` and a folder that cannot be written
  (read-only, another user's) :class:`~timm_jax.errors.NotWritableError`, each one line naming the
  path (:func:`timm_jax.errors.writing`);
* the file is ``fsync``-ed before the rename, so the rename never publishes unwritten data;
* the crash tests' "killed mid-write" fault point sits between the write and the rename
  (:func:`timm_jax.faults.fault` with the caller's ``fault_point``).

This module imports only :mod:`timm_jax.errors` and :mod:`timm_jax.faults`; every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterator
from typing import IO, Any

from timm_jax.errors import NotWritableError, writing
from timm_jax.faults import fault

__all__ = ["atomic_dir", "atomic_path", "atomic_paths", "atomic_write", "writable_dir", "write_json"]


def _temporary(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{name}")


@contextlib.contextmanager
def atomic_paths(paths, *, fault_point: str = "") -> Iterator[list[str]]:
    """Temporary paths beside each of ``paths`` for the body to fill; when it returns, each is
    fsynced and renamed over its target, in order — the last one is the group's commit mark (e.g.
    a cache entry's record after its arrays). If the body raises, no target is touched and the
    temporary files are removed. Folders are created."""
    paths = [os.fspath(p) for p in paths]
    tmps: list[str] = []
    with writing(paths[-1]):
        try:
            for path in paths:
                if os.path.isdir(path):
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                tmps.append(_temporary(path))
            yield list(tmps)
            for tmp in tmps:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if fault_point:
                fault(fault_point, tmps[-1])
            for tmp, path in zip(tmps, paths):
                os.replace(tmp, path)
        finally:
            for tmp in tmps:
                if os.path.lexists(tmp):
                    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fault_point: str = "") -> Iterator[str]:
    """A temporary path beside ``path`` for the body to fill (e.g. a compiler's ``-o``, nibabel's
    ``save``); renamed over ``path`` when the body returns, removed if it raises."""
    with atomic_paths([path], fault_point=fault_point) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", *, fault_point: str = "", **open_kw
) -> Iterator[IO]:
    """``open(path, mode)`` that writes a temporary file and renames it over ``path`` when the
    body returns (``mode`` ``"w"`` or ``"wb"``; ``open_kw`` e.g. ``newline=""``). If the body
    raises, ``path`` is untouched and the temporary file removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', got {mode!r}")
    with atomic_path(path, fault_point=fault_point) as tmp:
        # mode 0o666 less the umask, like open(): the file's permissions are those of a plain write
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, mode, **open_kw) as f:
            yield f
            f.flush()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """A temporary folder beside ``path`` for the body to fill; renamed into place when it returns
    (a folder already at ``path`` is moved aside first and removed after), removed if it raises:
    a reader finds the whole old folder or the whole new one (e.g. a model bundle)."""
    import shutil
    import tempfile

    path = os.fspath(path).rstrip(os.sep)
    parent = os.path.dirname(path) or "."
    with writing(path):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
        try:
            yield tmp
            if os.path.lexists(path):
                old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
                os.replace(path, os.path.join(old, "previous"))
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any, *, fault_point: str = "", indent: int | None = 2) -> None:
    """``obj`` as JSON at ``path``, atomically."""
    with atomic_write(path, fault_point=fault_point) as f:
        json.dump(obj, f, indent=indent)


def writable_dir(path: str | os.PathLike) -> str:
    """Create the folder ``path`` if needed and check that files can be made in it, by making and
    removing one: a read-only folder (or one of another user, or a file in its place) is one line
    (:class:`~timm_jax.errors.NotWritableError`) before anything is computed."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotWritableError(
            f"cannot write {path}: a file is there where a folder should be; move it aside"
        )
    with writing(path):
        fault("write.probe", path)
        os.makedirs(path, exist_ok=True)
        probe = _temporary(os.path.join(path, "probe"))
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    return path
