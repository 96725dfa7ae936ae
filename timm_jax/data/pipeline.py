"""Random-patch training batches on grain: deterministic for a seed, any worker count, resumable.

Every patch is a pure function of ``(seed, element index)``: element ``i`` picks a case from a
seeded per-epoch permutation of the cases (``i // n_cases`` is the epoch), then draws its own
generator ``np.random.default_rng([seed, i])`` for the patch position and the augmentation. Batch
``s`` (the global step) is elements ``s B … s B + B - 1``. The pipeline is therefore a grain
``MapDataset`` indexed by step — ``MapDataset.range → map → batch``, sliced at ``start_step`` and
only then turned into an iterator and handed to ``mp_prefetch`` worker processes — so:

* the batches do not depend on ``num_workers`` (grain's slicing happens after all map steps and
  the workers' outputs are interleaved back in order), and
* resuming at step ``s`` yields exactly the batches an uninterrupted run yields from step ``s``.

Patch sampling (nnU-Net style): with probability ``foreground_rate`` the patch is placed so that it
contains a random foreground voxel (any target channel on); otherwise its corner is uniform over
the volume. Cases smaller than the patch are zero-padded.

Cases may be held in memory or be read-only ``np.memmap`` views of the preprocessing cache
(``Data.load(ids, mmap=True)``, :class:`~timm_jax.data.preprocess.LazyCases`). A memory-mapped case
is kept as its file name, offset, dtype and shape only: each sample maps the file, copies out the
one patch (and, for a foreground patch, one label slice) and unmaps it, so the sampler — also when
pickled to grain's worker processes — never holds a case's voxels, and the batches are bit-identical
to those drawn from the same cases in memory. Per case the sampler keeps the number of foreground
voxels in each slice along the first axis (found in one pass over the labels at construction), and
draws the ``k``-th foreground voxel in C order from them, as a flat index array would.

Augmentation: a flip of each axis in ``flip_axes`` with probability 1/2, then per channel an
intensity scale ``U(1 - s, 1 + s)`` and shift ``U(-t, t)`` applied to the non-zero (brain) voxels,
and with probability ``noise_prob`` additive Gaussian noise of std ``U(0, noise_std)`` there.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
from collections.abc import Sequence

import numpy as np

from timm_jax.config import TrainConfig
from timm_jax.data.io import Case, DataError
from timm_jax.data.tasks import Task

__all__ = ["AugmentConfig", "PatchSampler", "make_train_batches", "make_train_dataset"]

_EPOCH_SALT = 0x5EED
_ELEMENT_SALT = 0xE1E


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (see the module docstring)."""

    flip_axes: tuple[int, ...] = (0, 1, 2)
    scale: float = 0.1
    shift: float = 0.1
    noise_prob: float = 0.15
    noise_std: float = 0.05


@dataclasses.dataclass(frozen=True)
class _Mapped:
    """A read-only memory map described by its file (reopened where used: picklable, holds no pages)."""

    filename: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    order: str

    def open(self) -> np.memmap:
        return np.memmap(self.filename, np.dtype(self.dtype), "r", self.offset, self.shape, self.order)


def _mapped(a) -> _Mapped | None:
    """The file behind ``a`` if it is a whole memory-mapped array (e.g. ``np.load(mmap_mode="r")``)."""
    if not isinstance(a, np.memmap) or not isinstance(a.base, mmap.mmap) or not a.filename:
        return None
    if a.flags.c_contiguous:
        order = "C"
    elif a.flags.f_contiguous:
        order = "F"
    else:
        return None
    return _Mapped(str(a.filename), int(a.offset), a.dtype.str, tuple(int(d) for d in a.shape), order)


def _open(source):
    return source.open() if isinstance(source, _Mapped) else source


_SCAN_SLICES = 8


