"""The run directory: the one door through which every script and workflow reads and writes a run.

A run directory holds (each path has a name on :class:`RunDir`)::

    config.json                      the run's metadata, written when the run is created   CONFIG
    metrics.jsonl                    one JSON record per epoch                            METRICS
    run.lock                         while a process writes the run: its pid and host
    checkpoints/{latest,best}/<step> orbax checkpoints (state + meta)       training.checkpoints
    checkpoints/corrupt/             unreadable checkpoints set aside at resume  training.recovery
    events.out.tfevents.*            TensorBoard event files                       training.events
    eval_<split>/                    evaluate.py: per_case.csv, summary.json, predictions/  eval_dir
    forgetting/<source>/             evaluate.py --forgetting (paper Table 4)           forgetting_dir
    fisher/fisher_<kind>.npz         a source's Fisher cache (written by fuse.py)          fisher_cache
    mixing_ratios.{json,csv,png}     a fusion's learned ratios                             ratios_path
    adaption/                        a T-IMM fusion's adaption stage (itself a run)       adaption_dir

:class:`RunDir` owns the metadata schema (:func:`make_meta`: ``kind``, ``model``, ``train``,
``data``, ``run_key`` and whatever the workflow adds), the "is this the same configuration?"
check and the kind check, and delegates the rest to three small modules:
:mod:`~timm_jax.training.checkpoints` (the orbax store), :mod:`~timm_jax.training.run_lock` (one
writer per run) and :mod:`~timm_jax.training.recovery` (unreadable checkpoints). Open it as a
context manager; its orbax managers are closed and its lock released on exit, also after an error.

* ``RunDir.create(path, meta)`` — a run to write. It takes ``run.lock`` first (a run held by a
  live process is refused with :class:`~timm_jax.errors.RunLockedError`, a lock of a dead process
  of this host taken over with a warning); if the directory already holds checkpoints of another
  configuration (another ``run_key``) it refuses with :class:`CheckpointError` before anything is
  computed; if they were written with another convolution implementation it says so.
* ``RunDir.open(path, kinds=...)`` — an existing run to read; refuses a missing directory, one
  without checkpoints, or one of another kind. Writing a file into such a run (a source's Fisher
  cache) takes its lock for that long: ``with run.lock(): ...``.

In a multi-process run (``jax.distributed``) every process opens the same ``RunDir`` and calls
the same methods: orbax coordinates the checkpoint writes, and only process 0 writes
``config.json`` and ``metrics.jsonl``. Every other file is written with
:func:`timm_jax.atomic.atomic_write`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from timm_jax.atomic import atomic_write, write_json
from timm_jax.config import DataSpec, FuseConfig, ModelConfig, TrainConfig
from timm_jax.core import PyTree
from timm_jax.errors import CheckpointError
from timm_jax.training import recovery, run_lock
from timm_jax.training.checkpoints import KINDS, CheckpointStore, jsonable

__all__ = ["KINDS", "LOCK_FILE", "RunDir", "RunPaths", "load_run", "make_meta", "read_metrics", "run_key"]

LOCK_FILE = run_lock.LOCK_FILE
CONFIG = "config.json"
METRICS = "metrics.jsonl"
_log = logging.getLogger(__name__)

#: metadata fields that a run's result does not depend on: its progress, the key itself, where it
#: ran (a run may resume on another number of devices or processes) and what was found in its data
#: folder (``data_info``: convention, modalities, labels — a function of the folder the ``data``
#: spec names)
_UNKEYED = ("run", "run_key", "num_devices", "num_processes", "data_info")
#: the config section of the metadata per class: their ``later=True`` settings are keyed only away
#: from their defaults (``timm_jax.config.setting``), so older runs keep their key
_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "fuse": FuseConfig, "data": DataSpec}


def _dictify(obj):
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def run_key(meta: dict) -> str:
    """Hash of what a run's result depends on: everything in ``meta`` except its progress
    (``run``), the key itself, the device and process counts, what was found in the data folder,
    the convolution implementation (same maths, other rounding) and settings added later that are
    at their defaults."""
    keyed = {k: v for k, v in meta.items() if k not in _UNKEYED}
    if isinstance(keyed.get("model"), dict):
        keyed["model"] = {k: v for k, v in keyed["model"].items() if k != "conv_impl"}
    for section, cls in _SECTIONS.items():
        later = cls.later_defaults()
        if isinstance(keyed.get(section), dict):
            keyed[section] = {k: v for k, v in keyed[section].items() if later.get(k, object()) != v}
    blob = json.dumps(jsonable(keyed), sort_keys=True)
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
    meta = jsonable(meta)
    meta["run_key"] = run_key(meta)
    return meta


class RunPaths:
    """The named files of a run directory (module docstring), without opening it: every reader
    and writer of a run's files takes their paths from here (or from :class:`RunDir`, which is
    one)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))

    def file(self, name: str) -> str:
        """``<run>/<name>`` (``CONFIG``, ``METRICS``, ...)."""
        return os.path.join(self.path, name)

    def eval_dir(self, split: str) -> str:
        """Where ``evaluate.py --split=<split>`` writes by default."""
        return self.file(f"eval_{split}")

    def forgetting_dir(self, source: str | None = None) -> str:
        """``forgetting/`` (``forgetting.json``) or ``forgetting/<source>/`` of one source."""
        return self.file("forgetting") if source is None else os.path.join(self.file("forgetting"), source)

    def fisher_cache(self, kind: str) -> str:
        """The cached Fisher of this run (a source) of ``kind``."""
        if not re.fullmatch(r"[a-z]+", kind):
            raise ValueError(f"Fisher kind must be a lower-case word, got {kind!r}")
        return os.path.join(self.file("fisher"), f"fisher_{kind}.npz")

    def ratios_path(self, ext: str) -> str:
        """``mixing_ratios.<ext>`` of a fusion (json, csv, png)."""
        return self.file(f"mixing_ratios.{ext}")

    def adaption_dir(self) -> str:
        """A T-IMM fusion's adaption stage (a run directory of kind ``adaption``)."""
        return self.file("adaption")


