"""The checkpoint store of a run: ``checkpoints/latest/<step>`` and ``checkpoints/best/<step>``.

Two orbax ``CheckpointManager``s (the last few checkpoints for resuming; the one with the best
validation loss), each checkpoint a pytree ``state`` plus the run's JSON ``meta``. orbax writes a
checkpoint into a temporary folder and renames it when complete, so a process killed at any point
leaves the previous checkpoint or the new one. Every failure to read becomes a
:class:`~timm_jax.errors.CheckpointError` naming the checkpoint, every full disk a
:class:`~timm_jax.errors.DiskFullError`. What to do with an unreadable checkpoint is
:mod:`timm_jax.training.recovery`'s business; :class:`~timm_jax.training.rundir.RunDir` is the door.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from timm_jax.core import PyTree
from timm_jax.errors import CheckpointError, writing
from timm_jax.faults import fault

__all__ = ["KINDS", "CheckpointStore", "jsonable"]

#: the kinds of run a checkpoint's metadata may name
KINDS = ("train", "adaption", "fused")
WHICH = ("latest", "best")


class CheckpointStore:
    """The ``latest`` (``max_to_keep``) and ``best`` (one) checkpoints under ``<run>/checkpoints``.

    ``create=False`` opens an existing store without creating folders. Close it (or use it as a
    context manager): pending asynchronous writes are waited for and the managers closed."""

    def __init__(self, run_path: str, *, max_to_keep: int = 2, create: bool = True):
        self.root = os.path.join(run_path, "checkpoints")
        self._managers: dict = {}
        try:
            for which, keep in (("latest", max_to_keep), ("best", 1)):
                self._managers[which] = ocp.CheckpointManager(
                    os.path.join(self.root, which),
                    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
                )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending writes and close both managers (idempotent); the first error is raised
        after both are closed."""
        errors = []
        for m in self._managers.values():
            try:
                with writing(self.root):
                    m.wait_until_finished()
            except Exception as e:
                errors.append(e)
            finally:
                try:
                    m.close()
                except Exception as e:  # close the other manager too, then report
                    errors.append(e)
        self._managers = {}
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ reading
    def latest_step(self, which: str = "latest") -> int | None:
        return self._managers[which].latest_step()

    def all_steps(self, which: str) -> list[int]:
        return sorted(self._managers[which].all_steps())

    def path(self, which: str, step: int) -> str:
        return os.path.join(self.root, which, str(step))

    def reload(self, which: str) -> None:
        """Re-read the folder after a checkpoint was moved away."""
        self._managers[which].reload()

    def best_or_latest(self) -> str:
        """``"best"`` if there is a best checkpoint, else ``"latest"``; an error if neither."""
        for which in ("best", "latest"):
            if self.latest_step(which) is not None:
                return which
        raise CheckpointError(f"no checkpoint in {self.root} (neither best nor latest)")

    def _step(self, which: str, step: int | None) -> int:
        step = self.latest_step(which) if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.root}/{which}")
        return step

    def read_meta(self, which: str = "latest", step: int | None = None) -> dict:
        """The metadata stored with a checkpoint."""
        step = self._step(which, step)
        where = f"{self.path(which, step)}/meta"
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            meta = self._managers[which].restore(step, args=args).meta
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint metadata {where} could not be read (corrupt?): {brief(e)}"
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

        def read(step: int) -> PyTree:
            abstract = self._stored_structure(which, step) if target is None else _abstract(target)
            restore = ocp.args.StandardRestore(abstract)
            return self._managers[which].restore(step, args=ocp.args.Composite(state=restore)).state

        return self._read(which, step, read)

    def restore_params(self, which: str = "latest", step: int | None = None) -> tuple[PyTree, dict]:
        """``(params, meta)``: only the state's ``params`` subtree (not the optimiser's moments,
        two thirds of an Adam checkpoint), read as it is stored onto this process's first device."""

        def read(step: int) -> PyTree:
            stored = self._stored_structure(which, step)
            if not hasattr(stored, "keys") or "params" not in stored.keys():
                raise CheckpointError(f"checkpoint {self.path(which, step)} holds no 'params'")
            item = {"params": stored["params"]}
            restore_args = jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
            args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
            with ocp.PyTreeCheckpointer() as checkpointer:
                return checkpointer.restore(Path(self.path(which, step)) / "state", args=args)["params"]

        return self._read(which, step, read)

    def _read(self, which: str, step: int | None, read) -> tuple[PyTree, dict]:
        """``(read(step), meta)`` of a checkpoint; any failure of ``read`` is one CheckpointError
        that names the checkpoint."""
        step = self._step(which, step)
        meta = self.read_meta(which, step)
        try:
            return read(step), meta
        except CheckpointError:
            raise
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint {self.path(which, step)} could not be read (corrupt or of another "
                f"structure): {brief(e)}"
            ) from e

    def _stored_structure(self, which: str, step: int) -> PyTree:
        """The checkpoint's own tree of shapes and dtypes, placed on this process's first device."""
        tree = ocp.StandardCheckpointHandler().metadata(Path(self.path(which, step)) / "state")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)

    def newest_meta(self) -> dict | None:
        """Metadata of the newest readable checkpoint (``latest``, else ``best``); ``None`` for a
        store without checkpoints. Raises :class:`CheckpointError` when checkpoints exist but none
        can be read: a run is never silently restarted over its history."""
        errors = []
        for which in ("latest", "best"):
            for step in reversed(self.all_steps(which)):
                try:
                    return self.read_meta(which, step)
                except CheckpointError as e:
                    errors.append(str(e))
        if errors:
            raise CheckpointError(
                f"no checkpoint in {self.root} can be read ({errors[0]}); move the run directory aside "
                "to start again"
            )
        return None

    # ------------------------------------------------------------------ writing
    def save(self, step: int, state: PyTree, meta: dict, *, best: bool = False) -> None:
        """Save ``latest`` (and ``best``). ``best`` is written and finished first, so a process
        killed in between resumes from the previous ``latest`` with ``best`` at least as new as
        the resumed metadata says; a step already present is not written again."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(jsonable(meta)))
        for which in ("best", "latest"):
            m = self._managers[which]
            if (which == "latest" or best) and step not in m.all_steps():
                with writing(self.path(which, step)):
                    m.save(step, args=args, force=True)
                    fault(f"checkpoint.{which}", m.directory)
                    m.wait_until_finished()


def brief(e: Exception) -> str:
    """orbax/tensorstore errors append a long JSON spec; keep the part a person reads."""
    text = str(e).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else ""
    return f"{type(e).__name__}: {text[:400]}"


def _abstract(tree: PyTree) -> PyTree:
    """The restore target: shapes and dtypes, and the sharding of ``jax.Array`` leaves, so that a
    checkpoint is restored onto the target's devices (whatever device count wrote it)."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


def jsonable(obj: Any) -> Any:
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
