"""Datasets on disk: both layouts read alike, and every bad input names its file."""

from __future__ import annotations

import csv
import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectd.data.datasets import (
    MVTEC_VAL_PERCENT,
    Sample,
    open_dataset,
)
from defectd.data.synth import write_dataset
from defectd.errors import DataError


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, 24, seed=2, height=40, width=56, defect_rate=0.5)
    return root


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _manifest(root: Path, rows: list[dict[str, str]]) -> None:
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _row(stem: str, has_defect: bool, mask: bool = True, split: str = "train") -> dict[str, str]:
    return {
        "stem": stem,
        "cls": "crack" if has_defect else "free",
        "image": f"images/{stem}.png",
        "mask": f"masks/{stem}.png" if mask else "",
        "split": split,
        "has_defect": "1" if has_defect else "0",
    }


def test_synthetic_set_opens_in_the_manifest_layout(synth_root: Path) -> None:
    ds = open_dataset(synth_root)
    assert ds.layout == "manifest"
    assert len(ds) == 24 and ds.splits == ("test", "train", "val")
    assert set(ds.classes) <= {"scratch", "crack", "pit", "stain", "chip"} and ds.classes
    assert sum(len(ds.samples(s)) for s in ds.splits) == 24


def test_images_and_masks_load_with_matching_shapes(synth_root: Path) -> None:
    ds = open_dataset(synth_root)
    for sample in ds.samples("train"):
        image = ds.load_image(sample, 1)
        mask = ds.load_mask(sample, image.shape[:2])
        assert image.shape == (40, 56) and image.dtype == np.uint8
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert bool(mask.any()) == sample.has_defect


def test_grey_files_load_as_rgb_and_colour_files_as_grey(tmp_path: Path) -> None:
    grey = np.full((8, 9), 100, np.uint8)
    bgr = np.zeros((8, 9, 3), np.uint8)
    bgr[..., 2] = 200  # pure red
    _write_png(tmp_path / "images" / "g.png", grey)
    _write_png(tmp_path / "images" / "c.png", bgr)
    _manifest(tmp_path, [_row("g", False, mask=False), _row("c", False, mask=False)])
    ds = open_dataset(tmp_path)
    g, c = ds.samples()
    assert ds.load_image(g, 3).shape == (8, 9, 3)
    assert (ds.load_image(g, 3) == 100).all()
    rgb = ds.load_image(c, 3)
    assert rgb[0, 0].tolist() == [200, 0, 0]
    assert ds.load_image(c, 1).shape == (8, 9)
    assert ds.load_image(c, 1)[0, 0] == round(0.299 * 200)


def test_good_sample_without_mask_gives_zeros(tmp_path: Path) -> None:
    _write_png(tmp_path / "images" / "a.png", np.zeros((5, 6), np.uint8))
    _write_png(tmp_path / "images" / "b.png", np.zeros((5, 6), np.uint8))
    _write_png(tmp_path / "masks" / "b.png", np.full((5, 6), 255, np.uint8))
    _manifest(tmp_path, [_row("a", False, mask=False), _row("b", True)])
    ds = open_dataset(tmp_path)
    good = ds.samples()[0]
    assert good.mask is None
    assert not ds.load_mask(good, (5, 6)).any()


def _mvtec(root: Path) -> None:
    img = np.full((16, 16, 3), 90, np.uint8)
    for i in range(3):
        _write_png(root / "train" / "good" / f"{i:03d}.png", img)
    for i in range(4):
        _write_png(root / "test" / "good" / f"{i:03d}.png", img)
    for kind in ("crack", "hole"):
        for i in range(8):
            _write_png(root / "test" / kind / f"{i:03d}.png", img)
            m = np.zeros((16, 16), np.uint8)
            m[4:8, 4:8] = 255
            _write_png(root / "ground_truth" / kind / f"{i:03d}_mask.png", m)


