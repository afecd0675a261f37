"""How fast synthetic parts render and augmentation runs.

Rows: a banked part (``PartRenderer.render``, grey and RGB, 30% defective) against the
baseline of rendering its texture from scratch (``render_texture``), at 256² and 512²; the
training augmentation (default config) against a plain image copy, at 256².
Each figure is the median over ``--repeats`` runs of the mean over ``--parts`` calls.

    python bench/bench_synth.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np

from _common import print_rows
from defectd.data.synth import SURFACES, PartRenderer, render_texture
from defectd.log import configure_logging
from defectd.training.augment import Augment


def per_call_ms(fn: Callable[[int], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean milliseconds per call of ``fn(i)``."""
    fn(0)  # warm-up (banks, caches)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        runs.append((time.perf_counter() - t0) * 1000 / calls)
    return statistics.median(runs)


def run(quick: bool) -> list[dict[str, object]]:
    calls, repeats = (20, 3) if quick else (100, 5)
    rows: list[dict[str, object]] = []
    rng = np.random.default_rng(0)
    for size in (256, 512):
        base = per_call_ms(
            lambda i, s=size: render_texture(rng, s, s, SURFACES[i % 4]),
            max(4, calls // 10),
            repeats,
        )
        rows.append({"what": "texture from scratch", "size": size, "ms": base, "ratio": 1.0})
        for channels in (1, 3):
            renderer = PartRenderer(size, size, channels)
            ms = per_call_ms(lambda _i, r=renderer: r.render(rng), calls, repeats)
            name = f"banked part ({'grey' if channels == 1 else 'RGB'})"
            rows.append({"what": name, "size": size, "ms": ms, "ratio": ms / base})
    part = PartRenderer(256, 256).render(np.random.default_rng(1), defect_prob=1.0)
    rng = np.random.default_rng(2)
    turn = cv2.getRotationMatrix2D((127.5, 127.5), 5.0, 1.1)

    def warp_pair(_i: int) -> object:
        cv2.warpAffine(part.image, turn, (256, 256), flags=cv2.INTER_LINEAR)
        return cv2.warpAffine(part.mask, turn, (256, 256), flags=cv2.INTER_NEAREST)

    warp_ms = per_call_ms(warp_pair, calls * 5, repeats)
    rows.append({"what": "one warp of image+mask", "size": 256, "ms": warp_ms, "ratio": 1.0})
    augment = Augment()
    aug_ms = per_call_ms(lambda _i: augment(part.image, part.mask, rng), calls * 5, repeats)
    rows.append({"what": "augment (default)", "size": 256, "ms": aug_ms, "ratio": aug_ms / warp_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (< 30 s)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    configure_logging("warning")  # logs to stderr; stdout holds only the table or JSON
    rows = run(args.quick)
    if args.json:
        print(json.dumps({"bench": "synth", "quick": args.quick, "rows": rows}))
        return
    print_rows(
        ["what", "size", "ms/call", "x baseline"],
        "{what:<24} {size:>5} {ms:>9.3f} {ratio:>11.3f}",
        rows,
    )


if __name__ == "__main__":
    main()