class PatchSampler:
    """Maps an element index to one ``{"image": (*patch, C), "target": (*patch, K)}`` sample.

    Holds each case's image and labels — in memory, or, for memory-mapped cases, only where their
    files are (see the module docstring) — and per case the foreground voxel count of every slice
    along the first axis. Picklable, so grain can ship it to workers.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        task: Task,
        patch_shape: Sequence[int],
        *,
        seed: int,
        foreground_rate: float = TrainConfig.foreground_rate,
        augment: bool | AugmentConfig = TrainConfig.augment,
    ):
        if not len(cases):
            raise ValueError("no cases to sample from")
        if not 0.0 <= foreground_rate <= 1.0:
            raise ValueError("foreground_rate must be in [0, 1]")
        self.patch_shape = tuple(int(p) for p in patch_shape)
        if len(self.patch_shape) != 3 or min(self.patch_shape) < 1:
            raise ValueError(f"patch_shape must be three positive sizes, got {patch_shape}")
        self.task = task
        self.seed = int(seed)
        self.foreground_rate = float(foreground_rate)
        if augment is True:
            augment = AugmentConfig()
        self.augment = augment or None
        self._table = task._table()
        self._fg_table = self._table.any(-1)
        self.images: list = []  # np.ndarray or _Mapped per case
        self.labels: list = []
        self.shapes: list[tuple[int, int, int]] = []
        self.fg_cumsum: list[np.ndarray] = []  # cumulative foreground count per slice of axis 0
        channels = None
        for case in cases:  # a LazyCases sequence opens one case at a time
            if case.labels is None:
                raise DataError(f"case {case.case_id}: training needs labels")
            if case.image.shape[:3] != case.labels.shape:
                raise DataError(
                    f"case {case.case_id}: image {case.image.shape} and labels {case.labels.shape} differ"
                )
            if channels is None:
                channels = case.image.shape[-1]
            elif case.image.shape[-1] != channels:
                raise DataError(
                    f"case {case.case_id}: {case.image.shape[-1]} channels, others have {channels}"
                )
            labels = case.labels
            values, counts = self._scan(labels)
            task.check_labels(values)
            image_ref, label_ref = _mapped(case.image), _mapped(labels)
            small = any(n < p for n, p in zip(labels.shape, self.patch_shape))
            if small or image_ref is None or image_ref.dtype != np.dtype(np.float32).str:
                image_ref = None
            if small:  # padded copies in memory (small by definition)
                image, labels = _pad_to_at_least(
                    np.asarray(case.image, np.float32), np.asarray(labels), self.patch_shape
                )
                _, counts = self._scan(labels)
                label_ref = None
            else:
                image = case.image if image_ref is None else None
            if image_ref is None:
                image = np.asarray(image).astype(np.float32, copy=False)
            if label_ref is None:
                labels = np.asarray(labels)
                if not np.issubdtype(labels.dtype, np.integer):
                    labels = labels.astype(np.int32)
            self.images.append(image_ref if image_ref is not None else image)
            self.labels.append(label_ref if label_ref is not None else labels)
            self.shapes.append(tuple(int(n) for n in labels.shape))
            self.fg_cumsum.append(np.cumsum(counts))

    def _scan(self, labels) -> tuple[np.ndarray, np.ndarray]:
        """One pass over a label map, a few slices at a time: its values, and its foreground voxels
        per slice of axis 0."""
        top = self._fg_table.shape[0] - 1
        values: set[int] = set()
        counts = np.zeros(labels.shape[0], np.int64)
        for z in range(0, labels.shape[0], _SCAN_SLICES):
            slab = np.asarray(labels[z : z + _SCAN_SLICES])
            values.update(np.unique(slab).tolist())
            fg = self._fg_table[np.clip(slab.astype(np.int64, copy=False), 0, top)]
            counts[z : z + slab.shape[0]] = fg.reshape(slab.shape[0], -1).sum(axis=1)
        return np.asarray(sorted(values)), counts

    @property
    def num_cases(self) -> int:
        return len(self.images)

    def case_index(self, index: int) -> int:
        """Which case element ``index`` uses: a seeded permutation of the cases per epoch."""
        n = self.num_cases
        epoch, pos = divmod(int(index), n)
        perm = np.random.default_rng([self.seed, _EPOCH_SALT, epoch]).permutation(n)
        return int(perm[pos])

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return self.sample(index)[0]

    def _foreground_voxel(self, c: int, k: int, labels) -> np.ndarray:
        """The ``k``-th foreground voxel of case ``c`` in C order."""
        cum = self.fg_cumsum[c]
        z = int(np.searchsorted(cum, k, side="right"))
        before = int(cum[z - 1]) if z else 0
        top = self._fg_table.shape[0] - 1
        plane = np.asarray(labels[z]).astype(np.int64, copy=False)
        row = np.flatnonzero(self._fg_table[np.clip(plane, 0, top)])
        return np.asarray((z, *np.unravel_index(int(row[k - before]), self.shapes[c][1:])))

    def sample(self, index: int) -> tuple[dict[str, np.ndarray], dict]:
        """The sample for ``index`` plus how it was drawn (case, corner, foreground or not)."""
        c = self.case_index(index)
        rng = np.random.default_rng([self.seed, _ELEMENT_SALT, int(index)])
        image, labels = _open(self.images[c]), _open(self.labels[c])
        n_fg = int(self.fg_cumsum[c][-1]) if self.fg_cumsum[c].size else 0
        shape = np.asarray(self.shapes[c])
        patch = np.asarray(self.patch_shape)
        use_fg = bool(rng.random() < self.foreground_rate) and n_fg > 0
        if use_fg:
            centre = self._foreground_voxel(c, int(rng.integers(n_fg)), labels)
            lo = np.maximum(centre - patch + 1, 0)
            hi = np.minimum(centre, shape - patch)
            corner = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])
        else:
            corner = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
        sl = tuple(slice(int(a), int(a + p)) for a, p in zip(corner, patch))
        img = np.array(image[sl], np.float32)  # a copy: nothing refers to a memory map afterwards
        lab = np.array(labels[sl])
        del image, labels
        if self.augment is not None:
            img, lab = _augment(img, lab, rng, self.augment)
        target = self._table[np.minimum(lab, self._table.shape[0] - 1)]
        out = {
            "image": np.ascontiguousarray(img, np.float32),
            "target": np.ascontiguousarray(target, np.float32),
        }
        return out, {"case": c, "corner": tuple(int(v) for v in corner), "foreground": use_fg}


def _pad_to_at_least(image: np.ndarray, labels: np.ndarray, patch: Sequence[int]):
    pads = []
    for n, p in zip(labels.shape, patch):
        extra = max(0, p - n)
        pads.append((extra // 2, extra - extra // 2))
    if any(a or b for a, b in pads):
        image = np.pad(image, pads + [(0, 0)])
        labels = np.pad(labels, pads)
    return image, labels


def _augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    for axis in cfg.flip_axes:
        if rng.random() < 0.5:
            img = np.flip(img, axis)
            lab = np.flip(lab, axis)
    channels = img.shape[-1]
    scale = rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale, size=channels).astype(np.float32)
    shift = rng.uniform(-cfg.shift, cfg.shift, size=channels).astype(np.float32)
    brain = np.any(img != 0, axis=-1, keepdims=True)
    out = img * scale + shift
    if rng.random() < cfg.noise_prob:
        std = rng.uniform(0.0, cfg.noise_std)
        out = out + rng.normal(0.0, std, size=img.shape).astype(np.float32)
    return np.where(brain, out, 0.0).astype(np.float32), lab


def make_train_batches(
    cases: Sequence[Case],
    task: Task,
    *,
    patch_shape: Sequence[int],
    batch_size: int,
    seed: int,
    foreground_rate: float = TrainConfig.foreground_rate,
    augment: bool | AugmentConfig = TrainConfig.augment,
    num_steps: int = 2**40,
    process_index: int = 0,
    process_count: int = 1,
):
    """The training stream as a grain ``MapDataset`` of batches: ``ds[s]`` is the batch of step ``s``.

    With ``process_count > 1`` (a multi-process run), ``ds[s]`` is this process's contiguous share
    of global batch ``s``: rows ``process_index * b … (process_index + 1) * b - 1`` with
    ``b = batch_size / process_count``. Only those elements are ever computed, and the global
    batches are those of a single-process stream of the same seed.
    """
    import grain

    batch_size, process_count = int(batch_size), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in 0..{process_count - 1}")
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not divide over {process_count} processes")
    sampler = PatchSampler(
        cases, task, patch_shape, seed=seed, foreground_rate=foreground_rate, augment=augment
    )
    local = batch_size // process_count
    elements = grain.MapDataset.range(0, int(num_steps) * local)
    if process_count > 1:
        first = int(process_index) * local
        elements = elements.map(functools.partial(_global_element, batch_size, local, first))
    return elements.map(sampler).batch(local)


def make_train_dataset(
    cases: Sequence[Case],
    task: Task,
    *,
    patch_shape: Sequence[int],
    batch_size: int,
    seed: int,
    foreground_rate: float = TrainConfig.foreground_rate,
    augment: bool | AugmentConfig = TrainConfig.augment,
    num_workers: int = TrainConfig.num_workers,
    start_step: int = 0,
    num_steps: int = 2**40,
    read_threads: int = 1,
    prefetch: int = 4,
    process_index: int = 0,
    process_count: int = 1,
):
    """An endless iterable of training batches ``{"image": (B, *patch, C), "target": (B, *patch, K)}``.

    Args:
      cases: cases with labels, in memory or memory-mapped (``load_preprocessed(..., mmap=True)``,
        ``Data.load(ids, mmap=True)``; a lazy sequence is walked through once).
      task: maps label maps to target channels.
      patch_shape: spatial patch size; smaller volumes are zero-padded.
      batch_size: patches per batch (the global batch).
      seed: the stream is a pure function of the seed.
      foreground_rate: probability that a patch is forced to contain foreground.
      augment: True for the default :class:`AugmentConfig`, False for none, or a config.
      num_workers: grain ``mp_prefetch`` worker processes (0: in this process); the batches are the
        same for every value.
      start_step: first global step to yield — batches equal those of an uninterrupted run.
      num_steps: length of the stream (practically endless by default).
      read_threads, prefetch: grain read threads and buffer size per process.
      process_index, process_count: in a multi-process run, each process reads only its
        contiguous rows of every global batch (see :func:`make_train_batches`).

    Returns:
      a grain ``IterDataset``; ``iter()`` it (and ``close()`` the iterator when workers are used).
    """
    import grain

    batches = make_train_batches(
        cases,
        task,
        patch_shape=patch_shape,
        batch_size=batch_size,
        seed=seed,
        foreground_rate=foreground_rate,
        augment=augment,
        num_steps=num_steps,
        process_index=process_index,
        process_count=process_count,
    )
    if start_step:
        batches = batches.slice(slice(int(start_step), None))
    ds = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, read_threads), prefetch_buffer_size=max(1, prefetch))
    )
    if num_workers > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=int(num_workers), per_worker_buffer_size=max(1, prefetch)
            )
        )
        # Batches arrive in grain's shared-memory arrays; copy them out so the shared memory is freed
        # as soon as the batch is consumed (not at interpreter exit, where grain cannot free it).
        ds = ds.map(_own_arrays)
    return ds


def _global_element(batch_size: int, local: int, first: int, i: int) -> int:
    """Element index of a global batch for the ``i``-th element of a process's local stream."""
    return (i // local) * batch_size + first + i % local


def _own_arrays(batch: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in batch.items()}
