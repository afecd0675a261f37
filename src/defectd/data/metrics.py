"""Segmentation and detection metrics, exact and in numpy.

Pixel metrics are accumulated over the whole split (true positive, false positive and false
negative defect pixels summed over every image) so that a split's Dice is one number that large
and small images weigh by their pixels, as the literature on these data sets reports it.
Image-level metrics treat an image as defective when its prediction, after the threshold and
after removing connected components smaller than ``min_area_px``, has any defect pixel left.

Conventions for empty denominators (a ratio of 0/0): the value is 1.0 when there was nothing to
find and nothing was found, 0.0 otherwise; so a perfect prediction scores 1.0 everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

ImageScore = Literal["max", "area"]
THRESHOLD_GRID: NDArray[np.float64] = np.round(np.arange(0.01, 0.96, 0.01), 2)


def _ratio(num: float, den: float, *, empty: float) -> float:
    return float(num / den) if den > 0 else empty


def dice_score(tp: float, fp: float, fn: float) -> float:
    """``2 TP / (2 TP + FP + FN)``; 1.0 when all three are zero."""
    return _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0)


def iou_score(tp: float, fp: float, fn: float) -> float:
    """``TP / (TP + FP + FN)``; 1.0 when all three are zero."""
    return _ratio(tp, tp + fp + fn, empty=1.0)


def precision_score(tp: float, fp: float, fn: float) -> float:
    """``TP / (TP + FP)``; with nothing predicted: 1.0 if there was nothing to find, else 0.0."""
    return _ratio(tp, tp + fp, empty=1.0 if fn == 0 else 0.0)


def recall_score(tp: float, fp: float, fn: float) -> float:
    """``TP / (TP + FN)``; with nothing to find: 1.0 if nothing was predicted, else 0.0."""
    return _ratio(tp, tp + fn, empty=1.0 if fp == 0 else 0.0)


def auroc(
    labels: Sequence[bool] | NDArray[np.bool_], scores: Sequence[float] | NDArray[Any]
) -> float:
    """Area under the ROC curve: the probability that a random positive scores higher than a
    random negative, ties counting one half (Mann-Whitney U with mid-ranks).

    ``labels`` and ``scores`` have one entry per image. Returns NaN when either class is absent.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal 1-D shapes")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Mid-rank of each run of equal scores: ranks are 1-based positions in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    mid = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def remove_small(binary: NDArray[np.bool_], min_area_px: int) -> NDArray[np.bool_]:
    """``(H, W)`` bool with 8-connected components smaller than ``min_area_px`` removed."""
    if min_area_px <= 1 or not binary.any():
        return binary
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        binary.astype(np.uint8), connectivity=8
    )
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # background
    if keep[1:count].all():
        return binary
    kept: NDArray[np.bool_] = keep[labels]
    return kept


@dataclass(frozen=True)
class ImageStats:
    """What one image contributes: pixel counts at the threshold and its image-level score."""

    stem: str
    cls: str
    tp: int
    fp: int
    fn: int
    truth_px: int
    pred_px: int
    max_prob: float

    @property
    def has_defect(self) -> bool:
        return self.truth_px > 0

    @property
    def predicted_defect(self) -> bool:
        return self.pred_px > 0

    @property
    def iou(self) -> float:
        return iou_score(self.tp, self.fp, self.fn)

    def score(self, kind: ImageScore) -> float:
        return self.max_prob if kind == "max" else float(self.pred_px)


def image_stats(
    prob: NDArray[np.float32],
    truth: NDArray[np.uint8],
    *,
    threshold: float,
    min_area_px: int = 0,
    stem: str = "",
    cls: str = "",
) -> ImageStats:
    """Compare a ``(H, W)`` float32 probability map with its ``(H, W)`` uint8 {0,1} mask."""
    if prob.shape != truth.shape:
        raise ValueError(f"{stem or 'image'}: prediction {prob.shape} vs mask {truth.shape}")
    pred = remove_small(prob > threshold, min_area_px)
    gt = truth > 0
    tp = int(np.count_nonzero(pred & gt))
    pred_px = int(np.count_nonzero(pred))
    truth_px = int(np.count_nonzero(gt))
    return ImageStats(
        stem=stem,
        cls=cls,
        tp=tp,
        fp=pred_px - tp,
        fn=truth_px - tp,
        truth_px=truth_px,
        pred_px=pred_px,
        max_prob=float(prob.max()) if prob.size else 0.0,
    )


@dataclass(frozen=True)
class Scores:
    """Metrics of a group of images (a split or one class); see the module docstring."""

    images: int
    defective: int
    dice: float
    iou: float
    precision: float
    recall: float
    mean_image_iou: float  # over images with a defect in the mask; NaN when there are none
    accuracy: float  # image-level: predicted defective == truly defective

    def as_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in self.__dict__.items()}


