"""Training checkpoints: one ``.pt`` file holding weights, U-Net config and model card.

A checkpoint is a ``dict`` saved with ``torch.save``: ``model`` (state dict), ``unet``
(UNetConfig fields), ``card`` (ModelCard as JSON-able dict) and, for resumable training,
``optimizer``, ``scheduler``, ``epoch``, ``best`` and ``rng`` entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from defectd.errors import ModelError
from defectd.model.card import ModelCard
from defectd.model.unet import UNet, UNetConfig


def save_checkpoint(path: Path, net: UNet, card: ModelCard, **extra: Any) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": net.state_dict(),
        "unet": net.config.as_dict(),
        "card": card.model_dump(mode="json"),
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict; ``ModelError`` naming the file when it cannot be read."""
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise ModelError(f"{path}: not a defectd checkpoint ({exc})") from exc
    if not isinstance(state, dict) or not {"model", "unet", "card"} <= state.keys():
        raise ModelError(f"{path}: not a defectd checkpoint (missing model/unet/card entries)")
    return state


def load_checkpoint(path: Path) -> tuple[UNet, ModelCard]:
    """The U-Net (in eval mode, on CPU) and its card from a checkpoint file."""
    state = read_checkpoint(path)
    try:
        net = UNet(UNetConfig(**state["unet"]))
        net.load_state_dict(state["model"])
        card = ModelCard.from_dict(state["card"])
    except (TypeError, RuntimeError, ValidationError) as exc:
        raise ModelError(f"{path}: checkpoint does not match the U-Net: {exc}") from exc
    return net.eval(), card
