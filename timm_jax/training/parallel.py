"""Data parallelism over a device mesh, and multi-process runs on ``jax.distributed``.

A run computes on a one-axis :class:`jax.sharding.Mesh` named ``"data"``: every global batch is
split along its first axis over the mesh's devices; parameters, optimiser state, the mixing
logits and the frozen source models are replicated. The steps are ordinary ``jax.jit`` programs
with ``in_shardings`` / ``out_shardings`` (:func:`data_parallel_jit`): XLA partitions them and
inserts the gradient all-reduce itself, so a step on N devices computes the same global-batch
mean as on one (up to float summation order). A second mesh axis (e.g. ``fsdp`` for sharded
parameters) would change only the two shardings built here.

Several processes (hosts) form one mesh after :func:`initialize` has started
``jax.distributed``: every process runs the same program on the same global arrays; each one
feeds only its own rows of a batch (:meth:`DataParallel.shard`,
``jax.make_array_from_process_local_data``), and the rows are contiguous per process, so a run
sees the same global batches whatever its process count.

Without a mesh (``DataParallel(None)``, the library default) nothing is placed or sharded: the
computation is exactly the single-device one.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from timm_jax.config import DeviceConfig
from timm_jax.core import PyTree
from timm_jax.errors import ConfigError

__all__ = ["AXIS", "DataParallel", "data_parallel_jit", "initialize", "make_mesh"]

AXIS = "data"
_log = logging.getLogger(__name__)


def initialize(cfg: DeviceConfig) -> None:
    """Start ``jax.distributed`` if ``cfg`` asks for a multi-process run (idempotent).

    Must run before anything else touches a JAX backend. On CPU the cross-process collectives
    use gloo. Errors are one line (:class:`~timm_jax.errors.ConfigError`, or for a process that
    waits in vain, ``error: …`` and exit status 2): processes that do not all join within
    ``cfg.distributed_timeout`` seconds (JAX's own client would abort the process with a C++
    stack trace, so a watchdog ends it first), and processes started with different
    ``--num_processes`` or a count that differs from the one JAX runs.
    """
    if not cfg.multi_process:
        return
    if jax.distributed.is_initialized():
        _check_process_count(cfg)
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    watchdog = threading.Timer(cfg.distributed_timeout, _give_up, args=(cfg,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address or None,
            num_processes=cfg.num_processes or None,
            process_id=cfg.process_id if cfg.process_id >= 0 else None,
            initialization_timeout=cfg.distributed_timeout + 60,  # the watchdog's deadline comes first
        )
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"jax.distributed could not start ({_describe(cfg)}): {first}") from None
    finally:
        watchdog.cancel()
    _check_process_count(cfg)


def _describe(cfg: DeviceConfig) -> str:
    return (
        f"--coordinator_address={cfg.coordinator_address or 'auto'}, --num_processes="
        f"{cfg.num_processes or 'auto'}, --process_id={cfg.process_id if cfg.process_id >= 0 else 'auto'}"
    )


def _give_up(cfg: DeviceConfig) -> None:
    sys.stdout.flush()
    print(
        f"error: jax.distributed: not every process joined within --distributed_timeout="
        f"{cfg.distributed_timeout} s ({_describe(cfg)}); start all --num_processes processes with the "
        "same --coordinator_address",
        file=sys.stderr,
        flush=True,
    )
    os._exit(2)


def _check_process_count(cfg: DeviceConfig) -> None:
    """Every process must have been started with the same process count, the one JAX runs."""
    from jax.experimental import multihost_utils

    declared = np.asarray(multihost_utils.process_allgather(np.int32(cfg.num_processes))).ravel()
    if (cfg.num_processes and jax.process_count() != cfg.num_processes) or len(set(declared.tolist())) > 1:
        raise ConfigError(
            f"the processes disagree on the process count: jax.distributed runs {jax.process_count()} "
            f"processes, started with --num_processes={declared.tolist()} (process 0, 1, ...)"
        )


def make_mesh(num_devices: int = DeviceConfig.num_devices) -> Mesh:
    """A ``("data",)`` mesh over the first ``num_devices`` of ``jax.devices()`` (0: all of them).

    In a multi-process run the mesh must span every process's devices."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ConfigError(f"--num_devices={n} but only {len(devices)} device(s) are visible: {devices}")
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(
            f"--num_devices={n}: a multi-process run uses every device of every process "
            f"({len(devices)} over {jax.process_count()} processes); leave --num_devices at 0"
        )
    return Mesh(np.array(devices[:n]), (AXIS,))


