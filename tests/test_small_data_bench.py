"""bench/small_data.py: group-wise nested subsets of the training split, and one cell run end
to end (train under a time budget, eval on the untouched test split)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest


@pytest.fixture(scope="module")
def small_data(bench_module: Callable[[str], ModuleType]) -> ModuleType:
    return bench_module("small_data")


def write_grouped_set(root: Path) -> Path:
    """32x32 parts: 20 train groups of two images each, 4 val and 4 test images."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        split = "train" if i < 40 else ("val" if i < 44 else "test")
        image = rng.integers(60, 100, (32, 32), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        if i % 2:
            mask[8:16, 8:16] = 1
            image[mask > 0] = 220
        stem = f"p{i:02d}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask * 255)
        group = f"g{i // 2}" if split == "train" else stem
        rows.append([stem, "sq" if i % 2 else "free", f"images/{stem}.png",
                     f"masks/{stem}.png", split, i % 2, group])  # fmt: skip
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "cls", "image", "mask", "split", "has_defect", "group"])
        writer.writerows(rows)
    return root


def rows_of(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_subsets_are_nested_group_wise_and_keep_val_and_test(
    small_data: ModuleType, tmp_path: Path
) -> None:
    data = write_grouped_set(tmp_path / "data")
    kept = {}
    for fraction in (0.1, 0.25, 0.5, 1.0):
        rows = rows_of(small_data.write_subset(data, tmp_path / f"s{fraction}", fraction, 0))
        train = [r for r in rows if r["split"] == "train"]
        assert {r["split"] for r in rows if r["split"] != "train"} == {"val", "test"}
        assert sum(r["split"] != "train" for r in rows) == 8
        groups = {r["group"] for r in train}
        assert len(groups) == max(1, round(20 * fraction + 0.4999))
        assert all(sum(r["group"] == g for r in train) == 2 for g in groups)  # whole groups
        assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows)
        kept[fraction] = groups
    assert kept[0.1] <= kept[0.25] <= kept[0.5] <= kept[1.0]


def test_one_cell_trains_within_its_budget_and_is_measured_on_test(
    small_data: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_grouped_set(tmp_path / "data")
    out = tmp_path / "study"
    recipe = "--size 32 --base 4 --depth 2 --epochs 2 --batch-size 4 --threads 1"
    args = ["--data", str(data), "--out", str(out), "--fractions", "0.5", "--augment", "off"]
    assert small_data.main([*args, "--minutes", "1", "--recipe", recipe, "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["fraction"], row["train_images"], row["augment"], row["init"]) == (
        0.5, 20, "off", "none",
    )  # fmt: skip
    assert 0.0 <= row["test_dice"] <= 1.0 and row["epochs"] == 2 and row["cpu"]
    # A second run finds the cell done and trains nothing.
    assert small_data.main([*args, "--minutes", "1", "--recipe", recipe, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == row
