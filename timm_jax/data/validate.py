"""Check a data folder before a long training: ``python -m timm_jax.data.validate --layout=brats DIR``.

Every case is read with the loader's own checks (:func:`timm_jax.data.io.inspect_case`): missing,
unreadable or truncated file, a header declaring more voxels than the file holds, unsupported voxel
type (complex, RGB), no voxels, not 3-D, a non-finite affine, modalities with different shapes or
affines, non-finite values, empty image, label values that are not integers, do not fit int32 or lie
outside the layout's set. The command prints one summary line per case and exits 0 when all is well;
otherwise it prints **every** problem, one line each (file and what is wrong), and exits 1. No file
content makes it raise (``tests/test_fuzz_validate.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags

from timm_jax import cli
from timm_jax.data.io import LAYOUTS, Case, DataError, Problem, inspect_case, list_cases

__all__ = ["Problem", "summarise_case", "validate_case", "validate_dataset", "main"]


def validate_case(
    root: str | os.PathLike,
    case_id: str,
    layout: str,
    *,
    require_labels: bool = True,
) -> list[Problem]:
    """All problems of one case (empty list when it loads cleanly)."""
    _, problems = inspect_case(root, case_id, layout, require_labels=require_labels)
    return problems


def summarise_case(case: Case) -> str:
    """One line: id, shape, spacing, modalities, label values."""
    shape = "x".join(str(s) for s in case.shape)
    spacing = "x".join(f"{s:.2f}" for s in case.spacing)
    if case.labels is None:
        labels = "no labels"
    else:
        values = np.unique(case.labels)
        shown = ",".join(str(int(v)) for v in values[:20]) + (",..." if values.size > 20 else "")
        labels = f"labels {{{shown}}}"
    return f"{case.case_id}: ok, {shape} voxels of {spacing} mm, {','.join(case.modalities)}, {labels}"


def validate_dataset(
    root: str | os.PathLike,
    layout: str,
    *,
    require_labels: bool = True,
) -> tuple[list[str], list[Problem]]:
    """Check every case under ``root``.

    Returns:
      ``(summaries, problems)``: a summary line per good case and every problem of the bad ones (a
      folder without cases is itself a problem).
    """
    try:
        case_ids = list_cases(root, layout)
    except DataError as err:
        return [], list(err.problems)
    if not case_ids:
        return [], [Problem("", str(root), f"no case folders found for layout {layout!r}")]
    summaries: list[str] = []
    problems: list[Problem] = []
    for case_id in case_ids:
        case, case_problems = inspect_case(root, case_id, layout, require_labels=require_labels)
        if case_problems:
            problems.extend(case_problems)
        else:
            summaries.append(summarise_case(case))
    return summaries, problems


def _define(fv) -> None:
    flags.DEFINE_enum("layout", None, sorted(LAYOUTS), "Data layout.", flag_values=fv)
    flags.mark_flag_as_required("layout", flag_values=fv)
    flags.DEFINE_string(
        "dir", None, "Data folder (or give it as the one positional argument).", flag_values=fv
    )
    flags.DEFINE_bool(
        "labels", True, "Require a label file per case (--nolabels for inference data).", flag_values=fv
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m timm_jax.data.validate --layout=brats DIR``: exit 0 if every case loads, 1 if not."""
    fv = cli.parse_command(
        "python -m timm_jax.data.validate",
        "Check every case of a data folder; exit 0 if all load cleanly, 1 otherwise.",
        _define,
        argv,
        positional="dir",
    )
    if isinstance(fv, int):
        return fv
    summaries, problems = validate_dataset(Path(fv.dir), fv.layout, require_labels=fv.labels)
    if problems:
        n_bad = len({p.case_id for p in problems})
        for p in problems:
            print(f"ERROR {p}")
        print(f"{len(problems)} problem(s) in {n_bad} case(s); {len(summaries)} case(s) ok.", file=sys.stderr)
        return 1
    for line in summaries:
        print(line)
    print(f"all {len(summaries)} case(s) ok.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
