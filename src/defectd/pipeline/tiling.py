"""Cutting large images into overlapping model-sized tiles and stitching probabilities back.

A frame larger than the model input is inspected at full resolution: ``plan_tiles`` lays out
tiles that cover the image with at least ``overlap`` pixels shared between neighbours (tiles
are spread evenly, so no tile hangs over the border), and ``stitch`` assembles the per-tile
probability maps into one map of the image's size. In an overlap the tiles' probabilities are
either blended with weights that fall off towards each tile's edge (where a convolutional
model sees least context) or combined by maximum. Because stitching happens before
thresholding, a defect that straddles a seam is one connected region, found once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from defectd.pipeline.config import StitchMode


def axis_positions(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Start offsets of tiles of size ``tile`` covering ``0..length`` with >= ``overlap`` shared.

    ``length`` must be >= ``tile`` (pad smaller images first) and ``overlap`` < ``tile``.
    The first tile starts at 0, the last ends at ``length``; the rest are spread evenly.
    """
    if tile <= 0 or length < tile:
        raise ValueError(f"axis of {length} px cannot hold a tile of {tile} px")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} px must lie in 0..{tile - 1} for tiles of {tile} px")
    if length == tile:
        return (0,)
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    span = length - tile
    return tuple(round(i * span / (count - 1)) for i in range(count))


def edge_weights(tile: int, overlap: int) -> NDArray[np.float32]:
    """``(tile,)`` float32 blend weights: 1 inside, ramping down to ``1/(overlap+1)`` at edges."""
    idx = np.arange(tile, dtype=np.float32)
    depth = np.minimum(idx + 1.0, tile - idx)
    weights: NDArray[np.float32] = np.minimum(depth / np.float32(overlap + 1), 1.0).astype(
        np.float32
    )
    return weights


@dataclass(frozen=True, slots=True, eq=False)
class TilePlan:
    """Where the tiles of one ``height`` x ``width`` image lie and how they are stitched.

    ``positions`` are ``(y, x)`` top-left corners of ``tile_h`` x ``tile_w`` tiles.
    For ``blend``, ``weight`` is the ``(tile_h, tile_w)`` float32 weight of each tile and
    ``inv_weight_sum`` the ``(height, width)`` float32 reciprocal of the summed weights.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    positions: tuple[tuple[int, int], ...]
    stitch: StitchMode
    weight: NDArray[np.float32] | None
    inv_weight_sum: NDArray[np.float32] | None

    @property
    def count(self) -> int:
        return len(self.positions)

    def tile(self, image: NDArray[np.generic], index: int) -> NDArray[np.generic]:
        """A view of tile ``index`` of ``image`` (``(..., height, width)``, leading axes kept)."""
        y, x = self.positions[index]
        return image[..., y : y + self.tile_h, x : x + self.tile_w]


def plan_tiles(
    height: int, width: int, tile_h: int, tile_w: int, *, overlap: int, stitch: StitchMode = "blend"
) -> TilePlan:
    """Lay out tiles over a ``height`` x ``width`` image (each at least the tile size).

    Raises ``ValueError`` when the image is smaller than a tile or the overlap does not fit.
    """
    ys = axis_positions(height, tile_h, min(overlap, tile_h - 1))
    xs = axis_positions(width, tile_w, min(overlap, tile_w - 1))
    positions = tuple((y, x) for y in ys for x in xs)
    weight: NDArray[np.float32] | None = None
    inv: NDArray[np.float32] | None = None
    if stitch == "blend" and len(positions) > 1:
        weight = np.outer(edge_weights(tile_h, overlap), edge_weights(tile_w, overlap)).astype(
            np.float32
        )
        total = np.zeros((height, width), np.float32)
        for y, x in positions:
            total[y : y + tile_h, x : x + tile_w] += weight
        inv = np.reciprocal(total)
    return TilePlan(height, width, tile_h, tile_w, overlap, positions, stitch, weight, inv)


def stitch(
    plan: TilePlan,
    tiles: Sequence[NDArray[np.float32]],
    out: NDArray[np.float32],
    scratch: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Assemble ``(tile_h, tile_w)`` float32 probability tiles into ``out`` ``(height, width)``.

    ``tiles[i]`` belongs at ``plan.positions[i]``. ``scratch`` (``(tile_h, tile_w)`` float32)
    avoids a temporary per tile when blending. Returns ``out``.
    """
    if len(tiles) != plan.count:
        raise ValueError(f"{len(tiles)} tiles for a plan of {plan.count}")
    if out.shape != (plan.height, plan.width) or out.dtype != np.float32:
        raise ValueError(
            f"stitch target {out.shape} {out.dtype}, plan needs float32 "
            f"({plan.height}, {plan.width})"
        )
    th, tw = plan.tile_h, plan.tile_w
    if plan.count == 1:
        np.copyto(out, tiles[0])
        return out
    out.fill(0.0)
    if plan.weight is None or plan.inv_weight_sum is None:
        for (y, x), tile in zip(plan.positions, tiles, strict=True):
            region = out[y : y + th, x : x + tw]
            np.maximum(region, tile, out=region)
        return out
    tmp = scratch if scratch is not None else np.empty((th, tw), np.float32)
    for (y, x), tile in zip(plan.positions, tiles, strict=True):
        region = out[y : y + th, x : x + tw]
        np.multiply(tile, plan.weight, out=tmp)
        region += tmp
    out *= plan.inv_weight_sum
    return out
