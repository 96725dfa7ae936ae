"""What the network predicts from a label map: region channels (BraTS) or chosen label ids.

A :class:`Task` turns an integer label map ``(D, H, W)`` into ``K`` float32 target channels
``(D, H, W, K)`` for a per-channel sigmoid (multi-label, as in the T-IMM paper's Dice loss), and
turns predicted probabilities back into a label map.

* ``kind="regions"`` (BraTS): channel ``k`` is 1 where the label lies in ``regions[k]``; the regions
  are nested, outermost first: WT = {1, 2, 4} ⊃ TC = {1, 4} ⊃ ET = {4}. Decoding thresholds every
  channel at 0.5 and paints from the outside in, each region with the label that it alone adds:
  WT\\TC → 2, TC\\ET → 1, ET → 4.
  A region task may instead give ``region_labels`` (nnU-Net's ``regions_class_order``): the label
  painted for each region in channel order, later channels overwriting earlier ones.
* ``kind="labels"`` (parcellation): channel ``k`` is 1 where the label equals ``label_ids[k]``; every
  other value is background. Decoding takes the most probable channel where its probability
  exceeds 0.5, else background (0).

A label value outside the task's ``known_labels`` (when given) raises :class:`DataError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from timm_jax.data.files import DataError

__all__ = ["Task", "brats_regions", "parcellation_labels", "task_from_manifest"]

_KINDS = ("regions", "labels")


@dataclasses.dataclass(frozen=True)
class Task:
    """A segmentation task: which channels the network outputs and how they map to labels.

    Attributes:
      name: task name (e.g. ``"brats"`` or ``"task1"``).
      layout: data layout the task reads (``"brats"`` / ``"parcellation"``).
      kind: ``"regions"`` or ``"labels"``.
      label_ids: the label values the task is about (regions: every label in some region).
      channel_names: one name per output channel.
      regions: for ``kind="regions"``, the label set of each channel, outermost first.
      known_labels: every label value a label map may contain (``None``: any non-negative
        integer); anything else raises ``DataError``.
      region_labels: for ``kind="regions"``, the label :meth:`decode` paints for each region, in
        channel order (later ones overwrite); empty: derived from nested regions.
    """

    name: str
    layout: str
    kind: str
    label_ids: tuple[int, ...]
    channel_names: tuple[str, ...]
    regions: tuple[tuple[int, ...], ...] = ()
    known_labels: tuple[int, ...] | None = None
    region_labels: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "label_ids", tuple(int(v) for v in self.label_ids))
        object.__setattr__(self, "channel_names", tuple(str(v) for v in self.channel_names))
        object.__setattr__(self, "regions", tuple(tuple(int(v) for v in r) for r in self.regions))
        object.__setattr__(self, "region_labels", tuple(int(v) for v in self.region_labels))
        if self.known_labels is not None:
            object.__setattr__(self, "known_labels", tuple(sorted({0, *(int(v) for v in self.known_labels)})))
        if self.kind not in _KINDS:
            raise ValueError(f"task kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "labels":
            if len(self.label_ids) != len(self.channel_names):
                raise ValueError("labels task needs one channel name per label id")
            if 0 in self.label_ids or len(set(self.label_ids)) != len(self.label_ids):
                raise ValueError(f"label ids must be distinct and non-zero, got {self.label_ids}")
        else:
            if len(self.regions) != len(self.channel_names) or not self.regions:
                raise ValueError("regions task needs one non-empty region per channel name")
            if self.region_labels and len(self.region_labels) != len(self.regions):
                raise ValueError("region_labels needs one label per region")
        if any(v < 0 for v in self.label_ids):
            raise ValueError("label ids must be non-negative")
        if self.known_labels is not None:
            missing = set(self.label_ids) - set(self.known_labels)
            if missing:
                raise ValueError(f"label ids {sorted(missing)} are not among the known labels")

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    # ----------------------------------------------------------------------------- label maps
    def _table(self) -> np.ndarray:
        """``(L + 1, K)`` float32 lookup table, label value → target row; row ``L`` is background."""
        top = max([0, *self.label_ids, *(self.known_labels or ())])
        table = np.zeros((top + 2, self.num_channels), np.float32)
        if self.kind == "labels":
            for k, label in enumerate(self.label_ids):
                table[label, k] = 1.0
        else:
            for k, region in enumerate(self.regions):
                table[list(region), k] = 1.0
        return table

    def check_labels(self, labelmap: np.ndarray) -> None:
        """Raise :class:`DataError` if ``labelmap`` holds values the task does not know."""
        lm = np.asarray(labelmap)
        if lm.size == 0:
            return
        if not np.issubdtype(lm.dtype, np.integer):
            if not np.all(lm == np.round(lm)):
                raise DataError(f"task {self.name!r}: label map holds non-integer values")
        values = np.unique(lm).astype(np.int64)
        if self.known_labels is None:
            bad = values[values < 0]
        else:
            bad = values[~np.isin(values, self.known_labels)]
        if bad.size:
            allowed = "non-negative integers" if self.known_labels is None else str(set(self.known_labels))
            raise DataError(
                f"task {self.name!r}: label map holds unknown value(s) {bad[:10].tolist()} "
                f"(allowed: {allowed})"
            )

    def targets(self, labelmap: np.ndarray, *, check: bool = True) -> np.ndarray:
        """Multi-label targets ``(..., K)`` float32 for an integer label map ``(...)``.

        Raises:
          DataError: unknown label values (skipped when ``check=False``, for speed on patches of a
            map already checked).
        """
        lm = np.asarray(labelmap)
        if check:
            self.check_labels(lm)
        table = self._table()
        background = table.shape[0] - 1
        index = np.clip(lm.astype(np.int64, copy=False), 0, background)
        return table[index]

    def decode(self, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Label map (int32) from per-channel probabilities ``(..., K)``."""
        p = np.asarray(probs)
        if p.shape[-1] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels, got shape {p.shape}")
        out = np.zeros(p.shape[:-1], np.int32)
        if self.kind == "labels":
            best = np.argmax(p, axis=-1)
            ids = np.asarray(self.label_ids, np.int32)
            hit = np.take_along_axis(p, best[..., None], axis=-1)[..., 0] > threshold
            out[hit] = ids[best[hit]]
            return out
        for k, label in enumerate(self._region_paint_labels()):
            out[p[..., k] > threshold] = label
        return out

    def _region_paint_labels(self) -> tuple[int, ...]:
        """The label painted per region: ``region_labels``, or for nested regions the one label each
        region adds to the next inner one."""
        if self.region_labels:
            return self.region_labels
        paint = []
        for k, region in enumerate(self.regions):
            inner = set(self.regions[k + 1]) if k + 1 < len(self.regions) else set()
            if not inner <= set(region):
                raise NotImplementedError(
                    f"task {self.name!r}: decoding needs nested regions, outermost first"
                )
            own = set(region) - inner
            if len(own) != 1:
                raise NotImplementedError(
                    f"task {self.name!r}: region {self.channel_names[k]} must add exactly one label "
                    "to the next"
                )
            paint.append(own.pop())
        return tuple(paint)

    # ----------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layout": self.layout,
            "kind": self.kind,
            "label_ids": list(self.label_ids),
            "channel_names": list(self.channel_names),
            "regions": [list(r) for r in self.regions],
            "known_labels": None if self.known_labels is None else list(self.known_labels),
            **({"region_labels": list(self.region_labels)} if self.region_labels else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Task:
        return cls(
            name=d["name"],
            layout=d["layout"],
            kind=d["kind"],
            label_ids=tuple(d["label_ids"]),
            channel_names=tuple(d["channel_names"]),
            regions=tuple(tuple(r) for r in d.get("regions", ())),
            known_labels=None if d.get("known_labels") is None else tuple(d["known_labels"]),
            region_labels=tuple(d.get("region_labels", ())),
        )


def brats_regions(name: str = "brats") -> Task:
    """BraTS whole tumour {1,2,4}, tumour core {1,4} and enhancing tumour {4} as three channels."""
    return Task(
        name=name,
        layout="brats",
        kind="regions",
        label_ids=(1, 2, 4),
        channel_names=("WT", "TC", "ET"),
        regions=((1, 2, 4), (1, 4), (4,)),
        known_labels=(0, 1, 2, 4),
    )


def parcellation_labels(
    label_ids: Sequence[int],
    names: Sequence[str] | None = None,
    *,
    name: str = "parcellation",
    layout: str = "parcellation",
    known_labels: Sequence[int] | None = None,
) -> Task:
    """One channel per chosen label id; every other label value counts as background."""
    label_ids = tuple(int(v) for v in label_ids)
    if names is None:
        names = tuple(f"label_{v}" for v in label_ids)
    return Task(
        name=name,
        layout=layout,
        kind="labels",
        label_ids=label_ids,
        channel_names=tuple(names),
        known_labels=None if known_labels is None else tuple(known_labels),
    )


def task_from_manifest(manifest: Mapping[str, Any], task_key: str) -> Task:
    """The :class:`Task` recorded for ``task_key`` (e.g. ``"task1"``) in a demo ``manifest.json``."""
    try:
        entry = manifest["tasks"][task_key]
    except KeyError:
        raise KeyError(
            f"manifest has no task {task_key!r}; tasks: {sorted(manifest.get('tasks', {}))}"
        ) from None
    return Task.from_dict(entry["task"])
