"""PNG plots of a threshold calibration (matplotlib, Agg backend: no display needed).

Three files in the report folder:

- ``precision_recall.png`` -- image-level precision/recall over the pixel threshold (at the
  chosen min area and score) and pixel-level precision/recall, chosen threshold marked;
- ``false_reject_vs_escape.png`` -- every swept operating point, the Pareto front, the target
  and the chosen point with its 95% intervals;
- ``pixel_iou_dice.png`` -- pixel IoU and Dice per threshold, chosen threshold marked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from defectd.calibration.threshold import (
    OperatingPoint,
    Sweep,
    TargetKind,
    image_pr_curve,
    pareto_front,
)


def write_plots(
    sweep: Sweep,
    chosen: OperatingPoint,
    target: TargetKind,
    target_rate: float,
    out_dir: Path,
    *,
    title: str = "",
) -> list[Path]:
    """Write the three plots into ``out_dir`` (created); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _precision_recall(sweep, chosen, out_dir / "precision_recall.png", title),
        _fr_vs_escape(sweep, chosen, target, target_rate, out_dir / "false_reject_vs_escape.png"),
        _iou_dice(sweep, chosen, out_dir / "pixel_iou_dice.png", title),
    ]


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _precision_recall(sweep: Sweep, chosen: OperatingPoint, path: Path, title: str) -> Path:
    img = image_pr_curve(sweep, chosen.min_area_px, chosen.min_score)
    pix = sweep.pixel_metrics()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(
        [r["recall"] for r in img],
        [r["precision"] for r in img],
        "o-",
        ms=3,
        label=f"image level (min area {chosen.min_area_px} px)",
    )
    ax.plot([r["recall"] for r in pix], [r["precision"] for r in pix], "s-", ms=3, label="pixel")
    for rows, marker in ((img, "*"), (pix, "D")):
        at = min(rows, key=lambda r: abs(r["threshold"] - chosen.pixel_threshold))
        ax.plot(at["recall"], at["precision"], marker, color="red", ms=11)
    ax.plot([], [], "*", color="red", label=f"chosen threshold {chosen.pixel_threshold:g}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title(f"Precision-recall {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _fr_vs_escape(
    sweep: Sweep, chosen: OperatingPoint, target: TargetKind, target_rate: float, path: Path
) -> Path:
    points = sweep.points()
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(
        [p.escape.rate for p in points],
        [p.false_reject.rate for p in points],
        s=4,
        alpha=0.25,
        color="grey",
        label="swept points",
    )
    ax.step(
        [p.escape.rate for p in front],
        [p.false_reject.rate for p in front],
        where="post",
        color="C0",
        label="best trade-off",
    )
    e_lo, e_hi = chosen.escape.interval
    f_lo, f_hi = chosen.false_reject.interval
    ax.errorbar(
        [chosen.escape.rate],
        [chosen.false_reject.rate],
        xerr=[[chosen.escape.rate - e_lo], [e_hi - chosen.escape.rate]],
        yerr=[[chosen.false_reject.rate - f_lo], [f_hi - chosen.false_reject.rate]],
        fmt="*",
        color="red",
        ms=13,
        capsize=3,
        label=(f"chosen: t={chosen.pixel_threshold:g}, area>={chosen.min_area_px} px (95% CI)"),
    )
    if target == "escape":
        ax.axvline(target_rate, color="red", ls="--", lw=1, label=f"target escape {target_rate:g}")
    else:
        ax.axhline(
            target_rate, color="red", ls="--", lw=1, label=f"target false reject {target_rate:g}"
        )
    ax.set(
        xlabel=f"escape rate (defective passed / {sweep.n_defective})",
        ylabel=f"false-reject rate (good rejected / {sweep.n_good})",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
    )
    ax.set_title("False reject vs escape")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def _iou_dice(sweep: Sweep, chosen: OperatingPoint, path: Path, title: str) -> Path:
    rows = sweep.pixel_metrics()
    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, [r["iou"] for r in rows], "o-", ms=3, label="pixel IoU")
    ax.plot(t, [r["dice"] for r in rows], "s-", ms=3, label="pixel Dice")
    ax.axvline(chosen.pixel_threshold, color="red", ls="--", lw=1, label="chosen threshold")
    ax.set(xlabel="pixel threshold", ylabel="score", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"Pixel IoU / Dice per threshold {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
