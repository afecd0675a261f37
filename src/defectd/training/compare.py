"""Two models on the same images: verdict agreement, pixel IoU between their masks, each
against the truth, and the parts they disagree on (``defectd compare``).

Each model runs as ``defectd eval`` and the station run it: its own card's fit policy and
normalisation (``evaluate.infer_images``), probabilities brought back to the image's size,
then its operating point, the card's threshold and min area or a calibration file's
(``operating_point``). A part's verdict is the station's default rule (``any-defect``): fail
when an 8-connected region of ``prob > threshold`` has at least ``min_area_px`` pixels.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.data.datasets import Dataset, Sample
from defectd.data.metrics import remove_small
from defectd.errors import DataError
from defectd.model.card import ModelCard
from defectd.training.evaluate import OpenedModel, infer_images
from defectd.training.overlays import enlarge


@dataclass(frozen=True)
class OperatingPoint:
    """Threshold and min area of one model, where they come from, and a warning when a
    calibration file names another model (the station would not apply it: it would use the
    card's)."""

    threshold: float
    min_area_px: int
    source: str
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "min_area_px": self.min_area_px,
            "source": self.source,
            "warning": self.warning,
        }


def operating_point(
    card: ModelCard,
    calibrated: tuple[float, int, str] | None = None,
    source: str = "card",
) -> OperatingPoint:
    """The card's threshold and min area, or ``calibrated`` = (threshold, min area, sha256 of
    the model the calibration was made for; "" for any), e.g. a calibration file's threshold
    section. A calibration made for another model comes with a warning: the station would not
    apply it to this one."""
    if calibrated is None:
        return OperatingPoint(card.threshold, card.min_area_px, "card")
    threshold, min_area, made_for = calibrated
    warning = None
    if made_for and card.sha256 and made_for != card.sha256:
        warning = (
            f"{source} was calibrated for model {made_for[:12]}, not {card.name} "
            f"{card.sha256[:12]}: a station would use the card's threshold {card.threshold:g} "
            f"and min area {card.min_area_px} px for this model"
        )
    return OperatingPoint(threshold, min_area, source, warning)


@dataclass
class Confusion:
    """Image-level verdicts against the truth (defective = fail is right), and pooled pixels."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    px_tp: int = 0
    px_fp: int = 0
    px_fn: int = 0

    def add(
        self, fail: bool, defective: bool, pred: NDArray[np.bool_], truth: NDArray[np.bool_]
    ) -> None:
        if defective:
            self.tp += fail
            self.fn += not fail
        else:
            self.fp += fail
            self.tn += not fail
        tp = int(np.count_nonzero(pred & truth))
        self.px_tp += tp
        self.px_fp += int(np.count_nonzero(pred)) - tp
        self.px_fn += int(np.count_nonzero(truth)) - tp

    def as_dict(self) -> dict[str, Any]:
        defective, good = self.tp + self.fn, self.fp + self.tn
        union = self.px_tp + self.px_fp + self.px_fn
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "escape_rate": round(self.fn / defective, 6) if defective else None,
            "false_reject_rate": round(self.fp / good, 6) if good else None,
            "accuracy": round((self.tp + self.tn) / (defective + good), 6)
            if defective + good
            else None,
            "pixel_iou": round(self.px_tp / union, 6) if union else None,
            "pixel_dice": round(2 * self.px_tp / (union + self.px_tp), 6) if union else None,
        }


@dataclass(frozen=True)
class PartResult:
    """One image: both verdicts (True = fail), the IoU of the two masks (None when both are
    empty), the truth (None without a mask) and the masks' pixel counts."""

    sample: Sample
    fail_a: bool
    fail_b: bool
    iou_ab: float | None
    truth_defect: bool | None
    pixels_a: int
    pixels_b: int

    @property
    def agree(self) -> bool:
        return self.fail_a == self.fail_b


