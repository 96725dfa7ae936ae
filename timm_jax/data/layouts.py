"""The on-disk layouts: where a data set's cases and files are, and what its labels mean.

:func:`dataset_info` looks at a data folder once (file names, ``dataset.json``) and returns a
:class:`DatasetInfo`: the naming convention found, the modalities in the channel order fed to the
network, the label values a label file may hold and how they are renumbered, and the task the data
set defines. Everything that is decided per data set — the BraTS naming, whether a T2 is present,
which FreeSurfer files are used — must hold for all of its cases, else the data set is refused
with one line saying which cases disagree. :func:`case_plan` then names the files of one case.

Layouts (file names may end in ``.nii.gz``, ``.nii``, ``.mgz`` or ``.mgh`` unless said otherwise):

* ``brats``: ``<root>/[HGG/|LGG/]<case>/<case>_{t1,t1ce,t2,flair,seg}`` (BraTS 2018–2021, labels
  0, 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing) or ``<root>/<case>/<case>-{t1n,t1c,t2w,
  t2f,seg}`` (BraTS 2023+, e.g. ``BraTS-GLI-00000-000``; labels 0, 1 NETC, 2 SNFH, 3 ET). Both give
  the channels (t1, t1ce, t2, flair) and labels renumbered to the 2018 ids (2023's 3 becomes 4), so
  that WT = {1, 2, 4}, TC = {1, 4}, ET = {4} for both.
* ``msd``: a Medical Segmentation Decathlon task folder (``Task01_BrainTumour/``) whose
  ``dataset.json`` lists the cases (``training``: ``{"image", "label"}``, ``test``: image paths).
  Images are 4-D with the channels of ``modality``. BrainTumour (modalities FLAIR, T1w, t1gd, T2w;
  labels 1 edema, 2 non-enhancing tumour, 3 enhancing) is reordered to (t1, t1ce, t2, flair) and
  renumbered to the BraTS 2018 ids; other tasks keep their channels and labels.
* ``nnunet``: an nnU-Net v2 raw data set (``DatasetXXX_Name/``): ``imagesTr/<case>_<XXXX><ending>``
  one file per channel of ``channel_names``, ``labelsTr/<case><ending>``, ``imagesTs/``; labels and
  region-based labels (a name mapped to a list of ids, with ``regions_class_order``) from
  ``dataset.json``; region-based labels become the task's channels.
* ``freesurfer``: a subjects directory: ``<subject>/mri/{T1,orig}.mgz``, optional
  ``{T2,T2.prenorm}.mgz``, labels ``{aseg,aparc+aseg}.mgz``; ``--label_map`` (``paper14`` or JSON)
  merges the FreeSurfer ids into classes.
* ``parcellation``: ``<root>/<case>/{t1,t2,labels}``; the T2 is optional for a whole data set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from timm_jax.config import LAYOUT_NAMES  # the one list of layouts
from timm_jax.data.files import (
    IMAGE_EXTENSIONS,
    CasePlan,
    DataError,
    ImageSource,
    Problem,
    is_case_dir,
    is_file,
    list_dir,
)

__all__ = ["LAYOUT_NAMES", "DatasetInfo", "dataset_info", "case_plan", "list_layout_cases"]

SUBSETS = ("train", "test", "all")

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
#: file-name suffix of each channel (and of the label file) per BraTS naming convention
BRATS_NAMING = {
    "brats2018": {"sep": "_", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "labels": "seg"},
    "brats2023": {"sep": "-", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "labels": "seg"},
}
BRATS_LABEL_NAMES = {1: "necrotic / non-enhancing tumour core", 2: "oedema", 4: "enhancing tumour"}
FREESURFER_FILES = {
    "t1": ("T1.mgz", "orig.mgz"),
    "t2": ("T2.mgz", "T2.prenorm.mgz"),
    "labels": ("aseg.mgz", "aparc+aseg.mgz"),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What one data folder holds (from :func:`dataset_info`); store ``to_dict()`` with a run.

    Attributes:
      layout: ``brats``, ``msd``, ``nnunet``, ``freesurfer`` or ``parcellation``.
      convention: the naming / label convention found: ``brats2018``, ``brats2023``, ``msd-brats``
        (MSD BrainTumour, mapped to BraTS), ``msd``, ``nnunet``, ``nnunet-regions``, ``freesurfer``,
        ``parcellation``.
      root: the data folder.
      modalities: channel names in the order fed to the network (``in_channels = len(...)``).
      files: the per-data-set file choices (BraTS suffixes, FreeSurfer file names, nnU-Net file
        ending, MSD channel order), for the record and the cache key.
      native_labels: the values a label file may hold (``None``: any non-negative integer).
      remap: native id -> id on the loaded label map, for a one-to-one renumbering (BraTS 2023,
        MSD BrainTumour); ``None`` keeps the ids.
      label_map: a many-to-one :class:`~timm_jax.data.labelmaps.LabelMap` (as a dict), or ``None``.
      label_names: id on the loaded label map -> name (may be empty).
      task: the :class:`~timm_jax.data.tasks.Task` (as a dict) the data set defines, or ``None`` when
        the labels to predict must be chosen (``--labels``).
      cases: MSD / nnU-Net only, the cases ``dataset.json`` / ``imagesTr`` list (left out of
        ``to_dict``: an info read back with ``from_dict`` is a record; read data through
        :func:`dataset_info`).
    """

    layout: str
    convention: str
    root: str
    modalities: tuple[str, ...]
    files: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    native_labels: tuple[int, ...] | None = None
    remap: Mapping[int, int] | None = None
    label_map: Mapping[str, Any] | None = None
    label_names: Mapping[int, str] = dataclasses.field(default_factory=dict)
    task: Mapping[str, Any] | None = None
    #: MSD / nnU-Net: case id -> its entry (files, subset); not part of the record
    cases: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @property
    def label_set_name(self) -> str:
        """How label-value problems name the allowed set (``label values outside the brats set``)."""
        names = {
            "brats2018": "brats",
            "brats2023": "brats (BraTS 2023+)",
            "msd-brats": "msd BrainTumour",
            "msd": "msd (dataset.json labels)",
            "nnunet": "nnunet (dataset.json labels)",
            "nnunet-regions": "nnunet (dataset.json labels)",
        }
        return names.get(self.convention, self.layout)

    @property
    def label_values(self) -> tuple[int, ...] | None:
        """The values of a loaded (renumbered / mapped) label map; ``None``: any non-negative integer."""
        if self.label_map is not None:
            return (0, *(int(c) for c, _, _ in self.label_map["classes"]))
        if self.native_labels is None:
            return None
        if self.remap is None:
            return tuple(self.native_labels)
        return tuple(sorted({int(self.remap.get(v, v)) for v in self.native_labels}))

    def make_task(self):
        """The data set's own :class:`~timm_jax.data.tasks.Task`, or ``None``."""
        from timm_jax.data.tasks import Task

        return None if self.task is None else Task.from_dict(self.task)

    def get_label_map(self):
        from timm_jax.data.labelmaps import LabelMap

        return None if self.label_map is None else LabelMap.from_dict(self.label_map)

    def to_native_labels(self, labels):
        """A loaded label map (e.g. a prediction) in the data set's own ids (BraTS 2023: 4 -> 3).

        Raises:
          DataError: the data set was loaded through a many-to-one ``label_map``, which cannot be
            inverted (write the class ids instead).
        """
        import numpy as np

        lab = np.asarray(labels)
        if self.label_map is not None:
            raise DataError(
                f"labels of {self.root} were merged by the label map {self.label_map['name']}; "
                "the source ids cannot be recovered"
            )
        if not self.remap:
            return lab
        out = lab.copy()
        for native, loaded in self.remap.items():
            out[lab == loaded] = native
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "convention": self.convention,
            "root": self.root,
            "modalities": list(self.modalities),
            "files": _jsonable(self.files),
            "native_labels": None if self.native_labels is None else list(self.native_labels),
            "remap": None if self.remap is None else {str(k): int(v) for k, v in self.remap.items()},
            "label_map": None if self.label_map is None else _jsonable(self.label_map),
            "label_names": {str(k): v for k, v in self.label_names.items()},
            "task": None if self.task is None else _jsonable(self.task),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetInfo:
        return cls(
            layout=d["layout"],
            convention=d["convention"],
            root=d["root"],
            modalities=tuple(d["modalities"]),
            files=dict(d.get("files") or {}),
            native_labels=None if d.get("native_labels") is None else tuple(d["native_labels"]),
            remap=None if d.get("remap") is None else {int(k): int(v) for k, v in d["remap"].items()},
            label_map=d.get("label_map"),
            label_names={int(k): v for k, v in (d.get("label_names") or {}).items()},
            task=d.get("task"),
        )

    def fingerprint(self) -> dict[str, Any]:
        """What decides how a case is read (everything but the root), for cache keys."""
        d = self.to_dict()
        d.pop("root")
        return d


