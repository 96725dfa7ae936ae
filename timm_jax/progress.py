"""Progress on long loops: a tqdm bar when a person watches a terminal, nothing otherwise.

Callers keep their plain progress lines (logged); :func:`bar` adds a live bar on top of them
only when standard error is a terminal, so CI logs and files stay readable. Set
``TIMM_JAX_PROGRESS=0`` to switch the bars off, ``=1`` to force them.
"""

from __future__ import annotations

import os
import shutil
import sys

__all__ = ["bar", "bars_enabled"]


def bars_enabled() -> bool:
    """Whether :func:`bar` shows a bar: ``$TIMM_JAX_PROGRESS`` if set, else whether stderr is a TTY."""
    env = os.environ.get("TIMM_JAX_PROGRESS", "")
    if env in ("0", "1"):
        return env == "1"
    return sys.stderr.isatty()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it", leave: bool = False):
    """A context manager with ``update(n)``: a tqdm bar on a terminal, a no-op elsewhere."""
    if not bars_enabled():
        return _NoBar()
    from tqdm import tqdm

    # a terminal that reports no width (a fresh pseudo-terminal) gets 80 columns, not an empty bar
    width = shutil.get_terminal_size().columns
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, ncols=width or 80, file=sys.stderr)
