"""The one table of experiment scales, written in the package's one configuration schema.

A :class:`Scale` is the demo data set it builds (``build_demo`` keyword arguments), the network
(:class:`~timm_jax.config.ModelConfig`) and one :class:`~timm_jax.config.TrainConfig` per stage —
the sources (M1, M2, the All-HCP models), every task-3 fine-tuning and T-IMM's adaption stage —
the same configs the scripts take (``python -c "from timm_jax.experiments.presets import table;
print(table())"`` prints them side by side).

* ``full`` — ``make demo``: one seed at 8 %, about 12 minutes on a 2-core CPU.
* ``smoke`` — a minutes-long check of the demo pipeline on a tiny data set (the tests;
  ``python -m timm_jax.experiments.demo_data --small``).
* ``repro`` — the scale of the superseded reproduction (``docs/reproduce/``), kept so that its
  runs stay readable; the benchmark's own settings are in ``docs/benchmark/preregistration.json``.
* ``repro_quick`` — its tiny version.
* ``paper`` — the paper's network (base 16, depth 5), 96×128×96 patches at 1.5 mm with batch 1,
  Adam 5e-4, plateau 10 / stop 50; for a GPU.

The schedules were fixed before the reproduction grid ran and are the same for every
initialisation; early stopping follows the paper's plateau / patience rule, scaled to the
demo's 20-step epochs.
"""

from __future__ import annotations

import dataclasses

from timm_jax.config import FuseConfig, ModelConfig, TrainConfig

__all__ = ["SCALES", "Scale", "table"]


@dataclasses.dataclass(frozen=True)
class Scale:
    """One experiment scale: the data, the network and the configuration of every stage."""

    data: dict  # keyword arguments of experiments.demo_data.build_demo
    model: ModelConfig
    source: TrainConfig  # M1, M2 and the All-HCP sources
    target: TrainConfig  # every task-3 run (fine-tuning)
    adapt: TrainConfig  # T-IMM's adaption stage
    fuse: FuseConfig = FuseConfig()  # T-IMM (IMM: method="imm")

    def stage(self, name: str, seed: int) -> TrainConfig:
        """The :class:`TrainConfig` of stage ``name`` (``source`` / ``target`` / ``adapt``) with
        training seed ``seed``."""
        return getattr(self, name).replace(seed=seed)

    def to_dict(self) -> dict:
        return {
            "data": dict(self.data),
            **{k: getattr(self, k).to_dict() for k in ("model", "source", "target", "adapt", "fuse")},
        }


def _stages(common: dict, source, target, adapt) -> dict:
    """Three TrainConfigs sharing ``common``; each schedule is (max epochs, plateau, early stop)."""

    def cfg(sched):
        epochs, plateau, stop = sched
        return TrainConfig(
            max_epochs=epochs, plateau_patience=plateau, early_stopping_patience=stop, **common
        )

    return {"source": cfg(source), "target": cfg(target), "adapt": cfg(adapt)}


# the demo's CPU-sized training: the paper's 5e-4 converges too slowly for it
_CPU = dict(patch_shape=(32, 32, 32), batch_size=2, steps_per_epoch=20, learning_rate=1e-3)
_TINY = dict(patch_shape=(16, 16, 16), batch_size=2, steps_per_epoch=2, learning_rate=1e-3)
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
        model=ModelConfig(base_filters=8, depth=5),
        **_stages(_CPU, source=(20, 3, 5), target=(12, 3, 5), adapt=(6, 3, 5)),
    ),
    "smoke": Scale(
        data=_SMALL_DATA,
        model=ModelConfig(base_filters=4, depth=3),
        **_stages(_TINY, source=(2, 1, 2), target=(2, 1, 2), adapt=(2, 1, 2)),
    ),
    "repro": Scale(
        data=dict(spacing=3.0),
        model=ModelConfig(base_filters=8, depth=5),
        **_stages(_CPU, source=(60, 4, 8), target=(16, 3, 4), adapt=(8, 2, 3)),
    ),
    "repro_quick": Scale(
        data=dict(spacing=6.0),
        model=ModelConfig(base_filters=4, depth=3),
        **_stages(_TINY, source=(2, 1, 2), target=(2, 1, 2), adapt=(2, 1, 2)),
    ),
    "paper": Scale(
        data=dict(spacing=1.5),
        model=ModelConfig(base_filters=16, depth=5),
        **_stages(
            dict(patch_shape=(96, 128, 96), batch_size=1, steps_per_epoch=200, learning_rate=5e-4),
            source=(500, 10, 50),
            target=(500, 10, 50),
            adapt=(100, 10, 20),
        ),
    ),
}


def table(names=None) -> str:
    """A Markdown table of the scales: every setting that differs from its default, per stage."""
    names = list(names or SCALES)
    rows = []
    for section, cls in (("model", ModelConfig), ("source", TrainConfig), ("target", TrainConfig)):
        rows += _rows(section, cls, names)
    rows += _rows("adapt", TrainConfig, names) + _rows("fuse", FuseConfig, names)
    head = f"| setting | {' | '.join(names)} |\n|---|{'---|' * len(names)}\n"
    data = " | ".join(str(SCALES[n].data) for n in names)
    return head + f"| data | {data} |\n" + "".join(rows)


def _rows(section: str, cls, names) -> list[str]:
    default = cls()
    out = []
    for f in dataclasses.fields(cls):
        values = [getattr(getattr(SCALES[n], section), f.name) for n in names]
        if all(v == getattr(default, f.name) for v in values):
            continue
        out.append(f"| {section}.{f.name} | {' | '.join(str(v) for v in values)} |\n")
    return out
