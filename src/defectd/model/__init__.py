"""The U-Net and its model card.

The card needs no torch; ``UNet`` and ``UNetConfig`` load torch on first use, so a station
that runs ONNX models does not pay torch's import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defectd.model.card import ModelCard, card_path, load_card

if TYPE_CHECKING:
    from defectd.model.unet import UNet, UNetConfig

__all__ = ["ModelCard", "UNet", "UNetConfig", "card_path", "load_card"]


def __getattr__(name: str) -> Any:
    if name in ("UNet", "UNetConfig"):
        from defectd.model import unet  # noqa: PLC0415  (deferred: torch is heavy)

        return getattr(unet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
