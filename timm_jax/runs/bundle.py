"""Model bundles: one trained network as a directory of plain data, to share, fuse and fine-tune.

A bundle (format ``timm_jax.bundle``, version 1; written by :mod:`timm_jax.runs.bundle_export`,
``python -m timm_jax.bundle export``) holds::

    bundle.json            format, version, the model / train / task / channel description, the
                           preprocessing, the Fishers' settings, the code version, a SHA-256 per file
    params.npz             the best parameters, np.savez of flat "a/b/c" keys
    fisher_<kind>.npz      the diagonal Fisher(s) it was exported with (same keys and shapes)
    MODEL_CARD.md          what it was trained on, how well it did, what it is for

and nothing else: no image, no path to the training data (the case ids only when asked for).
Reading it (:func:`open_bundle`) is data only and never runs code from it: JSON and
``np.load(..., allow_pickle=False)``, every file's checksum verified first. It is refused with one
line naming the file (:class:`BundleError`, a :class:`~timm_jax.errors.CheckpointError`) for a
missing, extra or damaged file, a checksum mismatch, a foreign or newer format version, a pickled
object array, a symbolic link or folder inside it, arrays that are not real numbers, and arrays
whose shapes do not match each other or the network ``bundle.json`` describes. The format is
documented in ``docs/bundles.md``.

What the fuse and train workflows need, for a run directory *or* a bundle:

* :func:`timm_jax.runs.models.load_model` reads a bundle as it reads a run directory; a bundle's
  ``meta`` is shaped like a run's metadata (``kind``, ``model``, ``train``, ``task``,
  ``data_info``, ``data``, ``run_key``, ``run``).
* :func:`bundle_fisher` — a bundle's stored Fisher (a run's is
  :func:`timm_jax.runs.fisher_cache.source_fisher`).
* :func:`is_bundle`.

This module is of the ``runs`` layer: the workflows import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from timm_jax.config import ModelConfig, TrainConfig
from timm_jax.core.partition import from_flat_dict, to_flat_dict
from timm_jax.data.io import LAYOUTS
from timm_jax.data.layouts import DatasetInfo
from timm_jax.data.tasks import Task
from timm_jax.errors import CheckpointError
from timm_jax.nn.unet import build_model, init_params

__all__ = [
    "BUNDLE_FILE",
    "FISHER_KINDS",
    "FORMAT",
    "VERSION",
    "Bundle",
    "BundleError",
    "bundle_fisher",
    "file_sha256",
    "is_bundle",
    "open_bundle",
    "run_modalities",
]

FORMAT = "timm_jax.bundle"
VERSION = 1
BUNDLE_FILE = "bundle.json"
PARAMS_FILE = "params.npz"
CARD_FILE = "MODEL_CARD.md"
FISHER_KINDS = ("empirical", "true", "adam")
#: bundle.json larger than this is not a bundle's (it holds configuration and checksums only)
_MAX_JSON_BYTES = 16 << 20
#: an .npz whose members declare more than this is refused before it is read (the paper's network:
#: 33 MB of float32 parameters)
_MAX_NPZ_BYTES = 8 << 30
_log = logging.getLogger(__name__)


class BundleError(CheckpointError):
    """A model bundle is missing, damaged, foreign, of a newer format, or lacks what was asked."""


def fisher_file(kind: str) -> str:
    return f"fisher_{kind}.npz"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with a ``bundle.json`` of this format (any version; nothing
    is verified — :func:`open_bundle` does that). Never raises."""
    try:
        p = Path(path) / BUNDLE_FILE
        if not p.is_file() or p.is_symlink() or p.stat().st_size > _MAX_JSON_BYTES:
            return False
        d = json.loads(p.read_text(encoding="utf-8"))
        return isinstance(d, dict) and d.get("format") == FORMAT
    except (OSError, ValueError):
        return False


