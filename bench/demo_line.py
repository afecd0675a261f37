"""Demo models on the demo line's parts: image AUROC, escapes and false rejects, by defect kind.

Renders ``--parts`` parts as the demo line does (``PartRenderer`` at 256x256, defect rate 0.3,
``--seed``; ``--seed`` repeated pools ``--parts`` parts of each seed into one sample), runs each
``--model`` on them through ONNX Runtime (fp32, the card's input normalisation), and decides
each part as the station's area rule does: a part fails when a region (8-connected) of pixels at
or above the threshold has at least the minimum area. For each model: image AUROC (score =
highest pixel probability), escapes and false rejects at the card's operating point (counts,
rates and Wilson 95% intervals; per seed too when pooled), escapes by defect kind, escapes and
false rejects by surface (where on the line a model's mistakes are), and the lowest escape rate
any point of the threshold x min-area grid that ``defectd calibrate threshold`` sweeps reaches
at <= ``--max-false-reject`` false rejects. Compare models within one run (same parts): every
row after the first is also compared with the first, part by part: the difference in that lowest
escape with a paired bootstrap 95% interval (the parts resampled, both models on each draw, the
lowest point chosen again in each), and how many defective parts each catches that the other
misses.

``--flips h`` (or ``v``, ``hv``) also measures each model with its probability map averaged over
flipped views of the part (h: the part and its mirror, 2x the inference; hv: four views, 4x):
what test-time augmentation (``defectd export --flips``) would buy at the card's point and on
the grid.

``--contrast`` says how faint the defects a model missed were: each defective part is rendered
again without its defects (its defect-free twin: same texture, light and noise), and per
defect kind the bench prints the median contrast (mean absolute grey-level difference between
the part and its twin over the defect's pixels) of the parts caught and of those missed, and how
many misses the model did not see at all (highest probability inside the defect below 0.01);
``--json`` then lists every escape with its kind, surface, area, contrast and peak probability.

``--overlays DIR`` draws the escapes and false rejects at the card's point, as ``defectd eval
--overlays`` does (part | truth | prediction: green found, red false alarm, blue missed), one
PNG per part named by model, views, outcome, index and defect kinds.

    python bench/demo_line.py --model models/demo/model.onnx [--model OTHER.onnx]
                              [--flips h] [--flips hv] [--parts 1500] [--seed 7 ...] [--json]
                              [--contrast] [--overlays DIR] [--overlay-count 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from _common import cpu_model
from defectd.calibration.threshold import (
    DEFAULT_MIN_AREAS,
    DEFAULT_THRESHOLDS,
    Rate,
    largest_components,
)
from defectd.data.datasets import Sample
from defectd.data.metrics import UNSEEN_BELOW, auroc
from defectd.data.synth import DEFECTS, SURFACES, PartRenderer, SynthPart
from defectd.log import configure_logging
from defectd.model.card import ModelCard, load_card
from defectd.model.views import VIEWS, Flips, View, check_flips
from defectd.training.evaluate import Prediction
from defectd.training.overlays import overlay, write_overlay

SIZE = 256
DEFECT_RATE = 0.3  # the demo line's (configs/demo.toml)
# The grid `defectd calibrate threshold` sweeps (thresholds from 0.001: a model trained with an
# image-level loss can sit its best points far below 0.5), so "the lowest escape" is one the
# station's calibration could choose.
GRID_THRESHOLDS = np.asarray(DEFAULT_THRESHOLDS)
GRID_MIN_AREAS = tuple(sorted({max(a, 1) for a in DEFAULT_MIN_AREAS}))  # 0 px decides as 1
CONTEXT = 8  # px around a defect's box over which the surface's own variation is taken
UNSEEN = UNSEEN_BELOW  # not seen at all below it: eval's cut-off for thresholds of 0.1 and up
RESAMPLES = 2000  # bootstrap resamples of the parts for the paired comparison of two models


def line_parts(count: int, seed: int) -> list[SynthPart]:
    """``count`` parts as the demo line renders them (256x256, defect rate 0.3) from ``seed``."""
    return [part for part, _ in line_parts_with_twins(count, seed, twins=False)]


def line_parts_with_twins(
    count: int, seed: int, *, twins: bool = True
) -> list[tuple[SynthPart, NDArray[np.uint8] | None]]:
    """The parts of :func:`line_parts`, each defective one with its defect-free twin (the same
    generator state rendered with ``defect_prob=0``: same texture, light and noise)."""
    renderer = PartRenderer(SIZE, SIZE)
    rng = np.random.default_rng(seed)
    out: list[tuple[SynthPart, NDArray[np.uint8] | None]] = []
    for _ in range(count):
        state = rng.bit_generator.state
        part = renderer.render(rng, defect_prob=DEFECT_RATE)
        twin = None
        if twins and part.defects:
            again = np.random.default_rng()
            again.bit_generator.state = state
            twin = renderer.render(again, defect_prob=0.0).image
        out.append((part, twin))
    return out


def pooled_parts(
    count: int, seeds: Sequence[int], *, twins: bool = True
) -> list[tuple[SynthPart, NDArray[np.uint8] | None]]:
    """:func:`line_parts_with_twins` of each seed in turn, ``count`` parts each: one sample of
    ``count * len(seeds)`` parts, the same parts a run per seed reads."""
    return [pair for seed in seeds for pair in line_parts_with_twins(count, seed, twins=twins)]


def counted(fail: NDArray[np.bool_], bad: NDArray[np.bool_]) -> dict[str, dict[str, Any]]:
    """Escapes and false rejects of ``fail`` as counts with their Wilson 95% intervals."""
    return {
        "escape": Rate(int((~fail & bad).sum()), int(bad.sum())).as_dict(),
        "false_reject": Rate(int((fail & ~bad).sum()), int((~bad).sum())).as_dict(),
    }


def contrast_of(part: SynthPart, twin: NDArray[np.uint8]) -> tuple[float, float]:
    """How far the drawn defects moved the surface they were drawn on: the mean absolute
    grey-level difference between a part and its defect-free twin over the defect's pixels, and
    the standard deviation of the twin's grey levels around the defect (its box widened by
    ``CONTEXT`` px), what the surface itself varies by there."""
    sel = part.mask > 0
    if not sel.any():
        return 0.0, 0.0
    diff = np.abs(part.image.astype(np.float32) - twin.astype(np.float32))
    ys, xs = np.nonzero(sel)
    y0, y1 = max(int(ys.min()) - CONTEXT, 0), int(ys.max()) + CONTEXT + 1
    x0, x1 = max(int(xs.min()) - CONTEXT, 0), int(xs.max()) + CONTEXT + 1
    return float(diff[sel].mean()), float(twin[y0:y1, x0:x1].astype(np.float32).std())


def contrast_report(
    parts: list[SynthPart],
    contrasts: list[tuple[float, float] | None],
    probs: NDArray[np.float32],
    fail: NDArray[np.bool_],
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per defect kind (parts whose defects are all of that kind): parts, escapes, median
    contrast and contrast-to-surface ratio of the caught and of the escaped, escapes not seen at
    all; and every escape. ``contrasts`` holds :func:`contrast_of` per defective part (None for
    a good one), computed once for every model measured on the parts."""
    # Per kind: (caught, contrast, contrast over the surface's variation, peak in the defect).
    by_kind: dict[str, list[tuple[bool, float, float, float]]] = {}
    escapes: list[dict[str, Any]] = []
    for i, (part, measured) in enumerate(zip(parts, contrasts, strict=True)):
        if measured is None:
            continue
        contrast, surface_std = measured
        defect = part.mask > 0
        peak = float(probs[i][defect].max()) if defect.any() else 0.0
        caught = bool(fail[i])
        if not caught:
            escapes.append(
                {
                    "index": i,
                    "defects": list(part.defects),
                    "surface": part.surface,
                    "area_px": int(np.count_nonzero(defect)),
                    "contrast": round(contrast, 1),
                    "surface_std": round(surface_std, 1),
                    "peak_probability": round(peak, 4),
                }
            )
        if len(set(part.defects)) == 1:
            ratio = contrast / max(surface_std, 1e-6)
            by_kind.setdefault(part.defects[0], []).append((caught, contrast, ratio, peak))

    def median(values: list[float], digits: int = 1) -> float | None:
        return round(float(np.median(values)), digits) if values else None

    summary = {}
    for kind in DEFECTS:
        rows = by_kind.get(kind, [])
        if not rows:
            continue
        hit = [r for r in rows if r[0]]
        missed = [r for r in rows if not r[0]]
        summary[kind] = {
            "parts": len(rows),
            "escapes": len(missed),
            "median_contrast_caught": median([r[1] for r in hit]),
            "median_contrast_escaped": median([r[1] for r in missed]),
            "median_ratio_caught": median([r[2] for r in hit], 2),
            "median_ratio_escaped": median([r[2] for r in missed], 2),
            "escapes_unseen": sum(r[3] < UNSEEN for r in missed),
        }
    return summary, escapes


