"""Model bundles from the command line: export a trained run, verify a bundle.

  python -m timm_jax.bundle export --run=runs/m1 --out=bundles/m1 [--fisher=empirical,adam]
  python -m timm_jax.bundle verify bundles/m1

A bundle is one directory of plain data (parameters, Fishers, a JSON description with checksums and
a model card; no image, no path to the training data) that ``fuse.py --source``, ``train.py
--init=transfer --init_from`` and ``predict.py --run`` accept in place of a run directory. The
format: docs/bundles.md. This module only parses flags; the work is in
:mod:`timm_jax.runs.bundle_export` and :mod:`timm_jax.runs.bundle`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from timm_jax import cli
from timm_jax.config import DeviceConfig, FuseConfig
from timm_jax.errors import UserError

_USAGE = "usage: python -m timm_jax.bundle {export,verify} [flags]  (--help after a command for its flags)"


def _define_export(fv) -> None:
    flags.DEFINE_string("run", None, "Run directory of a model trained with train.py.", flag_values=fv)
    flags.DEFINE_string("out", None, "The bundle directory to write.", flag_values=fv)
    flags.DEFINE_list(
        "fisher",
        ["empirical"],
        "Fishers to include: empirical (computed on the run's training data if not cached), true, adam "
        "(from the optimiser state); empty: none.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "fisher_patches",
        FuseConfig().fisher_patches,
        "Patches per training case of the Fisher.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "case_ids",
        False,
        "Include the training / validation case ids (they may identify patients; default: left out).",
        flag_values=fv,
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --out.", flag_values=fv)
    cli.define_flags(DeviceConfig, flag_values=fv)
    for name in ("run", "out"):
        flags.mark_flag_as_required(name, flag_values=fv)


def _define_verify(fv) -> None:
    flags.DEFINE_string("bundle", None, "The bundle directory (or the positional argument).", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("export", "verify"):
        print(_USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    prog = f"python -m timm_jax.bundle {command}"
    if command == "export":
        fv = cli.parse_command(prog, "Export a trained run as a model bundle.", _define_export, rest)
    else:
        fv = cli.parse_command(
            prog,
            "Verify a model bundle and print its description.",
            _define_verify,
            rest,
            positional="bundle",
        )
    if isinstance(fv, int):
        return fv
    cli.setup_logging()
    try:
        if command == "export":
            from timm_jax.runs.bundle_export import export_bundle

            export_bundle(
                fv.run,
                fv.out,
                fishers=[k for k in fv.fisher if k],
                patches_per_case=fv.fisher_patches,
                include_case_ids=fv.case_ids,
                overwrite=fv.overwrite,
                devices=cli.from_flags(DeviceConfig, flag_values=fv),
            )
        else:
            from timm_jax.runs.bundle import open_bundle

            b = open_bundle(fv.bundle)
            rec = b.record
            print(
                json.dumps(
                    {
                        "bundle": b.path,
                        "id": b.id,
                        "format": f"{rec['format']} v{rec['version']}",
                        "task": rec["task"].get("name"),
                        "channels": rec["task"].get("channel_names"),
                        "modalities": rec["data_info"].get("modalities"),
                        "fishers": {k: rec["fishers"][k]["settings"] for k in b.fisher_kinds},
                        "code": rec["code"],
                    },
                    indent=2,
                )
            )
            print(f"{b.path}: ok ({len(rec['files'])} files, checksums verified)", file=sys.stderr)
    except UserError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