def _jsonable(v):
    return json.loads(json.dumps(v))


# ----------------------------------------------------------------------------------- helpers
def _problem(path, message, case_id="") -> Problem:
    return Problem(case_id, str(path), message)


def _fail(path, message) -> DataError:
    return DataError([_problem(path, message)])


def _find(folder: Path, stem: str, names: set[str] | None = None) -> Path | None:
    """``folder/stem + ext`` for the first image extension present, else ``None``."""
    for ext in IMAGE_EXTENSIONS:
        p = folder / (stem + ext)
        if (stem + ext in names) if names is not None else p.is_file():
            return p
    return None


def _decimal(text: str) -> bool:
    """Whether ``text`` is a plain decimal number (``str.isdigit`` also accepts "²" and "٣")."""
    return re.fullmatch(r"[0-9]+", text.strip()) is not None


def _file_names(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir() if not p.is_dir()}
    except OSError:
        return set()


def _examples(ids: Sequence[str], n: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _root_dir(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise _fail(root, "data folder not found")
    return root


def _subset(subset: str) -> str:
    if subset not in SUBSETS:
        raise DataError(f"unknown subset {subset!r}; expected one of {SUBSETS}")
    return subset


def _choose(key: str, candidates: Sequence[str], present: Mapping[str, set[str]], *, optional: bool):
    """The one file name of ``candidates`` the cases use (preference order), or ``None`` (absent).

    ``present`` maps each case to the candidates it has. A case with none of them is left to report
    its own missing file (or, for an optional file, means the data set has none); the cases that
    have some must share one candidate, else :class:`DataError`.
    """
    having = {c: s for c, s in present.items() if s}
    if not having:
        return None if optional else candidates[0]
    if optional and len(having) != len(present):
        lacking = [c for c in present if c not in having]
        raise DataError(
            f"{' or '.join(candidates)} is present in {len(having)} of {len(present)} cases "
            f"(missing in {_examples(lacking)}); all cases of a data set must have it or all lack it"
        )
    for cand in candidates:
        if all(cand in s for s in having.values()):
            return cand
    by = {cand: [c for c, s in having.items() if cand in s] for cand in candidates}
    shown = "; ".join(f"{cand} in {len(ids)} ({_examples(ids)})" for cand, ids in by.items() if ids)
    raise DataError(
        f"the cases disagree on the {key} file: {shown}; all cases of a data set must use the same one"
    )


# ----------------------------------------------------------------------------------- folders of cases
def _case_folders(root: Path, group_dirs: Sequence[str] = (), *, need: str | None = None) -> dict[str, Path]:
    """Case id -> folder: every sub-folder (in ``group_dirs`` too); with ``need``, only those holding it."""
    found: dict[str, Path] = {}
    for entry in sorted(list_dir(root)):
        if not is_case_dir(entry):
            continue
        if entry.name in group_dirs:
            subs = [e for e in sorted(list_dir(entry)) if is_case_dir(e)]
        else:
            subs = [entry]
        for sub in subs:
            if need is not None and (not (sub / need).is_dir() or sub.name.startswith("fsaverage")):
                continue
            if sub.name in found:
                raise DataError([Problem(sub.name, str(sub), f"case id also found at {found[sub.name]}")])
            found[sub.name] = sub
    return found


# ----------------------------------------------------------------------------------- brats
def _brats_info(root: Path) -> DatasetInfo:
    folders = _case_folders(root, ("HGG", "LGG"))
    seen: dict[str, list[str]] = {"brats2018": [], "brats2023": []}
    both = []
    for cid, folder in folders.items():
        names = _file_names(folder)
        hits = {}
        for conv, naming in BRATS_NAMING.items():
            keys = [*BRATS_MODALITIES, "labels"]
            stems = [f"{cid}{naming['sep']}{naming[k]}" for k in keys]
            hits[conv] = sum(_find(folder, s, names) is not None for s in stems)
        if hits["brats2018"] and hits["brats2023"]:
            both.append(cid)
        elif hits["brats2018"] or hits["brats2023"]:
            seen["brats2018" if hits["brats2018"] else "brats2023"].append(cid)
    if both:
        raise _fail(
            root,
            f"case folder(s) {_examples(both)} hold files of both the BraTS 2018-2021 naming "
            "(<case>_t1.nii.gz) and the BraTS 2023+ naming (<case>-t1n.nii.gz)",
        )
    if seen["brats2018"] and seen["brats2023"]:
        a, b = seen["brats2018"], seen["brats2023"]
        raise _fail(
            root,
            f"the cases use both the BraTS 2018-2021 naming (<case>_t1.nii.gz: {len(a)} case(s), e.g. "
            f"{_examples(a, 2)}) and the BraTS 2023+ naming (<case>-t1n.nii.gz: {len(b)} case(s), e.g. "
            f"{_examples(b, 2)}); all cases of a data set must use one",
        )
    conv = "brats2023" if seen["brats2023"] else "brats2018"
    from timm_jax.data.tasks import brats_regions

    if conv == "brats2018":
        native, remap = (0, 1, 2, 4), None
        names = dict(BRATS_LABEL_NAMES)
    else:
        native, remap = (0, 1, 2, 3), {0: 0, 1: 1, 2: 2, 3: 4}
        names = {1: "NETC (non-enhancing tumour core)", 2: "SNFH (oedema)", 4: "ET (enhancing tumour)"}
    return DatasetInfo(
        layout="brats",
        convention=conv,
        root=str(root),
        modalities=BRATS_MODALITIES,
        files=dict(BRATS_NAMING[conv]),
        native_labels=native,
        remap=remap,
        label_names=names,
        task=brats_regions().to_dict(),
    )


def _brats_plan(root: Path, info: DatasetInfo, case_id: str):
    folder = _locate(root, case_id, ("HGG", "LGG"))
    if folder is None:
        return None, [Problem(case_id, str(root / case_id), "case folder not found")]
    naming = info.files
    names = _file_names(folder)
    images = []
    for m in info.modalities:
        stem = f"{case_id}{naming['sep']}{naming[m]}"
        images.append(ImageSource(_find(folder, stem, names), folder / (stem + ".nii.gz"), (m,)))
    stem = f"{case_id}{naming['sep']}{naming['labels']}"
    return CasePlan(
        case_id, folder, tuple(images), _find(folder, stem, names), folder / (stem + ".nii.gz")
    ), []


def _locate(root: Path, case_id: str, groups: Sequence[str] = ()) -> Path | None:
    if not case_id or "/" in case_id or case_id in (".", ".."):
        return None
    for folder in (root / case_id, *(root / g / case_id for g in groups)):
        if folder.is_dir():
            return folder
    return None


# ----------------------------------------------------------------------------------- parcellation
def _parcellation_info(root: Path, label_map) -> DatasetInfo:
    folders = _case_folders(root)
    present = {cid: ({"t2.nii.gz"} if _find(f, "t2") else set()) for cid, f in folders.items()}
    try:
        t2 = _choose("t2", ("t2.nii.gz",), present, optional=True)
    except DataError as err:
        raise _fail(root, str(err)) from None
    modalities = ("t1", "t2") if t2 else ("t1",)
    return _with_label_map(
        DatasetInfo(
            layout="parcellation",
            convention="parcellation",
            root=str(root),
            modalities=modalities,
            files={"t2": bool(t2)},
        ),
        label_map,
    )


def _parcellation_plan(root: Path, info: DatasetInfo, case_id: str):
    folder = _locate(root, case_id)
    if folder is None:
        return None, [Problem(case_id, str(root / case_id), "case folder not found")]
    names = _file_names(folder)
    images = tuple(
        ImageSource(_find(folder, m, names), folder / f"{m}.nii.gz", (m,)) for m in info.modalities
    )
    return CasePlan(case_id, folder, images, _find(folder, "labels", names), folder / "labels.nii.gz"), []


def _with_label_map(info: DatasetInfo, label_map) -> DatasetInfo:
    """Attach a ``--label_map`` (name or LabelMap) and the task it defines."""
    if label_map in (None, ""):
        return info
    from timm_jax.data.labelmaps import LabelMap, load_label_map
    from timm_jax.data.tasks import parcellation_labels

    lm = label_map if isinstance(label_map, LabelMap) else load_label_map(label_map)
    task = parcellation_labels(
        lm.class_ids, lm.class_names, name=Path(lm.name).stem, layout=info.layout, known_labels=lm.class_ids
    )
    return dataclasses.replace(
        info,
        label_map=lm.to_dict(),
        label_names={c: n for c, n, _ in lm.classes},
        task=task.to_dict(),
    )


# ----------------------------------------------------------------------------------- freesurfer
def _freesurfer_info(root: Path, label_map) -> DatasetInfo:
    folders = _case_folders(root, need="mri")
    if not folders:
        raise _fail(root, "no FreeSurfer subject folders found (<subject>/mri/ with T1.mgz or orig.mgz)")
    names = {cid: _file_names(f / "mri") for cid, f in folders.items()}
    chosen = {}
    for key, candidates in FREESURFER_FILES.items():
        present = {cid: {c for c in candidates if c in n} for cid, n in names.items()}
        try:
            chosen[key] = _choose(key, candidates, present, optional=key != "t1")
        except DataError as err:
            raise _fail(root, str(err)) from None
    modalities = ("t1", "t2") if chosen["t2"] else ("t1",)
    return _with_label_map(
        DatasetInfo(
            layout="freesurfer",
            convention="freesurfer",
            root=str(root),
            modalities=modalities,
            files={k: v for k, v in chosen.items() if v},
        ),
        label_map,
    )


def _freesurfer_plan(root: Path, info: DatasetInfo, case_id: str):
    folder = _locate(root, case_id)
    if folder is None or not (folder / "mri").is_dir():
        where = root / case_id / "mri"
        return None, [Problem(case_id, str(where), "subject folder (with mri/) not found")]
    mri = folder / "mri"
    images = []
    for m in info.modalities:
        p = mri / info.files[m]
        images.append(ImageSource(p if p.is_file() else None, p, (m,)))
    labels_name = info.files.get("labels", FREESURFER_FILES["labels"][0])
    lab = mri / labels_name
    return CasePlan(case_id, folder, tuple(images), lab if lab.is_file() else None, lab), []


# ----------------------------------------------------------------------------------- dataset.json
class _Json:
    """Type checks on a parsed dataset.json; every failure is one line naming the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, message: str) -> DataError:
        return _fail(self.path, f"{where} {message}" if where else message)

    def load(self) -> dict:
        if not is_file(self.path):
            raise _fail(self.path, "missing file (the data set's dataset.json)")
        try:
            raw = json.loads(self.path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise _fail(self.path, f"is not valid JSON ({type(err).__name__}: {_one_line(err)})") from None
        if not isinstance(raw, dict):
            raise self.fail("", f"must hold a JSON object, got {_kind(raw)}")
        return raw

    def get(self, d: dict, key: str, kind, where: str = "", *, required: bool = True, default=None):
        label = f"{where}[{key!r}]" if where else repr(key)
        if key not in d:
            if required:
                raise self.fail("", f"has no {label} entry")
            return default
        value = d[key]
        if not _is(value, kind):
            raise self.fail(label, f"must be {_kind_name(kind)}, got {_kind(value)}")
        return value

    def channel_dict(self, d: dict, key: str) -> tuple[str, ...]:
        """``{"0": "T1", "1": "T2"}`` -> ``("T1", "T2")``; keys must be 0..n-1."""
        value = self.get(d, key, dict)
        if not value:
            raise self.fail(repr(key), "must name at least one channel")
        try:
            if not all(_decimal(k) for k in value):
                raise ValueError
            indices = sorted(int(k) for k in value)
        except ValueError:
            raise self.fail(
                repr(key), f'keys must be channel numbers "0", "1", ..., got {list(value)[:5]}'
            ) from None
        if indices != list(range(len(value))) or any(str(int(k)) != k.strip() for k in value):
            raise self.fail(repr(key), f'keys must be "0" .. "{len(value) - 1}", got {list(value)[:8]}')
        names = {int(k): v for k, v in value.items()}
        for i, name in names.items():
            if not isinstance(name, str) or not name.strip():
                raise self.fail(f'{key!r}["{i}"]', f"must be a non-empty string, got {_kind(name)}")
        return tuple(names[i].strip() for i in range(len(names)))

    def inside(self, root: Path, rel: str, where: str) -> Path:
        """``root / rel`` (lexically normalised), which must lie inside ``root``."""
        if not rel.strip() or "\x00" in rel:
            raise self.fail(where, f"is not a file path: {rel!r}")
        joined = os.path.normpath(os.path.join(str(root), rel))
        base = os.path.normpath(str(root))
        if os.path.commonpath([joined, base]) != base or joined == base:
            raise self.fail(where, f"{rel!r} points outside the data set folder {root}")
        return Path(joined)


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(kind, tuple):
        return any(_is(value, k) for k in kind)
    return isinstance(value, kind)


def _kind_name(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_kind_name(k) for k in kind)
    return {dict: "an object", list: "a list", str: "a string", int: "an integer"}.get(kind, kind.__name__)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    text = json.dumps(value) if not isinstance(value, float) or value == value else "NaN"
    if len(text) > 40:
        text = text[:37] + "..."
    return (
        f"{_kind_name(type(value)) if type(value) in (dict, list, str, int) else type(value).__name__} {text}"
    )


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(str(err).split())[:limit]


def _strip_ext(name: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _msd_brats_map(modalities: Sequence[str], labels: Mapping[int, str]):
    """(channel order, label remap) when the task is BrainTumour, else ``None``."""
    names = [m.lower().replace("-", "").replace("_", "") for m in modalities]
    wanted = {"t1w": "t1", "t1gd": "t1ce", "t2w": "t2", "flair": "flair"}
    if sorted(names) != sorted(wanted):
        return None
    order = tuple(names.index(k) for k in ("t1w", "t1gd", "t2w", "flair"))
    remap = {0: 0}
    for i, name in labels.items():
        n = name.lower().replace("-", " ").replace("_", " ")
        if i == 0:
            continue
        if "edema" in n or "oedema" in n:
            remap[i] = 2
        elif "non enhancing" in n or "necro" in n:
            remap[i] = 1
        elif "enhancing" in n:
            remap[i] = 4
    if sorted(remap.values()) != [0, 1, 2, 4] or len(remap) != len(labels):
        return None
    return order, remap


def _msd_info(root: Path) -> DatasetInfo:
    js = _Json(root / "dataset.json")
    d = js.load()
    modalities = js.channel_dict(d, "modality")
    raw_labels = js.get(d, "labels", dict)
    labels: dict[int, str] = {}
    for k, v in raw_labels.items():
        if not _decimal(k):
            raise js.fail("'labels'", f'keys must be label values "0", "1", ..., got {k!r}')
        if not isinstance(v, str):
            raise js.fail(f"'labels'[{k!r}]", f"must be a string (the label's name), got {_kind(v)}")
        labels[int(k)] = v
    if 0 not in labels:
        raise js.fail("'labels'", 'must name the background "0"')
    training = js.get(d, "training", list)
    test = js.get(d, "test", list, required=False, default=[])
    cases: dict[str, dict] = {}

    def add(case_id, entry, where):
        if case_id in cases:
            raise js.fail(where, f"lists case {case_id!r} twice")
        cases[case_id] = entry

    for i, item in enumerate(training):
        where = f"'training'[{i}]"
        if not isinstance(item, dict):
            raise js.fail(where, f'must be an object {{"image": ..., "label": ...}}, got {_kind(item)}')
        image = js.get(item, "image", str, where)
        label = js.get(item, "label", str, where)
        img = js.inside(root, image, f"{where}['image']")
        lab = js.inside(root, label, f"{where}['label']")
        add(_strip_ext(img.name), {"subset": "train", "image": str(img), "label": str(lab)}, where)
    for i, item in enumerate(test):
        where = f"'test'[{i}]"
        if isinstance(item, dict):  # some conversions write {"image": ...}
            item = js.get(item, "image", str, where)
        if not isinstance(item, str):
            raise js.fail(where, f"must be an image path, got {_kind(item)}")
        img = js.inside(root, item, where)
        add(_strip_ext(img.name), {"subset": "test", "image": str(img), "label": None}, where)
    n = d.get("numTraining")
    if n is not None and (not _is(n, int) or n != len(training)):
        raise js.fail(
            "'numTraining'", f"is {json.dumps(n)[:20]} but 'training' lists {len(training)} case(s)"
        )
    brats = _msd_brats_map(modalities, labels)
    if brats is not None:
        from timm_jax.data.tasks import brats_regions

        order, remap = brats
        task = dataclasses.replace(brats_regions(), layout="msd")
        return DatasetInfo(
            layout="msd",
            convention="msd-brats",
            root=str(root),
            modalities=BRATS_MODALITIES,
            files={"channels": list(order), "modality": list(modalities)},
            cases=cases,
            native_labels=tuple(sorted(labels)),
            remap=remap,
            label_names=dict(BRATS_LABEL_NAMES),
            task=task.to_dict(),
        )
    from timm_jax.data.tasks import parcellation_labels

    fg = sorted(v for v in labels if v != 0)
    task = None
    if fg:
        task = parcellation_labels(
            fg, [labels[v] for v in fg], name=str(d.get("name", root.name)), layout="msd", known_labels=fg
        ).to_dict()
    return DatasetInfo(
        layout="msd",
        convention="msd",
        root=str(root),
        modalities=modalities,
        files={"channels": list(range(len(modalities))), "modality": list(modalities)},
        cases=cases,
        native_labels=tuple(sorted(labels)),
        label_names={v: labels[v] for v in fg},
        task=task,
    )


def _msd_plan(root: Path, info: DatasetInfo, case_id: str):
    entry = info.cases.get(case_id)
    if entry is None:
        return None, [Problem(case_id, str(root / "dataset.json"), f"lists no case {case_id!r}")]
    img = Path(entry["image"])
    order = tuple(info.files["channels"])
    n = len(info.files["modality"])
    source = ImageSource(
        img if is_file(img) else None,
        img,
        info.modalities,
        volumes=order,
        n_volumes=n,
        what="channels of dataset.json 'modality'",
    )
    if entry["label"] is None:
        return CasePlan(case_id, img.parent, (source,), None, None), []
    lab = Path(entry["label"])
    return CasePlan(case_id, img.parent, (source,), lab if is_file(lab) else None, lab), []


_NNUNET_ENDINGS = (".nii.gz", ".nii", ".mgz", ".mgh")


def _nnunet_info(root: Path) -> DatasetInfo:
    js = _Json(root / "dataset.json")
    d = js.load()
    modalities = js.channel_dict(d, "channel_names")
    raw = js.get(d, "labels", dict)
    ending = js.get(d, "file_ending", str)
    if ending not in _NNUNET_ENDINGS:
        raise js.fail("'file_ending'", f"{ending!r} is not supported (only {', '.join(_NNUNET_ENDINGS)})")
    labels: dict[str, tuple[int, ...]] = {}
    for name, value in raw.items():
        where = f"'labels'[{name!r}]"
        if _is(value, int):
            ids = (value,)
        elif isinstance(value, list) and value and all(_is(v, int) for v in value):
            ids = tuple(value)
        else:
            raise js.fail(where, f"must be a label value or a non-empty list of them, got {_kind(value)}")
        if any(v < 0 or v > 2**31 - 1 for v in ids):
            raise js.fail(where, f"holds a label value outside 0 .. 2^31-1: {list(ids)}")
        labels[name] = ids
    if labels.get("background") != (0,):
        raise js.fail("'labels'", 'must map "background" to 0')
    if "ignore" in labels:
        raise js.fail("'labels'", "has an 'ignore' label (sparse annotation), which is not supported")
    fg = {k: v for k, v in labels.items() if k != "background"}
    if not fg:
        raise js.fail("'labels'", "defines no label besides the background")
    if any(0 in v for v in fg.values()):
        raise js.fail("'labels'", "maps a label other than 'background' to 0")
    regions = any(len(v) > 1 for v in fg.values())
    from timm_jax.data.tasks import Task

    all_ids = sorted({i for v in fg.values() for i in v})
    if regions:
        order = js.get(d, "regions_class_order", list)
        if len(order) != len(fg) or not all(_is(v, int) for v in order):
            raise js.fail(
                "'regions_class_order'",
                f"must list {len(fg)} label values (one per region), got {_kind(order)}",
            )
        if any(v not in all_ids for v in order):
            raise js.fail("'regions_class_order'", f"holds values that are in no region: {order}")
        task = Task(
            name=root.name,
            layout="nnunet",
            kind="regions",
            label_ids=tuple(all_ids),
            channel_names=tuple(fg),
            regions=tuple(fg.values()),
            known_labels=tuple(all_ids),
            region_labels=tuple(order),
        )
        names: dict[int, str] = {}
    else:
        by_id = {v[0]: k for k, v in fg.items()}
        if len(by_id) != len(fg):
            raise js.fail("'labels'", "maps two names to the same label value")
        task = Task(
            name=root.name,
            layout="nnunet",
            kind="labels",
            label_ids=tuple(sorted(by_id)),
            channel_names=tuple(by_id[i] for i in sorted(by_id)),
            known_labels=tuple(sorted(by_id)),
        )
        names = {i: by_id[i] for i in sorted(by_id)}
    cases: dict[str, str] = {}
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    for subset, folder in (("train", "imagesTr"), ("test", "imagesTs")):
        if not (root / folder).is_dir():
            if subset == "train":
                raise _fail(root / folder, "folder not found (nnU-Net raw data: imagesTr/, labelsTr/)")
            continue
        for p in sorted(list_dir(root / folder)):
            if p.name.startswith(".") or not p.name.endswith(ending):
                continue
            m = pattern.match(p.name)
            if m is None:
                raise _fail(p, f"file name is not <case>_<XXXX>{ending} (XXXX: the channel number)")
            if int(m["channel"]) >= len(modalities):
                raise _fail(
                    p, f"channel {m['channel']}, but dataset.json 'channel_names' has {len(modalities)}"
                )
            cid = m["case"]
            if cases.setdefault(cid, subset) != subset:
                raise _fail(p, f"case {cid!r} is in both imagesTr and imagesTs")
    n_train = sum(1 for s in cases.values() if s == "train")
    n = d.get("numTraining")
    if n is not None and (not _is(n, int) or n != n_train):
        raise js.fail("'numTraining'", f"is {json.dumps(n)[:20]} but imagesTr holds {n_train} case(s)")
    return DatasetInfo(
        layout="nnunet",
        convention="nnunet-regions" if regions else "nnunet",
        root=str(root),
        modalities=modalities,
        files={"file_ending": ending},
        cases=cases,
        native_labels=tuple(sorted({0, *all_ids})),
        label_names=names,
        task=task.to_dict(),
    )


def _nnunet_plan(root: Path, info: DatasetInfo, case_id: str):
    subset = info.cases.get(case_id)
    if subset is None:
        return None, [
            Problem(case_id, str(root / "imagesTr" / case_id), "no such case in imagesTr/ or imagesTs/")
        ]
    ending = info.files["file_ending"]
    folder = root / ("imagesTr" if subset == "train" else "imagesTs")
    images = []
    for i, m in enumerate(info.modalities):
        p = folder / f"{case_id}_{i:04d}{ending}"
        images.append(ImageSource(p if p.is_file() else None, p, (m,)))
    if subset == "test":
        return CasePlan(case_id, folder, tuple(images), None, None), []
    lab = root / "labelsTr" / f"{case_id}{ending}"
    return CasePlan(case_id, folder, tuple(images), lab if lab.is_file() else None, lab), []


# ----------------------------------------------------------------------------------- public
def dataset_info(root: str | os.PathLike, layout: str, *, label_map: str | None = None) -> DatasetInfo:
    """Look at the data folder ``root`` in ``layout``: its convention, modalities, labels and task.

    Args:
      root: the data folder (BraTS/parcellation: the folder of case folders; MSD/nnU-Net: the task
        folder holding ``dataset.json``; FreeSurfer: the subjects directory).
      layout: one of :data:`LAYOUT_NAMES`.
      label_map: ``freesurfer`` / ``parcellation`` only: ``"paper14"`` or a JSON label-map file.

    Raises:
      DataError: unknown layout, missing folder, a bad ``dataset.json`` or label map, or cases that
        disagree on the naming or on the modalities present — one line each, naming the file.
    """
    if layout not in LAYOUT_NAMES:
        raise DataError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUT_NAMES)}")
    if label_map and layout not in ("freesurfer", "parcellation"):
        raise DataError(f"--label_map applies to the freesurfer and parcellation layouts, not {layout}")
    root = _root_dir(root)
    if layout == "brats":
        return _brats_info(root)
    if layout == "parcellation":
        return _parcellation_info(root, label_map)
    if layout == "freesurfer":
        return _freesurfer_info(root, label_map)
    if layout == "msd":
        return _msd_info(root)
    return _nnunet_info(root)


def list_layout_cases(info: DatasetInfo, subset: str = "train") -> list[str]:
    """Sorted case ids of ``subset``: ``train`` (annotated, or every folder), ``test`` or ``all``."""
    subset = _subset(subset)
    root = Path(info.root)
    if info.layout in ("msd", "nnunet"):
        cases = info.cases
        return sorted(
            cid
            for cid, entry in cases.items()
            if subset == "all" or (entry["subset"] if isinstance(entry, dict) else entry) == subset
        )
    if subset == "test":
        return []
    if info.layout == "brats":
        return sorted(_case_folders(root, ("HGG", "LGG")))
    if info.layout == "freesurfer":
        return sorted(_case_folders(root, need="mri"))
    return sorted(_case_folders(root))


def case_plan(info: DatasetInfo, case_id: str) -> tuple[CasePlan | None, list[Problem]]:
    """The files of one case (``None`` and a problem when the case does not exist)."""
    root = Path(info.root)
    plan = {
        "brats": _brats_plan,
        "parcellation": _parcellation_plan,
        "freesurfer": _freesurfer_plan,
        "msd": _msd_plan,
        "nnunet": _nnunet_plan,
    }[info.layout]
    return plan(root, info, case_id)
