"""The one table of experiment scales: the demo data set, the network and the schedules.

* ``full`` — ``make demo``: one seed at 8 %, about 11 minutes on a 2-core CPU.
* ``smoke`` — a minutes-long check of the demo pipeline on a tiny data set (the tests;
  ``python -m timm_jax.experiments.demo_data --small``).
* ``repro`` — ``make reproduce``: the paper's grid on the demo benchmark (sources and every
  task-3 run stopped early on the validation loss), sized for ≤ 100 minutes on 2 CPU cores.
* ``repro_quick`` — ``--quick``: the same grid on coarse volumes with a tiny network and two
  epochs per stage, for the tests.
* ``paper`` — the paper's network (base 16, depth 5), whole-volume training at 1.5 mm with
  batch 1, Adam 5e-4, plateau 10 / stop 50; for a GPU.

The schedules were fixed before the reproduction grid ran and are the same for every
initialisation; early stopping follows the paper's plateau / patience rule, scaled to the
demo's 20-step epochs.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Schedule:
    max_epochs: int
    plateau: int  # epochs without improvement before the learning rate is halved
    early_stop: int  # epochs without improvement before stopping


@dataclasses.dataclass(frozen=True)
class Scale:
    data: dict  # keyword arguments of experiments.demo_data.build_demo
    base_filters: int
    depth: int
    patch: tuple
    batch_size: int
    steps_per_epoch: int
    learning_rate: float  # the paper's 5e-4 converges too slowly for a CPU-sized demo
    source: Schedule  # M1, M2 and the All-HCP sources
    target: Schedule  # every task-3 run (fine-tuning)
    adapt: Schedule  # T-IMM's adaption stage

    def train_config(self, sched: Schedule, seed: int):
        """The :class:`~timm_jax.config.TrainConfig` of one stage (``self.source`` / ``target`` /
        ``adapt``) with training seed ``seed``."""
        from timm_jax.config import TrainConfig

        return TrainConfig(
            patch_shape=self.patch,
            batch_size=self.batch_size,
            steps_per_epoch=self.steps_per_epoch,
            learning_rate=self.learning_rate,
            max_epochs=sched.max_epochs,
            plateau_patience=sched.plateau,
            early_stopping_patience=sched.early_stop,
            seed=seed,
        )


_SMALL_DATA = dict(
    spacing=6.0,
    n_parc_task1=4,
    n_parc_task2=4,
    n_parc_val=1,
    n_parc_test=2,
    n_brats_train=6,
    n_brats_val=2,
    n_brats_test=2,
)

SCALES = {
    "full": Scale(
        data=dict(spacing=3.0),
        base_filters=8,
        depth=5,
        patch=(32, 32, 32),
        batch_size=2,
        steps_per_epoch=20,
        learning_rate=1e-3,
        source=Schedule(20, 3, 5),
        target=Schedule(12, 3, 5),
        adapt=Schedule(6, 3, 5),
    ),
    "smoke": Scale(
        data=_SMALL_DATA,
        base_filters=4,
        depth=3,
        patch=(16, 16, 16),
        batch_size=2,
        steps_per_epoch=2,
        learning_rate=1e-3,
        source=Schedule(2, 1, 2),
        target=Schedule(2, 1, 2),
        adapt=Schedule(2, 1, 2),
    ),
    "repro": Scale(
        data=dict(spacing=3.0),
        base_filters=8,
        depth=5,
        patch=(32, 32, 32),
        batch_size=2,
        steps_per_epoch=20,
        learning_rate=1e-3,
        source=Schedule(60, 4, 8),
        target=Schedule(16, 3, 4),
        adapt=Schedule(8, 2, 3),
    ),
    "repro_quick": Scale(
        data=dict(spacing=6.0),
        base_filters=4,
        depth=3,
        patch=(16, 16, 16),
        batch_size=2,
        steps_per_epoch=2,
        learning_rate=1e-3,
        source=Schedule(2, 1, 2),
        target=Schedule(2, 1, 2),
        adapt=Schedule(2, 1, 2),
    ),
    "paper": Scale(
        data=dict(spacing=1.5),
        base_filters=16,
        depth=5,
        patch=(96, 128, 96),
        batch_size=1,
        steps_per_epoch=200,
        learning_rate=5e-4,
        source=Schedule(500, 10, 50),
        target=Schedule(500, 10, 50),
        adapt=Schedule(100, 10, 20),
    ),
}
