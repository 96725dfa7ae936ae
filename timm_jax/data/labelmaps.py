"""Label maps: many source label ids (e.g. FreeSurfer's aseg) merged into a few named classes.

``--label_map=paper14`` is the T-IMM paper's 14 brain classes from FreeSurfer ``aseg.mgz`` /
``aparc+aseg.mgz`` ids (left and right merged); every other id is background (0).

``--label_map=FILE.json`` reads a JSON object::

    {
      "thalamus": [10, 49],
      "cortex": [3, 42, "1000-1035", "2000-2035"],
      "background": [24],
      "unmapped": "error"
    }

* every key but ``"background"`` and ``"unmapped"`` is a class: either a name (the classes are then
  numbered 1, 2, ... in the order of the file) or a class id written as a decimal string
  (``"1"``, ``"7"``; the class is named ``class_<id>``); names and ids cannot be mixed;
* a value lists the source ids of the class: non-negative integers, or ``"lo-hi"`` strings for the
  inclusive range ``lo..hi``; an id may belong to one class only, and 0 (background) to none;
* ``"background"`` (optional) lists source ids that are explicitly background;
* ``"unmapped"`` (optional) says what a source id listed nowhere becomes: ``"error"`` (the default:
  the label file is reported, so that a typo or an unexpected structure is not silently lost) or
  ``"background"`` (as ``paper14`` does).

Any problem with the file is one line naming it (:class:`~timm_jax.data.io.DataError`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from timm_jax.data.files import DataError, Problem

__all__ = ["LabelMap", "PAPER14", "load_label_map", "paper14"]

#: the paper's 14 classes: name -> FreeSurfer ids (aseg, and aparc+aseg's cortical parcels)
PAPER14: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("cerebellum grey matter", (8, 47)),
    (
        "cerebral grey matter and accumbens",
        (3, 42, 26, 58, *range(1000, 1036), *range(2000, 2036)),
    ),
    ("thalamus", (10, 49)),
    ("amygdala and choroid plexus", (18, 54, 31, 63)),
    ("caudate", (11, 50)),
    ("pallidum", (13, 52)),
    ("CSF", (24,)),
    ("cerebellum white matter", (7, 46)),
    ("cerebral white matter", (2, 41)),
    ("hippocampus", (17, 53)),
    ("ventricles", (4, 43, 5, 44, 14, 15)),
    ("putamen", (12, 51)),
    ("ventral DC", (28, 60)),
    ("brainstem", (16,)),
)

_UNMAPPED = ("error", "background")
#: above this largest source id the map is applied through np.unique instead of a lookup table
_MAX_TABLE = 1 << 20


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Source id -> class id, with the class names.

    Attributes:
      name: ``"paper14"`` or the JSON file's path.
      classes: ``(class id, class name, source ids)`` per class, by class id.
      background: source ids explicitly mapped to 0 (0 itself always is).
      unmapped: ``"background"`` or ``"error"`` for source ids listed nowhere.
    """

    name: str
    classes: tuple[tuple[int, str, tuple[int, ...]], ...]
    background: tuple[int, ...] = ()
    unmapped: str = "background"

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(c for c, _, _ in self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(n for _, n, _ in self.classes)

    def pairs(self) -> dict[int, int]:
        """Every listed source id -> its class id (0 for the explicit background ids)."""
        out = {0: 0, **{int(b): 0 for b in self.background}}
        for cid, _, ids in self.classes:
            out.update({int(i): int(cid) for i in ids})
        return out

    def unknown(self, values: np.ndarray) -> np.ndarray:
        """The values (of a label map's unique values) that ``unmapped="error"`` rejects."""
        values = np.asarray(values, np.int64)
        if self.unmapped == "background":
            return values[:0]
        listed = np.fromiter(self.pairs(), np.int64)
        return values[~np.isin(values, listed)]

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """int32 class ids for a map of non-negative source ids (unlisted ids become 0)."""
        lab = np.asarray(labels)
        pairs = self.pairs()
        top = int(lab.max(initial=0))
        if top < _MAX_TABLE:
            table = np.zeros(top + 1, np.int32)
            for src, dst in pairs.items():
                if src <= top:
                    table[src] = dst
            return table[lab]
        values, inverse = np.unique(lab, return_inverse=True)
        mapped = np.array([pairs.get(int(v), 0) for v in values], np.int32)
        return mapped[inverse].reshape(lab.shape)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": [[c, n, list(ids)] for c, n, ids in self.classes],
            "background": list(self.background),
            "unmapped": self.unmapped,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LabelMap:
        return cls(
            name=str(d["name"]),
            classes=tuple((int(c), str(n), tuple(int(i) for i in ids)) for c, n, ids in d["classes"]),
            background=tuple(int(b) for b in d.get("background", ())),
            unmapped=str(d.get("unmapped", "background")),
        )


def paper14() -> LabelMap:
    """The paper's 14 classes (see :data:`PAPER14`); other ids are background."""
    return LabelMap(
        name="paper14",
        classes=tuple((k + 1, name, ids) for k, (name, ids) in enumerate(PAPER14)),
        unmapped="background",
    )


def load_label_map(spec: str | os.PathLike) -> LabelMap:
    """``"paper14"`` or the path of a JSON label map (format in the module docstring).

    Raises:
      DataError: one line naming the file: missing, not JSON, or not of the format.
    """
    if str(spec) == "paper14":
        return paper14()
    path = Path(spec)

    def bad(message: str) -> DataError:
        return DataError([Problem("", str(path), message)])

    try:
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise bad("label map file not found (--label_map: paper14 or a JSON file)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise bad(f"label map is not readable JSON ({type(err).__name__}: {_short(err)})") from None
    if not isinstance(raw, dict) or not raw:
        raise bad('label map must be a non-empty JSON object {"class name": [source ids], ...}')
    unmapped = raw.get("unmapped", "error")
    if unmapped not in _UNMAPPED:
        raise bad(f'"unmapped" must be "error" or "background", got {_show(unmapped)}')
    background = _ids(raw.get("background", []), '"background"', bad)
    entries = [(k, v) for k, v in raw.items() if k not in ("background", "unmapped")]
    if not entries:
        raise bad("label map defines no class")
    numeric = [_decimal(k) for k, _ in entries]
    if any(numeric) and not all(numeric):
        raise bad("class keys must be all names or all decimal class ids, not a mix")
    classes = []
    seen: dict[int, str] = {b: '"background"' for b in background}
    for k, (key, value) in enumerate(entries):
        if numeric[0]:
            cid, name = int(key), f"class_{int(key)}"
            if cid == 0:
                raise bad('class id "0" is the background; list background ids under "background"')
        else:
            cid, name = k + 1, key
            if not key.strip():
                raise bad("a class name is empty")
        ids = _ids(value, f"class {key!r}", bad)
        if not ids:
            raise bad(f"class {key!r} lists no source ids")
        for i in ids:
            if i == 0:
                raise bad(f"class {key!r} lists source id 0, which is always background")
            if i in seen:
                raise bad(f"source id {i} is listed twice ({seen[i]} and class {key!r})")
            seen[i] = f"class {key!r}"
        classes.append((cid, name, ids))
    if len({c for c, _, _ in classes}) != len(classes):
        raise bad("a class id is defined twice")
    classes.sort()
    return LabelMap(name=str(path), classes=tuple(classes), background=background, unmapped=unmapped)


def _ids(value, what: str, bad) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise bad(f"{what} must be a list of source ids, got {_show(value)}")
    out: list[int] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            if item < 0 or item > np.iinfo(np.int32).max:
                raise bad(f"{what}: source id {item} is not a non-negative int32")
            out.append(item)
        elif isinstance(item, str) and _is_range(item):
            lo, hi = (int(s) for s in item.split("-"))
            if lo > hi or hi > np.iinfo(np.int32).max or hi - lo > 1_000_000:
                raise bad(f"{what}: range {item!r} must be lo-hi with lo <= hi (at most 10^6 ids)")
            out.extend(range(lo, hi + 1))
        else:
            raise bad(f'{what}: {_show(item)} is not a source id (an integer or a "lo-hi" range)')
    seen: set[int] = set()
    for i in out:
        if i in seen:
            raise bad(f"{what} lists source id {i} twice")
        seen.add(i)
    return tuple(out)


def _is_range(s: str) -> bool:
    parts = s.split("-")
    return len(parts) == 2 and all(_decimal(p) for p in parts)


def _decimal(text: str) -> bool:
    return re.fullmatch(r"[0-9]+", text.strip()) is not None


def _show(value, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]