@dataclass
class Bundle:
    """An opened, verified bundle (:func:`open_bundle`): ``meta`` (run-metadata-like), ``params``
    (nested numpy tree), the Fishers by kind (:meth:`fisher`) and the raw ``bundle.json``."""

    path: str
    record: dict
    meta: dict
    params: dict
    _fishers: dict = field(repr=False, default_factory=dict)

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def fisher_kinds(self) -> tuple[str, ...]:
        return tuple(self._fishers)

    def fisher_settings(self, kind: str) -> dict:
        """How the ``kind`` Fisher was computed (patch, patches per case, seed, checkpoint step...)."""
        self.fisher(kind)
        return dict(self.record["fishers"][kind]["settings"])

    def fisher(self, kind: str) -> dict:
        """The ``kind`` Fisher (nested numpy tree, the params' structure). Raises
        :class:`BundleError` naming the kinds the bundle has."""
        if kind not in self._fishers:
            have = ", ".join(self._fishers) or "none"
            other = f", or fuse with --fisher={next(iter(self._fishers))}" if self._fishers else ""
            raise BundleError(
                f"model bundle {self.path} holds no {kind} Fisher (it has: {have}); export it again "
                f"with --fisher={kind} from its run directory{other}"
            )
        return self._fishers[kind]


# ------------------------------------------------------------------------------------ reading
def _fail(root: Path, name: str, message: str) -> BundleError:
    return BundleError(f"model bundle {root}: {name}: {message}")


def _scan(root: Path) -> dict[str, int]:
    """Every entry of the bundle directory as name -> size; refuses links, folders, special files."""
    out = {}
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        raise BundleError(f"model bundle {root} cannot be listed ({type(e).__name__}: {e})") from None
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.is_symlink():
            target = os.readlink(entry.path)
            resolved = os.path.realpath(entry.path)
            inside = os.path.commonpath([resolved, os.path.realpath(root)]) == os.path.realpath(root)
            where = "inside the bundle" if inside else "outside the bundle"
            raise _fail(
                root,
                entry.name,
                f"is a symbolic link (to {target}, {where}); a bundle holds regular files only",
            )
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise _fail(root, entry.name, "is a folder; a bundle holds regular files only")
        if not stat.S_ISREG(st.st_mode):
            raise _fail(root, entry.name, "is not a regular file; a bundle holds regular files only")
        out[entry.name] = st.st_size
    return out


