"""The one family of errors that means "the input is wrong", not "the code is wrong".

The scripts (``train.py``, ``fuse.py``, ``evaluate.py``, ``python -m timm_jax...``) print a
:class:`UserError` as one line and exit with status 2; every other exception is a bug and
keeps its traceback. Raise a subclass of :class:`UserError` for bad flags, data that fail
validation, missing / corrupt / foreign checkpoints and diverging training, and name the
file, flag or leaf with what was expected.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class UserError(Exception):
    """Bad input from the user: the message names what is wrong and what was expected."""


class ConfigError(UserError, ValueError):
    """A flag or configuration value is missing, out of range or contradicts another."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or run directory is missing, unreadable, or does not fit what was asked."""


class OptimizerStateError(CheckpointError):
    """A checkpoint lacks the optimiser state a setting reads (``--fisher=adam`` needs the Adam
    second moment of each source), or the source was trained with another optimiser."""


class DivergenceError(UserError, FloatingPointError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


class DiskFullError(UserError, OSError):
    """A write failed because the disk (or the user's quota) is full; names the path. What was
    written before (the previous checkpoint) is intact: free space and run the same command again."""


class NotWritableError(UserError, OSError):
    """A file or folder the command must write cannot be written (read-only file system, no
    permission); names the path. Nothing was changed."""


class RunLockedError(UserError, RuntimeError):
    """The run directory is held by another live process (its lock file names it)."""


_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it was raised from is "no space left" (ENOSPC / EDQUOT);
    orbax / tensorstore report it in their message rather than as an ``OSError``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into :class:`DiskFullError`, and a path that may
    not be written (read-only, no permission) into :class:`NotWritableError` — one line naming the
    path; any other error passes unchanged."""
    try:
        yield
    except (DiskFullError, NotWritableError):
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(
                f"disk full: no space left while writing {path}; what was written before (the previous "
                "checkpoint) is intact — free some space and run the same command again to resume"
            ) from e
        if isinstance(e, OSError) and e.errno in (errno.EISDIR, errno.ENOTDIR):
            where = e.filename or path
            what = "is a directory" if e.errno == errno.EISDIR else "has a file where a folder should be"
            raise NotWritableError(
                f"cannot write {where}: the path {what}; move it aside (nothing was changed)"
            ) from e
        if isinstance(e, OSError) and e.errno in _NOT_WRITABLE:
            where = e.filename or path
            raise NotWritableError(
                f"cannot write {where}: {os.strerror(e.errno)}; nothing was changed — use a writable "
                "directory (e.g. copy the run elsewhere, or pass --out)"
            ) from e
        raise
