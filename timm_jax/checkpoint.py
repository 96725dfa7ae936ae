"""Checkpoints with orbax: an array pytree (``state``) plus a JSON document (``meta``).

A run directory holds ``checkpoints/latest/<step>/`` (the last few, for resuming) and
``checkpoints/best/<step>/`` (the best validation loss). orbax writes each checkpoint into a
temporary folder and renames it when complete, so a process killed at any point leaves either
the previous checkpoint or the new one, never half of one. ``meta`` carries everything on the
host side that a resumed run needs (config, data split, epoch, counters, history).

Errors (missing, of another architecture, corrupt) are :class:`CheckpointError` naming the path.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit what was asked of it."""


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


class RunCheckpoints:
    """The ``latest`` and ``best`` checkpoints of one run directory."""

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.workdir = _abs(workdir)
        root = os.path.join(self.workdir, "checkpoints")
        self._managers = {
            "latest": ocp.CheckpointManager(
                os.path.join(root, "latest"),
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)),
            "best": ocp.CheckpointManager(
                os.path.join(root, "best"),
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)),
        }

    def latest_step(self, which: str = "latest") -> int | None:
        return self._managers[which].latest_step()

    def save(self, step: int, state: PyTree, meta: dict, *, best: bool = False) -> None:
        """Save ``latest`` (and ``best``). ``best`` is written and finished first, so a process
        killed in between resumes from the previous ``latest`` with ``best`` at least as new as
        the resumed metadata says; a step already present in ``best`` is not written again."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        if best and step not in self._managers["best"].all_steps():
            self._managers["best"].save(step, args=args, force=True)
            self._managers["best"].wait_until_finished()
        if step not in self._managers["latest"].all_steps():
            self._managers["latest"].save(step, args=args, force=True)
        self.wait()

    def wait(self) -> None:
        for m in self._managers.values():
            m.wait_until_finished()

    def restore(self, target: PyTree, which: str = "latest", step: int | None = None):
        """Restore ``(state, meta)``; ``target`` gives the structure (arrays or ShapeDtypeStructs)."""
        mngr = self._managers[which]
        step = mngr.latest_step() if step is None else step
        path = os.path.join(self.workdir, "checkpoints", which)
        if step is None:
            raise CheckpointError(f"no checkpoint in {path}")
        meta = self.restore_meta(which, step)
        try:
            out = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target))))
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(f"checkpoint {path}/{step} could not be read (corrupt or of "
                                  f"another structure): {type(e).__name__}: {e}") from e
        return out.state, meta

    def restore_meta(self, which: str = "latest", step: int | None = None) -> dict:
        mngr = self._managers[which]
        step = mngr.latest_step() if step is None else step
        path = os.path.join(self.workdir, "checkpoints", which)
        if step is None:
            raise CheckpointError(f"no checkpoint in {path}")
        try:
            return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"checkpoint metadata {path}/{step}/meta could not be read "
                                  f"(corrupt?): {type(e).__name__}: {e}") from e

    def close(self) -> None:
        self.wait()
        for m in self._managers.values():
            m.close()


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), x.dtype),
        tree)


def _jsonable(obj):
    """Round-trip through json so tuples/numpy scalars become plain JSON values."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in checkpoint metadata")


def find_run(path: str) -> str:
    """Accept a run directory (with ``checkpoints/``) or its ``checkpoints`` folder; check it exists."""
    path = _abs(path)
    if os.path.basename(path) == "checkpoints":
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"{path} is not a run directory: it has no checkpoints/ folder")
    return path


def load_params(path: str, which: str = "best") -> tuple[dict, dict]:
    """Model params and meta of a finished run (``best``, falling back to ``latest``).

    The params structure is read from the checkpoint's own metadata, so no model is needed;
    callers check ``meta["model"]`` against the architecture they expect before using them.
    """
    run = find_run(path)
    ckpt = RunCheckpoints(run)
    try:
        if ckpt.latest_step(which) is None:
            which = "latest"
        step = ckpt.latest_step(which)
        if step is None:
            raise CheckpointError(f"no checkpoint in {run}/checkpoints (neither best nor latest)")
        meta = ckpt.restore_meta(which, step)
        mngr = ckpt._managers[which]
        try:
            out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        except Exception as e:
            raise CheckpointError(f"checkpoint {run}/checkpoints/{which}/{step} could not be read "
                                  f"(corrupt?): {type(e).__name__}: {e}") from e
        state = out.state
        if not isinstance(state, dict) or "params" not in state:
            raise CheckpointError(f"checkpoint {run}/checkpoints/{which}/{step} holds no 'params'")
        params = jax.tree_util.tree_map(np.asarray, state["params"])
        return params, meta
    finally:
        ckpt.close()
