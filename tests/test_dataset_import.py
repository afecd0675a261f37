"""``defectd dataset import``: folder pairs and COCO JSON into the manifest layout, read back by
``open_dataset`` (the reader train/eval/calibrate use), with a validation report."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from defectd.cli import main
from defectd.data.datasets import open_dataset
from defectd.data.importer import import_dataset
from defectd.errors import ConfigError, DataError


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _pairs(root: Path, n: int = 10) -> Path:
    """``n`` 32x32 images; even ones with a 0/255 square defect, odd ones with an empty mask."""
    rng = np.random.default_rng(0)
    for i in range(n):
        _png(root / "images" / f"p{i:02d}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
        mask = np.zeros((32, 32), np.uint8)
        if i % 2 == 0:
            mask[4:12, 4:12] = 255
        _png(root / "masks" / f"p{i:02d}.png", mask)
    return root


def test_folder_pairs_get_a_manifest_the_dataset_reader_opens(tmp_path: Path) -> None:
    root = _pairs(tmp_path / "set")
    report = import_dataset(root, splits=(0.6, 0.2, 0.2))
    assert report.imported == 10 and report.defective == 5
    ds = open_dataset(root)
    assert ds.layout == "manifest" and len(ds) == 10
    counts = {s: len(ds.samples(s)) for s in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 2, "test": 2}
    sample = next(s for s in ds.samples() if s.stem == "p00")
    assert sample.has_defect and ds.load_mask(sample, (32, 32)).sum() == 64
    assert len(report.empty_masks) == 5  # the odd ones: imported as defect-free


def test_split_assignment_is_seeded_and_stratified(tmp_path: Path) -> None:
    a = import_dataset(_pairs(tmp_path / "a", 20), seed=3)
    b = import_dataset(_pairs(tmp_path / "b", 20), seed=3)
    assert a.splits == b.splits
    assert (tmp_path / "a" / "manifest.csv").read_text() == (
        tmp_path / "b" / "manifest.csv"
    ).read_text()
    assert a.splits["train"] == {"good": 7, "defective": 7}


def test_report_names_missing_mismatched_and_non_binary_masks(tmp_path: Path) -> None:
    root = _pairs(tmp_path / "set", 6)
    (root / "masks" / "p00.png").unlink()
    _png(root / "masks" / "p01.png", np.zeros((16, 32), np.uint8))
    graded = np.zeros((32, 32), np.uint8)
    graded[0:4, 0:4], graded[8:12, 8:12] = 1, 2  # a class-index mask
    _png(root / "masks" / "p02.png", graded)
    report = import_dataset(root)
    assert report.missing_masks == ["p00.png"]
    assert report.size_mismatch == ["p01.png: mask 32x16, image 32x32"]
    assert report.non_binary == ["p02.png: values [0, 1, 2]; defect where > 1"]
    assert report.imported == 4 and report.skipped == 2


def test_missing_masks_can_be_imported_as_good(tmp_path: Path) -> None:
    root = _pairs(tmp_path / "set", 4)
    (root / "masks" / "p00.png").unlink()
    report = import_dataset(root, missing_mask="good")
    assert report.imported == 4
    sample = next(s for s in open_dataset(root).samples() if s.stem == "p00")
    assert not sample.has_defect and sample.mask is None


def test_existing_manifest_is_kept_without_force(tmp_path: Path) -> None:
    root = _pairs(tmp_path / "set", 4)
    import_dataset(root)
    with pytest.raises(ConfigError, match=r"manifest\.csv exists; pass --force"):
        import_dataset(root)
    assert import_dataset(root, force=True).imported == 4


def _coco(tmp_path: Path) -> Path:
    """Three 40x30 images: a polygon (cat 'crack'), a compressed RLE ('blowhole'), none."""
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "images" / name, rng.integers(0, 255, (30, 40), dtype=np.uint8))
    rle_mask = np.zeros((30, 40), np.uint8, order="F")
    rle_mask[10:20, 20:30] = 1
    rle = coco_mask.encode(np.asfortranarray(rle_mask))
    doc = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "c.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
            },
            {
                "id": 2,
                "image_id": 2,
                "category_id": 2,
                "iscrowd": 1,
                "segmentation": {"size": [30, 40], "counts": rle["counts"].decode()},
            },
            {"id": 3, "image_id": 9, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]},
        ],
        "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "blowhole"}],
    }
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_polygons_and_rle_become_binary_masks(tmp_path: Path) -> None:
    report = import_dataset(_coco(tmp_path), out=tmp_path / "out", splits=(1.0, 0.0, 0.0))
    assert report.imported == 3 and report.defective == 2
    assert report.classes == {"crack": 1, "blowhole": 1, "free": 1}
    assert report.other == ["annotations for unknown image id 9"]
    ds = open_dataset(tmp_path / "out")
    by_stem = {s.stem: s for s in ds.samples()}
    rle = ds.load_mask(by_stem["b"], (30, 40))
    assert rle.sum() == 100 and rle[10:20, 20:30].all()
    poly = ds.load_mask(by_stem["a"], (30, 40))
    assert poly[3:12, 3:12].all() and poly[20:, 20:].sum() == 0
    assert not by_stem["c"].has_defect
    written = cv2.imread(str(tmp_path / "out" / "masks" / "b.png"), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(written)) == {0, 255}


def test_coco_size_that_disagrees_with_the_file_is_reported(tmp_path: Path) -> None:
    path = _coco(tmp_path)
    doc = json.loads(path.read_text())
    doc["images"][0]["width"] = 41
    path.write_text(json.dumps(doc))
    report = import_dataset(path, out=tmp_path / "out")
    assert report.size_mismatch == ["a.png: JSON says 41x30, file is 40x30"]
    assert report.imported == 2


def test_cli_prints_the_report_and_refuses_an_empty_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _pairs(tmp_path / "set", 4)
    assert main(["dataset", "import", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["imported"] == 4 and report["problems"]["empty_masks"] == ["p01.png", "p03.png"]
    (tmp_path / "empty" / "images").mkdir(parents=True)
    assert main(["dataset", "import", str(tmp_path / "empty")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    with pytest.raises(DataError, match="neither a folder"):
        import_dataset(tmp_path / "set" / "images" / "p00.png")
