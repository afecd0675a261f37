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
from defectd.model.views import VIEWS, Flips, View

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


class FlipMean(nn.Module):
    """A probability module averaged over flipped views of its input, each output flipped back
    (test-time augmentation in the graph; ``defectd.model.views``)."""

    def __init__(self, inner: nn.Module, views: Sequence[View]) -> None:
        super().__init__()
        self.inner = inner
        self.views = tuple(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [
            self.inner(x) if not axes else torch.flip(self.inner(torch.flip(x, axes)), axes)
            for axes in self.views
        ]
        return torch.stack(maps).mean(0)


def probability_module(nets: UNet | Sequence[UNet], flips: Flips = "none") -> nn.Module:
    """Probabilities from one network (its logits through a sigmoid: the graph every single
    model has had) or the mean probability of several (a seed ensemble), averaged over
    ``flips``' views when there is more than one."""
    members = members_of(nets)
    module: nn.Module = WithSigmoid(members[0]) if len(members) == 1 else MeanProbability(members)
    return module if flips == "none" else FlipMean(module, VIEWS[flips])


def export_onnx(
    nets: UNet | Sequence[UNet],
    card: ModelCard,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    flips: Flips = "none",
) -> ModelCard:
    """Write ``out`` (ONNX, input ``image`` (N,C,H,W) float32 with dynamic N, output ``prob``
    (N,1,H,W)) and its card; returns the card with ``sha256`` and ``opset`` filled in.

    Several networks export as one model whose output is the mean of their probabilities;
    ``flips`` other than ``none`` averages that over flipped views of the input (the card's
    ``architecture["flips"]`` says which). Height and width are fixed to ``card.input``.
    Raises ``ModelError`` when the export fails.
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
    module = probability_module(members, flips).eval()
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
    architecture = dict(card.architecture)
    architecture.pop("flips", None)
    if flips != "none":
        architecture["flips"] = flips
    final = card.model_copy(
        update={
            "architecture": architecture,
            "sha256": file_sha256(out),
            "opset": opset,
            "producer": PRODUCER,
        }
    )
    final.save(card_path(out))
    return final
