"""PNG overlays of predictions: image | truth | prediction, colour-coded.

The third panel colours the thresholded prediction against the mask on the image itself:
green = found defect (TP), red = false alarm (FP), blue = missed defect (FN).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.data.metrics import ImageStats, remove_small
from defectd.errors import DataError
from defectd.training.evaluate import Prediction

# BGR, for cv2.imwrite
TP_BGR = (0, 200, 0)
FP_BGR = (0, 0, 230)
FN_BGR = (230, 80, 0)
TRUTH_BGR = (0, 220, 255)


def _bgr(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    if image.ndim == 2:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), np.uint8)
    return np.asarray(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), np.uint8)


def _tint(
    base: NDArray[np.uint8], where: NDArray[np.bool_], bgr: tuple[int, int, int]
) -> NDArray[np.uint8]:
    out = base.copy()
    colour = np.asarray(bgr, np.float32)
    out[where] = (0.45 * base[where] + 0.55 * colour).astype(np.uint8)
    return out


def overlay(
    pred: Prediction, threshold: float, min_area_px: int = 0, *, scale_to: int = 256
) -> NDArray[np.uint8]:
    """``(H', 3 W', 3)`` uint8 BGR panel of one prediction, scaled so its height is at least
    ``scale_to`` px (small parts stay visible)."""
    img = _bgr(pred.image)
    truth = pred.mask > 0
    found = remove_small(pred.prob > threshold, min_area_px)
    panel_truth = _tint(img, truth, TRUTH_BGR)
    coded = _tint(img, found & truth, TP_BGR)
    coded = _tint(coded, found & ~truth, FP_BGR)
    coded = _tint(coded, ~found & truth, FN_BGR)
    gap = np.full((img.shape[0], 4, 3), 255, np.uint8)
    panel = np.hstack([img, gap, panel_truth, gap, coded])
    return enlarge(panel, scale_to)


def enlarge(panel: NDArray[np.uint8], scale_to: int) -> NDArray[np.uint8]:
    """``panel`` scaled up by the smallest whole factor (nearest neighbour, pixels stay sharp)
    that makes it at least ``scale_to`` px high; as it is when it already is."""
    factor = max(1, -(-scale_to // panel.shape[0]))
    if factor == 1:
        return np.asarray(panel, np.uint8)
    size = (panel.shape[1] * factor, panel.shape[0] * factor)
    return np.asarray(cv2.resize(panel, size, interpolation=cv2.INTER_NEAREST), np.uint8)


def pick_cases(stats: Sequence[ImageStats], count: int) -> tuple[list[str], list[str]]:
    """Stems of the ``count`` worst and ``count`` best cases.

    Worst: defective images with the lowest IoU and good images with the most false-alarm
    pixels, interleaved. Best: defective images with the highest IoU.
    """
    defective = sorted((s for s in stats if s.has_defect), key=lambda s: (s.iou, s.stem))
    alarms = sorted(
        (s for s in stats if not s.has_defect and s.pred_px > 0), key=lambda s: (-s.fp, s.stem)
    )
    worst: list[str] = []
    for i in range(count):
        for group in (defective, alarms):
            if i < len(group) and len(worst) < count:
                worst.append(group[i].stem)
    best = [s.stem for s in reversed(defective[-count:])] if count > 0 else []
    return worst, [b for b in best if b not in worst]


def predicted_mask(
    pred: Prediction,
    threshold: float,
    min_area_px: int = 0,
    points: Sequence[tuple[float, int]] | None = None,
) -> NDArray[np.uint8]:
    """The ``(H, W)`` uint8 prediction as eval scores it.

    One-class model: 255 where ``prob > threshold`` in a component of at least ``min_area_px``
    pixels, else 0. Multi-class model (``pred.probs`` and one ``(threshold, min area)`` per
    class in ``points``): the class index ``k + 1`` of the most probable class whose own
    decision holds the pixel, 0 where none does.
    """
    if pred.probs is None or points is None:
        found = remove_small(pred.prob > threshold, min_area_px)
        return np.asarray(found, np.uint8) * np.uint8(255)
    decided = np.stack(
        [remove_small(pred.probs[k] > np.float32(t), a) for k, (t, a) in enumerate(points)]
    )
    scored = np.where(decided, pred.probs, np.float32(-1.0))
    label = np.where(decided.any(axis=0), scored.argmax(axis=0) + 1, 0)
    return np.asarray(label, np.uint8)


def write_mask(path: Path, mask: NDArray[np.uint8]) -> None:
    """Write a predicted ``(H, W)`` uint8 mask as PNG; ``DataError`` naming it when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), mask):
        raise DataError(f"{path}: cannot write mask PNG")


def write_overlay(path: Path, panel: NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), panel):
        raise DataError(f"{path}: cannot write overlay PNG")