class RunDir(RunPaths):
    """A run directory (see the module docstring). Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: str, *, max_to_keep: int = 2, create: bool = True, lock: bool = False):
        super().__init__(path)
        self.meta: dict = {}
        self.previous: dict | None = None
        self._lock = None
        self._store: CheckpointStore | None = None
        if lock:  # before the orbax managers exist: they must not touch a live writer's checkpoints
            self._lock = run_lock.acquire_once(self.path)
        try:
            self._store = CheckpointStore(self.path, max_to_keep=max_to_keep, create=create)
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
            old = run._store.newest_meta()
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
                write_json(run.file(CONFIG), meta)
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
            what = "is a file, not a run directory" if os.path.exists(path) else "does not exist"
            raise CheckpointError(f"run directory {path} {what}")
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise CheckpointError(f"{path} is not a run directory: it has no checkpoints/ folder")
        run = cls(path, create=False)
        try:
            run.meta = run.read_meta(run.best_or_latest())
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
        try:
            if self._store is not None:
                self._store.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            run_lock.release(self._lock)
            self._lock = None

    @contextlib.contextmanager
    def lock(self, purpose: str = "run") -> Iterator[None]:
        """Hold the run's lock while writing into a run opened for reading (e.g. a source's
        Fisher cache, ``purpose="fisher"``): a run being written by another live process is
        refused with one line (:class:`~timm_jax.errors.RunLockedError`, whose ``holder`` says
        what that process is doing)."""
        if self._lock is not None:  # opened with create(): already held
            yield
            return
        held = run_lock.acquire_once(self.path, purpose)
        try:
            yield
        finally:
            if held is not None:
                run_lock.release(held)

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "train")

    # ------------------------------------------------------------------ checkpoints
    def latest_step(self, which: str = "latest") -> int | None:
        return self._store.latest_step(which)

    def best_or_latest(self) -> str:
        """``"best"`` if the run has a best checkpoint, else ``"latest"``; an error if neither."""
        return self._store.best_or_latest()

    def read_meta(self, which: str = "latest", step: int | None = None) -> dict:
        """The metadata stored with a checkpoint."""
        return self._store.read_meta(which, step)

    def restore(
        self, target: PyTree | None = None, which: str = "latest", step: int | None = None
    ) -> tuple[PyTree, dict]:
        """``(state, meta)`` of a checkpoint (:meth:`CheckpointStore.restore`)."""
        return self._store.restore(target, which, step)

    def restore_newest(self, target: PyTree) -> tuple[PyTree, dict] | None:
        """For resuming: the newest readable checkpoint, unreadable ones set aside
        (:func:`timm_jax.training.recovery.restore_newest`)."""
        return recovery.restore_newest(self._store, target)

    def check_best(self, target: PyTree) -> None:
        """At resume: an unreadable ``best`` is set aside (and rewritten where possible)."""
        recovery.check_best(self._store, target)

    def load_params(self, which: str | None = None) -> tuple[dict, dict]:
        """Model params (numpy) and meta of the ``best`` checkpoint (else ``latest``). The params
        structure is read from the checkpoint itself, so no model is needed."""
        params, meta = self._store.restore_params(which or self.best_or_latest())
        return jax.tree_util.tree_map(np.asarray, params), meta

    def save(self, step: int, state: PyTree, meta: dict, *, best: bool = False) -> None:
        """Save ``latest`` (and ``best``, written first)."""
        self._store.save(step, state, meta, best=best)

    def write_metrics(self, records: list[dict]) -> None:
        """``metrics.jsonl``: one line per record, replaced atomically (by process 0 only)."""
        if jax.process_index() != 0:
            return
        with atomic_write(self.file(METRICS), fault_point="metrics.write") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (or of the run directory ``path``). A torn last line
    (a copy or sync cut short) is skipped with a warning; a damaged line elsewhere is an error."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS)
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
