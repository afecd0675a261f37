"""Segmentation and detection metrics, exact and in numpy.

Pixel metrics are accumulated over the whole split (true positive, false positive and false
negative defect pixels summed over every image) so that a split's Dice is one number that large
and small images weigh by their pixels, as the literature on these data sets reports it.
Image-level metrics treat an image as defective when its prediction, after the threshold and
after removing connected components smaller than ``min_area_px``, has any defect pixel left.

Conventions for empty denominators (a ratio of 0/0): the value is 1.0 when there was nothing to
find and nothing was found, 0.0 otherwise; so a perfect prediction scores 1.0 everywhere.
A metric that has no meaning on a split (AUROC without good or without defective images, the
mean image IoU without defective images) is NaN in Python and ``null`` in JSON, with the reason
under ``undefined`` (:meth:`Report.as_dict`): the JSON never holds NaN.

Tolerant precision and recall (``tolerance_px``, for thin structures such as cracks, where a
mask one pixel off halves the strict Dice): a predicted pixel counts as correct when a true
defect pixel lies within ``tolerance_px`` (Euclidean disc), a true pixel as found when a
predicted pixel lies that close; both summed over the split, F1 their harmonic mean.

Escapes (defective images the decision passes) carry the highest probability the model gave
inside their true defect and why they passed (:data:`ESCAPE_REASONS`): ``unseen`` (below
:func:`unseen_cutoff` everywhere inside: 0.01, or a tenth of the threshold when that is lower;
no sensible operating point catches it, the map has to improve),
``below_threshold`` (seen, a lower threshold would catch it, at the cost of the good images
above that threshold), ``under_min_area`` (pixels above the threshold inside, but no region
of the minimum area anywhere) or ``below_class_point`` (a multi-class decision: seen, under
each class's threshold or minimum area).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

ImageScore = Literal["max", "area", "decision"]
IMAGE_SCORES: tuple[ImageScore, ...] = ("max", "area", "decision")
THRESHOLD_GRID: NDArray[np.float64] = np.round(np.arange(0.01, 0.96, 0.01), 2)
UNSEEN_BELOW = 0.01  # an escape whose defect stays under this probability was not seen at all
ESCAPE_REASONS: tuple[str, ...] = (
    "unseen",
    "below_threshold",
    "under_min_area",
    "below_class_point",
)


def unseen_cutoff(threshold: float | None) -> float:
    """The probability under which a defect counts as not seen at all: :data:`UNSEEN_BELOW`,
    or a tenth of ``threshold`` when that is lower (a model operated at 0.01 sees at 0.005);
    ``None``: no single threshold decides (a multi-class model)."""
    return UNSEEN_BELOW if threshold is None else min(UNSEEN_BELOW, threshold / 10.0)


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


def decision_score(prob: NDArray[np.float32], min_area_px: int) -> float:
    """The highest threshold at which ``prob`` keeps an 8-connected region of at least
    ``min_area_px`` pixels: the image is judged defective at threshold ``t`` (``prob > t``,
    regions under ``min_area_px`` removed, as :func:`remove_small` and the station do) exactly
    when this score is above ``t`` (compared in the map's dtype). So sweeping ``t`` at a fixed
    min area traces this score's ROC: it is the station's own decision variable. With
    ``min_area_px <= 1`` it is the maximum probability; 0.0 when the whole map is smaller
    than ``min_area_px``.

    Binary search over the map's distinct values (about 17 labellings for 100k of them).
    """
    if prob.size == 0:
        return 0.0
    if min_area_px <= 1:
        return float(prob.max())
    values = np.unique(prob)

    def holds(i: int) -> bool:
        return bool(remove_small(prob >= values[i], min_area_px).any())

    if not holds(0):
        return 0.0
    lo, hi = 0, values.size - 1  # holds(lo) is true; find the last index that holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if holds(mid):
            lo = mid
        else:
            hi = mid - 1
    return float(values[lo])


def auroc_costs(
    stats: Sequence[ImageStats], kind: ImageScore, count: int = 5
) -> dict[str, list[dict[str, Any]]]:
    """The images that cost the AUROC most under score ``kind``: ``defective``, the defective
    images outranked by the most good ones, and ``good``, the good images outranking the most
    defective ones (``count`` of each, costliest first). Each row: ``stem``, ``cls``,
    ``score``, ``pairs`` (mis-ordered pairs, ties counting one half) and ``auroc_loss``
    (``pairs / (defective x good)``: the AUROC would be that much higher were the image ranked
    right). Empty lists when either kind of image is missing."""
    pos = [s for s in stats if s.has_defect]
    neg = [s for s in stats if not s.has_defect]
    if not pos or not neg:
        return {"defective": [], "good": []}
    ps = np.sort(np.array([s.score(kind) for s in pos]))
    ns = np.sort(np.array([s.score(kind) for s in neg]))
    total = float(len(pos) * len(neg))

    def misordered(sorted_scores: NDArray[Any], v: float, *, above: bool) -> float:
        """How many of ``sorted_scores`` lie above (or below) ``v``, ties counting one half."""
        lo = int(np.searchsorted(sorted_scores, v, side="left"))
        hi = int(np.searchsorted(sorted_scores, v, side="right"))
        return (sorted_scores.size - hi if above else lo) + 0.5 * (hi - lo)

    def rows(group: list[ImageStats], others: NDArray[Any], above: bool) -> list[dict[str, Any]]:
        costed = [(misordered(others, s.score(kind), above=above), s) for s in group]
        costed = sorted((c for c in costed if c[0] > 0), key=lambda c: (-c[0], c[1].stem))
        return [
            {
                "stem": s.stem,
                "cls": s.cls,
                "score": _json_number(s.score(kind)),
                "pairs": pairs,
                "auroc_loss": round(pairs / total, 6),
            }
            for pairs, s in costed[:count]
        ]

    # A defective image loses the pairs with good images above it; a good one, with defective
    # images below it.
    return {"defective": rows(pos, ns, above=True), "good": rows(neg, ps, above=False)}


def disc(radius: int) -> NDArray[np.uint8]:
    """A ``(2r+1, 2r+1)`` uint8 disc (elliptic structuring element) of ``radius`` px."""
    size = 2 * radius + 1
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)), np.uint8)


def tolerant_hits(
    pred: NDArray[np.bool_], truth: NDArray[np.bool_], radius: int
) -> tuple[int, int]:
    """``(predicted pixels within radius of a true pixel, true pixels within radius of a
    predicted pixel)`` for ``(H, W)`` bool masks."""
    if radius <= 0:
        both = int(np.count_nonzero(pred & truth))
        return both, both
    kernel = disc(radius)
    near_truth = cv2.dilate(truth.astype(np.uint8), kernel) > 0
    near_pred = cv2.dilate(pred.astype(np.uint8), kernel) > 0
    return int(np.count_nonzero(pred & near_truth)), int(np.count_nonzero(truth & near_pred))


@dataclass(frozen=True)
class ImageStats:
    """What one image contributes: pixel counts at the threshold and its image-level score.

    ``tol_pred_hit`` / ``tol_truth_hit``: predicted pixels near a true one and true pixels near
    a predicted one, at the accumulator's ``tolerance_px`` (0 when no tolerance is asked for).
    """

    stem: str
    cls: str
    tp: int
    fp: int
    fn: int
    truth_px: int
    pred_px: int
    max_prob: float
    tol_pred_hit: int = 0
    tol_truth_hit: int = 0
    decision: float | None = None  # :func:`decision_score`, computed when asked for
    truth_peak: float = 0.0  # highest probability inside the true defect (0 without one)
    escape: str | None = None  # why a defective image passed (:data:`ESCAPE_REASONS`)

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
        if kind == "area":
            return float(self.pred_px)
        if kind == "decision" and self.decision is not None:
            return self.decision
        return self.max_prob


def image_stats(
    prob: NDArray[np.float32],
    truth: NDArray[np.uint8],
    *,
    threshold: float,
    min_area_px: int = 0,
    stem: str = "",
    cls: str = "",
    tolerance_px: int | None = None,
    binary: NDArray[np.bool_] | None = None,
    decision: bool = False,
) -> ImageStats:
    """Compare a ``(H, W)`` float32 probability map with its ``(H, W)`` uint8 {0,1} mask.

    ``binary``: the ``(H, W)`` bool prediction when it was decided elsewhere (a multi-class
    model: the union of its classes, each at its own threshold and min area); ``prob`` then
    only gives the image score. ``decision``: also compute :func:`decision_score` at
    ``min_area_px`` (with ``binary`` given there is no single threshold to sweep, and the
    decision score is the maximum probability).
    """
    if prob.shape != truth.shape:
        raise ValueError(f"{stem or 'image'}: prediction {prob.shape} vs mask {truth.shape}")
    pred = remove_small(prob > threshold, min_area_px) if binary is None else binary
    gt = truth > 0
    tp = int(np.count_nonzero(pred & gt))
    pred_px = int(np.count_nonzero(pred))
    truth_px = int(np.count_nonzero(gt))
    hits = (0, 0) if tolerance_px is None else tolerant_hits(pred, gt, tolerance_px)
    truth_peak = float(prob[gt].max()) if truth_px else 0.0
    escape = None
    if truth_px and not pred_px:
        if truth_peak < unseen_cutoff(None if binary is not None else threshold):
            escape = "unseen"
        elif binary is not None:
            escape = "below_class_point"
        else:
            escape = "under_min_area" if truth_peak > threshold else "below_threshold"
    return ImageStats(
        stem=stem,
        cls=cls,
        tp=tp,
        fp=pred_px - tp,
        fn=truth_px - tp,
        truth_px=truth_px,
        pred_px=pred_px,
        max_prob=float(prob.max()) if prob.size else 0.0,
        tol_pred_hit=hits[0],
        tol_truth_hit=hits[1],
        decision=decision_score(prob, min_area_px if binary is None else 1) if decision else None,
        truth_peak=truth_peak,
        escape=escape,
    )


def escapes_of(stats: Sequence[ImageStats], unseen_below: float = UNSEEN_BELOW) -> dict[str, Any]:
    """The defective images the decision passed: ``count``, a count per reason of
    :data:`ESCAPE_REASONS`, ``unseen_below`` (the :func:`unseen_cutoff` the stats were
    judged by) and ``images``, each ``stem``, ``cls``,
    ``peak_in_defect``, ``peak`` (the image's highest probability) and ``why``, the nearest to
    being caught first."""
    missed = sorted(
        (s for s in stats if s.escape is not None), key=lambda s: (-s.truth_peak, s.stem)
    )
    counts = dict.fromkeys(ESCAPE_REASONS, 0)
    for s in missed:
        counts[str(s.escape)] += 1
    return {
        "count": len(missed),
        **counts,
        "unseen_below": unseen_below,
        "images": [
            {
                "stem": s.stem,
                "cls": s.cls,
                "peak_in_defect": _json_number(s.truth_peak),
                "peak": _json_number(s.max_prob),
                "why": s.escape,
            }
            for s in missed
        ],
    }


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
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return round(value, 6) if isinstance(value, float) else value


def undefined_reasons(report: dict[str, Any]) -> dict[str, str]:
    """Why each ``null`` metric of an ``as_dict`` result has no value (JSON holds no NaN)."""
    reasons: dict[str, str] = {}
    if report.get("auroc", 0) is None:
        which = "good" if report.get("defective") == report.get("images") else "defective"
        reasons["auroc"] = f"undefined: the split has no {which} image to rank against"
    if report.get("mean_image_iou", 0) is None:
        reasons["mean_image_iou"] = "undefined: the split has no defective image"
    return reasons


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
    # ``{"tolerance_px", "precision", "recall", "f1"}`` when a tolerance was asked for.
    tolerant: dict[str, float] | None = None
    # AUROC under every image score the stats hold (``decision`` only when it was computed).
    auroc_by_score: dict[str, float] = field(default_factory=dict)
    # :func:`auroc_costs` under ``score``.
    auroc_costs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # :func:`escapes_of`: the defective images passed, with why.
    escapes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict: ``dice``, ``iou``, ..., ``auroc``, ``per_class`` {cls: {...}};
        ``tolerance_px`` and ``tolerant_precision``/``_recall``/``_f1`` with a tolerance;
        ``undefined`` {metric: reason} for each metric that is ``null``."""
        out: dict[str, Any] = {
            **self.overall.as_dict(),
            "auroc": _json_number(self.auroc),
            "image_score": self.score,
            "threshold": self.threshold,
            "min_area_px": self.min_area_px,
            "per_class": {k: v.as_dict() for k, v in self.per_class.items()},
        }
        if self.auroc_by_score:
            out["auroc_by_score"] = {k: _json_number(v) for k, v in self.auroc_by_score.items()}
        if self.auroc_costs:
            out["auroc_costs"] = self.auroc_costs
        if self.escapes:
            out["escapes"] = self.escapes
        if self.tolerant is not None:
            out["tolerance_px"] = int(self.tolerant["tolerance_px"])
            for key in ("precision", "recall", "f1"):
                out[f"tolerant_{key}"] = _json_number(self.tolerant[key])
        undefined = undefined_reasons(out)
        for cls, row in out["per_class"].items():
            for key, why in undefined_reasons(row).items():
                if key != "auroc":
                    undefined[f"per_class.{cls}.{key}"] = why
        if undefined:
            out["undefined"] = undefined
        return out


def tolerant_scores(stats: Sequence[ImageStats], tolerance_px: int) -> dict[str, float]:
    """Boundary-tolerant precision, recall and F1 summed over ``stats`` (module docstring)."""
    pred = sum(s.pred_px for s in stats)
    truth = sum(s.truth_px for s in stats)
    p_hit = sum(s.tol_pred_hit for s in stats)
    t_hit = sum(s.tol_truth_hit for s in stats)
    precision = _ratio(p_hit, pred, empty=1.0 if truth == 0 else 0.0)
    recall = _ratio(t_hit, truth, empty=1.0 if pred == 0 else 0.0)
    f1 = _ratio(2 * precision * recall, precision + recall, empty=0.0)
    return {"tolerance_px": float(tolerance_px), "precision": precision, "recall": recall, "f1": f1}


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
    tolerance_px: int | None = None  # also count boundary-tolerant hits (module docstring)
    stats: list[ImageStats] = field(default_factory=list)
    _sweep: NDArray[np.int64] = field(
        default_factory=lambda: np.zeros((3, THRESHOLD_GRID.size), np.int64)
    )
    _decided_elsewhere: bool = field(default=False, init=False)  # a multi-class union decided

    def add(
        self,
        prob: NDArray[np.float32],
        truth: NDArray[np.uint8],
        *,
        stem: str = "",
        cls: str = "",
        binary: NDArray[np.bool_] | None = None,
    ) -> ImageStats:
        """Add one ``(H, W)`` float32 probability map and its ``(H, W)`` uint8 {0,1} mask
        (``binary``: the decided prediction, see :func:`image_stats`)."""
        st = image_stats(
            prob,
            truth,
            threshold=self.threshold,
            min_area_px=self.min_area_px,
            stem=stem,
            cls=cls,
            tolerance_px=self.tolerance_px,
            binary=binary,
            decision=self.score == "decision",
        )
        self.stats.append(st)
        self._decided_elsewhere |= binary is not None
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
        kinds: list[ImageScore] = ["max", "area"]
        if self.score == "decision" or (
            self.stats and all(s.decision is not None for s in self.stats)
        ):
            kinds.append("decision")
        by_score: dict[str, float] = {
            k: auroc(labels, [s.score(k) for s in self.stats]) for k in kinds
        }
        return Report(
            overall=scores_of(self.stats),
            auroc=by_score[self.score],
            auroc_by_score=by_score,
            auroc_costs=auroc_costs(self.stats, self.score),
            escapes=escapes_of(
                self.stats, unseen_cutoff(None if self._decided_elsewhere else self.threshold)
            ),
            score=self.score,
            threshold=self.threshold,
            min_area_px=self.min_area_px,
            per_class={c: scores_of([s for s in self.stats if s.cls == c]) for c in classes},
            tolerant=(
                None
                if self.tolerance_px is None
                else tolerant_scores(self.stats, self.tolerance_px)
            ),
        )


@dataclass(frozen=True)
class ClassReport:
    """Pixel metrics of a multi-class model, one row per class, and the pixel confusion matrix.

    ``per_class[name]``: ``dice``, ``iou``, ``precision``, ``recall`` of that class's channel at
    its own operating point (threshold, min area), ``truth_px``, ``images`` (holding the class),
    ``best_threshold``/``best_dice`` on the grid. ``confusion[t][p]``: pixels of true label
    ``t`` predicted as ``p``, labels ``["good", *classes]``; a pixel's predicted label is the
    class with the highest probability among those whose decided mask holds it, its true label
    the first class it belongs to.
    """

    classes: tuple[str, ...]
    per_class: dict[str, dict[str, float | int]]
    confusion: list[list[int]]

    @property
    def mean_iou(self) -> float:
        """Mean IoU over the defect classes."""
        return float(np.mean([float(r["iou"]) for r in self.per_class.values()]))

    @property
    def mean_dice(self) -> float:
        return float(np.mean([float(r["dice"]) for r in self.per_class.values()]))

    @property
    def mean_iou_with_background(self) -> float:
        """Mean IoU over the classes and ``good`` (background), from the confusion matrix, as
        semantic segmentation papers often report mIoU."""
        m = np.asarray(self.confusion, np.float64)
        inter = np.diag(m)
        union = m.sum(0) + m.sum(1) - inter
        ious = [_ratio(i, u, empty=1.0) for i, u in zip(inter, union, strict=True)]
        return float(np.mean(ious))

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean_iou": _json_number(self.mean_iou),
            "mean_dice": _json_number(self.mean_dice),
            "mean_iou_with_background": _json_number(self.mean_iou_with_background),
            "per_class": {
                k: {n: _json_number(v) for n, v in row.items()} for k, row in self.per_class.items()
            },
            "confusion": {"labels": ["good", *self.classes], "matrix": self.confusion},
        }


@dataclass
class ClassAccumulator:
    """Per-class pixel counts of a multi-class model, image by image (O(classes x grid))."""

    classes: tuple[str, ...]
    thresholds: tuple[float, ...]
    min_areas: tuple[int, ...]
    _counts: NDArray[np.int64] = field(init=False)
    _sweep: NDArray[np.int64] = field(init=False)
    _confusion: NDArray[np.int64] = field(init=False)
    _images: NDArray[np.int64] = field(init=False)

    def __post_init__(self) -> None:
        k = len(self.classes)
        if not len(self.thresholds) == len(self.min_areas) == k:
            raise ValueError("one threshold and one min area per class")
        self._counts = np.zeros((k, 4), np.int64)  # tp, fp, fn, truth px
        self._sweep = np.zeros((k, 3, THRESHOLD_GRID.size), np.int64)
        self._confusion = np.zeros((k + 1, k + 1), np.int64)
        self._images = np.zeros(k, np.int64)

    def decide(self, probs: NDArray[np.float32]) -> NDArray[np.bool_]:
        """``(K, H, W)`` bool: each class's ``prob > threshold`` without components under its
        min area (the daemon's per-class post-processing without morphology)."""
        return np.stack(
            [
                remove_small(probs[k] > np.float32(self.thresholds[k]), self.min_areas[k])
                for k in range(len(self.classes))
            ]
        )

    def add(
        self,
        probs: NDArray[np.float32],
        truth: NDArray[np.uint8],
        decided: NDArray[np.bool_] | None = None,
    ) -> NDArray[np.bool_]:
        """Add ``(K, H, W)`` float32 probabilities and ``(K, H, W)`` uint8 {0, 1} truth;
        returns the ``(K, H, W)`` decided masks (``decided`` if given)."""
        if probs.shape != truth.shape or probs.shape[0] != len(self.classes):
            raise ValueError(f"probabilities {probs.shape} vs truth {truth.shape}")
        pred = self.decide(probs) if decided is None else decided
        gt = truth > 0
        grid = THRESHOLD_GRID.astype(probs.dtype)
        for k in range(len(self.classes)):
            tp = int(np.count_nonzero(pred[k] & gt[k]))
            n_pred, n_truth = int(np.count_nonzero(pred[k])), int(np.count_nonzero(gt[k]))
            self._counts[k] += (tp, n_pred - tp, n_truth - tp, n_truth)
            self._images[k] += int(n_truth > 0)
            pos = np.sort(probs[k][gt[k]])
            neg = np.sort(probs[k][~gt[k]])
            s_tp = pos.size - np.searchsorted(pos, grid, side="right")
            s_fp = neg.size - np.searchsorted(neg, grid, side="right")
            self._sweep[k, 0] += s_tp
            self._sweep[k, 1] += s_fp
            self._sweep[k, 2] += pos.size - s_tp
        n = len(self.classes) + 1
        true_label = np.where(gt.any(0), gt.argmax(0) + 1, 0)
        scored = np.where(pred, probs, np.float32(-1.0))
        pred_label = np.where(pred.any(0), scored.argmax(0) + 1, 0)
        flat = (true_label * n + pred_label).ravel()
        self._confusion += np.bincount(flat, minlength=n * n).reshape(n, n)
        return pred

    def best_thresholds(self) -> list[tuple[float, float]]:
        """Per class: the grid threshold with the best split Dice of its channel, and that
        Dice (ties: the lowest threshold)."""
        out = []
        for k in range(len(self.classes)):
            tp, fp, fn = self._sweep[k]
            sweep = [
                (float(t), dice_score(int(a), int(b), int(c)))
                for t, a, b, c in zip(THRESHOLD_GRID, tp, fp, fn, strict=True)
            ]
            out.append(max(sweep, key=lambda td: (td[1], -td[0])))
        return out

    def report(self) -> ClassReport:
        best = self.best_thresholds()
        per_class: dict[str, dict[str, float | int]] = {}
        for k, name in enumerate(self.classes):
            tp, fp, fn, truth_px = (int(v) for v in self._counts[k])
            per_class[name] = {
                "images": int(self._images[k]),
                "truth_px": truth_px,
                "dice": dice_score(tp, fp, fn),
                "iou": iou_score(tp, fp, fn),
                "precision": precision_score(tp, fp, fn),
                "recall": recall_score(tp, fp, fn),
                "threshold": self.thresholds[k],
                "min_area_px": self.min_areas[k],
                "best_threshold": best[k][0],
                "best_dice": best[k][1],
            }
        return ClassReport(self.classes, per_class, self._confusion.tolist())
