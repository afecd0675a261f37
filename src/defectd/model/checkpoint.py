"""Training checkpoints: one ``.pt`` file holding weights, U-Net config and model card.

A checkpoint is a ``dict`` saved with ``torch.save``: ``model`` (state dict), ``unet``
(UNetConfig fields), ``card`` (ModelCard as JSON-able dict) and, for resumable training,
``optimizer``, ``scheduler``, ``epoch``, ``best`` and ``rng`` entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class InitReport:
    """What ``load_matching`` did: tensors loaded, tensors left as initialised (with why), and
    checkpoint tensors the network has no place for."""

    loaded: tuple[str, ...]
    initialised: tuple[tuple[str, str], ...]  # (name, why)
    unused: tuple[str, ...]

    @property
    def head_loaded(self) -> bool:
        """Whether the output layer came from the checkpoint (same classes, same width)."""
        return "head.weight" in self.loaded and "head.bias" in self.loaded

    def summary(self, limit: int = 6) -> str:
        """``loaded 58 of 60 tensors; initialised: head.weight (shape ...), ...`` (at most
        ``limit`` names of each list)."""
        total = len(self.loaded) + len(self.initialised)
        text = f"loaded {len(self.loaded)} of {total} tensors"
        if self.initialised:
            shown = ", ".join(f"{n} ({why})" for n, why in self.initialised[:limit])
            more = len(self.initialised) - limit
            text += f"; initialised: {shown}" + (f" and {more} more" if more > 0 else "")
        if self.unused:
            shown = ", ".join(self.unused[:limit])
            more = len(self.unused) - limit
            text += f"; not used from the checkpoint: {shown}" + (
                f" and {more} more" if more > 0 else ""
            )
        return text


def load_matching(net: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> InitReport:
    """Load every tensor of ``weights`` whose name and shape match one of ``net``; the others
    keep their fresh initialisation. A head re-sized for another number of classes, a wider
    first layer for RGB input or a deeper network thus start from whatever still fits."""
    own = net.state_dict()
    take: dict[str, torch.Tensor] = {}
    initialised: list[tuple[str, str]] = []
    for name, tensor in own.items():
        source = weights.get(name)
        if source is None:
            initialised.append((name, "not in the checkpoint"))
        elif tuple(source.shape) != tuple(tensor.shape):
            initialised.append(
                (name, f"shape {tuple(source.shape)} in the checkpoint, {tuple(tensor.shape)} here")
            )
        else:
            take[name] = source
    net.load_state_dict(take, strict=False)
    unused = tuple(sorted(set(weights) - set(own)))
    return InitReport(tuple(take), tuple(initialised), unused)
