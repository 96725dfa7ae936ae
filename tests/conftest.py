"""Test configuration: fast CPU compilation and absl flags parsed (grain reads one at worker start)."""

import atexit
import fcntl
import os
import shutil
import tempfile

from _demo import FAST_COMPILE_ENV, FAST_XLA_FLAGS  # imports neither jax nor the package

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {FAST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _k, _v in FAST_COMPILE_ENV.items():
    os.environ.setdefault(_k, _v)

import logging  # noqa: E402

import jax  # noqa: E402
from absl import flags  # noqa: E402


def _jax_cache_dir() -> str:
    """The persistent compilation cache of this test process, kept between test runs.

    The tests build many tiny networks of the same shapes; with every compilation cached, each
    fresh jit of them (a new train_model, a new fuse, the next ``make test-fast``) is read back
    instead of recompiled. JAX writes cache entries without a lock, so each pytest-xdist worker
    has its own folder (``.cache/jax-tests/<worker>`` in the checkout, or under
    ``$TIMM_JAX_TEST_JAX_CACHE``), held with an exclusive lock while it runs; a second test run
    at the same time gets a private temporary cache instead. Before the workers start, every
    folder gets the others' entries (:func:`_share`): a module runs on whichever worker is free.
    A folder over 2 GiB is emptied first (entries of changed code are never read again).
    ``TIMM_JAX_TEST_JAX_CACHE=off``: a temporary cache per process, as on a fresh machine."""
    root = os.environ.get("TIMM_JAX_TEST_JAX_CACHE") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax-tests"
    )
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if root != "off":
        path = os.path.join(root, worker or "main")
        os.makedirs(path, exist_ok=True)
        if worker is None:  # the run's first process (before any xdist worker starts)
            _share(root)
        lock = open(os.path.join(root, f"{worker}.lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
        else:
            _HELD.append(lock)  # released when this process exits
            entries = [e for e in os.scandir(path) if e.is_file()]
            if sum(e.stat().st_size for e in entries) > 2 << 30:
                for e in entries:
                    os.unlink(e.path)
            return path
    path = tempfile.mkdtemp(prefix="timm_jax_test_jax_cache_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _share(root: str) -> None:
    """Hard-link every entry of each worker's folder into the others, when no test run holds any
    of them (a folder being written is never read from)."""
    locks = []
    try:
        folders = [e.path for e in os.scandir(root) if e.is_dir()]
        for folder in folders:
            locks.append(open(folder + ".lock", "w"))
            fcntl.flock(locks[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        names = {folder: set(os.listdir(folder)) for folder in folders}
        for folder in folders:
            for other in folders:
                for name in names[other] - names[folder]:
                    os.link(os.path.join(other, name), os.path.join(folder, name))
    except OSError:  # held by another run, or no hard links here: each worker keeps its own
        pass
    finally:
        for lock in locks:
            lock.close()


_HELD: list = []
jax.config.update("jax_compilation_cache_dir", _jax_cache_dir())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

# orbax leaves a failed asyncio task behind when a corrupt checkpoint is read (the tests assert
# the CheckpointError it raises); without this its "never retrieved" traceback is logged at exit
logging.getLogger("asyncio").setLevel(logging.CRITICAL)


import pytest  # noqa: E402


@pytest.fixture
def log(caplog):
    """caplog on the package logger (INFO), also if a script's setup_logging turned propagation off."""
    logger = logging.getLogger("timm_jax")
    propagate = logger.propagate
    logger.propagate = True
    caplog.set_level("INFO", logger="timm_jax")
    yield caplog
    logger.propagate = propagate
