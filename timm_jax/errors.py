"""The one family of errors that means "the input is wrong", not "the code is wrong".

The scripts (``train.py``, ``fuse.py``, ``evaluate.py``, ``python -m timm_jax...``) print a
:class:`UserError` as one line and exit with status 2; every other exception is a bug and
keeps its traceback. Raise a subclass of :class:`UserError` for bad flags, data that fail
validation, missing / corrupt / foreign checkpoints and diverging training, and name the
file, flag or leaf with what was expected.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message names what is wrong and what was expected."""


class ConfigError(UserError, ValueError):
    """A flag or configuration value is missing, out of range or contradicts another."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or run directory is missing, unreadable, or does not fit what was asked."""


class DivergenceError(UserError, FloatingPointError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""
