"""Trainable weights from an exported model: ``defectd train --init model.onnx``.

A line may hold only what it runs (``model.onnx`` and its card), not the training checkpoint.
The export folds every batch norm into the convolution before it (weights scaled, a bias
added), so :func:`read_onnx_init` rebuilds each norm in identity form: scale 1, shift the
folded bias, running mean 0, running variance ``1 - eps``. The U-Net then computes exactly
the export in eval mode. Training normalises with the statistics of each batch instead, so
:func:`refit_norms` measures every convolution's output on real images and gives each norm
those statistics, with scale and shift chosen so that eval mode still computes the same map:
train mode then starts close to the export, not from a network whose every layer is rescaled.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from defectd.errors import ModelError
from defectd.model.card import load_card
from defectd.model.checkpoint import read_checkpoint
from defectd.model.unet import UNet, UNetConfig

_PREFIX = "net."  # the single network inside the exported probability module


def read_init(path: Path) -> dict[str, Any]:
    """What ``--init`` starts from: a checkpoint (``.pt``) or an exported model (``.onnx``)."""
    return read_onnx_init(path) if path.suffix == ".onnx" else read_checkpoint(path)


def read_onnx_init(path: Path) -> dict[str, Any]:
    """A checkpoint-like ``{"model", "unet", "card"}`` dict from an exported single U-Net (its
    card beside it). ``ModelError`` naming the file for an ensemble, a quantised export, a norm
    other than batch norm or none, or weights that are not a defectd U-Net's."""
    card = load_card(path)
    arch = dict(card.architecture)
    if arch.pop("type", "unet") != "unet":
        raise ModelError(f"{path}: not a U-Net ({card.architecture.get('type')})")
    if arch.pop("flips", "none") != "none":
        raise ModelError(
            f"{path}: exported with flipped views averaged ({card.architecture['flips']}); "
            "start from the checkpoint it was exported from (named in its card's training notes)"
        )
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # onnx raises protobuf and OS errors alike
        raise ModelError(f"{path}: not an ONNX model ({exc})") from exc
    arrays = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    members = {name.split(".")[1] for name in arrays if name.startswith("nets.")}
    if members:
        raise ModelError(
            f"{path}: an ensemble of {len(members)} networks; start from one member's "
            "checkpoint (the ones named in its card's training notes)"
        )
    stem, head = arrays.get(f"{_PREFIX}stem.0.weight"), arrays.get(f"{_PREFIX}head.weight")
    if stem is None or head is None:
        raise ModelError(f"{path}: its weights are not named like a defectd U-Net's")
    # What the card leaves out (a hand-written card) the weights tell.
    downs = {name.split(".")[2] for name in arrays if name.startswith(f"{_PREFIX}down.")}
    found = {"in_channels": stem.shape[1], "out_channels": head.shape[0], "base": stem.shape[0]}
    arch = {**found, "depth": len(downs), **arch}
    try:
        config = UNetConfig(**arch)
        net = UNet(config)
    except TypeError as exc:
        raise ModelError(f"{path}: the card's architecture is not a U-Net's: {exc}") from exc
    if config.norm not in ("batch", "none"):
        raise ModelError(
            f"{path}: {config.norm} norm is not folded into the export; start "
            "from the training checkpoint"
        )
    # Each convolution names its weight; its bias (folded or its own) is the node's third input.
    biases = {
        node.input[1]: node.input[2]
        for node in graph.node
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 2
    }
    state = net.state_dict()
    modules = dict(net.named_modules())
    for name, module in modules.items():
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        weight = arrays.get(f"{_PREFIX}{name}.weight")
        if weight is None or not weight.is_floating_point():
            raise ModelError(
                f"{path}: no float weights for {name} (a quantised export? start "
                "from the float model or its checkpoint)"
            )
        if tuple(weight.shape) != tuple(state[f"{name}.weight"].shape):
            raise ModelError(
                f"{path}: {name} has shape {tuple(weight.shape)}, the card's "
                f"U-Net {tuple(state[f'{name}.weight'].shape)}"
            )
        state[f"{name}.weight"] = weight.float()
        bias_name = biases.get(f"{_PREFIX}{name}.weight")
        bias = arrays.get(bias_name) if bias_name else None
        if bias is None:
            continue
        norm = _norm_after(name, modules)
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = bias.float()
        elif norm is not None:  # a folded batch norm in identity form
            eps = float(modules[norm].eps)
            state[f"{norm}.weight"] = torch.ones_like(bias, dtype=torch.float32)
            state[f"{norm}.bias"] = bias.float()
            state[f"{norm}.running_mean"] = torch.zeros_like(bias, dtype=torch.float32)
            state[f"{norm}.running_var"] = torch.full_like(bias, 1.0 - eps, dtype=torch.float32)
    return {"model": state, "unet": config.as_dict(), "card": card.model_dump(mode="json")}


def _norm_after(conv: str, modules: dict[str, nn.Module]) -> str | None:
    """The batch norm right after convolution ``conv`` in its ``Sequential``, if any."""
    owner, _, index = conv.rpartition(".")
    if not index.isdigit():
        return None
    name = f"{owner}.{int(index) + 1}"
    return name if isinstance(modules.get(name), nn.BatchNorm2d) else None


@torch.no_grad()
def refit_norms(net: UNet, batches: Iterable[torch.Tensor]) -> int:
    """Give every batch norm of ``net`` the mean and variance its input has on ``batches``
    (normalised images), changing its scale and shift so that eval mode computes the same
    map as before. Returns the number of images measured."""
    norms = {name: m for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    sums: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def measure(name: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            z = inputs[0].double()
            if name not in sums:
                zero = torch.zeros(z.shape[1], dtype=torch.float64)
                sums[name] = (zero, zero, 0)
            s1, s2, n = sums[name]
            sums[name] = (s1 + z.sum((0, 2, 3)), s2 + (z * z).sum((0, 2, 3)), n + z[:, 0].numel())

        return hook

    was_training = net.training
    net.eval()
    hooks = [m.register_forward_pre_hook(measure(name)) for name, m in norms.items()]
    images = 0
    try:
        for x in batches:
            net(x)
            images += len(x)
    finally:
        for h in hooks:
            h.remove()
    if images:
        for name, norm in norms.items():
            assert norm.running_mean is not None and norm.running_var is not None
            s1, s2, count = sums[name]
            mean = s1 / count
            var = (s2 / count - mean * mean).clamp_min(1e-8)
            old_scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            norm.bias.add_(((mean - norm.running_mean.double()) * old_scale).float())
            norm.weight.copy_((old_scale * torch.sqrt(var + norm.eps)).float())
            norm.running_mean.copy_(mean.float())
            norm.running_var.copy_(var.float())
    net.train(was_training)
    return images
