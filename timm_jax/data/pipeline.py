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

Augmentation: a flip of each axis in ``flip_axes`` with probability 1/2, then per channel an
intensity scale ``U(1 - s, 1 + s)`` and shift ``U(-t, t)`` applied to the non-zero (brain) voxels,
and with probability ``noise_prob`` additive Gaussian noise of std ``U(0, noise_std)`` there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

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


class PatchSampler:
    """Maps an element index to one ``{"image": (*patch, C), "target": (*patch, K)}`` sample.

    Holds the cases in memory (image float32, labels in the smallest integer type) and, per case,
    the flat indices of its foreground voxels. Picklable, so grain can ship it to workers.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        task: Task,
        patch_shape: Sequence[int],
        *,
        seed: int,
        foreground_rate: float = 0.33,
        augment: bool | AugmentConfig = True,
    ):
        if not cases:
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
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.foreground: list[np.ndarray] = []
        channels = None
        for case in cases:
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
            task.check_labels(case.labels)
            image, labels = _pad_to_at_least(case.image.astype(np.float32), case.labels, self.patch_shape)
            labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int32)
            fg = self._table[np.minimum(labels, self._table.shape[0] - 1)].any(-1)
            self.images.append(image)
            self.labels.append(labels)
            self.foreground.append(np.flatnonzero(fg).astype(np.int64))

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

    def sample(self, index: int) -> tuple[dict[str, np.ndarray], dict]:
        """The sample for ``index`` plus how it was drawn (case, corner, foreground or not)."""
        c = self.case_index(index)
        rng = np.random.default_rng([self.seed, _ELEMENT_SALT, int(index)])
        image, labels, fg = self.images[c], self.labels[c], self.foreground[c]
        shape = np.asarray(labels.shape)
        patch = np.asarray(self.patch_shape)
        use_fg = bool(rng.random() < self.foreground_rate) and fg.size > 0
        if use_fg:
            centre = np.asarray(np.unravel_index(fg[rng.integers(fg.size)], labels.shape))
            lo = np.maximum(centre - patch + 1, 0)
            hi = np.minimum(centre, shape - patch)
            corner = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])
        else:
            corner = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
        sl = tuple(slice(int(a), int(a + p)) for a, p in zip(corner, patch))
        img = image[sl]
        lab = labels[sl]
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
    foreground_rate: float = 0.33,
    augment: bool | AugmentConfig = True,
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
    foreground_rate: float = 0.33,
    augment: bool | AugmentConfig = True,
    num_workers: int = 0,
    start_step: int = 0,
    num_steps: int = 2**40,
    read_threads: int = 1,
    prefetch: int = 4,
    process_index: int = 0,
    process_count: int = 1,
):
    """An endless iterable of training batches ``{"image": (B, *patch, C), "target": (B, *patch, K)}``.

    Args:
      cases: cases with labels, held in memory (e.g. from ``load_preprocessed``).
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
