"""Small-data study: test Dice when a model sees 10%, 25%, 50% or 100% of a training split,
with and without augmentation, from scratch or started from another line's model (``--init``).

Each cell trains with ``defectd train`` under the same wall-time budget (``--minutes``) and
the same recipe (``--recipe``), then ``defectd eval`` measures it on the untouched ``test``
split. Subsets are drawn by ``group`` (all images of one group together, so near-duplicates of
one part never straddle the cut), seeded, nested (the 10% set lies inside the 25% set, ...);
``val`` and ``test`` stay whole. A subset is a manifest with absolute paths in
``OUT/data_<fraction>/``: no image is copied.

    python bench/small_data.py --data ../shared/datasets/magnetic_tile --out runs/small_data \\
        [--fractions 0.1,0.25,0.5,1] [--augment off,default] [--init none,models/x/best.pt] \\
        [--minutes 10] [--recipe "--size 192 --base 8 ..."] [--dry-run] [--json]

Results go to ``OUT/results.jsonl`` as each cell ends (a rerun skips cells already there), with
the CPU and the load average beside every row; the table at the end compares the cells.
Run it on a quiet machine: cells compare only when they got the same CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import cpu_model, print_rows

# The shipped magnetic-tile recipe (docs/training.md), less what the study varies. The fit
# policy is spelled out: with --init, options not given are the checkpoint's (its line's).
DEFAULT_RECIPE = (
    "--size 192 --resize resize --base 8 --batch-size 8 --lr 3e-3 --loss bce_dice_img "
    "--select-by dice+auroc --epochs 80 --val-every 2 --seed 0"
)


def subset_rows(rows: list[dict[str, str]], fraction: float, seed: int) -> list[dict[str, str]]:
    """``rows`` with the ``train`` split cut to ``fraction`` of its groups (seeded, nested:
    a smaller fraction's groups are a prefix of a larger one's); other splits whole."""
    train_groups = sorted({r.get("group") or r["stem"] for r in rows if _split(r) == "train"})
    order = np.random.default_rng(seed).permutation(len(train_groups))
    keep_n = max(1, math.ceil(fraction * len(train_groups)))
    keep = {train_groups[i] for i in order[:keep_n]}
    return [r for r in rows if _split(r) != "train" or (r.get("group") or r["stem"]) in keep]


def _split(row: dict[str, str]) -> str:
    return (row.get("split") or "").strip() or "train"


def write_subset(data: Path, out: Path, fraction: float, seed: int) -> Path:
    """``out/manifest.csv``: the subset of ``data``'s manifest, paths made absolute."""
    with (data / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or ())
        rows = list(reader)
    kept = subset_rows(rows, fraction, seed)
    path_columns = [c for c in ("image", "mask", "mask_classes") if c in columns]
    out.mkdir(parents=True, exist_ok=True)
    for row in kept:
        for col in path_columns:
            if row.get(col):
                row[col] = str((data / row[col]).resolve())
    if (data / "classes.txt").is_file():
        (out / "classes.txt").write_text((data / "classes.txt").read_text())
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
    return out


def _defectd(*args: str) -> list[str]:
    return [sys.executable, "-m", "defectd", *args]


def run_cell(
    subset: Path, run: Path, *, augment: str, init: str, minutes: float, recipe: list[str]
) -> dict[str, Any]:
    """Train one cell and evaluate it on ``test``; the row for the table."""
    train = _defectd(
        "train", "--data", str(subset), "--out", str(run), "--augment", augment,
        "--time-limit", f"{minutes:g}", "--force", "--json", *recipe,
    )  # fmt: skip
    if init != "none":
        train += ["--init", init]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    done = subprocess.run(train, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"train failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = time.monotonic() - t0
    ev = subprocess.run(
        _defectd("eval", "--model", str(run / "best.pt"), "--data", str(subset), "--split",
                 "test", "--json"),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if ev.returncode != 0:
        raise SystemExit(f"eval failed ({ev.returncode}): {ev.stderr.strip()[-2000:]}")
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    classes = result.get("classes") or {}
    return {
        "epochs": summary["epochs"],
        "train_min": round(seconds / 60, 1),
        "test_dice": result["dice"],
        "test_iou": result["iou"],
        "test_auroc": result["auroc"],
        "test_mean_class_iou": classes.get("mean_iou"),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/magnetic_tile"))
    ap.add_argument("--out", type=Path, default=Path("runs/small_data"))
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1")
    ap.add_argument("--augment", default="off,default", help="augment presets to compare")
    ap.add_argument("--init", default="none", help="'none' and/or checkpoints to start from")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per cell")
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help="further defectd train options")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    ap.add_argument("--dry-run", action="store_true", help="write the subsets, print the plan")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = ap.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    augments = [a.strip() for a in args.augment.split(",") if a.strip()]
    inits = [i.strip() for i in args.init.split(",") if i.strip()]
    recipe = shlex.split(args.recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    done: dict[tuple[float, str, str], dict[str, Any]] = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["fraction"], row["augment"], row["init"])] = row
    cpu = cpu_model()
    rows = []
    for fraction in fractions:
        subset = write_subset(args.data, args.out / f"data_{fraction:g}", fraction, args.seed)
        n_train = sum(
            1 for r in csv.DictReader((subset / "manifest.csv").open()) if _split(r) == "train"
        )
        for augment in augments:
            for init in inits:
                key = (fraction, augment, init)
                cell = {"fraction": fraction, "train_images": n_train, "augment": augment,
                        "init": init}  # fmt: skip
                if key in done:
                    rows.append(done[key])
                    continue
                if args.dry_run:
                    print(f"would train {cell} for {args.minutes:g} min", file=sys.stderr)
                    continue
                name = (
                    f"run_{fraction:g}_{augment}_{Path(init).stem if init != 'none' else 'scratch'}"
                )
                measured = run_cell(
                    subset,
                    args.out / name,
                    augment=augment,
                    init=init,
                    minutes=args.minutes,
                    recipe=recipe,
                )
                row = {**cell, **measured, "cpu": cpu}
                with results_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                rows.append(row)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"small-data study on {args.data} ({cpu}), {args.minutes:g} min per cell")
    print_rows(
        ("fraction", "train", "augment", "init", "epochs", "min", "test Dice", "AUROC", "load"),
        "{fraction:>8g}  {train_images:>5}  {augment:<8} {init:<12} {epochs:>6}  "
        "{train_min:>5}  {test_dice:>9.4f}  {auroc:>6}  {load_before:>5}",
        [{**r, "init": Path(r["init"]).stem, "auroc": "-" if r["test_auroc"] is None
          else f"{r['test_auroc']:.3f}"} for r in rows],
        rule=True,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
