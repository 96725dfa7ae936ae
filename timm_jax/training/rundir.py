"""The run directory: one type that every script and workflow reads and writes runs through.

A run directory holds::

    config.json             the run's metadata (written when the run is created)
    checkpoints/latest/<step>/{state,meta}    the last few checkpoints, for resuming
    checkpoints/best/<step>/{state,meta}      the checkpoint with the best validation loss
    checkpoints/corrupt/    unreadable checkpoints set aside when a run resumed past them
    metrics.jsonl           one JSON record per epoch (read it with :func:`read_metrics`)
    run.lock                while a process writes the run: its pid and host

:class:`RunDir` owns the metadata schema (:func:`make_meta`: ``kind``, ``model``, ``train``,
``data``, ``run_key`` and whatever the workflow adds), the "is this the same configuration?"
check, the kind check and the orbax checkpoints. Open it as a context manager; its orbax
managers are closed on exit, also after an error.

* ``RunDir.create(path, meta)`` — a run to write. If the directory already holds checkpoints
  of another configuration (another ``run_key``) it refuses with :class:`CheckpointError`
  before anything is computed; if they were written with another convolution implementation it
  says so (the results then differ in float rounding). It takes ``run.lock`` first: a run held
  by a live process is refused (:class:`RunLockedError`), a lock left by a dead process of this
  host is taken over with a warning; in a multi-process run only process 0 takes it.
* ``RunDir.open(path, kinds=...)`` — an existing run to read; refuses a missing directory, one
  without checkpoints, or one of another kind.

In a multi-process run (``jax.distributed``) every process opens the same ``RunDir`` and calls
the same methods: orbax coordinates the checkpoint writes, and only process 0 writes
``config.json`` and ``metrics.jsonl``.

orbax writes each checkpoint into a temporary folder and renames it when complete, so a process
killed at any point leaves either the previous checkpoint or the new one; a checkpoint damaged
afterwards is skipped by :meth:`RunDir.restore_newest` (the previous good one is resumed, with a
warning) and a write to a full disk raises :class:`~timm_jax.errors.DiskFullError` naming the
path (see docs/reliability.md). ``meta`` carries
everything on the host side that a resumed run needs (configuration, split, epoch, counters,
history).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from timm_jax.core import PyTree
from timm_jax.errors import CheckpointError, RunLockedError, writing
from timm_jax.faults import fault

__all__ = ["KINDS", "LOCK_FILE", "RunDir", "load_run", "make_meta", "read_metrics", "run_key"]

KINDS = ("train", "adaption", "fused")
_log = logging.getLogger(__name__)


def _dictify(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


#: metadata fields that a run's result does not depend on: its progress, the key itself, where it
#: ran (a run may resume on another number of devices or processes) and what was found in its data
#: folder (``data_info``: convention, modalities, labels — a function of the folder the ``data``
#: spec names)
_UNKEYED = ("run", "run_key", "num_devices", "num_processes", "data_info")
#: model settings added after runs had been written: keyed only when not at their default, so
#: that older runs keep their key (and resume)
_LATER_MODEL_DEFAULTS = {"precision": "float32"}
#: the same for the other config sections of the metadata (``fuse``: FuseConfig)
_LATER_DEFAULTS = {
    "model": _LATER_MODEL_DEFAULTS,
    "fuse": {"adaption_objective": "supervised", "task_specific_from": -1},
    "train": {"skip_nonfinite_steps": False},
}


def run_key(meta: dict) -> str:
    """Hash of what a run's result depends on: everything in ``meta`` except its progress
    (``run``), the key itself, the device and process counts and the convolution implementation
    (same maths, other rounding)."""
    keyed = {k: v for k, v in meta.items() if k not in _UNKEYED}
    if isinstance(keyed.get("model"), dict):
        keyed["model"] = {k: v for k, v in keyed["model"].items() if k != "conv_impl"}
    for section, later in _LATER_DEFAULTS.items():
        if isinstance(keyed.get(section), dict):
            keyed[section] = {k: v for k, v in keyed[section].items() if later.get(k, object()) != v}
    blob = json.dumps(_jsonable(keyed), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_meta(kind: str, *, model, data, train=None, **extra) -> dict:
    """The metadata of a run: ``kind`` (one of :data:`KINDS`), the configs as dicts, any extra
    JSON-able fields, and the ``run_key`` over all of them."""
    if kind not in KINDS:
        raise ValueError(f"run kind must be one of {KINDS}, got {kind!r}")
    meta = {
        "kind": kind,
        "model": _dictify(model),
        "train": _dictify(train),
        "data": _dictify(data),
        **{k: _dictify(v) for k, v in extra.items()},
    }
    meta = _jsonable(meta)
    meta["run_key"] = run_key(meta)
    return meta


class RunDir:
    """A run directory (see the module docstring). Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: str, *, max_to_keep: int = 2, create: bool = True, lock: bool = False):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.meta: dict = {}
        self.previous: dict | None = None
        self._managers: dict = {}
        self._lock = None
        if lock:
            # before the orbax managers exist: they must not touch a live writer's checkpoints
            self._lock = _acquire_lock_once(self.path)
        root = os.path.join(self.path, "checkpoints")
        opts = dict(create=create)
        try:
            self._managers = {
                "latest": ocp.CheckpointManager(
                    os.path.join(root, "latest"),
                    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **opts),
                ),
                "best": ocp.CheckpointManager(
                    os.path.join(root, "best"), options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts)
                ),
            }
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str, meta: dict) -> RunDir:
        """Open ``path`` to write the run described by ``meta`` (from :func:`make_meta`).

        Refuses a directory whose checkpoints belong to another configuration; ``self.meta`` is
        ``meta``, and :attr:`previous` the metadata of the latest checkpoint already there (or
        ``None`` for a new run). Writes ``config.json``.
        """
        run = cls(path, lock=True)
        try:
            run.meta = meta
            old = run._newest_meta()
            if old is not None:
                if old.get("run_key") != meta.get("run_key"):
                    raise CheckpointError(
                        f"{run.path} already holds checkpoints of a {old.get('kind', 'train')} run with "
                        f"another configuration (run key {old.get('run_key')} vs {meta.get('run_key')}); "
                        "use a new directory or the original flags"
                    )
                old_impl = (old.get("model") or {}).get("conv_impl")
                new_impl = (meta.get("model") or {}).get("conv_impl")
                if old_impl != new_impl:
                    _log.warning(
                        "%s was written with conv_impl=%s and continues with conv_impl=%s: "
                        "the same maths, but results differ in float rounding",
                        run.path,
                        old_impl,
                        new_impl,
                    )
                run.previous = old
            if jax.process_index() == 0:
                _write_json(os.path.join(run.path, "config.json"), meta)
        except BaseException:
            run.close()
            raise
        return run

    @classmethod
    def open(cls, path: str, kinds: Sequence[str] = KINDS) -> RunDir:
        """Open an existing run to read it; ``path`` may also be its ``checkpoints`` folder.

        Raises :class:`CheckpointError` if it does not exist, has no checkpoint, or is of a kind
        other than ``kinds``. ``self.meta`` is the metadata of its best (else latest) checkpoint.
        """
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.basename(path) == "checkpoints":
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"run directory {path} does not exist")
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise CheckpointError(f"{path} is not a run directory: it has no checkpoints/ folder")
        run = cls(path, create=False)
        try:
            which = run.best_or_latest()
            run.meta = run.read_meta(which)
            kind = run.meta.get("kind", "train")
            if kind not in kinds:
                raise CheckpointError(
                    f"{path} is a {kind!r} run directory; expected {' or '.join(repr(k) for k in kinds)}"
                )
        except BaseException:
            run.close()
            raise
        return run

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending writes, close the orbax managers and release the lock (idempotent)."""
        errors = []
        try:
            for m in self._managers.values():
                try:
                    with writing(os.path.join(self.path, "checkpoints")):
                        m.wait_until_finished()
                except Exception as e:
                    errors.append(e)
                finally:
                    try:
                        m.close()
                    except Exception as e:  # close the other manager too, then report
                        errors.append(e)
        finally:
            self._release()
        if errors:
            raise errors[0]

    def _release(self) -> None:
        if self._lock is not None:
            _release_lock(self._lock)
            self._lock = None

    # ------------------------------------------------------------------ reading
    @property
    def kind(self) -> str:
        return self.meta.get("kind", "train")

    def latest_step(self, which: str = "latest") -> int | None:
        return self._managers[which].latest_step()

    def best_or_latest(self) -> str:
        """``"best"`` if the run has a best checkpoint, else ``"latest"``; an error if neither."""
        for which in ("best", "latest"):
            if self.latest_step(which) is not None:
                return which
        raise CheckpointError(f"no checkpoint in {self.path}/checkpoints (neither best nor latest)")

    def _step(self, which: str, step: int | None) -> int:
        step = self.latest_step(which) if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.path}/checkpoints/{which}")
        return step

    def read_meta(self, which: str = "latest", step: int | None = None) -> dict:
        """The metadata stored with a checkpoint."""
        step = self._step(which, step)
        where = f"{self.path}/checkpoints/{which}/{step}/meta"
        try:
            meta = (
                self._managers[which].restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            )
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint metadata {where} could not be read (corrupt?): {_brief(e)}"
            ) from e
        if not isinstance(meta, dict) or "run_key" not in meta or meta.get("kind", "train") not in KINDS:
            # valid JSON of something else (a foreign or overwritten file)
            raise CheckpointError(f"checkpoint metadata {where} is not a run's metadata (no run_key or kind)")
        return meta

    def restore(
        self, target: PyTree | None = None, which: str = "latest", step: int | None = None
    ) -> tuple[PyTree, dict]:
        """``(state, meta)`` of a checkpoint. ``target`` gives the structure (arrays or
        ShapeDtypeStructs, with the shardings to restore onto); ``None`` reads the structure
        stored in the checkpoint and restores every array onto this process's first device, so
        a checkpoint written on any number of devices can be read here."""
        step = self._step(which, step)
        meta = self.read_meta(which, step)
        try:
            abstract = self._stored_structure(which, step) if target is None else _abstract(target)
            restore = ocp.args.StandardRestore(abstract)
            out = self._managers[which].restore(step, args=ocp.args.Composite(state=restore))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self.path}/checkpoints/{which}/{step} could not be "
                f"read (corrupt or of another structure): {_brief(e)}"
            ) from e
        return out.state, meta

    def _stored_structure(self, which: str, step: int) -> PyTree:
        """The checkpoint's own tree of shapes and dtypes, placed on this process's first device."""
        path = os.path.join(self.path, "checkpoints", which, str(step), "state")
        tree = ocp.StandardCheckpointHandler().metadata(Path(path))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)

    def _newest_meta(self) -> dict | None:
        """Metadata of the newest readable checkpoint (``latest``, else ``best``); ``None`` for a
        directory without checkpoints. Raises :class:`CheckpointError` when checkpoints exist but
        none can be read: a run is never silently restarted over its history."""
        errors = []
        for which in ("latest", "best"):
            for step in sorted(self._managers[which].all_steps(), reverse=True):
                try:
                    return self.read_meta(which, step)
                except CheckpointError as e:
                    errors.append(str(e))
        if errors:
            raise CheckpointError(
                f"no checkpoint in {self.path}/checkpoints can be read ({errors[0]}); move the run "
                "directory aside to start again"
            )
        return None

    def restore_newest(self, target: PyTree) -> tuple[PyTree, dict] | None:
        """``(state, meta)`` of the newest readable checkpoint, for resuming: the ``latest`` steps
        newest first, then ``best``. Unreadable ones before it are moved to
        ``checkpoints/corrupt/`` (kept, not deleted) with a warning, so the run continues from
        the previous good checkpoint. ``None`` if the run has no checkpoint; if it has some but
        none is readable, :class:`CheckpointError` names them and nothing is moved."""
        candidates = [("latest", s) for s in sorted(self._managers["latest"].all_steps(), reverse=True)]
        candidates += [("best", s) for s in sorted(self._managers["best"].all_steps(), reverse=True)]
        bad = []
        for which, step in candidates:
            try:
                out = self.restore(target, which, step)
            except CheckpointError as e:
                bad.append((which, step, e))
                continue
            for bad_which, bad_step, e in bad:
                moved = self._set_aside(bad_which, bad_step)
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
                f"no checkpoint of {self.path} can be read: {bad[0][2]}; nothing was changed — move "
                "the run directory aside to start again"
            )
        return None

    def _set_aside(self, which: str, step: int) -> str:
        """Move an unreadable checkpoint to ``checkpoints/corrupt/<which>-<step>[-k]`` (process 0
        moves it; in a multi-process run the others wait for the move, then all re-read)."""
        src = os.path.join(self.path, "checkpoints", which, str(step))
        dst = os.path.join(self.path, "checkpoints", "corrupt", f"{which}-{step}")
        k = 0
        while os.path.exists(dst + (f"-{k}" if k else "")):
            k += 1
        dst += f"-{k}" if k else ""
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"timm_jax set aside {which}-{step}")
        self._managers[which].reload()
        return dst

    def check_best(self, target: PyTree) -> None:
        """At resume: a ``best`` checkpoint that cannot be read is set aside with a warning and,
        when its step is still among the ``latest`` checkpoints, written again from there (else
        the run's next improving epoch writes a new one; readers fall back to ``latest``)."""
        step = self.latest_step("best")
        if step is None:
            return
        try:
            self.restore(target, "best", step)
            return
        except CheckpointError as e:
            moved = self._set_aside("best", step)
            problem = f"{e}; moved it to {moved}"
        if step in self._managers["latest"].all_steps():
            state, meta = self.restore(target, "latest", step)
            self.save(step, state, meta, best=True)
            _log.warning("%s and wrote it again from the latest checkpoint of the same step", problem)
        else:
            _log.warning(
                "%s; that step is no longer among the latest checkpoints, so the run has no best "
                "checkpoint until an epoch improves on it (readers use the latest meanwhile)",
                problem,
            )

    def load_params(self, which: str | None = None) -> tuple[dict, dict]:
        """Model params (numpy) and meta of the ``best`` checkpoint (else ``latest``). The params
        structure is read from the checkpoint itself, so no model is needed."""
        which = which or self.best_or_latest()
        state, meta = self.restore(None, which)
        if not isinstance(state, dict) or "params" not in state:
            raise CheckpointError(f"checkpoint {self.path}/checkpoints/{which} holds no 'params'")
        return jax.tree_util.tree_map(np.asarray, state["params"]), meta

    # ------------------------------------------------------------------ writing
    def save(self, step: int, state: PyTree, meta: dict, *, best: bool = False) -> None:
        """Save ``latest`` (and ``best``). ``best`` is written and finished first, so a process
        killed in between resumes from the previous ``latest`` with ``best`` at least as new as
        the resumed metadata says; a step already present is not written again."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta)))
        for which in ("best", "latest"):
            m = self._managers[which]
            if (which == "latest" or best) and step not in m.all_steps():
                with writing(os.path.join(self.path, "checkpoints", which, str(step))):
                    m.save(step, args=args, force=True)
                    fault(f"checkpoint.{which}", m.directory)
                    m.wait_until_finished()

    def write_metrics(self, records: list[dict]) -> None:
        """``metrics.jsonl``: one line per record, replaced atomically (by process 0 only)."""
        if jax.process_index() != 0:
            return
        path = os.path.join(self.path, "metrics.jsonl")
        with writing(path):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
                fault("metrics.write", path)
            os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (or of the run directory ``path``). A torn last line
    (a copy or sync cut short) is skipped with a warning; a damaged line elsewhere is an error."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                _log.warning("%s: last line is incomplete (%d characters); skipped", path, len(line))
                break
            raise CheckpointError(f"{path} line {i + 1} is not a JSON record: {line[:80]!r}") from None
    return records


def load_run(path: str, kinds: Sequence[str] = KINDS) -> tuple[dict, dict]:
    """Params and meta of a finished run's best (else latest) checkpoint."""
    with RunDir.open(path, kinds) as run:
        return run.load_params()


def _brief(e: Exception) -> str:
    """orbax/tensorstore errors append a long JSON spec; keep the part a person reads."""
    text = str(e).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else ""
    return f"{type(e).__name__}: {text[:400]}"


def _write_json(path: str, obj: Any) -> None:
    with writing(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------- the lock
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


def _acquire_lock(run_path: str) -> str:
    """Create ``<run>/run.lock`` holding this process's pid and host, atomically (``O_EXCL``).
    A lock of a live process refuses with :class:`RunLockedError`; one left by a dead process of
    this host (its pid is not running, or is this very process's: a container restarted) is
    taken over with a warning."""
    path = os.path.join(run_path, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    with writing(path):
        os.makedirs(run_path, exist_ok=True)
    for _ in range(20):
        try:
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
                os.replace(path, stale)  # only one of several racing processes gets the file
            except FileNotFoundError:
                continue
            os.unlink(stale)
            _log.warning(
                "%s: took over the lock left by process %d on %s, which is not running", run_path, pid, host
            )
            continue
        raise RunLockedError(
            f"{run_path} is in use by process {pid} on {host} (lock file {path}); wait for it to "
            "finish, or delete the lock file if that process is no longer running"
        )
    raise RunLockedError(
        f"could not take the lock {path}: it keeps changing; is another process starting here?"
    )


def _acquire_lock_once(run_path: str) -> str | None:
    """Process 0 takes the lock; in a multi-process run every process learns whether it did, so
    that all of them stop with the same one line (instead of waiting in collectives for a
    process 0 that has left)."""
    if jax.process_count() == 1:
        return _acquire_lock(run_path)
    from jax.experimental import multihost_utils

    held, error = None, None
    if jax.process_index() == 0:
        try:
            held = _acquire_lock(run_path)
        except RunLockedError as e:
            error = e
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise RunLockedError(f"{run_path} is in use by another run: process 0 could not take its lock")
    return held


def _release_lock(path: str) -> None:
    """Remove the lock if it is still this process's."""
    _held.discard(path)
    try:
        with open(path) as f:
            holder = json.load(f)
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.unlink(path)
    except (OSError, ValueError):
        pass


def _abstract(tree: PyTree) -> PyTree:
    """The restore target: shapes and dtypes, and the sharding of ``jax.Array`` leaves, so that a
    checkpoint is restored onto the target's devices (whatever device count wrote it)."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


def _jsonable(obj):
    """Round-trip through json so tuples and numpy scalars become plain JSON values."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in checkpoint metadata")
