"""Check a data folder before a long training: ``python -m timm_jax.data.validate --layout=brats DIR``.

The data set is looked at once (:func:`timm_jax.data.io.dataset_info`: naming convention, modalities
present, ``dataset.json``, label map), then every case is read with the loader's own checks
(:func:`timm_jax.data.io.inspect_case`): missing, unreadable or truncated file, a header declaring
more voxels than the file holds, unsupported voxel type (complex, RGB), no voxels, not 3-D or a 4-D
image with the wrong channel count, a non-finite or degenerate affine, non-positive voxel sizes,
grids that do not overlap (other grids are resampled, and the summary says so), non-finite values,
empty or constant image, label values that are not integers, do not fit int32 or lie outside the
data set's set or label map. The command prints one summary line per case (and, on stderr, one
line on the data set) and exits 0 when all is well; otherwise it prints **every** problem, one line
each (file and what is wrong), and exits 1. MSD / nnU-Net test cases (``imagesTs``) are checked
too, without labels. No file content makes it raise (``tests/test_fuzz_validate.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags

from timm_jax import cli
from timm_jax.data.io import LAYOUT_NAMES, Case, DataError, Problem, dataset_info, inspect_case, list_cases

__all__ = ["Problem", "describe_dataset", "summarise_case", "validate_case", "validate_dataset", "main"]


def validate_case(
    root: str | os.PathLike,
    case_id: str,
    layout: str,
    *,
    require_labels: bool = True,
    label_map: str | None = None,
) -> list[Problem]:
    """All problems of one case (empty list when it loads cleanly)."""
    _, problems = inspect_case(root, case_id, layout, require_labels=require_labels, label_map=label_map)
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
    line = f"{case.case_id}: ok, {shape} voxels of {spacing} mm, {','.join(case.modalities)}, {labels}"
    if case.meta.get("resampled"):
        line += f" ({','.join(case.meta['resampled'])} resampled onto the {case.meta['source']['file']} grid)"
    return line


def describe_dataset(info) -> str:
    """One line on a data set: layout, convention, channels and labels."""
    if info.label_names:
        labels = ", ".join(f"{k} {v}" for k, v in sorted(info.label_names.items()))
    elif info.label_values is not None:
        labels = ", ".join(str(v) for v in info.label_values)
    else:
        labels = "any non-negative integers"
    task = info.make_task()
    what = f"; task {task.kind} {','.join(task.channel_names)}" if task is not None else ""
    return (
        f"data set {info.root}: layout {info.layout}, convention {info.convention}, channels "
        f"{','.join(info.modalities)}, labels {labels}{what}"
    )


def validate_dataset(
    root: str | os.PathLike,
    layout: str,
    *,
    require_labels: bool = True,
    label_map: str | None = None,
    info_out: list | None = None,
) -> tuple[list[str], list[Problem]]:
    """Check every case under ``root`` (MSD / nnU-Net: the test cases too, without labels).

    Returns:
      ``(summaries, problems)``: a summary line per good case and every problem of the bad ones (a
      folder without cases, or a data set refused as a whole, is itself a problem). The data set's
      :class:`~timm_jax.data.layouts.DatasetInfo` is appended to ``info_out`` when given.
    """
    try:
        info = dataset_info(root, layout, label_map=label_map)
        case_ids = list_cases(root, layout, info=info)
        test_ids = list_cases(root, layout, info=info, subset="test")
    except DataError as err:
        return [], list(err.problems)
    if info_out is not None:
        info_out.append(info)
    if not case_ids and not test_ids:
        return [], [Problem("", str(root), f"no case folders found for layout {layout!r}")]
    summaries: list[str] = []
    problems: list[Problem] = []
    for case_id in [*case_ids, *test_ids]:
        need = require_labels and case_id not in test_ids
        case, case_problems = inspect_case(root, case_id, layout, require_labels=need, info=info)
        if case_problems:
            problems.extend(case_problems)
        else:
            summaries.append(summarise_case(case))
    return summaries, problems


def _define(fv) -> None:
    flags.DEFINE_enum("layout", None, sorted(LAYOUT_NAMES), "Data layout.", flag_values=fv)
    flags.mark_flag_as_required("layout", flag_values=fv)
    flags.DEFINE_string(
        "dir", None, "Data folder (or give it as the one positional argument).", flag_values=fv
    )
    flags.DEFINE_bool(
        "labels", True, "Require a label file per case (--nolabels for inference data).", flag_values=fv
    )
    flags.DEFINE_string(
        "label_map",
        "",
        'freesurfer / parcellation: paper14, or a JSON label map {"class": [source ids], ...}.',
        flag_values=fv,
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
    infos: list = []
    summaries, problems = validate_dataset(
        Path(fv.dir), fv.layout, require_labels=fv.labels, label_map=fv.label_map or None, info_out=infos
    )
    if infos:
        print(describe_dataset(infos[0]), file=sys.stderr)
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