def _json_number(value: float | int) -> float | int | None:
    if isinstance(value, float) and np.isnan(value):
        return None
    return round(value, 6) if isinstance(value, float) else value


def scores_of(stats: Sequence[ImageStats]) -> Scores:
    """Pixel metrics summed over ``stats``, per-image IoU mean, image accuracy."""
    tp = sum(s.tp for s in stats)
    fp = sum(s.fp for s in stats)
    fn = sum(s.fn for s in stats)
    defective = [s for s in stats if s.has_defect]
    correct = sum(s.has_defect == s.predicted_defect for s in stats)
    return Scores(
        images=len(stats),
        defective=len(defective),
        dice=dice_score(tp, fp, fn),
        iou=iou_score(tp, fp, fn),
        precision=precision_score(tp, fp, fn),
        recall=recall_score(tp, fp, fn),
        mean_image_iou=float(np.mean([s.iou for s in defective])) if defective else float("nan"),
        accuracy=_ratio(correct, len(stats), empty=1.0),
    )


@dataclass(frozen=True)
class Report:
    """Split-level metrics, image-level AUROC and the per-class table."""

    overall: Scores
    auroc: float
    score: ImageScore
    threshold: float
    min_area_px: int
    per_class: dict[str, Scores]

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict: ``dice``, ``iou``, ..., ``auroc``, ``per_class`` {cls: {...}}."""
        return {
            **self.overall.as_dict(),
            "auroc": _json_number(self.auroc),
            "image_score": self.score,
            "threshold": self.threshold,
            "min_area_px": self.min_area_px,
            "per_class": {k: v.as_dict() for k, v in self.per_class.items()},
        }


@dataclass
class MetricsAccumulator:
    """Feed images one by one with :meth:`add`; :meth:`report` gives the split's metrics.

    Also keeps, per threshold of ``THRESHOLD_GRID``, the summed pixel counts so that
    :meth:`best_threshold` can pick the threshold with the best split Dice without a second pass.
    Memory is O(images + grid), not O(pixels).
    """

    threshold: float = 0.5
    min_area_px: int = 0
    score: ImageScore = "max"
    keep_sweep: bool = True  # False skips the per-threshold counts (faster)
    stats: list[ImageStats] = field(default_factory=list)
    _sweep: NDArray[np.int64] = field(
        default_factory=lambda: np.zeros((3, THRESHOLD_GRID.size), np.int64)
    )

    def add(
        self, prob: NDArray[np.float32], truth: NDArray[np.uint8], *, stem: str = "", cls: str = ""
    ) -> ImageStats:
        """Add one ``(H, W)`` float32 probability map and its ``(H, W)`` uint8 {0,1} mask."""
        st = image_stats(
            prob, truth, threshold=self.threshold, min_area_px=self.min_area_px, stem=stem, cls=cls
        )
        self.stats.append(st)
        if not self.keep_sweep:
            return st
        gt = truth > 0
        # Predicted-positive counts at every grid threshold from two sorted arrays.
        # Compare in the map's own dtype, exactly as ``prob > threshold`` does.
        grid = THRESHOLD_GRID.astype(prob.dtype)
        pos = np.sort(prob[gt])
        neg = np.sort(prob[~gt])
        tp = pos.size - np.searchsorted(pos, grid, side="right")
        fp = neg.size - np.searchsorted(neg, grid, side="right")
        self._sweep[0] += tp
        self._sweep[1] += fp
        self._sweep[2] += pos.size - tp
        return st

    def extend(self, items: Iterable[tuple[NDArray[np.float32], NDArray[np.uint8]]]) -> None:
        for prob, truth in items:
            self.add(prob, truth)

    def sweep(self) -> list[tuple[float, float]]:
        """``(threshold, split Dice)`` for every grid threshold (no min-area filtering)."""
        tp, fp, fn = self._sweep
        return [
            (float(t), dice_score(int(a), int(b), int(c)))
            for t, a, b, c in zip(THRESHOLD_GRID, tp, fp, fn, strict=True)
        ]

    def best_threshold(self) -> tuple[float, float]:
        """The grid threshold with the highest split Dice, and that Dice (ties: lowest)."""
        best = max(self.sweep(), key=lambda td: (td[1], -td[0]))
        return best

    def report(self) -> Report:
        labels = [s.has_defect for s in self.stats]
        classes = sorted({s.cls for s in self.stats if s.cls})
        return Report(
            overall=scores_of(self.stats),
            auroc=auroc(labels, [s.score(self.score) for s in self.stats]),
            score=self.score,
            threshold=self.threshold,
            min_area_px=self.min_area_px,
            per_class={c: scores_of([s for s in self.stats if s.cls == c]) for c in classes},
        )
