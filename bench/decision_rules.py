"""Would another part decision catch the demo line's misses? The station's region rule against
a two-tier rule, each point chosen on a calibration set and measured on line parts it never saw.

Station rule (what ``defectd calibrate threshold`` chooses from and the station applies): a part
fails when a region (8-connected) of pixels above the threshold ``t`` has at least ``a`` pixels
and a peak probability >= ``s``. Two-tier rule: the same, or a region above ``t`` of at least
``big`` pixels whatever its peak, so that a wide faint region (a stain the model half sees)
fails a part without lowering the bar for small bright specks.

Each rule's point is the grid point with the fewest escapes on the calibration set's ``--split``
at <= ``--target-false-reject`` false rejects (ties: fewer false rejects, then grid order); both
points are then measured on ``--parts`` fresh line parts of ``--seed``, rendered and run
through ONNX Runtime fp32 by ``bench/demo_line.py``'s code.

    python bench/decision_rules.py --model models/demo/model.onnx --calibration runs/line_cal_s21 \
        [--split train] [--target-false-reject 0.04] [--parts 1500] [--seed 37] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from _common import cpu_model, print_rows
from defectd.calibration.threshold import largest_components
from defectd.data.datasets import open_dataset
from defectd.data.synth import DEFECTS
from defectd.log import configure_logging
from defectd.model.card import ModelCard, load_card
from demo_line import line_parts, rates, view_maps

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MIN_SCORES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
MIN_AREAS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)
BIG_AREAS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

Table = NDArray[np.int64]  # (N, T, S): largest region per part, threshold and min peak
Decide = Callable[[Table], NDArray[np.bool_]]


def region_tables(model: Path, card: ModelCard, images: Sequence[NDArray[np.uint8]]) -> Table:
    """Per image, the largest region above each threshold whose peak reaches each min score."""
    maps = view_maps(model, card, images, {()})[()]
    return np.stack([largest_components(prob, THRESHOLDS, MIN_SCORES) for prob in maps])


def station_points() -> list[tuple[dict[str, float], Decide]]:
    """Every station point ``(t, a, s)`` (``s`` 0 or above ``t``) with its decision."""
    out: list[tuple[dict[str, float], Decide]] = []
    for ti, t in enumerate(THRESHOLDS):
        for a in MIN_AREAS:
            for si, s in enumerate(MIN_SCORES):
                if s == 0 or s > t:
                    out.append(
                        ({"t": t, "a": a, "s": s}, lambda x, ti=ti, a=a, si=si: x[:, ti, si] >= a)
                    )
    return out


def two_tier_points() -> list[tuple[dict[str, float], Decide]]:
    """Every two-tier point ``(t, big, a, s)`` with ``s`` above ``t`` and ``big`` above ``a``."""
    out: list[tuple[dict[str, float], Decide]] = []
    for ti, t in enumerate(THRESHOLDS):
        for big in BIG_AREAS:
            for a in MIN_AREAS:
                for si, s in enumerate(MIN_SCORES):
                    if s > t and big > a:
                        out.append(
                            (
                                {"t": t, "big": big, "a": a, "s": s},
                                lambda x, ti=ti, big=big, a=a, si=si: (
                                    (x[:, ti, 0] >= big) | (x[:, ti, si] >= a)
                                ),
                            )
                        )
    return out


def choose(
    points: list[tuple[dict[str, float], Decide]],
    table: Table,
    bad: NDArray[np.bool_],
    target: float,
) -> tuple[dict[str, float], Decide, tuple[float, float]]:
    """The point with the fewest escapes at <= ``target`` false rejects on ``table``."""
    best: tuple[tuple[float, float], dict[str, float], Decide] | None = None
    for point, decide in points:
        e, fr = rates(decide(table), bad)
        if fr <= target + 1e-12 and (best is None or (e, fr) < best[0]):
            best = ((e, fr), point, decide)
    if best is None:
        raise SystemExit(
            f"no point reaches a false-reject rate of {target:g} on the calibration set"
        )
    return best[1], best[2], best[0]


def main() -> None:
    configure_logging("warning", stream=sys.stderr)  # stdout carries the results only
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, required=True, help="ONNX model with its card")
    ap.add_argument("--calibration", type=Path, required=True, help="dataset folder (manifest)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--target-false-reject", type=float, default=0.04)
    ap.add_argument("--parts", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=37)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    card = load_card(args.model)
    dataset = open_dataset(args.calibration)
    samples = dataset.samples(args.split)
    cal_bad = np.array([s.has_defect for s in samples])
    cal = region_tables(args.model, card, [dataset.load_image(s, 1) for s in samples])
    parts = line_parts(args.parts, args.seed)
    bad = np.array([bool(p.defects) for p in parts])
    line = region_tables(args.model, card, [p.image for p in parts])
    rows: list[dict[str, Any]] = []
    for label, points in (("station", station_points()), ("two-tier", two_tier_points())):
        point, decide, (cal_escape, cal_fr) = choose(points, cal, cal_bad, args.target_false_reject)
        fail = decide(line)
        escape, false_reject = rates(fail, bad)
        missed = {
            k: f"{sum(not f for p, f in zip(parts, fail, strict=True) if k in p.defects)}/"
            f"{sum(k in p.defects for p in parts)}"
            for k in DEFECTS
        }
        rows.append(
            {
                "rule": label,
                "point": point,
                "calibration_escape": round(cal_escape, 4),
                "calibration_false_reject": round(cal_fr, 4),
                "escape": round(escape, 4),
                "false_reject": round(false_reject, 4),
                "missed_by_kind": missed,
            }
        )
    report = {
        "model": str(args.model),
        "calibration": {"data": str(args.calibration), "split": args.split, "parts": len(samples)},
        "parts": args.parts,
        "defective": int(bad.sum()),
        "seed": args.seed,
        "cpu_model": cpu_model(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "rules": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.model}: points chosen on {args.calibration} ({args.split}, {len(samples)} parts, "
        f"false reject <= {args.target_false_reject:g}); measured on {args.parts} line parts "
        f"({report['defective']} defective), seed {args.seed}; {report['cpu_model']}, "
        f"load {report['load_avg_1m']}"
    )
    print_rows(
        ("rule", "point", "cal escape", "cal FR", "escape", "FR", "missed"),
        "{rule:<10}{point_text:<36}{calibration_escape:>11.1%}{calibration_false_reject:>8.1%}"
        "{escape:>8.1%}{false_reject:>7.1%}  {missed_text}",
        (
            {
                **r,
                "point_text": " ".join(f"{k}={v:g}" for k, v in r["point"].items()),
                "missed_text": ", ".join(f"{k} {v}" for k, v in r["missed_by_kind"].items()),
            }
            for r in rows
        ),
        rule=True,
    )


if __name__ == "__main__":
    main()