def view_maps(
    model: Path,
    card: ModelCard,
    images: Sequence[NDArray[np.uint8]],
    views: set[View],
    batch: int = 16,
) -> dict[View, NDArray[np.float32]]:
    """Per flipped view, ``(N, H, W)`` defect probabilities of ``model`` for the grey images
    (each view's map flipped back): one inference pass per view, shared by every ``--flips``."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out: dict[View, list[NDArray[np.float32]]] = {axes: [] for axes in views}
    for i in range(0, len(images), batch):
        x = card.normalisation.apply(np.stack(images[i : i + batch])[:, None])
        for axes in views:
            y = session.run(None, {name: np.ascontiguousarray(np.flip(x, axes))})[0]
            out[axes].append(np.flip(y, axes)[:, 0])
    return {axes: np.concatenate(maps) for axes, maps in out.items()}


def decisions(
    card: ModelCard, probs: NDArray[np.float32]
) -> tuple[list[float], NDArray[np.int64], NDArray[np.bool_]]:
    """The grid's thresholds (the card's among them), the ``(N, T)`` largest region per part
    and threshold (strictly above, like the station), and per part whether it fails at the
    card's point (a region of at least the minimum area)."""
    thresholds = sorted({*GRID_THRESHOLDS.tolist(), card.threshold})
    largest = np.stack([largest_components(p, thresholds, [0.0])[:, 0] for p in probs])
    fail = largest[:, thresholds.index(card.threshold)] >= max(card.min_area_px, 1)
    return thresholds, largest, np.asarray(fail)


