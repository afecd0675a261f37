"""Decision thresholds from a labelled split: sweep, rates with confidence intervals, choice.

A part is *rejected* at an operating point ``(pixel_threshold t, min_area_px a, min_score s)``
when the probability map, thresholded at ``t`` and split into 8-connected components (as the
daemon's post-processing does, without morphology), has a component of at least ``a`` pixels
(``a = 0`` counts as 1) whose peak probability is at least ``s``. Over a split:

- escape rate = defective parts passed / defective parts,
- false-reject rate = good parts rejected / good parts,

each with a Wilson 95% interval. The model runs once: :class:`SweepCollector` keeps, per image
and per grid threshold, only the largest component area for each min-score (``(T, S)`` int64),
plus per-threshold pixel counts for pixel precision/recall/IoU/Dice. Memory is
O(images x grid), not O(pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.data.metrics import (
    dice_score,
    iou_score,
    precision_score,
    recall_score,
    unseen_cutoff,
)
from defectd.errors import CalibrationError

TargetKind = Literal["escape", "false_reject"]

# Pixel thresholds swept; fine at the low end where segmentation models put defect edges.
_GRID = np.concatenate(
    [[0.001, 0.002, 0.005], np.arange(0.01, 0.10, 0.01), np.arange(0.10, 0.96, 0.025)]
)
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(float(t), 3) for t in _GRID)
DEFAULT_MIN_AREAS: tuple[int, ...] = (
    0, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000,
)  # fmt: skip
DEFAULT_MIN_SCORES: tuple[float, ...] = (0.0,)
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n``; ``(0, 1)`` when ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # Clamp so that low <= p <= high holds exactly despite rounding.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` parts, the rate and its Wilson 95% interval."""

    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {
            "rate": round(self.rate, 6),
            "low": round(low, 6),
            "high": round(high, 6),
            "k": self.k,
            "n": self.n,
        }


@dataclass(frozen=True)
class OperatingPoint:
    """One decision setting and what it achieved on the split."""

    pixel_threshold: float
    min_area_px: int
    min_score: float
    escape: Rate  # defective parts passed / defective parts
    false_reject: Rate  # good parts rejected / good parts

    def as_dict(self) -> dict[str, Any]:
        return {
            "pixel_threshold": self.pixel_threshold,
            "min_area_px": self.min_area_px,
            "min_score": self.min_score,
            "escape": self.escape.as_dict(),
            "false_reject": self.false_reject.as_dict(),
        }


def largest_components(
    prob: NDArray[np.float32], thresholds: Sequence[float], min_scores: Sequence[float]
) -> NDArray[np.int64]:
    """``(T, S)`` int64: per threshold, the largest 8-connected component of ``prob > t``
    whose peak probability is ``>= s`` (0 when there is none). ``prob`` is ``(H, W)`` float32.
    """
    out = np.zeros((len(thresholds), len(min_scores)), np.int64)
    scores = np.asarray(min_scores, np.float64)
    peak = float(prob.max()) if prob.size else 0.0
    for i, t in enumerate(thresholds):
        if peak <= t:
            break  # thresholds ascend: nothing above this one either
        binary = (prob > np.float32(t)).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        areas = stats[1:count, cv2.CC_STAT_AREA].astype(np.int64)
        if len(scores) == 1 and scores[0] <= t:
            out[i, 0] = int(areas.max())
            continue
        fg = labels > 0
        maxima = np.zeros(count, np.float64)
        np.maximum.at(maxima, np.asarray(labels[fg], np.intp), prob[fg])
        maxima = maxima[1:]
        for j, s in enumerate(scores):
            ok = maxima >= s
            out[i, j] = int(areas[ok].max()) if ok.any() else 0
    return out