@dataclass
class Comparison:
    """What ``compare_models`` found on one split."""

    split: str
    point_a: OperatingPoint
    point_b: OperatingPoint
    parts: list[PartResult] = field(default_factory=list)
    inter: int = 0  # pixels in both masks, over the split
    union: int = 0  # pixels in either mask
    truth_a: Confusion = field(default_factory=Confusion)
    truth_b: Confusion = field(default_factory=Confusion)
    seconds: float = 0.0

    @property
    def agreement(self) -> float:
        return sum(p.agree for p in self.parts) / len(self.parts) if self.parts else 1.0

    @property
    def disagreements(self) -> list[PartResult]:
        return [p for p in self.parts if not p.agree]

    def as_dict(self) -> dict[str, Any]:
        parts = self.parts
        ious = [p.iou_ab for p in parts if p.iou_ab is not None]
        labelled = sum(p.truth_defect is not None for p in parts)
        return {
            "split": self.split,
            "images": len(parts),
            "verdict_agreement": round(self.agreement, 6),
            "agree": sum(p.agree for p in parts),
            "disagree": len(parts) - sum(p.agree for p in parts),
            "verdicts": {
                "both_fail": sum(p.fail_a and p.fail_b for p in parts),
                "both_pass": sum(not p.fail_a and not p.fail_b for p in parts),
                "a_fail_b_pass": sum(p.fail_a and not p.fail_b for p in parts),
                "a_pass_b_fail": sum(not p.fail_a and p.fail_b for p in parts),
            },
            "pixel_iou_ab": round(self.inter / self.union, 6) if self.union else None,
            "mean_image_iou_ab": round(float(np.mean(ious)), 6) if ious else None,
            "truth": {
                "images": labelled,
                "a": self.truth_a.as_dict() if labelled else None,
                "b": self.truth_b.as_dict() if labelled else None,
            },
            "operating_points": {"a": self.point_a.as_dict(), "b": self.point_b.as_dict()},
            "seconds": round(self.seconds, 2),
        }


def _truth(dataset: Dataset, sample: Sample, shape: tuple[int, int]) -> NDArray[np.uint8] | None:
    """The sample's mask, or None for a defective sample without one (not labelled)."""
    if sample.has_defect and (sample.mask is None or not sample.mask.is_file()):
        return None
    return dataset.load_mask(sample, shape)


PartCallback = Callable[[PartResult, dict[str, Any]], None]


def compare_models(
    dataset: Dataset,
    samples: Sequence[Sample],
    a: OpenedModel,
    b: OpenedModel,
    *,
    point_a: OperatingPoint,
    point_b: OperatingPoint,
    split: str = "",
    batch_size: int = 8,
    on_part: PartCallback | None = None,
) -> Comparison:
    """Run both models on ``samples`` (batches of ``batch_size``) and compare them.

    ``on_part(result, arrays)`` is called after each image with ``arrays`` = ``image``,
    ``mask_a``, ``mask_b`` (``(H, W)`` bool) and ``truth`` (``(H, W)`` uint8 or None), e.g. for
    progress and the gallery. ``DataError`` naming the file for an unreadable image or mask.
    """
    result = Comparison(split, point_a, point_b)
    t0 = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images_a = [dataset.load_image(s, a.card.input.channels) for s in chunk]
        images_b = (
            images_a
            if b.card.input.channels == a.card.input.channels
            else [dataset.load_image(s, b.card.input.channels) for s in chunk]
        )
        probs_a = infer_images(images_a, a.predictor, a.card)
        probs_b = infer_images(images_b, b.predictor, b.card)
        for i, sample in enumerate(chunk):
            image = images_a[i]
            mask_a = remove_small(probs_a[i] > point_a.threshold, point_a.min_area_px)
            mask_b = remove_small(probs_b[i] > point_b.threshold, point_b.min_area_px)
            inter = int(np.count_nonzero(mask_a & mask_b))
            union = int(np.count_nonzero(mask_a | mask_b))
            result.inter += inter
            result.union += union
            truth = _truth(dataset, sample, image.shape[:2])
            fail_a, fail_b = bool(mask_a.any()), bool(mask_b.any())
            truth_defect = None
            if truth is not None:
                gt = truth > 0
                truth_defect = bool(gt.any())
                result.truth_a.add(fail_a, truth_defect, mask_a, gt)
                result.truth_b.add(fail_b, truth_defect, mask_b, gt)
            part = PartResult(
                sample,
                fail_a,
                fail_b,
                inter / union if union else None,
                truth_defect,
                int(np.count_nonzero(mask_a)),
                int(np.count_nonzero(mask_b)),
            )
            result.parts.append(part)
            if on_part is not None:
                on_part(part, {"image": image, "mask_a": mask_a, "mask_b": mask_b, "truth": truth})
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- the gallery