def rates(fail: NDArray[np.bool_], bad: NDArray[np.bool_]) -> tuple[float, float]:
    """(escape rate, false-reject rate) of part decisions against the truth."""
    return float(np.mean(~fail[bad])), float(np.mean(fail[~bad]))


def grid_fails(largest: NDArray[np.int64]) -> NDArray[np.bool_]:
    """``(N, G)``: whether each part fails at each grid point (threshold x minimum area), from
    the ``(N, T)`` largest region per part and threshold."""
    areas = np.asarray(GRID_MIN_AREAS)
    return np.asarray((largest[:, :, None] >= areas[None, None, :]).reshape(len(largest), -1))


def grid_rates(
    bad: NDArray[np.bool_], fails: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Escape and false-reject rate at each grid point (each column of ``fails``, ``(N, G)``)."""
    return (~fails[bad]).mean(axis=0), fails[~bad].mean(axis=0)


def lowest_point(
    bad: NDArray[np.bool_], fails: NDArray[np.bool_], max_false_reject: float
) -> int | None:
    """The grid point (column of ``fails``) with the lowest escape rate at <=
    ``max_false_reject`` false rejects, the first in grid order on a tie; None where none is
    within the limit."""
    escape, false_reject = grid_rates(bad, fails)
    within = np.flatnonzero(false_reject <= max_false_reject)
    return int(within[np.argmin(escape[within])]) if within.size else None


def lowest_escapes(
    weights: NDArray[np.float64],
    bad: NDArray[np.bool_],
    fails: NDArray[np.bool_],
    max_false_reject: float,
) -> NDArray[np.float64]:
    """:func:`lowest_point`'s escape rate with the parts weighted, per row of ``weights``
    (``(B, N)``: how often each part is drawn); NaN where no point is within the limit."""
    f = fails.astype(np.float64)
    wb, wg = weights * bad, weights * ~bad
    escape = (wb @ (1.0 - f)) / np.maximum(wb.sum(axis=1, keepdims=True), 1e-12)
    false_reject = (wg @ f) / np.maximum(wg.sum(axis=1, keepdims=True), 1e-12)
    lowest = np.where(false_reject <= max_false_reject, escape, np.inf).min(axis=1)
    return np.where(np.isfinite(lowest), lowest, np.nan)


def paired_comparison(
    bad: NDArray[np.bool_],
    first: NDArray[np.bool_],
    other: NDArray[np.bool_],
    *,
    max_false_reject: float,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any] | None:
    """``other`` against ``first`` (each ``(N, G)`` grid decisions on the same parts): the
    difference in lowest escape at <= ``max_false_reject`` false rejects (other - first) with a
    paired bootstrap 95% interval (parts resampled, both models on the same draw, the lowest
    point chosen again in each), and the defective parts each catches at its lowest point that
    the other does not. None where either model has no point within the false-reject limit."""
    i, j = (lowest_point(bad, fails, max_false_reject) for fails in (first, other))
    if i is None or j is None:
        return None
    difference = grid_rates(bad, other)[0][j] - grid_rates(bad, first)[0][i]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(bad), size=(resamples, len(bad)))
    weights = np.stack([np.bincount(d, minlength=len(bad)) for d in draws]).astype(np.float64)
    diff = lowest_escapes(weights, bad, other, max_false_reject) - lowest_escapes(
        weights, bad, first, max_false_reject
    )
    low, high = np.nanpercentile(diff, [2.5, 97.5])
    a, b = first[:, i] & bad, other[:, j] & bad  # caught at each one's lowest point
    return {
        "difference": round(float(difference), 4),
        "low": round(float(low), 4),
        "high": round(float(high), 4),
        "resamples": resamples,
        "caught_by_first_only": int((a & ~b).sum()),
        "caught_by_this_only": int((b & ~a).sum()),
    }


def measure(
    model: Path,
    card: ModelCard,
    parts: list[SynthPart],
    probs: NDArray[np.float32],
    *,
    max_false_reject: float,
    flips: str,
) -> tuple[dict[str, Any], NDArray[np.bool_], NDArray[np.bool_]]:
    """Decisions on ``probs`` (``(N, H, W)``) at the card's point and on the grid, by the
    largest region above the threshold as calibration and the station measure it; the row,
    per part whether it fails at the card's point, and per part and grid point whether it
    fails there (:func:`grid_fails`)."""
    bad = np.array([bool(p.defects) for p in parts])
    thresholds, largest, fail = decisions(card, probs)
    escape, false_reject = rates(fail, bad)
    missed: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    by_surface: dict[str, Counter[str]] = {s: Counter() for s in SURFACES}
    for part, failed in zip(parts, fail, strict=True):
        for kind in set(part.defects):
            seen[kind] += 1
            missed[kind] += int(not failed)
        tally = by_surface[part.surface]
        if part.defects:
            tally["defective"] += 1
            tally["escapes"] += int(not failed)
        else:
            tally["good"] += 1
            tally["false_rejects"] += int(failed)
    grid = grid_fails(largest)
    j = lowest_point(bad, grid, max_false_reject)
    best: dict[str, float] | None = None
    if j is not None:
        escapes, false_rejects = grid_rates(bad, grid)
        t, a = divmod(j, len(GRID_MIN_AREAS))
        best = {
            "threshold": float(thresholds[t]),
            "min_area_px": GRID_MIN_AREAS[a],
            "escape": float(escapes[j]),
            "false_reject": float(false_rejects[j]),
        }
    row = {
        "model": str(model),
        "flips": flips,
        "threshold": card.threshold,
        "min_area_px": card.min_area_px,
        "auroc": round(auroc(bad, probs.reshape(len(parts), -1).max(axis=1)), 4),
        "escape": round(escape, 4),
        "false_reject": round(false_reject, 4),
        "at_card_point": counted(fail, bad),
        "missed_by_kind": {k: f"{missed[k]}/{seen[k]}" for k in DEFECTS if seen[k]},
        "by_surface": {
            s: {
                "escapes": f"{t['escapes']}/{t['defective']}",
                "false_rejects": f"{t['false_rejects']}/{t['good']}",
            }
            for s, t in by_surface.items()
            if t
        },
        "best_at_false_reject": best,
    }
    return row, fail, grid


def draw_mistakes(
    out: Path,
    label: str,
    card: ModelCard,
    parts: list[SynthPart],
    probs: NDArray[np.float32],
    *,
    fail: NDArray[np.bool_],
    count: int,
) -> int:
    """Overlays of the first ``count`` escapes and ``count`` false rejects; how many written."""
    written = 0
    bad = np.array([bool(p.defects) for p in parts])
    for outcome, wrong in (("escape", bad & ~fail), ("false-reject", ~bad & fail)):
        for i in np.flatnonzero(wrong)[:count]:
            part = parts[i]
            kinds = "+".join(part.defects) or "good"
            sample = Sample(f"part{i}", kinds, Path(f"part{i}.png"), None, "line", bad[i], "")
            pred = Prediction(sample, part.image, part.mask, probs[i])
            panel = overlay(pred, card.threshold, max(card.min_area_px, 1))
            write_overlay(out / f"{label}-{outcome}-{i:04d}-{kinds}.png", panel)
            written += 1
    return written


def counted_text(figures: dict[str, dict[str, Any]]) -> str:
    """One line of :func:`counted`'s figures: counts, rates and Wilson 95% intervals."""
    return "; ".join(
        f"{what} {f['k']} of {f['n']}, {f['rate']:.1%} ({f['low']:.1%} to {f['high']:.1%})"
        for what, f in (("escapes", figures["escape"]), ("false rejects", figures["false_reject"]))
    )


def main() -> None:
    configure_logging("warning", stream=sys.stderr)  # stdout carries the results only
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", type=Path, action="append", required=True, help="ONNX model with its card"
    )
    ap.add_argument(
        "--flips",
        choices=[v for v in VIEWS if v != "none"],
        action="append",
        default=[],
        help="also measure each model averaged over these flipped views (repeatable)",
    )
    ap.add_argument("--parts", type=int, default=1500)
    ap.add_argument(
        "--seed",
        type=int,
        action="append",
        help="line seed (default 7); repeat to pool --parts parts of each seed into one sample",
    )
    ap.add_argument("--max-false-reject", type=float, default=0.05)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--contrast",
        action="store_true",
        help="compare each defect with its defect-free twin: how faint the escapes were",
    )
    ap.add_argument(
        "--overlays", type=Path, help="write PNGs of escapes and false rejects into this folder"
    )
    ap.add_argument("--overlay-count", type=int, default=12, help="of each outcome, per row")
    args = ap.parse_args()
    seeds: list[int] = args.seed or [7]
    if len(set(seeds)) != len(seeds):
        ap.error(f"--seed {seeds}: each seed once (a repeated seed counts its parts twice)")
    pairs = pooled_parts(args.parts, seeds, twins=args.contrast)
    parts = [part for part, _ in pairs]
    # Properties of the parts, not of a model: measured once for every row below.
    contrasts = [None if twin is None else contrast_of(part, twin) for part, twin in pairs]
    bad = np.array([bool(p.defects) for p in parts])
    rows: list[dict[str, Any]] = []
    first_grid: NDArray[np.bool_] | None = None
    for model in args.model:
        card = load_card(model)
        wanted: list[Flips] = ["none", *(check_flips(f) for f in args.flips)]
        views = {axes for f in wanted for axes in VIEWS[f]}
        maps = view_maps(model, card, [p.image for p in parts], views)
        for flips in wanted:
            probs = np.asarray(
                np.mean([maps[axes] for axes in VIEWS[flips]], axis=0), dtype=np.float32
            )
            row, fail, grid = measure(
                model, card, parts, probs, max_false_reject=args.max_false_reject, flips=flips
            )
            if first_grid is None:
                first_grid = grid
            else:
                row["against_first"] = paired_comparison(
                    bad, first_grid, grid, max_false_reject=args.max_false_reject
                )
            if len(seeds) > 1:
                row["by_seed"] = {
                    str(seed): counted(fail[i : i + args.parts], bad[i : i + args.parts])
                    for i, seed in zip(range(0, len(parts), args.parts), seeds, strict=True)
                }
            if args.contrast:
                row["contrast"], row["escapes"] = contrast_report(parts, contrasts, probs, fail)
            if args.overlays is not None:
                label = f"{model.parent.name or model.stem}-{flips}"
                row["overlays"] = draw_mistakes(
                    args.overlays, label, card, parts, probs, fail=fail, count=args.overlay_count
                )
            rows.append(row)
    report: dict[str, Any] = {
        "parts": len(parts),
        "defective": int(bad.sum()),
        "seeds": seeds,
        **({"seed": seeds[0]} if len(seeds) == 1 else {}),
        "cpu_model": cpu_model(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "models": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['parts']} parts ({report['defective']} defective), "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, "
        f"{report['cpu_model']}, load {report['load_avg_1m']}"
    )
    for row in report["models"]:
        best = row["best_at_false_reject"]
        print(
            f"\n{row['model']}"
            + (f" (flips {row['flips']})" if row["flips"] != "none" else "")
            + f": AUROC {row['auroc']:.3f}; at the card's point "
            f"({row['threshold']}, {row['min_area_px']} px) escape {row['escape']:.1%}, "
            f"false reject {row['false_reject']:.1%}; missed {row['missed_by_kind']}"
        )
        print(f"  at the card's point: {counted_text(row['at_card_point'])}")
        for seed, figures in row.get("by_seed", {}).items():
            print(f"    seed {seed}: {counted_text(figures)}")
        surfaces = ", ".join(
            f"{s} {t['escapes']} / {t['false_rejects']}" for s, t in row["by_surface"].items()
        )
        print(f"  by surface (escapes / false rejects): {surfaces}")
        if "contrast" in row:
            print(
                "  contrast against the defect-free twin, median of the caught / of the missed "
                "(grey levels; over the surface's own standard deviation there):"
            )
            for k, figures in row["contrast"].items():
                c = {key: "-" if v is None else v for key, v in figures.items()}
                print(
                    f"    {k}: {c['median_contrast_caught']} / {c['median_contrast_escaped']} "
                    f"({c['median_ratio_caught']} / {c['median_ratio_escaped']}); "
                    f"{c['escapes']} of {c['parts']} missed, {c['escapes_unseen']} not seen "
                    f"(peak probability in the defect < {UNSEEN})"
                )
        if best is not None:
            print(
                f"  lowest escape at <= {args.max_false_reject:.0%} false rejects: "
                f"{best['escape']:.1%} (false reject {best['false_reject']:.1%}, "
                f"threshold {best['threshold']}, min area {best['min_area_px']} px)"
            )
        paired = row.get("against_first")
        if paired is not None:
            print(
                f"  against the first row, lowest escape {100 * paired['difference']:+.1f} "
                f"points (paired bootstrap 95% interval {100 * paired['low']:+.1f} to "
                f"{100 * paired['high']:+.1f}, {paired['resamples']} resamples of the parts); "
                f"defective parts caught only by the first {paired['caught_by_first_only']}, "
                f"only by this {paired['caught_by_this_only']}"
            )


if __name__ == "__main__":
    main()
