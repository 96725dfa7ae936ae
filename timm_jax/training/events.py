"""TensorBoard event files of a run directory, written with ``tensorboardX`` (no TensorFlow).

``metrics.jsonl`` stays the machine-readable record; the event files are for watching runs:
``tensorboard --logdir runs/``. Tags:

* training (``fit``): ``train/loss``, ``val/loss``, ``val/dice_mean``, ``val/dice/<channel>``,
  ``lr``, ``perf/step_time_s``, ``perf/voxels_per_s`` — one point per epoch at the global step;
* T-IMM adaption: also ``ratios/<layer>/<source>``, the mixing ratio of each source per layer;
* ``fuse.py``: the image ``mixing_ratios``;
* ``evaluate.py``: ``eval/<split>/dice_<channel>`` and a few ``predictions/<case>`` images.

A resumed run purges the points its checkpoint had not reached, so curves never double back.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

__all__ = ["Events"]

_log = logging.getLogger(__name__)
_warned = False


class Events:
    """Event files in ``logdir``; a no-op (after one warning) without ``tensorboardX``, and in
    every process but process 0 of a multi-process run."""

    def __init__(self, logdir: str, *, purge_step: int | None = None):
        global _warned
        self._writer = None
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            if not _warned:
                _log.warning("tensorboardX is not installed: no TensorBoard event files")
                _warned = True
            return
        os.makedirs(logdir, exist_ok=True)
        self._writer = SummaryWriter(logdir=logdir, purge_step=purge_step, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One point per tag; non-finite values (e.g. the validation Dice of a label-free
        adaption stage, NaN by design) are left out rather than plotted."""
        if self._writer is not None:
            for tag, v in values.items():
                if np.isfinite(float(v)):
                    self._writer.add_scalar(tag, float(v), global_step=int(step))

    def image(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        """An (H, W, 3) or (H, W, 4) image, uint8 or float in [0, 1]."""
        if self._writer is not None:
            img = np.asarray(image)
            if img.dtype != np.uint8:
                img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            self._writer.add_image(tag, img[..., :3], global_step=int(step), dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
