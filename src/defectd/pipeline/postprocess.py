"""From a probability map to measured defects.

Threshold -> ignore-zones -> morphological opening then closing -> connected components
(8-connectivity) -> per-defect area (px, and mm² when the camera scale is calibrated), bbox,
centroid, maximum and mean probability. Everything runs in OpenCV/numpy on per-thread scratch
buffers (OpenCV releases the GIL, so several post-processing threads run in parallel); Python
only loops over the defects found, never over pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.errors import ConfigError
from defectd.pipeline.buffers import Scratch
from defectd.pipeline.config import Rect
from defectd.pipeline.inspection import Defect

PROB_TOLERANCE = 1e-3


@dataclass(frozen=True, slots=True)
class PostprocessParams:
    """The resolved settings for one camera and model (no ``None`` left to look up)."""

    threshold: float
    min_area_px: int
    open_px: int = 0
    close_px: int = 0
    max_defects: int = 100
    mm_per_px: float | None = None


def load_zone_mask(path: Path) -> NDArray[np.uint8]:
    """Read an ignore-zone mask image: ``(H, W)`` uint8, 1 where pixels are ignored.

    Raises ``ConfigError`` naming the file when it cannot be read.
    """
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if path.is_file() else None
    if img is None:
        raise ConfigError(f"{path}: ignore-zone mask not found or not an image")
    return (img > 0).astype(np.uint8)


def keep_mask(
    zones: Sequence[Rect | NDArray[np.uint8]],
    frame_hw: tuple[int, int],
    roi: tuple[int, int, int, int],
    source: Sequence[str] = (),
) -> NDArray[np.uint8] | None:
    """``(roi height, roi width)`` uint8 mask, 1 where pixels are judged, 0 in ignore zones.

    ``zones`` are rectangles or full-frame ignore masks (1 = ignore) in frame coordinates;
    ``None`` when nothing is ignored. A mask of another size than the frame raises
    ``ValueError`` naming it (``source[i]`` names zone ``i``).
    """
    if not zones:
        return None
    fh, fw = frame_hw
    ignore = np.zeros((fh, fw), np.uint8)
    for i, zone in enumerate(zones):
        if isinstance(zone, Rect):
            ignore[zone.y : zone.y + zone.height, zone.x : zone.x + zone.width] = 1
        else:
            if zone.shape != (fh, fw):
                name = source[i] if i < len(source) else f"ignore zone {i}"
                raise ValueError(
                    f"{name}: ignore mask is {zone.shape[1]}x{zone.shape[0]}, frame is {fw}x{fh}"
                )
            np.maximum(ignore, zone, out=ignore)
    x, y, w, h = roi
    keep: NDArray[np.uint8] = (ignore[y : y + h, x : x + w] == 0).astype(np.uint8)
    return keep


def _kernel(radius: int) -> NDArray[np.uint8]:
    size = 2 * radius + 1
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)), np.uint8)


class Postprocessor:
    """Finds defects in probability maps; one instance per thread (it owns scratch buffers)."""

    def __init__(self) -> None:
        self._scratch = Scratch()
        self._kernels: dict[int, NDArray[np.uint8]] = {}

    def kernel(self, radius: int) -> NDArray[np.uint8]:
        k = self._kernels.get(radius)
        if k is None:
            k = self._kernels[radius] = _kernel(radius)
        return k

    def binarise(
        self,
        prob: NDArray[np.float32],
        params: PostprocessParams,
        keep: NDArray[np.uint8] | None = None,
    ) -> NDArray[np.uint8]:
        """``(H, W)`` float32 probabilities -> ``(H, W)`` uint8 {0, 1} defect mask (scratch).

        Pixels above the threshold, minus ignore zones, opened then closed.
        """
        mask = self._scratch.get("mask", prob.shape, np.uint8)
        np.greater(prob, np.float32(params.threshold), out=mask.view(np.bool_))
        if keep is not None:
            np.multiply(mask, keep, out=mask)
        if params.open_px > 0:
            cv2.morphologyEx(mask, cv2.MORPH_OPEN, self.kernel(params.open_px), dst=mask)
        if params.close_px > 0:
            cv2.morphologyEx(mask, cv2.MORPH_CLOSE, self.kernel(params.close_px), dst=mask)
            if keep is not None:
                np.multiply(mask, keep, out=mask)
        return mask

    def measure(
        self,
        mask: NDArray[np.uint8],
        prob: NDArray[np.float32],
        params: PostprocessParams,
        offset: tuple[int, int] = (0, 0),
        cls: str = "defect",
    ) -> tuple[Defect, ...]:
        """Connected regions of ``mask`` of at least ``min_area_px``, largest first (at most
        ``max_defects``), with scores from ``prob`` and coordinates shifted by ``offset``
        ``(x, y)`` into full-frame pixels; each of class ``cls``."""
        # Label only the bounding box of the defect pixels: most frames have none or a few
        # small ones, and labelling a 5-megapixel frame costs tens of milliseconds.
        bx, by, bw, bh = cv2.boundingRect(mask)
        if bw == 0 or bh == 0:
            return ()
        labels = self._scratch.get("labels", (bh, bw), np.int32)
        n, _, stats, centroids = cv2.connectedComponentsWithStats(
            mask[by : by + bh, bx : bx + bw], labels=labels, connectivity=8, ltype=cv2.CV_32S
        )
        if n <= 1:
            return ()
        prob = prob[by : by + bh, bx : bx + bw]
        areas = stats[1:, cv2.CC_STAT_AREA]
        big = np.flatnonzero(areas >= max(params.min_area_px, 1)) + 1
        if big.size == 0:
            return ()
        order = big[np.argsort(-stats[big, cv2.CC_STAT_AREA], kind="stable")]
        ox, oy = offset[0] + bx, offset[1] + by
        scale2 = params.mm_per_px**2 if params.mm_per_px is not None else None
        defects = []
        for label in order[: params.max_defects]:
            x, y, w, h, area = (int(v) for v in stats[label])
            region = labels[y : y + h, x : x + w] == label
            values = prob[y : y + h, x : x + w][region]
            cx, cy = centroids[label]
            defects.append(
                Defect(
                    area_px=area,
                    bbox=(x + ox, y + oy, w, h),
                    centroid=(round(float(cx) + ox, 2), round(float(cy) + oy, 2)),
                    score_max=round(float(values.max()), 4),
                    score_mean=round(float(values.mean()), 4),
                    area_mm2=round(area * scale2, 4) if scale2 is not None else None,
                    cls=cls,
                )
            )
        return tuple(defects)

    def __call__(
        self,
        prob: NDArray[np.float32],
        params: PostprocessParams,
        keep: NDArray[np.uint8] | None = None,
        offset: tuple[int, int] = (0, 0),
        cls: str = "defect",
    ) -> tuple[tuple[Defect, ...], NDArray[np.uint8]]:
        """Defects (of class ``cls``) in ``prob`` ``(H, W)`` float32 and the ``(H, W)`` uint8
        mask they came from (a scratch buffer: copy it to keep it past the next call)."""
        mask = self.binarise(prob, params, keep)
        return self.measure(mask, prob, params, offset, cls), mask


def check_probabilities(prob: NDArray[np.float32]) -> str | None:
    """``None`` when every value is finite and within [0, 1] (give or take ``PROB_TOLERANCE``),
    else a one-line description."""
    lo, hi = float(prob.min()), float(prob.max())
    # Low-precision engines may overshoot [0, 1] by a rounding step; NaN fails every compare.
    if lo >= -PROB_TOLERANCE and hi <= 1.0 + PROB_TOLERANCE:
        return None
    nan = int(np.count_nonzero(np.isnan(prob)))
    return f"probabilities out of range: min {lo}, max {hi}, {nan} NaN of {prob.size}"
