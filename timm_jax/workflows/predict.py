"""Segment unlabelled scans with a trained run or a model bundle: what ``predict.py`` calls.

The input is a data folder in any supported layout (its label files, if any, are not read) or the
files of one case, one per modality in the model's modality order (or one 4-D file holding them).
Each case is
preprocessed with the *run's* settings (normalisation, spacing), predicted exactly as
``evaluate.py`` predicts (:func:`timm_jax.workflows.evaluate.run_predictor`: sliding windows at the
training patch), mapped back onto the input's voxel grid
(:func:`timm_jax.data.preprocess.to_input_geometry`) and written with the input's header
(:func:`~timm_jax.data.preprocess.write_like_input`: shape, affine, qform / sform codes)::

    <out>/<case>_seg.nii.gz     labels in the data set's own ids (BraTS 2023: ET = 3); class ids
                                where a label map merged the ids (said in the log)
    <out>/<case>_prob.nii.gz    with probabilities=True: (X, Y, Z, K) float32 sigmoid probabilities,
    <out>/<case>_prob.json      the K channel names beside them

Inputs whose modalities are not the model's are refused in one line naming the case and both
lists, before anything is written; existing outputs are refused unless ``overwrite``. A case that
cannot be read is reported and skipped, the others are written, and the command then ends with one
error line naming the skipped cases.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from timm_jax.config import DeviceConfig, EvalConfig
from timm_jax.data.io import IMAGE_EXTENSIONS, DataError, dataset_info, list_cases, load_case, load_files
from timm_jax.data.layouts import BRATS_NAMING, LAYOUT_NAMES, DatasetInfo
from timm_jax.data.preprocess import preprocess_case, to_input_geometry, write_like_input
from timm_jax.data.spec import DataSpec, preprocess_config
from timm_jax.data.tasks import Task
from timm_jax.errors import ConfigError, writing
from timm_jax.progress import bar
from timm_jax.runs.bundle import run_modalities
from timm_jax.runs.models import load_model, run_predictor, training_patch
from timm_jax.training.parallel import DataParallel

__all__ = ["file_modality", "predict"]

_log = logging.getLogger(__name__)

#: other names of a modality in file names (BraTS 2023, MSD, FreeSurfer)
_ALIASES = {
    "t1": ("t1", "t1n", "t1w", "orig"),
    "t1ce": ("t1ce", "t1c", "t1gd"),
    "t2": ("t2", "t2w", "t2.prenorm"),
    "flair": ("flair", "t2f"),
}
for _naming in BRATS_NAMING.values():
    for _m in ("t1", "t1ce", "t2", "flair"):
        assert _naming[_m] in _ALIASES[_m]


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def file_modality(path: str, modalities: Sequence[str]) -> tuple[str | None, str]:
    """``(modality, rest)``: which of ``modalities`` a file's name says it is — a suffix ``_t1``,
    ``-t1n``, ``.t1`` or the whole name (``T1.mgz``), with the BraTS 2023 / MSD / FreeSurfer names,
    or an nnU-Net channel ``_0001`` — and the name without it; ``(None, stem)`` when none or
    several match."""
    stem = _stem(path)
    low = stem.lower()
    hits = {}
    for i, m in enumerate(modalities):
        for alias in {m.lower(), *_ALIASES.get(m.lower(), ())}:
            if low == alias:
                hits[m] = ("", len(alias))
            for sep in ("_", "-", "."):
                if low.endswith(sep + alias):
                    hits.setdefault(m, (stem[: -len(alias) - 1], len(alias)))
        if re.search(rf"_{i:04d}$", stem):
            hits.setdefault(m, (stem[:-5], 4))
    if len(hits) > 1:  # the longest match wins (t1ce over t1 cannot clash: suffixes differ)
        best = max(v[1] for v in hits.values())
        hits = {m: v for m, v in hits.items() if v[1] == best}
    if len(hits) == 1:
        m, (rest, _) = next(iter(hits.items()))
        return m, rest
    return None, stem


def _case_name(path: str, named: tuple[str | None, str]) -> str:
    """A case id from its first file: the name without the modality (``<case>_t1.nii.gz``), else
    the folder (``<case>/t1.nii.gz``, FreeSurfer's ``<subject>/mri/T1.mgz``)."""
    modality, rest = named
    name = re.sub(r"[_\-.]+$", "", rest if modality else _stem(path))
    if name:
        return name
    folder = Path(os.path.abspath(path)).parent
    if folder.name == "mri":
        folder = folder.parent
    return folder.name or "case"


@dataclass
class _Input:
    """What to predict: a data folder (``root``, ``layout``, ``info``, ``cases``) or one case's files."""

    cases: list[str]
    root: str = ""
    layout: str = ""
    info: DatasetInfo | None = None
    files: tuple[str, ...] = ()
    volumes: tuple[int, ...] | None = None


def _label_map_for(spec: dict) -> str | None:
    lm = spec.get("label_map") or ""
    if not lm:
        return None
    if lm == "paper14" or os.path.isfile(lm):
        return lm
    _log.info(
        "[predict] the run's label map %s is not here; the input's label files (if any) are not mapped", lm
    )
    return None


def _resolve_input(inputs: Sequence[str], meta: dict, layout: str, case_id: str) -> _Input:
    modalities = run_modalities(meta)
    spec = meta.get("data") or {}
    inputs = [str(i) for i in inputs if str(i)]
    if not inputs:
        raise ConfigError("missing required flag: --input (a data folder, or the files of one case)")
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        root = inputs[0]
        layout = layout or spec.get("layout") or ""
        if layout not in LAYOUT_NAMES:
            raise ConfigError(f"--layout: the run records no layout; give one of {', '.join(LAYOUT_NAMES)}")
        info = dataset_info(
            root, layout, label_map=_label_map_for(spec) if layout == spec.get("layout") else None
        )
        cases = list_cases(root, layout, subset="all", info=info)
        if not cases:
            raise DataError(f"{root}: no cases found for --layout={layout}")
        if list(info.modalities) != modalities:
            raise ConfigError(
                f"{root}: its cases (all {len(cases)}, e.g. {cases[0]}) have the modalities "
                f"{list(info.modalities)}, the model reads {modalities}; nothing was written"
            )
        return _Input(cases=cases, root=root, layout=layout, info=info)
    if layout:
        raise ConfigError("--layout applies to a data folder; --input is a list of files")
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise DataError(f"--input: {missing[0]} is not a file (nor a data folder)")
    named = [file_modality(p, modalities) for p in inputs]
    cid = case_id or _case_name(inputs[0], named[0])
    given = [m or "?" for m, _ in named]
    volumes = None
    if len(inputs) == 1 and len(modalities) > 1:
        info = meta.get("data_info") or {}
        if info.get("layout") == "msd":  # an MSD 4-D image: the data set's channel order
            volumes = tuple(
                int(v) for v in (info.get("files") or {}).get("channels") or range(len(modalities))
            )
    elif len(inputs) != len(modalities):
        raise ConfigError(
            f"case {cid}: {len(inputs)} file(s) ({', '.join(os.path.basename(p) for p in inputs)}, "
            f"modalities {given} by their names) but the model reads {len(modalities)} modalities "
            f"{modalities}; nothing was written"
        )
    elif all(m is not None for m, _ in named) and given != modalities:
        raise ConfigError(
            f"case {cid}: the files' names say the modalities {given}, the model reads {modalities} in that "
            "order; give --input in the model's order; nothing was written"
        )
    return _Input(cases=[cid], files=tuple(inputs), volumes=volumes)


def _load(inp: _Input, cid: str, modalities: Sequence[str], pre) -> object:
    if inp.files:
        case = load_files(inp.files, modalities, case_id=cid, volumes=inp.volumes)
    else:
        case = load_case(inp.root, cid, inp.layout, read_labels=False, info=inp.info)
    return preprocess_case(case, pre)


def _native_labels(meta: dict, inp: _Input):
    """``(labels -> labels as written, what the log says)``."""
    run_info = DatasetInfo.from_dict(meta["data_info"]) if meta.get("data_info") else None
    if run_info is not None and run_info.label_map is not None:
        name = run_info.label_map.get("name")
        return (lambda lab: lab), (
            f"the class ids of the label map {name} (it merged the data set's label ids, which cannot be "
            "recovered)"
        )
    info = inp.info if inp.info is not None and inp.info.label_map is None else run_info
    if info is None:
        return (lambda lab: lab), "the model's label ids"
    remap = {int(v): int(k) for k, v in (info.remap or {}).items() if int(k) != int(v)}
    shown = f" (loaded → written: {', '.join(f'{a}→{b}' for a, b in sorted(remap.items()))})" if remap else ""
    return info.to_native_labels, f"the {info.convention} label ids{shown}"


def predict(
    run_dir: str,
    inputs: Sequence[str],
    out_dir: str,
    *,
    layout: str = "",
    probabilities: bool = False,
    overlap: float = EvalConfig.overlap,
    overwrite: bool = False,
    case_id: str = "",
    devices: DeviceConfig | None = None,
) -> list[dict]:
    """Segment the cases of ``inputs`` (a data folder, or the files of one case) with the run or
    bundle ``run_dir`` into ``out_dir``; returns one record per case written (see the module
    docstring). ``devices``: the data-parallel mesh (``None``: one device)."""
    cfg = EvalConfig(overlap=overlap)
    src = load_model(run_dir, kinds=("train", "fused"))
    meta = src.meta
    modalities = run_modalities(meta)
    if len(modalities) != src.cfg.in_channels:
        raise ConfigError(
            f"{run_dir} reads {src.cfg.in_channels} channels but records the modalities {modalities}"
        )
    inp = _resolve_input(inputs, meta, layout, case_id)
    task = Task.from_dict(meta["task"])
    spec = meta.get("data") or {}
    # the run's own preprocessing (normalisation, spacing), as DataSpec derives it for training
    placeholder = {"data_dir": "-", "layout": spec.get("layout") or "brats"}
    pre = preprocess_config(DataSpec.from_dict({**spec, **placeholder}))
    out = Path(out_dir)
    targets = {cid: out / f"{cid}_seg.nii.gz" for cid in inp.cases}
    written = [
        p for cid in inp.cases for p in (targets[cid], *_prob_paths(out, cid, probabilities)) if p.exists()
    ]
    if written and not overwrite:
        more = f" and {len(written) - 1} more" if len(written) > 1 else ""
        raise ConfigError(f"{written[0]}{more} exist(s); choose another --out or pass --overwrite")
    dp = DataParallel.setup(devices)
    patch = tuple(cfg.patch) or training_patch(meta)
    predictor = run_predictor(src.model, meta, cfg, mesh=dp.mesh)
    params = dp.replicate(src.params)
    to_native, labels_said = _native_labels(meta, inp)
    what = f"{inp.root} (layout {inp.layout})" if inp.root else ", ".join(inp.files)
    _log.info(
        "[predict] %s: %d case(s) from %s; modalities %s; %s normalisation%s; sliding windows %s "
        "(overlap %g) on %s; labels written as %s",
        src.path,
        len(inp.cases),
        what,
        ", ".join(modalities),
        pre.normalisation,
        f", {pre.spacing} mm" if pre.spacing else "",
        "x".join(map(str, patch)),
        overlap,
        dp.describe(),
        labels_said,
    )
    if dp.is_main:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
    records, failed = [], []
    with bar(len(inp.cases), "[predict]", "case") as progress:
        for cid in inp.cases:
            try:
                case = _load(inp, cid, modalities, pre)
            except DataError as e:
                failed.append(cid)
                _log.warning(
                    "[predict] case %s skipped, it cannot be read: %s", cid, " | ".join(str(e).splitlines())
                )
                progress.update()
                continue
            probs = predictor(params, np.asarray(case.image))
            seg = to_input_geometry(np.asarray(to_native(task.decode(probs)), np.int32), case)
            rec = {"case": cid, "seg": str(targets[cid]), "shape": list(seg.shape)}
            if dp.is_main:
                write_like_input(targets[cid], seg, case)
                if probabilities:
                    prob_path, json_path = _prob_paths(out, cid, True)
                    write_like_input(prob_path, to_input_geometry(probs.astype(np.float32), case), case)
                    with writing(json_path):
                        json_path.write_text(
                            json.dumps(
                                {
                                    "file": prob_path.name,
                                    "channels": list(task.channel_names),
                                    "axis": 3,
                                    "task": task.name,
                                    "kind": task.kind,
                                    "meaning": "per-channel sigmoid probabilities (independent "
                                    "channels) on the input's voxel grid; 0 outside the region the model saw",
                                },
                                indent=2,
                            )
                        )
                    rec["prob"] = str(prob_path)
            values, counts = np.unique(seg, return_counts=True)
            _log.info(
                "[predict] %s: %s -> %s (labels %s)%s",
                cid,
                "x".join(map(str, seg.shape)),
                targets[cid],
                ", ".join(f"{int(v)}: {int(c)}" for v, c in zip(values, counts)),
                f" + {rec['prob']} (channels {', '.join(task.channel_names)})" if "prob" in rec else "",
            )
            records.append(rec)
            progress.update()
    if failed:
        raise DataError(
            f"{len(failed)} of {len(inp.cases)} case(s) could not be read and were skipped "
            f"({', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}; the reasons are logged above); "
            f"the others were written to {out}"
        )
    return records


def _prob_paths(out: Path, cid: str, probabilities: bool) -> tuple[Path, ...]:
    return (out / f"{cid}_prob.nii.gz", out / f"{cid}_prob.json") if probabilities else ()
