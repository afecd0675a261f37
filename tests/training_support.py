"""The U-Net the training tests train: small enough for seconds on one thread."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from defectd.training.train import TrainConfig


def tiny_training(data: Path, out: Path, size: int, **settings: Any) -> TrainConfig:
    """A run on ``size`` x ``size`` images of a U-Net of width 8 and depth 2, learning rate
    1e-2, no augmentation and one thread (on a shared 2-core machine a second OpenMP thread
    mostly waits); ``settings`` are the test's own ``TrainConfig`` values on top."""
    config = TrainConfig(
        data=data,
        out=out,
        height=size,
        width=size,
        base=8,
        depth=2,
        lr=1e-2,
        augment="off",
        threads=1,
    )
    return replace(config, **settings)