A_BGR = (0, 140, 255)  # orange: model A's mask
B_BGR = (255, 120, 0)  # blue: model B's mask
TRUTH_BGR = (0, 220, 255)  # yellow outline: the truth


def _panel(
    image: NDArray[Any], mask: NDArray[np.bool_], colour: tuple[int, int, int], label: str
) -> NDArray[np.uint8]:
    img = image
    if img.dtype != np.uint8:
        img = (img.astype(np.float32) * (255.0 / max(int(img.max()), 1))).astype(np.uint8)
    code = cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR
    out = np.ascontiguousarray(cv2.cvtColor(img, code), dtype=np.uint8)
    if mask.any():
        tint = np.asarray(colour, np.float32)
        out[mask] = (0.45 * out[mask] + 0.55 * tint).astype(np.uint8)
    cv2.putText(out, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def disagreement_panel(
    part: PartResult, arrays: dict[str, Any], *, scale_to: int = 256
) -> NDArray[np.uint8]:
    """``image | A's mask | B's mask`` (truth outlined in yellow on both masks) as BGR uint8,
    scaled up so small parts stay visible."""
    image = arrays["image"]
    truth = arrays["truth"]
    verdict = {True: "fail", False: "pass"}
    panels = [
        _panel(image, np.zeros(image.shape[:2], bool), (0, 0, 0), part.sample.stem[:28]),
        _panel(image, arrays["mask_a"], A_BGR, f"A: {verdict[part.fail_a]}"),
        _panel(image, arrays["mask_b"], B_BGR, f"B: {verdict[part.fail_b]}"),
    ]
    if truth is not None and truth.any():
        contours, _ = cv2.findContours(
            truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        for p in panels[1:]:
            cv2.drawContours(p, contours, -1, TRUTH_BGR, 1)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    panel = np.hstack([panels[0], gap, panels[1], gap, panels[2]])
    return enlarge(panel, scale_to)


def write_png(path: Path, panel: NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), panel):
        raise DataError(f"{path}: cannot write the gallery image")


def write_index(
    path: Path, title: str, summary: dict[str, Any], rows: Sequence[tuple[PartResult, str]]
) -> None:
    """``index.html`` of the gallery: the summary and one row per disagreeing part."""
    esc = html.escape
    verdict = {True: "fail", False: "pass", None: "-"}
    truth = {True: "defective", False: "good", None: "not labelled"}
    lines = [
        "<!doctype html>",
        f"<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}td,th{padding:4px 8px;"
        "border-bottom:1px solid #ddd;vertical-align:top}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{summary['images']} images, verdicts agree on {summary['agree']} "
        f"({100 * summary['verdict_agreement']:.1f} %), pixel IoU between the two "
        f"{summary['pixel_iou_ab']}. Masks: A orange, B blue, truth outlined yellow.</p>",
        "<table><tr><th>part</th><th>class</th><th>truth</th><th>A</th><th>B</th>"
        "<th>IoU A/B</th><th>image | A | B</th></tr>",
    ]
    for part, png in rows:
        iou = "-" if part.iou_ab is None else f"{part.iou_ab:.3f}"
        lines.append(
            f"<tr><td>{esc(part.sample.stem)}</td><td>{esc(part.sample.cls)}</td>"
            f"<td>{truth[part.truth_defect]}</td><td>{verdict[part.fail_a]}</td>"
            f"<td>{verdict[part.fail_b]}</td><td>{iou}</td>"
            f"<td><img src='{esc(png)}' alt='{esc(part.sample.stem)}'></td></tr>"
        )
    lines += ["</table>", "</body></html>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
