"""What the command-line entry points share: flags derived from the configs, logging, errors.

* :func:`define_flags` / :func:`from_flags` — one absl flag per field of a config dataclass
  (:mod:`timm_jax.config`, :class:`timm_jax.data.spec.DataSpec`), with the field's default and
  help; the flag's name is the field's unless the field says otherwise.
* :func:`run` — ``app.run`` with the library's progress lines on stdout and the error policy:
  a :class:`timm_jax.errors.UserError` or a flag error prints ``error: <message>`` as one line
  and exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from timm_jax.errors import ConfigError, UserError

FLAGS = flags.FLAGS

__all__ = ["define_flags", "flag_fields", "from_flags", "parse_command", "run", "setup_logging"]


def flag_fields(cls) -> list[tuple[str, dataclasses.Field]]:
    """``(flag name, field)`` for every field of ``cls`` that is a flag (not ``derived``)."""
    return [
        (f.metadata.get("flag") or f.name, f)
        for f in dataclasses.fields(cls)
        if not f.metadata.get("derived")
    ]


def define_flags(cls, *, prefix: str = "", flag_values: flags.FlagValues | None = None) -> None:
    """Define one absl flag per non-derived field of the config dataclass ``cls`` (in
    ``flag_values``, default absl's global ``FLAGS``)."""
    fv = {"flag_values": flag_values if flag_values is not None else FLAGS}
    for name, f in flag_fields(cls):
        name, default, help_ = prefix + name, f.default, f.metadata["help"]
        choices = f.metadata.get("choices")
        if choices:
            flags.DEFINE_enum(name, default if default in choices else None, list(choices), help_, **fv)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_, **fv)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_, **fv)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_, **fv)
        elif isinstance(default, str):
            flags.DEFINE_string(name, default, help_, **fv)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(v) for v in default], help_, **fv)
        else:
            raise TypeError(
                f"{cls.__name__}.{f.name}: no flag type for a default of type {type(default).__name__}"
            )


def from_flags(cls, *, prefix: str = "", flag_values: flags.FlagValues | None = None):
    """An instance of ``cls`` from the parsed flags defined by :func:`define_flags`."""
    fv = flag_values if flag_values is not None else FLAGS
    kw = {}
    for name, f in flag_fields(cls):
        value = fv[prefix + name].value
        if value is None:
            value = f.default
        elif isinstance(f.default, tuple):
            item = f.metadata.get("item") or str
            try:
                value = tuple(item(v) for v in value)
            except ValueError:
                raise ConfigError(
                    f"--{prefix}{name} takes {item.__name__} values separated by "
                    f"commas, got {','.join(value)}"
                ) from None
        kw[f.name] = value
    return cls(**kw)


class _Stdout(logging.StreamHandler):
    """A handler bound to whatever ``sys.stdout`` is when a record is emitted."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record):
        self.stream = sys.stdout
        super().emit(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Print the library's progress lines (the ``timm_jax`` logger) as plain lines on stdout;
    keep other libraries (orbax logs every file operation at INFO) at warnings."""
    logger = logging.getLogger("timm_jax")
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)


def run(main: Callable[[], object]) -> None:
    """Run a script's ``main()`` under absl with the error policy of this module."""

    def wrapped(argv):
        setup_logging()
        try:
            if len(argv) > 1:
                raise ConfigError(f"unexpected positional arguments: {argv[1:]}")
            main()
        except (UserError, flags.Error) as e:
            sys.stdout.flush()
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(wrapped)


def parse_command(
    prog: str,
    doc: str,
    define: Callable[[flags.FlagValues], None],
    argv: Sequence[str] | None,
    *,
    positional: str = "",
) -> flags.FlagValues | int:
    """Parse the flags of a ``python -m`` command into their own :class:`absl.flags.FlagValues`
        (so that library modules define no global flags). ``argv`` excludes the program name
        (``None``: ``sys.argv[1:]``); ``positional`` names a string flag that may instead be given as
        the one positional argument (then it is required). ``define`` marks other required flags with
    ``flags.mark_flag_as_required(name, flag_values=fv)``. Returns the parsed
        flags, or an exit status: 0 after ``--help``, 2 after a flag error (printed as one line)."""
    fv = flags.FlagValues()
    define(fv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(
            f"usage: {prog} [flags]{f' [{positional.upper()}]' if positional else ''}\n\n"
            f"{doc.strip()}\n\n{fv.get_help()}"
        )
        return 0
    try:
        rest = fv([prog, *argv])[1:]
        if positional and len(rest) == 1 and fv[positional].value is None:
            fv[positional].value = rest.pop()
        if rest:
            raise flags.Error(f"unexpected positional arguments: {rest}")
        if positional and fv[positional].value is None:
            raise flags.Error(f"missing {positional.upper()} (the positional argument or --{positional})")
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return fv
