"""A plain U-Net for defect segmentation: (N, C, H, W) float32 in, (N, 1, H, W) logits out.

H and W must be multiples of ``2 ** depth``. The encoder halves the resolution ``depth``
times and doubles the width each time; the decoder upsamples with transposed convolutions
and concatenates the matching encoder features (skip connections).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

Norm = Literal["batch", "group", "instance", "none"]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 1
    base: int = 16  # width of the first stage; stage i has base * 2**i channels
    depth: int = 4  # number of down-sampling steps
    norm: Norm = "batch"
    dropout: float = 0.0  # dropout in the bottleneck only

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def stride(self) -> int:
        """Input height and width must be multiples of this."""
        return int(2**self.depth)


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> norm -> ReLU) twice."""

    def __init__(self, cin: int, cout: int, norm: Norm) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or UNetConfig()
        widths = [cfg.base * 2**i for i in range(cfg.depth + 1)]
        self.stem = DoubleConv(cfg.in_channels, widths[0], cfg.norm)
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1], cfg.norm))
            for i in range(cfg.depth)
        )
        self.drop = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(cfg.depth))
        )
        self.merge = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i], cfg.norm) for i in reversed(range(cfg.depth))
        )
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = self.drop(skips.pop())
        for up, merge in zip(self.up, self.merge, strict=True):
            y = merge(torch.cat([up(y), skips.pop()], dim=1))
        logits: torch.Tensor = self.head(y)
        return logits

    def gflops(self, height: int, width: int) -> float:
        """Multiply-accumulates x2 per frame of ``height`` x ``width``, in GFLOP."""
        total = 0
        hooks = []

        def count(module: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            nonlocal total
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                total += 2 * k * (module.in_channels // module.groups) * out.numel()
            elif isinstance(module, nn.ConvTranspose2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                total += 2 * k * module.out_channels * inp[0].numel()

        for m in self.modules():
            hooks.append(m.register_forward_hook(count))
        was_training = self.training
        self.eval()
        with torch.no_grad():
            self(torch.zeros(1, self.config.in_channels, height, width))
        self.train(was_training)
        for h in hooks:
            h.remove()
        return total / 1e9