def test_mvtec_layout_maps_train_good_and_takes_val_from_test_by_crc32(tmp_path: Path) -> None:
    _mvtec(tmp_path)
    ds = open_dataset(tmp_path)
    assert ds.layout == "mvtec" and ds.classes == ("crack", "hole")
    train = ds.samples("train")
    assert len(train) == 3 and not any(s.has_defect for s in train)
    held_out = [s for s in ds.samples() if s.split in ("val", "test")]
    assert len(held_out) == 20
    for s in held_out:
        expected = "val" if zlib.crc32(s.stem.encode()) % 100 < MVTEC_VAL_PERCENT else "test"
        assert s.split == expected
    crack = next(s for s in held_out if s.cls == "crack")
    assert crack.stem.startswith("crack_") and crack.has_defect
    assert ds.load_mask(crack, (16, 16)).sum() == 16


def test_a_folder_without_masks_names_the_first_missing_mask(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        _write_png(tmp_path / "images" / f"{stem}.png", np.zeros((4, 4), np.uint8))
    _manifest(tmp_path, [_row("a", True), _row("b", True)])
    with pytest.raises(DataError, match=r"masks/a\.png: mask not found; .* without masks"):
        open_dataset(tmp_path)


def test_a_defective_sample_whose_mask_is_missing_names_the_file(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        _write_png(tmp_path / "images" / f"{stem}.png", np.zeros((4, 4), np.uint8))
    _write_png(tmp_path / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    _manifest(tmp_path, [_row("a", True), _row("b", True)])
    ds = open_dataset(tmp_path)
    with pytest.raises(DataError, match=r"masks/b\.png: mask file not found"):
        ds.load_mask(ds.samples()[1], (4, 4))


def test_a_mask_of_the_wrong_size_names_the_file_and_both_sizes(tmp_path: Path) -> None:
    _write_png(tmp_path / "images" / "a.png", np.zeros((10, 12), np.uint8))
    _write_png(tmp_path / "masks" / "a.png", np.zeros((10, 11), np.uint8))
    _manifest(tmp_path, [_row("a", True)])
    ds = open_dataset(tmp_path)
    sample = ds.samples()[0]
    image = ds.load_image(sample, 1)
    with pytest.raises(DataError, match=r"masks/a\.png: mask is 11x10 .* image is 12x10"):
        ds.load_mask(sample, image.shape[:2])


def test_an_empty_split_names_the_split_and_lists_those_there_are(synth_root: Path) -> None:
    ds = open_dataset(synth_root)
    with pytest.raises(DataError, match=r"split 'holdout' has no samples; .*test, train, val"):
        ds.samples("holdout")


def test_splits_joined_by_plus_are_their_union_in_the_datasets_order(synth_root: Path) -> None:
    ds = open_dataset(synth_root)
    both = ds.samples("train+val")
    assert {s.split for s in both} == {"train", "val"}
    assert len(both) == len(ds.samples("train")) + len(ds.samples("val"))
    assert both == [s for s in ds.samples() if s.split in ("train", "val")]
    assert ds.samples("val+train") == both
    assert ds.fingerprint("train+val") != ds.fingerprint("train")
    assert ds.shared("train+val", "val") == len(ds.samples("val"))
    assert ds.shared("train", "val") == 0
    with pytest.raises(DataError, match=r"split 'vall' has no samples; .*test, train, val"):
        ds.samples("train+vall")


def test_an_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _manifest(tmp_path, [_row("a", False, mask=False)])
    ds = open_dataset(tmp_path)
    with pytest.raises(DataError, match=r"images/a\.png: not a readable image"):
        ds.load_image(ds.samples()[0], 1)


def test_a_missing_image_is_named_when_the_set_is_opened(tmp_path: Path) -> None:
    _manifest(tmp_path, [_row("a", False, mask=False)])
    with pytest.raises(DataError, match=r"images/a\.png: image file not found"):
        open_dataset(tmp_path)


def test_a_folder_of_another_layout_says_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "pictures").mkdir()
    with pytest.raises(DataError, match=r"not a dataset folder: expected manifest\.csv"):
        open_dataset(tmp_path)


def test_fingerprint_follows_content_not_location(synth_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(synth_root, copy)
    original = open_dataset(synth_root).fingerprint("train")
    assert open_dataset(copy).fingerprint("train") == original
    assert open_dataset(copy).fingerprint("val") != original
    sample: Sample = open_dataset(copy).samples("train")[0]
    sample.image.write_bytes(sample.image.read_bytes() + b"\0")
    assert open_dataset(copy).fingerprint("train") != original
