"""Export a trained U-Net (or several: a seed ensemble) to ONNX with the sigmoid in the graph,
its card beside it."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from defectd.errors import ModelError
from defectd.model.card import PRODUCER, ModelCard, card_path, file_sha256
from defectd.model.ensemble import members_of
from defectd.model.unet import UNet

INPUT_NAME = "image"
OUTPUT_NAME = "prob"
DEFAULT_OPSET = 18
MAX_EXPORT_BATCH = 256


class WithSigmoid(nn.Module):
    """Logits -> probabilities, so every engine returns probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


class MeanProbability(nn.Module):
    """Several networks' logits -> the mean of their probabilities (a seed ensemble)."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sigmoid(net(x)) for net in self.nets]).mean(0)


def probability_module(nets: UNet | Sequence[UNet]) -> nn.Module:
    """Probabilities from one network (its logits through a sigmoid: the graph every single
    model has had) or the mean probability of several (a seed ensemble)."""
    members = members_of(nets)
    return WithSigmoid(members[0]) if len(members) == 1 else MeanProbability(members)


def export_onnx(
    nets: UNet | Sequence[UNet], card: ModelCard, out: Path, *, opset: int = DEFAULT_OPSET
) -> ModelCard:
    """Write ``out`` (ONNX, input ``image`` (N,C,H,W) float32 with dynamic N, output ``prob``
    (N,1,H,W)) and its card; returns the card with ``sha256`` and ``opset`` filled in.

    Several networks export as one model whose output is the mean of their probabilities.
    Height and width are fixed to ``card.input``. Raises ``ModelError`` when the export fails.
    """
    if opset < 17:
        raise ModelError(f"opset {opset} is too old; defectd exports with opset >= 17")
    spec = card.input
    members = members_of(nets)
    stride = max(net.config.stride for net in members)
    if spec.height % stride or spec.width % stride:
        raise ModelError(
            f"input {spec.height}x{spec.width} is not a multiple of the U-Net stride {stride}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    module = probability_module(members).eval()
    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(out),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ModelError(f"{out}: ONNX export failed: {exc}") from exc
    final = card.model_copy(
        update={"sha256": file_sha256(out), "opset": opset, "producer": PRODUCER}
    )
    final.save(card_path(out))
    return final