def _read_record(root: Path, sizes: dict[str, int]) -> dict:
    if BUNDLE_FILE not in sizes:
        raise BundleError(f"{root} is not a model bundle: it has no {BUNDLE_FILE}")
    if sizes[BUNDLE_FILE] > _MAX_JSON_BYTES:
        raise _fail(root, BUNDLE_FILE, f"is {sizes[BUNDLE_FILE]} bytes, too large for a bundle record")
    try:
        rec = json.loads((root / BUNDLE_FILE).read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError) as e:
        raise _fail(root, BUNDLE_FILE, f"is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        got = rec.get("format") if isinstance(rec, dict) else type(rec).__name__
        raise _fail(root, BUNDLE_FILE, f"is not a {FORMAT} record (format {got!r})")
    version = rec.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(root, BUNDLE_FILE, f"has no valid format version (got {version!r})")
    if version > VERSION:
        raise _fail(
            root,
            BUNDLE_FILE,
            f"is of format version {version}; this timm_jax reads version {VERSION} and below — update it",
        )
    return rec


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _section(root: Path, rec: dict, key: str, kind=dict):
    v = rec.get(key)
    if not isinstance(v, kind):
        raise _fail(root, BUNDLE_FILE, f"'{key}' must be {kind.__name__}, got {type(v).__name__}")
    return v


def _check_files(root: Path, rec: dict, sizes: dict[str, int]) -> None:
    """Listed files == present files (bundle.json aside), each with its size and SHA-256."""
    files = _section(root, rec, "files")
    for name, entry in files.items():
        if (
            not isinstance(name, str)
            or name in ("", ".", "..", BUNDLE_FILE)
            or "/" in name
            or "\\" in name
            or "\x00" in name
        ):
            raise _fail(root, BUNDLE_FILE, f"lists a file name that is not a plain file name: {name!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise _fail(root, BUNDLE_FILE, f"'files'[{name!r}] must be {{'sha256': ..., 'bytes': ...}}")
    present = set(sizes) - {BUNDLE_FILE}
    missing = sorted(set(files) - present)
    if missing:
        raise _fail(root, missing[0], "is missing (listed in bundle.json)")
    extra = sorted(present - set(files))
    if extra:
        raise _fail(root, extra[0], "is not listed in bundle.json (a bundle holds its listed files only)")
    for name in sorted(files):
        want = files[name]
        if want.get("bytes") is not None and want.get("bytes") != sizes[name]:
            raise _fail(
                root,
                name,
                f"is {sizes[name]} bytes, bundle.json says {want.get('bytes')} "
                "(damaged or changed after export)",
            )
        if file_sha256(root / name) != want["sha256"].lower():
            raise _fail(root, name, "checksum mismatch (damaged or changed after export)")


def _read_npz(root: Path, name: str) -> dict[str, np.ndarray]:
    """Flat ``{"a/b": array}`` of real-valued arrays; never unpickles."""
    path = root / name
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(i.file_size for i in zf.infolist())
        if declared > _MAX_NPZ_BYTES:
            raise _fail(root, name, f"declares {declared} bytes of arrays, more than a bundle holds")
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise _fail(root, name, "is a single .npy array, not an .npz archive of named arrays")
            for key in z.files:
                try:
                    arr = z[key]
                except ValueError as e:
                    if "allow_pickle" in str(e) or "Object arrays" in str(e):
                        raise _fail(
                            root,
                            name,
                            f"holds a pickled object array ({key!r}); refused (a bundle is data only)",
                        ) from None
                    raise _fail(root, name, f"array {key!r} cannot be read ({e})") from None
                if not isinstance(arr, np.ndarray):
                    raise _fail(root, name, f"member {key!r} is not an .npy array")
                if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
                    raise _fail(root, name, f"array {key!r} is of dtype {arr.dtype}, not real floating point")
                if not key or any(not part for part in key.split("/")):
                    raise _fail(root, name, f"array name {key!r} is not a parameter path a/b/c")
                arr.setflags(write=False)
                out[key] = arr
    except BundleError:
        raise
    except Exception as e:  # not a zip, truncated member, bad .npy header...
        raise _fail(
            root, name, f"is not a readable .npz archive ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not out:
        raise _fail(root, name, "holds no arrays")
    return out


def _expected_shapes(root: Path, model_cfg: ModelConfig, train: TrainConfig) -> dict[str, tuple]:
    """The parameter shapes of the network bundle.json describes (traced, nothing computed)."""
    cfg = model_cfg.replace(conv_impl="native")  # shapes only: any implementation has the same
    model, _ = build_model(cfg)
    patch = tuple(int(p) for p in train.patch_shape)
    if len(patch) != 3 or any(p < 1 or p % cfg.divisor for p in patch):
        raise _fail(root, BUNDLE_FILE, f"train.patch_shape {list(patch)} does not fit depth {cfg.depth}")
    shapes = jax.eval_shape(
        lambda k: init_params(model, k, (1, *patch, cfg.in_channels)), jax.random.PRNGKey(0)
    )
    return {k: tuple(v.shape) for k, v in to_flat_dict(shapes).items()}


def _describe_shapes(want: dict, have: dict) -> str:
    missing = sorted(set(want) - set(have))
    if missing:
        return f"lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    extra = sorted(set(have) - set(want))
    if extra:
        return f"has an unexpected array {extra[0]}"
    bad = next(k for k in sorted(want) if tuple(want[k]) != tuple(have[k]))
    return f"array {bad} has shape {tuple(have[bad])}, expected {tuple(want[bad])}"


def _meta(root: Path, rec: dict) -> tuple[dict, ModelConfig, TrainConfig]:
    """The run-metadata-like view of bundle.json, its sections checked."""
    sections = {k: _section(root, rec, k) for k in ("model", "train", "task", "data_info", "data", "source")}
    try:
        model_cfg = ModelConfig.from_dict(sections["model"])
        train_cfg = TrainConfig.from_dict(sections["train"])
        task = Task.from_dict(sections["task"])
        info = DatasetInfo.from_dict(sections["data_info"])
    except Exception as e:
        raise _fail(
            root, BUNDLE_FILE, f"its model / train / task / data_info do not parse ({type(e).__name__}: {e})"
        ) from None
    if (model_cfg.in_channels, model_cfg.out_channels) != (len(info.modalities), task.num_channels):
        raise _fail(
            root,
            BUNDLE_FILE,
            f"the model is {model_cfg.in_channels}→{model_cfg.out_channels} channels but data_info names "
            f"{len(info.modalities)} modalities and the task {task.num_channels} channels",
        )
    source = sections["source"]
    meta = {
        "kind": "train",
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "task": task.to_dict(),
        "data_info": info.to_dict(),
        "data": dict(sections["data"]),
        "run_key": str(source.get("run_key") or rec.get("id")),
        "run": {"best_epoch": source.get("best_epoch"), "epoch": source.get("epochs")},
        "bundle": {"path": str(root), "id": rec.get("id"), "version": rec["version"]},
    }
    return meta, model_cfg, train_cfg


_OPENED: dict[str, tuple[tuple, Bundle]] = {}


def _signature(root: Path) -> tuple:
    return tuple(
        (e.name, e.stat(follow_symlinks=False).st_size, e.stat(follow_symlinks=False).st_mtime_ns)
        for e in sorted(os.scandir(root), key=lambda e: e.name)
    )


def open_bundle(path: str | os.PathLike, *, remember: bool = True) -> Bundle:
    """Open and verify a model bundle (see the module docstring for what is refused).

    Every file's size and SHA-256 is checked against ``bundle.json`` before anything is parsed;
    arrays are read with ``allow_pickle=False``; the parameters must have exactly the shapes of the
    network ``bundle.json`` describes, and each Fisher the parameters' keys and shapes, with finite,
    non-negative values. A bundle opened before and unchanged since (same files, sizes and
    modification times) is not read again (``remember=False``: not kept for that).
    """
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not root.is_dir():
        raise BundleError(f"model bundle {root} does not exist or is not a directory")
    try:
        sig = _signature(root)
    except OSError as e:
        raise BundleError(f"model bundle {root} cannot be listed ({type(e).__name__}: {e})") from None
    cached = _OPENED.get(str(root))
    if cached is not None and cached[0] == sig:
        return cached[1]
    sizes = _scan(root)
    rec = _read_record(root, sizes)
    _check_files(root, rec, sizes)
    if not isinstance(rec.get("id"), str):
        raise _fail(root, BUNDLE_FILE, "has no bundle 'id'")
    meta, model_cfg, train_cfg = _meta(root, rec)
    if PARAMS_FILE not in rec["files"]:
        raise _fail(root, PARAMS_FILE, "is missing (every bundle has its parameters)")
    if CARD_FILE not in rec["files"]:
        raise _fail(root, CARD_FILE, "is missing (every bundle has its model card)")
    flat = _read_npz(root, PARAMS_FILE)
    have = {k: v.shape for k, v in flat.items()}
    want = _expected_shapes(root, model_cfg, train_cfg)
    if have != want:
        raise _fail(
            root,
            PARAMS_FILE,
            f"does not hold the parameters of the network in bundle.json "
            f"(base_filters={model_cfg.base_filters}, depth={model_cfg.depth}, "
            f"{model_cfg.in_channels}→{model_cfg.out_channels} channels): {_describe_shapes(want, have)}",
        )
    if any(not np.all(np.isfinite(v)) for v in flat.values()):
        bad = next(k for k, v in flat.items() if not np.all(np.isfinite(v)))
        raise _fail(root, PARAMS_FILE, f"array {bad} holds non-finite values")
    fishers_rec = _section(root, rec, "fishers")
    fishers = {}
    for kind, entry in fishers_rec.items():
        if kind not in FISHER_KINDS or not isinstance(entry, dict) or entry.get("file") != fisher_file(kind):
            raise _fail(root, BUNDLE_FILE, f"'fishers'[{kind!r}] is not a Fisher of kind {FISHER_KINDS}")
        if not isinstance(entry.get("settings"), dict):
            raise _fail(root, BUNDLE_FILE, f"'fishers'[{kind!r}] records no settings")
        name = entry["file"]
        if name not in rec["files"]:
            raise _fail(root, name, "is missing (listed under 'fishers' in bundle.json)")
        f = _read_npz(root, name)
        shapes = {k: v.shape for k, v in f.items()}
        if shapes != have:
            raise _fail(root, name, f"does not match params.npz: {_describe_shapes(have, shapes)}")
        for k, v in f.items():
            if not np.all(np.isfinite(v)) or np.any(v < 0):
                raise _fail(root, name, f"array {k} holds negative or non-finite values (a Fisher cannot)")
        fishers[kind] = from_flat_dict(f)
    stray = sorted(
        n for n in rec["files"] if n.startswith("fisher_") and n[len("fisher_") : -len(".npz")] not in fishers
    )
    if stray:
        raise _fail(root, stray[0], "is not listed under 'fishers' in bundle.json")
    bundle = Bundle(path=str(root), record=rec, meta=meta, params=from_flat_dict(flat), _fishers=fishers)
    if remember:
        if len(_OPENED) >= 8:
            _OPENED.pop(next(iter(_OPENED)))
        _OPENED[str(root)] = (sig, bundle)
    return bundle


def bundle_fisher(path: str, kind: str, *, patches_per_case: int | None = None) -> dict:
    """The ``kind`` Fisher stored in the bundle ``path`` (computed when it was exported; a bundle has
    no data to compute another). ``patches_per_case``: what the caller would have asked of a run —
    when the bundle's Fisher was drawn otherwise, this says so in the log (the bundle's is used)."""
    b = open_bundle(path)
    fisher = b.fisher(kind)
    settings = b.fisher_settings(kind)
    recorded = settings.get("patches_per_case")
    if patches_per_case is not None and recorded is not None and recorded != patches_per_case:
        _log.warning(
            "[fuse] Fisher of %s: the bundle's (%s, %s patches per case as exported), not the %d asked for "
            "(a bundle has no data to compute another)",
            b.path,
            kind,
            recorded,
            patches_per_case,
        )
    else:
        _log.info("[fuse] Fisher of %s: stored in the bundle (%s)", b.path, kind)
    return fisher


# ------------------------------------------------------------------------------------ run or bundle
def run_modalities(meta: dict) -> list[str]:
    """The input channels a run or bundle reads, in order: its recorded ``data_info.modalities``, or
    for runs written before that was recorded the layout's default modalities (as many as the
    network's input channels)."""
    recorded = (meta.get("data_info") or {}).get("modalities")
    if recorded:
        return [str(m) for m in recorded]
    layout = (meta.get("data") or {}).get("layout", "")
    n = int((meta.get("model") or {}).get("in_channels", 0))
    default = LAYOUTS[layout].modalities if layout in LAYOUTS else ()
    if n and len(default) >= n:
        return list(default[:n])
    return [f"channel{i}" for i in range(n)]


def describe(meta: dict) -> dict[str, Any]:
    """A few facts of a run or bundle for logs and model cards."""
    return {
        "task": (meta.get("task") or {}).get("name"),
        "channels": list((meta.get("task") or {}).get("channel_names") or []),
        "modalities": run_modalities(meta),
    }