def data_parallel_jit(
    fn: Callable, mesh: Mesh | None, *, batch_argnums: Sequence[int], nargs: int, donate_argnums=()
) -> Callable:
    """``jax.jit(fn)``; with a mesh, the arguments in ``batch_argnums`` are split along their first
    axis over it and every other argument and every output is replicated."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    in_shardings = tuple(data if i in batch_argnums else rep for i in range(nargs))
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=rep, donate_argnums=donate_argnums)


@dataclass(frozen=True)
class DataParallel:
    """Where a run computes: a ``("data",)`` mesh, or ``None`` for plain single-device JAX."""

    mesh: Mesh | None = None

    @classmethod
    def setup(cls, cfg: DeviceConfig | None) -> DataParallel:
        """Start ``jax.distributed`` if asked and build the mesh of ``cfg`` (``None``: no mesh)."""
        if cfg is None:
            return cls(None)
        initialize(cfg)
        if jax.process_index() != 0:  # one process prints the progress lines
            logging.getLogger("timm_jax").setLevel(logging.WARNING)
        mesh = make_mesh(cfg.num_devices)
        # one device in one process: plain single-device JAX (nothing to place or split)
        return cls(None if mesh.size == 1 and jax.process_count() == 1 else mesh)

    # ------------------------------------------------------------------ where
    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def num_processes(self) -> int:
        return jax.process_count()

    @property
    def process_index(self) -> int:
        return jax.process_index()

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes reports, figures and JSON."""
        return jax.process_index() == 0

    def describe(self) -> str:
        platform = jax.devices()[0].platform if self.mesh is None else self.mesh.devices.flat[0].platform
        return (
            f"{self.num_devices} {platform} device{'s' if self.num_devices > 1 else ''} in "
            f"{self.num_processes} process{'es' if self.num_processes > 1 else ''}"
        )

    def record(self) -> dict:
        """The fields every run's ``config.json`` records."""
        return {"num_devices": self.num_devices, "num_processes": self.num_processes}

    def agree(self, flag: bool) -> bool:
        """Process 0's ``flag`` in every process (a decision all processes must share, e.g.
        whether to recompute a collective result or read a cache only process 0 checked)."""
        if self.num_processes == 1:
            return bool(flag)
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))

    # ------------------------------------------------------------------ batches
    def check_batch(self, batch_size: int, flag: str = "--batch_size") -> int:
        """The rows of a global batch that this process feeds; a clear error unless the batch
        divides over the devices."""
        if batch_size % self.num_devices:
            raise ConfigError(
                f"{flag}={batch_size} does not divide over the {self.num_devices} devices of the mesh; "
                f"use a multiple of {self.num_devices} (it is the global batch) or --num_devices"
            )
        return batch_size // self.num_processes

    def local_rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch of ``batch_size`` (contiguous, in process order)."""
        n = self.check_batch(batch_size)
        return slice(self.process_index * n, (self.process_index + 1) * n)

    def shard(self, batch: PyTree) -> PyTree:
        """This process's rows of a global batch → global arrays split over the mesh."""
        if self.mesh is None:
            return batch
        sharding = NamedSharding(self.mesh, P(AXIS))
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
        )

    def replicate(self, tree: PyTree) -> PyTree:
        """Every leaf as an array replicated over the mesh (the same value on every process)."""
        if self.mesh is None:
            return tree
        rep = NamedSharding(self.mesh, P())

        def leaf(x):
            if isinstance(x, jax.Array) and x.sharding == rep:
                return x
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return jax.jit(lambda a: a, out_shardings=rep)(x)
            a = np.asarray(x)
            return jax.make_array_from_callback(a.shape, rep, lambda idx: a[idx])

        return jax.tree_util.tree_map(leaf, tree)
