"""Configuration objects shared by the scripts (stored in every checkpoint's metadata)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from timm_jax.model import UNet3D


@dataclass(frozen=True)
class ModelConfig:
    """The network. Defaults are the paper's (Isensee 3D U-Net, ~8.3 M parameters for 4→3)."""
    in_channels: int = 4
    out_channels: int = 3
    base_filters: int = 16
    depth: int = 5
    dropout_rate: float = 0.3
    conv_impl: str = "auto"

    def build(self) -> UNet3D:
        return UNet3D(out_channels=self.out_channels, base_filters=self.base_filters,
                      depth=self.depth, dropout_rate=self.dropout_rate, conv_impl=self.conv_impl,
                      num_segmentation_levels=min(3, self.depth - 1))

    @property
    def divisor(self) -> int:
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def same_architecture(self, other: "ModelConfig") -> bool:
        """Same width/depth: parameters transfer (channel counts may differ, see partition)."""
        return (self.base_filters, self.depth) == (other.base_filters, other.depth)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule (the original: Adam 5e-4, plateau ×0.5 after 10, stop after 50 epochs)."""
    learning_rate: float = 5e-4
    batch_size: int = 2
    patch_shape: tuple = (32, 32, 32)
    steps_per_epoch: int = 20
    max_epochs: int = 100
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    min_learning_rate: float = 1e-6
    early_stopping_patience: int = 50
    foreground_rate: float = 0.33
    augment: bool = True
    loss: str = "dice"
    seed: int = 0
    num_workers: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_shape"] = list(self.patch_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if "patch_shape" in kw:
            kw["patch_shape"] = tuple(kw["patch_shape"])
        return cls(**kw)
