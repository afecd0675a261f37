"""A plain U-Net for defect segmentation: (N, C, H, W) float32 in, (N, 1, H, W) logits out.

H and W must be multiples of ``2 ** depth``. The encoder halves the resolution ``depth``
times and doubles the width each time; the decoder upsamples with transposed convolutions
and concatenates the matching encoder features (skip connections).
"""

from __future__ import annotations

from collections.abc import Mapping
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


def widen_state(
    weights: Mapping[str, torch.Tensor], net: UNet
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The weights of a narrower U-Net embedded in ``net``'s shapes, computing the same map.

    ``weights`` is the state dict of a U-Net like ``net`` (same depth, input channels,
    classes and norm) but with a smaller ``base``. Each layer keeps the checkpoint's channels
    as its first ones; the new channels keep ``net``'s fresh initialisation as far as what
    they read, and every old channel (and the head) reads them with weight zero. The old
    channels therefore compute exactly what they did, the widened network's output is the
    checkpoint's, and training grows the new channels from there (their outgoing weights get
    gradients). Returns the new state dict and the names of the tensors that were embedded
    (the rest were copied whole). ``ValueError`` when the two networks do not have that
    relation, e.g. group norm, whose groups mix channels, or another depth.
    """
    cfg = net.config
    if cfg.norm == "group":
        raise ValueError("group norm mixes channels within a group; only batch, instance or none")
    own = net.state_dict()
    if set(weights) != set(own):
        raise ValueError("the checkpoint's layers differ from this network's (another depth?)")
    old_base = int(weights["stem.0.weight"].shape[0])
    if old_base > cfg.base:
        raise ValueError(f"base {old_base} does not widen to base {cfg.base}")
    modules = dict(net.named_modules())
    out: dict[str, torch.Tensor] = {}
    widened: list[str] = []
    for name, fresh in own.items():
        old = weights[name]
        if tuple(old.shape) == tuple(fresh.shape):
            out[name] = old.clone()
            continue
        if old.ndim != fresh.ndim:
            shapes = f"{tuple(old.shape)} -> {tuple(fresh.shape)}"
            raise ValueError(f"{name}: shape {shapes} does not widen")
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        new = fresh.clone()
        if leaf == "weight" and isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # Conv2d weights are (out, in, k, k), transposed ones (in, out, k, k).
            o_dim, i_dim = (1, 0) if isinstance(module, nn.ConvTranspose2d) else (0, 1)
            n_out, n_in = old.shape[o_dim], old.shape[i_dim]
            if owner.startswith("merge.") and owner.endswith(".0"):
                # Reads cat([upsampled, skip]): the old channels are the first of each half.
                half_new, half_old = new.shape[i_dim] // 2, n_in // 2
                ins = [*range(half_old), *range(half_new, half_new + half_old)]
            else:
                ins = list(range(n_in))
            target = new.narrow(o_dim, 0, n_out)  # a view: the old channels' rows
            target.zero_()
            target.index_copy_(i_dim, torch.tensor(ins), old)
        else:  # biases and norm parameters / statistics: one value per output channel
            new.narrow(0, 0, old.shape[0]).copy_(old)
        out[name] = new
        widened.append(name)
    return out, tuple(widened)