@dataclass
class SweepCollector:
    """Feed every image of a split with :meth:`add`; then :meth:`result`.

    Keeps per image the ``(T, S)`` largest-component table and its label, and per threshold
    the summed pixel counts (TP, FP, FN; no min-area filtering).
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    min_areas: tuple[int, ...] = DEFAULT_MIN_AREAS
    min_scores: tuple[float, ...] = DEFAULT_MIN_SCORES
    stems: list[str] = field(default_factory=list)
    defective: list[bool] = field(default_factory=list)
    ignored: list[bool] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    truth_peaks: list[float] = field(default_factory=list)  # highest probability in the defect
    largest: list[NDArray[np.int64]] = field(default_factory=list)
    pixel_counts: NDArray[np.int64] = field(default_factory=lambda: np.zeros((3, 0), np.int64))

    def __post_init__(self) -> None:
        if list(self.thresholds) != sorted(self.thresholds) or not self.thresholds:
            raise CalibrationError("pixel thresholds must be a non-empty ascending list")
        if any(not 0.0 < t < 1.0 for t in self.thresholds):
            raise CalibrationError("pixel thresholds must lie strictly between 0 and 1")
        self.pixel_counts = np.zeros((3, len(self.thresholds)), np.int64)

    def add(
        self,
        prob: NDArray[np.float32],
        truth: NDArray[np.uint8],
        *,
        stem: str = "",
        ignore: bool = False,
    ) -> None:
        """One ``(H, W)`` float32 probability map and its ``(H, W)`` uint8 {0, 1} mask.

        ``ignore``: kept in order (its verdicts are there for :meth:`Sweep.rejected_at`) but
        left out of the rates, e.g. a part holding only other classes in one class's sweep.
        """
        if prob.shape != truth.shape:
            raise CalibrationError(f"{stem or 'image'}: prediction {prob.shape} vs {truth.shape}")
        self.ignored.append(ignore)
        gt = truth > 0
        pos = np.sort(prob[gt])  # the defect's probabilities: its peak, and the pixel counts
        self.truth_peaks.append(float(pos[-1]) if pos.size else 0.0)
        if ignore:
            self.stems.append(stem)
            self.defective.append(bool(pos.size))
            self.peaks.append(float(prob.max()) if prob.size else 0.0)
            self.largest.append(largest_components(prob, self.thresholds, self.min_scores))
            return
        grid = np.asarray(self.thresholds, prob.dtype)
        neg = np.sort(prob[~gt])
        tp = pos.size - np.searchsorted(pos, grid, side="right")
        fp = neg.size - np.searchsorted(neg, grid, side="right")
        self.pixel_counts += np.stack([tp, fp, pos.size - tp])
        self.stems.append(stem)
        self.defective.append(bool(gt.any()))
        self.peaks.append(float(prob.max()) if prob.size else 0.0)
        self.largest.append(largest_components(prob, self.thresholds, self.min_scores))

    def result(self) -> Sweep:
        if not self.stems:
            raise CalibrationError("no images were given to the threshold sweep")
        return Sweep(
            thresholds=np.asarray(self.thresholds, np.float64),
            min_areas=np.asarray(self.min_areas, np.int64),
            min_scores=np.asarray(self.min_scores, np.float64),
            defective=np.asarray(self.defective, bool),
            ignored=np.asarray(self.ignored, bool),
            largest=np.stack(self.largest),
            pixel_counts=self.pixel_counts.copy(),
            stems=tuple(self.stems),
            truth_peaks=np.asarray(self.truth_peaks, np.float64),
        )


@dataclass(frozen=True)
class Sweep:
    """The split's summaries: ``largest`` is ``(N, T, S)`` int64, ``pixel_counts`` ``(3, T)``
    (TP, FP, FN per threshold), ``defective`` ``(N,)`` bool."""

    thresholds: NDArray[np.float64]
    min_areas: NDArray[np.int64]
    min_scores: NDArray[np.float64]
    defective: NDArray[np.bool_]
    ignored: NDArray[np.bool_]  # (N,) kept for their verdicts, left out of the rates
    largest: NDArray[np.int64]
    pixel_counts: NDArray[np.int64]
    stems: tuple[str, ...]
    # (N,) the highest probability inside each entry's defect (0 without one).
    truth_peaks: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    @property
    def positives(self) -> NDArray[np.bool_]:
        """``(N,)``: counted defective parts."""
        out: NDArray[np.bool_] = self.defective & ~self.ignored
        return out

    @property
    def negatives(self) -> NDArray[np.bool_]:
        """``(N,)``: counted good parts (or defect-free tiles)."""
        out: NDArray[np.bool_] = ~self.defective & ~self.ignored
        return out

    @property
    def n_defective(self) -> int:
        return int(self.positives.sum())

    @property
    def n_good(self) -> int:
        return int(self.negatives.sum())

    def rejected(self) -> NDArray[np.bool_]:
        """``(N, T, A, S)`` bool: image rejected at every grid operating point."""
        need = np.maximum(self.min_areas, 1)[None, None, :, None]
        rej: NDArray[np.bool_] = self.largest[:, :, None, :] >= need
        return rej

    def points(self) -> list[OperatingPoint]:
        """Every grid operating point (min-scores not above the threshold are skipped,
        except 0), with its escape and false-reject counts."""
        rej = self.rejected()
        nd, ng = self.n_defective, self.n_good
        escapes = (~rej[self.positives]).sum(axis=0)  # (T, A, S)
        false_rejects = rej[self.negatives].sum(axis=0)
        out: list[OperatingPoint] = []
        for i, t in enumerate(self.thresholds):
            for j, a in enumerate(self.min_areas):
                for k, s in enumerate(self.min_scores):
                    if 0.0 < s <= t:
                        continue
                    out.append(
                        OperatingPoint(
                            pixel_threshold=float(t),
                            min_area_px=int(a),
                            min_score=float(s),
                            escape=Rate(int(escapes[i, j, k]), nd),
                            false_reject=Rate(int(false_rejects[i, j, k]), ng),
                        )
                    )
        return out

    def rejected_at(
        self, pixel_threshold: float, min_area_px: int, min_score: float
    ) -> NDArray[np.bool_]:
        """``(N,)`` bool: each image (in ``stems`` order) rejected at a grid ``(t, a, s)``,
        the verdict the daemon gives it with that calibration; ``CalibrationError`` off the
        grid."""
        i = _index(self.thresholds, pixel_threshold, "pixel threshold")
        j = _index(self.min_areas.astype(np.float64), float(min_area_px), "min area")
        k = _index(self.min_scores, min_score, "min score")
        rej: NDArray[np.bool_] = self.rejected()[:, i, j, k]
        return rej

    def point(self, pixel_threshold: float, min_area_px: int, min_score: float) -> OperatingPoint:
        """The operating point at a grid ``(t, a, s)``; ``CalibrationError`` off the grid."""
        rej = self.rejected_at(pixel_threshold, min_area_px, min_score)
        return OperatingPoint(
            pixel_threshold,
            min_area_px,
            min_score,
            Rate(int((~rej[self.positives]).sum()), self.n_defective),
            Rate(int(rej[self.negatives].sum()), self.n_good),
        )

    def unseen_escapes(self, pixel_threshold: float, min_area_px: int, min_score: float) -> int:
        """How many of the defective entries passed at a grid ``(t, a, s)`` the model did not
        see at all: under :func:`~defectd.data.metrics.unseen_cutoff` of ``t`` everywhere
        inside their defect, as ``defectd eval`` judges them. No sensible operating point
        catches those."""
        passed = self.positives & ~self.rejected_at(pixel_threshold, min_area_px, min_score)
        return int((passed & (self.truth_peaks < unseen_cutoff(pixel_threshold))).sum())

    def pixel_metrics(self) -> list[dict[str, float]]:
        """Per threshold: pixel precision, recall, IoU and Dice summed over the split."""
        rows = []
        for t, (tp, fp, fn) in zip(self.thresholds, self.pixel_counts.T, strict=True):
            a, b, c = int(tp), int(fp), int(fn)
            rows.append(
                {
                    "threshold": float(t),
                    "precision": precision_score(a, b, c),
                    "recall": recall_score(a, b, c),
                    "iou": iou_score(a, b, c),
                    "dice": dice_score(a, b, c),
                }
            )
        return rows


def _index(grid: NDArray[np.float64], value: float, what: str) -> int:
    hits = np.flatnonzero(np.isclose(grid, value, rtol=0.0, atol=1e-9))
    if hits.size == 0:
        raise CalibrationError(f"{what} {value} is not on the sweep grid")
    return int(hits[0])


def check_split(sweep: Sweep, target: TargetKind, split: str) -> None:
    """``CalibrationError`` when the split cannot support the asked target."""
    if sweep.n_defective == 0:
        raise CalibrationError(
            f"split {split!r} has no defective images: escape rates cannot be measured "
            f"({sweep.n_good} good images); use a split with labelled defects"
        )
    if sweep.n_good == 0:
        raise CalibrationError(
            f"split {split!r} has no good images: false-reject rates cannot be measured "
            f"({sweep.n_defective} defective images); use a split with good parts"
        )
    del target  # both rates are needed for either target: one is held, the other minimised


def choose(
    points: Sequence[OperatingPoint], target: TargetKind, rate: float, *, bound: bool = False
) -> OperatingPoint:
    """The point meeting ``rate`` for ``target`` with the fewest of the other kind of error.

    ``target="escape"``: escape rate <= ``rate``, fewest false rejects; ``"false_reject"``:
    false-reject rate <= ``rate``, fewest escapes. With ``bound``, the interval's upper end
    must meet ``rate`` (conservative). Ties: fewer errors of the held kind, then the higher
    threshold, then the smaller min area. ``CalibrationError`` when no point meets it.
    """

    def held(p: OperatingPoint) -> Rate:
        return p.escape if target == "escape" else p.false_reject

    def other(p: OperatingPoint) -> Rate:
        return p.false_reject if target == "escape" else p.escape

    def measure(r: Rate) -> float:
        return r.interval[1] if bound else r.rate

    ok = [p for p in points if measure(held(p)) <= rate + 1e-12]
    if not ok:
        best = min(points, key=lambda p: measure(held(p)))
        what = "an escape" if target == "escape" else "a false-reject"
        raise CalibrationError(
            f"no operating point reaches {what} rate of {rate:g}"
            f"{' (upper 95% bound)' if bound else ''}; the lowest is "
            f"{measure(held(best)):.4f} at threshold {best.pixel_threshold}, "
            f"min area {best.min_area_px} px"
        )
    return min(
        ok,
        key=lambda p: (other(p).k, held(p).k, -p.pixel_threshold, p.min_area_px, p.min_score),
    )


def pareto_front(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """Points no other point beats on both escape and false-reject rate, by escape rate."""
    best: dict[int, OperatingPoint] = {}
    for p in points:
        cur = best.get(p.escape.k)
        if cur is None or p.false_reject.k < cur.false_reject.k:
            best[p.escape.k] = p
    front: list[OperatingPoint] = []
    for k in sorted(best):
        p = best[k]
        if not front or p.false_reject.k < front[-1].false_reject.k:
            front.append(p)
    return front


def image_pr_curve(sweep: Sweep, min_area_px: int, min_score: float) -> list[dict[str, float]]:
    """Image-level precision/recall per threshold at a fixed min area and min score
    (a rejected part is a "defective" prediction)."""
    j = _index(sweep.min_areas.astype(np.float64), float(min_area_px), "min area")
    k = _index(sweep.min_scores, min_score, "min score")
    rej = sweep.rejected()[:, :, j, k]  # (N, T)
    rows = []
    for i, t in enumerate(sweep.thresholds):
        tp = int(rej[sweep.positives, i].sum())
        fp = int(rej[sweep.negatives, i].sum())
        fn = sweep.n_defective - tp
        rows.append(
            {
                "threshold": float(t),
                "precision": precision_score(tp, fp, fn),
                "recall": recall_score(tp, fp, fn),
            }
        )
    return rows


# ---------------------------------------------------------------- negatives without good parts


@dataclass(frozen=True)
class TilePlan:
    """Where defect-free tiles of defective images are cut: squares of ``tile_px`` on a grid
    of step ``tile_px``, kept when no labelled defect pixel lies within ``margin_px`` of them.
    ``tile_px = 0``: a quarter of the image's shorter side (at least 16 px)."""

    tile_px: int = 0
    margin_px: int = 16

    def size_for(self, shape: tuple[int, int]) -> int:
        return self.tile_px or max(16, min(shape) // 4)

    def tiles(self, truth: NDArray[np.uint8]) -> list[tuple[int, int, int]]:
        """``(y, x, size)`` of every defect-free tile of an ``(H, W)`` mask (any class)."""
        h, w = truth.shape
        size = self.size_for((h, w))
        if size > h or size > w:
            return []
        near = truth > 0
        if self.margin_px > 0 and near.any():
            k = 2 * self.margin_px + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
            near = cv2.dilate(near.astype(np.uint8), kernel) > 0
        # Integral image: defect pixels near each tile in O(1) per tile.
        integral = cv2.integral(near.astype(np.uint8))
        out = []
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                hits = (
                    integral[y + size, x + size]
                    - integral[y, x + size]
                    - integral[y + size, x]
                    + integral[y, x]
                )
                if hits == 0:
                    out.append((y, x, size))
        return out

    def describe(self) -> str:
        size = f"{self.tile_px} px" if self.tile_px else "a quarter of the image's shorter side"
        return (
            f"negatives are square tiles ({size}) of defective images with no labelled defect "
            f"within {self.margin_px} px; a false reject is a tile where the model finds a "
            "defect (a rate per tile, not per part)"
        )
