"""Losses for defect segmentation: a per-pixel term plus an overlap term.

Kinds: ``bce_dice`` (BCE + soft Dice over the batch), ``bce_dice_img`` (BCE + the mean of
batch Dice and per-image Dice), ``bce_dice_part`` (``bce_dice_img`` + a part-level term),
``focal_dice``, ``bce_tversky`` and plain ``bce``.

Defects cover a fraction of a percent of most images, so plain BCE is content predicting
"good" everywhere. The overlap term (soft Dice, or Tversky that weighs misses more than false
alarms) is computed over the whole batch at once, which matches how the split's Dice is measured
(pixels summed over images) and stays defined on batches of good images only.

A multi-class model's ``(N, K, H, W)`` output has one sigmoid per class (multi-label): BCE
over every pixel of every channel, and the overlap term per class, averaged over the classes,
so a rare class weighs as much as a common one. ``K = 1`` is the one-class loss unchanged.

The station decides a part by its strongest region, not by its pixels on average: a faint
defect the map scores just under the threshold everywhere is an escape however good the Dice,
and one bright speck on a good part is a false reject. ``bce_dice_part`` adds what that decision
sees: per image (and class) the mean of its ``PART_TOP_K`` highest logits, scored by BCE against
whether the image has a defect (of that class), so the loss rises with every part the pixel
terms would let through or reject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

LossKind = Literal["bce_dice", "bce_dice_img", "bce_dice_part", "focal_dice", "bce_tversky", "bce"]
LOSS_KINDS: tuple[LossKind, ...] = (
    "bce_dice",
    "bce_dice_img",
    "bce_dice_part",
    "focal_dice",
    "bce_tversky",
    "bce",
)
# Pixels pooled into a part's score: about the smallest region a station rejects (a pit), so a
# single noisy pixel neither makes nor saves a part.
PART_TOP_K = 16


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum p + sum t + s)`` over every pixel of the batch (per
    class and averaged, for ``K > 1`` channels)."""
    dims = (0, 2, 3) if prob.shape[1] > 1 else (0, 1, 2, 3)
    return _dice_loss_over(prob, target, dims, smooth).mean()


def _dice_loss_over(
    prob: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...], smooth: float
) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum p + sum t + s)``, the sums taken over ``dims``."""
    inter = (prob * target).sum(dims)
    return 1.0 - (2.0 * inter + smooth) / (prob.sum(dims) + target.sum(dims) + smooth)


def image_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per ``(N, 1, H, W)`` image, averaged over the images that have defect
    pixels (0 when none has): a 5-pixel pit weighs as much as a region over half the part.
    For ``K > 1`` channels: per image and class, over the pairs that have defect pixels."""
    dims: tuple[int, ...] = (1, 2, 3) if prob.shape[1] == 1 else (2, 3)
    per_image = _dice_loss_over(prob, target, dims, smooth)
    has_defect = target.sum(dims) > 0
    if not bool(has_defect.any()):
        return prob.sum() * 0.0
    return per_image[has_defect].mean()


def tversky_loss(
    prob: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Tversky loss: ``alpha`` weighs false positives, ``beta`` misses (Dice at 0.5/0.5);
    per class and averaged for ``K > 1`` channels."""
    if prob.shape[1] > 1:
        per_class = [
            tversky_loss(prob[:, k : k + 1], target[:, k : k + 1], alpha, beta, smooth)
            for k in range(prob.shape[1])
        ]
        return torch.stack(per_class).mean()
    tp = (prob * target).sum()
    fp = (prob * (1.0 - target)).sum()
    fn = ((1.0 - prob) * target).sum()
    return 1.0 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (mean over pixels): BCE scaled by ``(1 - p_t) ** gamma``."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    return ((1.0 - p_t) ** gamma * bce).mean()


def part_loss(logits: torch.Tensor, target: torch.Tensor, k: int = PART_TOP_K) -> torch.Tensor:
    """BCE of each image's (and class's) part score, the mean of its ``k`` highest logits,
    against whether it holds defect pixels; averaged over images and classes."""
    flat = logits.flatten(2)  # (N, K, H*W)
    top = flat.topk(min(k, flat.shape[-1]), dim=-1).values.mean(-1)
    present = (target.flatten(2).amax(-1) > 0).to(top.dtype)
    return F.binary_cross_entropy_with_logits(top, present)


def per_image_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``(N,)`` how wrong the network is on each image, without gradient: mean pixel BCE plus
    soft Dice loss over the image's pixels of every channel (for a good image: how much of it
    is called defect). What hard mining ranks images by (``DefectBalancedSampler.record``)."""
    with torch.no_grad():
        logits = logits.float()
        target = target.float()
        dims = (1, 2, 3)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
        return bce + _dice_loss_over(torch.sigmoid(logits), target, dims, smooth)


@dataclass(frozen=True)
class LossConfig:
    kind: LossKind = "bce_dice"
    pos_weight: float = 1.0  # BCE weight of defect pixels
    focal_gamma: float = 2.0
    focal_scale: float = 10.0  # focal terms are small; scaled to weigh like BCE
    overlap_weight: float = 1.0  # weight of the Dice / Tversky term


class SegLoss(nn.Module):
    """``(N, K, H, W)`` logits and ``(N, K, H, W)`` float {0, 1} targets -> scalar loss.

    Computed in float32 whatever the autocast dtype of the logits.
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        logits = logits.float()
        target = target.float()
        if cfg.kind == "focal_dice":
            pixel = cfg.focal_scale * focal_loss(logits, target, cfg.focal_gamma)
        else:
            weight = torch.tensor(cfg.pos_weight) if cfg.pos_weight != 1.0 else None
            pixel = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
        if cfg.kind == "bce":
            return pixel
        prob = torch.sigmoid(logits)
        if cfg.kind == "bce_tversky":
            overlap = tversky_loss(prob, target)
        elif cfg.kind in ("bce_dice_img", "bce_dice_part"):
            # Split Dice is ruled by large regions; the per-image term keeps small defects seen.
            overlap = 0.5 * (soft_dice_loss(prob, target) + image_dice_loss(prob, target))
        else:
            overlap = soft_dice_loss(prob, target)
        loss = pixel + cfg.overlap_weight * overlap
        if cfg.kind == "bce_dice_part":
            loss = loss + part_loss(logits, target)
        return loss
