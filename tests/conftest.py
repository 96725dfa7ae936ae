"""Test configuration: fast CPU compilation and absl flags parsed (grain reads one at worker start)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import logging  # noqa: E402

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
# one persistent compilation cache per test process, every compilation in it: the tests build many
# tiny networks of the same shapes, and each fresh jit of them (a new train_model, a new fuse) is
# then read back instead of recompiled; removed at exit
_JAX_CACHE = tempfile.mkdtemp(prefix="timm_jax_test_jax_cache_")
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
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
