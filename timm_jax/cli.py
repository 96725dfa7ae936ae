"""What the command-line entry points share: flags derived from the configs, logging, errors.

* :func:`define_flags` / :func:`from_flags` — one absl flag per field of a config dataclass
  (:mod:`timm_jax.config`, :class:`timm_jax.data.spec.DataSpec`), with the field's default and
  help; the flag's name is the field's unless the field says otherwise.
* :func:`run` — ``app.run`` with the library's progress lines on stdout and the error policy:
  a :class:`timm_jax.errors.UserError` or a flag error prints ``error: <message>`` as one line
  and exits with status 2; any other exception is a bug and keeps its traceback. ``--help``
  lists the script's flags grouped by concern (data, network, training, ..., the script's own),
  ``--helpfull`` adds absl's and the libraries'.
* ``--config=<run>/config.json`` (scripts that call :func:`define_config_flag`) relaunches a run:
  every setting recorded in that file becomes the flag's default, flags given on the command line
  override it; ``--flagfile=FILE`` (absl) reads flags from a file.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from timm_jax.errors import ConfigError, UserError

FLAGS = flags.FLAGS

__all__ = [
    "define_config_flag",
    "define_flags",
    "flag_fields",
    "from_flags",
    "parse_command",
    "run",
    "setup_logging",
]

#: --help's groups: (title, flag names) in definition order
_GROUPS: list[tuple[str, list[str]]] = []
#: --config: the metadata section each config class is stored under in a run's config.json
_SECTIONS: dict[str, type] = {}
#: --config: the script's own flags, each from ``(meta, run directory)``
_FROM_RUN: dict[str, Callable[[dict, str], object]] = {}


def flag_fields(cls) -> list[tuple[str, dataclasses.Field]]:
    """``(flag name, field)`` for every field of ``cls`` that is a flag (not ``derived``)."""
    return [
        (f.metadata.get("flag") or f.name, f)
        for f in dataclasses.fields(cls)
        if not f.metadata.get("derived")
    ]


def define_flags(
    cls,
    *,
    prefix: str = "",
    flag_values: flags.FlagValues | None = None,
    group: str = "",
    section: str = "",
) -> None:
    """Define one absl flag per non-derived field of the config dataclass ``cls`` (in
    ``flag_values``, default absl's global ``FLAGS``). ``group`` titles them in ``--help``
    (default: the class's docstring's first line); ``section`` is the key of a run's
    ``config.json`` that ``--config`` reads them from."""
    fv = {"flag_values": flag_values if flag_values is not None else FLAGS}
    if flag_values is None:
        title = group or (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
        _GROUPS.append((title, [prefix + name for name, _ in flag_fields(cls)]))
        if section:
            _SECTIONS[section] = cls
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


def define_config_flag(**from_run: Callable[[dict, str], object]) -> None:
    """``--config``: relaunch a run from its ``config.json`` (see the module docstring).
    ``from_run``: the script's own flags and how to read each from ``(meta, run directory)``
    (e.g. ``workdir=lambda meta, run: run``)."""
    _FROM_RUN.update(from_run)
    _GROUPS.append(("Relaunch", ["config"]))
    flags.DEFINE_string(
        "config",
        "",
        "A run's config.json (or its run directory): its recorded settings become the defaults of "
        "this script's flags; flags given here override them.",
    )


def _config_defaults(argv: Sequence[str]) -> str:
    """Apply ``--config=PATH`` from ``argv`` (before absl parses it): every flag of a recorded
    section takes the recorded value as its default. Returns the path, or ``""``."""
    path = ""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if not path:
        return ""
    import json
    import os

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--config={path}: cannot read a run's config.json ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(meta, dict) or "run_key" not in meta:
        raise ConfigError(f"--config={path}: {file} is not a run's config.json (no run_key)")
    for section, cls in _SECTIONS.items():
        recorded = meta.get(section)
        if not isinstance(recorded, dict):
            continue
        for name, f in flag_fields(cls):
            if f.name not in recorded or recorded[f.name] is None or name not in FLAGS:
                continue
            value = recorded[f.name]
            if isinstance(f.default, tuple):
                value = [str(v) for v in value]
            FLAGS.set_default(name, value)
    for name, read in _FROM_RUN.items():
        try:
            value = read(meta, os.path.dirname(os.path.abspath(file)))
        except (KeyError, TypeError, IndexError):
            continue  # not recorded by this run
        if value is not None and name in FLAGS:
            FLAGS.set_default(name, value)
    return file


def _print_help(doc: str) -> None:
    """``--help``: the script's docstring, then its flags grouped by concern."""
    print(doc.strip() + "\n")
    grouped = {n for _, names in _GROUPS for n in names}
    main = sys.modules["__main__"]
    own = [f.name for f in FLAGS.get_key_flags_for_module(main) if f.name not in grouped]
    for title, names in [*_GROUPS, ("This script", own)]:
        names = [n for n in names if n in FLAGS]
        if not names:
            continue
        print(f"{title}:")
        for n in names:
            flag = FLAGS[n]
            default = ",".join(map(str, flag.default)) if isinstance(flag.default, list) else flag.default
            print(f"  --{n}: {flag.help}\n    (default: {default!r})")
        print()
    print(
        "--config=RUN relaunches a run with its recorded settings; --flagfile=FILE reads flags from a file;"
    )
    print("--helpfull lists every flag, absl's and the libraries' included.")


def run(main: Callable[[], object]) -> None:
    """Run a script's ``main()`` under absl with the error policy of this module."""
    if any(a in ("--help", "-h", "-?") for a in sys.argv[1:]):
        _print_help(sys.modules["__main__"].__doc__ or "")
        sys.exit(0)
    try:
        config = _config_defaults(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)

    def wrapped(argv):
        setup_logging()
        try:
            if len(argv) > 1:
                raise ConfigError(f"unexpected positional arguments: {argv[1:]}")
            if config:
                logging.getLogger("timm_jax").info("relaunching with the settings of %s", config)
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
