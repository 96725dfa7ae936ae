"""The one table of experiment scales: the demo data set and the schedule of ``make demo``.

``full`` is the README's demo (11 minutes on a 2-core CPU); ``smoke`` is a minutes-long check
of the whole pipeline on a tiny data set, used by the tests and by
``python -m timm_jax.experiments.demo_data --small``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Scale:
    data: dict  # keyword arguments of experiments.demo_data.build_demo
    base_filters: int
    depth: int
    patch: tuple
    source_epochs: int
    target_epochs: int
    adapt_epochs: int
    steps_per_epoch: int
    plateau: int
    early_stop: int
    learning_rate: float  # the paper's 5e-4 converges too slowly for a CPU-sized demo


SCALES = {
    "full": Scale(
        data=dict(spacing=3.0),
        base_filters=8,
        depth=5,
        patch=(32, 32, 32),
        source_epochs=20,
        target_epochs=12,
        adapt_epochs=6,
        steps_per_epoch=20,
        plateau=3,
        early_stop=5,
        learning_rate=1e-3,
    ),
    "smoke": Scale(
        data=dict(
            spacing=6.0,
            n_parc_task1=4,
            n_parc_task2=4,
            n_parc_val=1,
            n_parc_test=2,
            n_brats_train=6,
            n_brats_val=2,
            n_brats_test=2,
        ),
        base_filters=4,
        depth=3,
        patch=(16, 16, 16),
        source_epochs=2,
        target_epochs=2,
        adapt_epochs=2,
        steps_per_epoch=2,
        plateau=1,
        early_stop=2,
        learning_rate=1e-3,
    ),
}
