"""``defectd dataset from-archive``: archived parts with reviewed or true labels become a
training set merged with the original one; parts without a label never become training data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectd.cli import main
from defectd.daemon.archive import Archive, ArchiveConfig
from defectd.data.datasets import open_dataset
from defectd.data.from_archive import dataset_from_archive
from defectd.data.synth import write_dataset
from defectd.errors import ConfigError, DataError
from defectd.pipeline.inspection import Defect, Inspection, Verdict

SIZE = 32


def _part(seq: int, verdict: Verdict, part_id: str | None = None) -> Inspection:
    defects = (Defect(20, (4, 4, 5, 4), (6.0, 6.0), 0.9, 0.8),) if verdict is Verdict.FAIL else ()
    return Inspection(
        station="st",
        camera="cam0",
        seq=seq,
        verdict=verdict,
        defects=defects,
        part_id=part_id,
        model_sha256="f" * 64,
        t_grab_wall=1_700_000_000.0 + seq,
        result_id=f"{seq:08x}" + "0" * 24,
    )


def _square(at: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[at : at + 6, at : at + 6] = 1
    return mask


def _archive(root: Path, *, truth: bool) -> Path:
    """Six parts: seqs 0-2 passes, 3-4 fails, 5 an error; masks true (``truth``) or predicted."""
    archive = Archive(ArchiveConfig(dir=root, pass_sample=1.0, overlays=False), root)
    archive.start()
    rng = np.random.default_rng(0)
    for seq in range(6):
        verdict = Verdict.PASS if seq < 3 else Verdict.FAIL if seq < 5 else Verdict.ERROR
        image = rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
        defective = verdict is Verdict.FAIL
        mask = _square(4) if defective else np.zeros((SIZE, SIZE), np.uint8)
        ins = _part(seq, verdict, part_id=f"P{seq}")
        if truth:
            kinds = ("scratch",) if defective else ()
            archive.submit(ins, image, mask if verdict is not Verdict.ERROR else None,
                           truth=mask, truth_kinds=kinds)  # fmt: skip
        else:
            archive.submit(ins, image, mask if verdict is not Verdict.ERROR else None)
    archive.stop()
    return root


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_true_labels_come_in_merged_with_the_original_set_and_say_where_they_came_from(
    tmp_path: Path,
) -> None:
    archive = _archive(tmp_path / "archive", truth=True)
    original = tmp_path / "original"
    write_dataset(original, 10, seed=0, height=SIZE, width=SIZE, defect_rate=0.5)
    report = dataset_from_archive(archive, out=tmp_path / "ds", merge=original)
    assert report.archived == report.included == 6
    assert report.by_label == {"truth": 6} and report.original == 10
    ds = open_dataset(tmp_path / "ds")
    assert len(ds) == 16
    rows = {r["stem"]: r for r in _rows(tmp_path / "ds" / "manifest.csv")}
    archived = [r for r in rows.values() if r["source"] == "archive"]
    assert sorted(r["seq"] for r in archived) == [str(i) for i in range(6)]
    assert {r["part_id"] for r in archived} == {f"P{i}" for i in range(6)}
    fails = [r for r in archived if r["verdict"] == "fail"]
    assert all(r["cls"] == "scratch" and r["has_defect"] == "1" for r in fails)
    assert all(r["model_sha256"] == "f" * 64 and r["camera"] == "cam0" for r in archived)
    assert {r["source"] for r in rows.values()} == {"archive", "original"}
    sample = next(s for s in ds.samples() if s.stem == fails[0]["stem"])
    assert ds.load_mask(sample, (SIZE, SIZE)).sum() == 36  # the true 6x6 square


def test_parts_with_only_the_models_prediction_are_left_out_and_listed(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive", truth=False)
    report = dataset_from_archive(archive, out=tmp_path / "ds")
    assert report.by_label == {"verdict-pass": 3}
    assert len(report.unlabelled) == 3  # two fails and the error
    assert all("no label" in line for line in report.unlabelled)
    assert {r["verdict"] for r in _rows(tmp_path / "ds" / "manifest.csv")} == {"pass"}


def test_unlabelled_parts_kept_for_review_stay_out_of_every_training_split(
    tmp_path: Path,
) -> None:
    archive = _archive(tmp_path / "archive", truth=False)
    dataset_from_archive(archive, out=tmp_path / "ds", unlabelled="review")
    ds = open_dataset(tmp_path / "ds")
    review = ds.samples("review")
    assert len(review) == 3 and {s.cls for s in review} == {"unlabelled"}
    assert not any(s.has_defect for s in review)


def test_reviewed_mask_files_named_by_stem_or_part_id_label_the_parts(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive", truth=False)
    stems = {r["stem"]: r for r in _rows(archive / "manifest.csv")}
    by_seq = {json.loads((archive / "results" / f"{s}.json").read_text())["seq"]: s for s in stems}
    labels = tmp_path / "labels"
    labels.mkdir()
    cv2.imwrite(str(labels / f"{by_seq[3]}_mask.png"), _square(10) * 255)  # by stem
    cv2.imwrite(str(labels / "P4.png"), np.zeros((SIZE, SIZE), np.uint8))  # reviewed: good
    cv2.imwrite(str(labels / "P5.png"), np.zeros((SIZE + 1, SIZE), np.uint8))  # wrong size
    cv2.imwrite(str(labels / "nobody.png"), np.zeros((SIZE, SIZE), np.uint8))
    report = dataset_from_archive(archive, out=tmp_path / "ds", labels=labels)
    assert report.by_label == {"reviewed": 2, "verdict-pass": 3}
    assert report.unmatched_labels == ["nobody.png"]
    assert len(report.problems) == 1 and "is 32x33, the archived image 32x32" in report.problems[0]
    rows = {r["seq"]: r for r in _rows(tmp_path / "ds" / "manifest.csv")}
    assert rows["3"]["label_source"] == "reviewed" and rows["3"]["has_defect"] == "1"
    assert rows["4"]["label_source"] == "reviewed" and rows["4"]["has_defect"] == "0"
    ds = open_dataset(tmp_path / "ds")
    sample = next(s for s in ds.samples() if s.stem == by_seq[3])
    assert ds.load_mask(sample, (SIZE, SIZE))[10:16, 10:16].all()


def test_a_coco_export_of_the_archived_images_labels_them_with_its_categories(
    tmp_path: Path,
) -> None:
    archive = _archive(tmp_path / "archive", truth=False)
    fails = [r["stem"] for r in _rows(archive / "manifest.csv") if r["cls"] == "defect"]
    coco = {
        "images": [
            {"id": i, "file_name": f"images/{stem}.png", "width": SIZE, "height": SIZE}
            for i, stem in enumerate(fails)
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 0,
                "category_id": 7,
                "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
            }
        ],
        "categories": [{"id": 7, "name": "crack"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    report = dataset_from_archive(archive, out=tmp_path / "ds", labels=tmp_path / "coco.json")
    assert report.by_label == {"reviewed": 2, "verdict-pass": 3}
    rows = {r["stem"]: r for r in _rows(tmp_path / "ds" / "manifest.csv")}
    assert rows[fails[0]]["cls"] == "crack" and rows[fails[1]]["cls"] == "free"


def test_a_used_out_folder_or_an_archive_without_labels_is_refused(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive", truth=False)
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    with pytest.raises(ConfigError, match="is not empty"):
        dataset_from_archive(archive, out=used)
    with pytest.raises(DataError, match="no archived part has a label"):
        dataset_from_archive(archive, out=tmp_path / "ds", trust_passes=False)
    with pytest.raises(DataError, match="not a defectd archive"):
        dataset_from_archive(tmp_path, out=tmp_path / "ds2")


def test_from_archive_command_reports_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = _archive(tmp_path / "archive", truth=True)
    out = tmp_path / "ds"
    args = ["dataset", "from-archive", str(archive), "--out", str(out), "--archive-split", "train"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["included"] == 6 and set(report["splits"]) == {"train"}
    assert main([*args, "--unlabelled", "maybe"]) == 2
    assert "--unlabelled: choose skip or review" in capsys.readouterr().err


CHIP_STAIN = ("chip", "stain")


def _multiclass_archive(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A chip/stain model's station on the synthetic line: fails with true class labels
    (the line's values, ``DEFECTS``), one fail with only the model's prediction, passes.
    Returns the archive and each truth part's class-index mask by part id."""
    from defectd.data.synth import DEFECTS, PartRenderer

    archive = Archive(ArchiveConfig(dir=root, pass_sample=1.0, overlays=False), root)
    archive.start()
    renderer = PartRenderer(SIZE, SIZE)
    rng = np.random.default_rng(4)
    truths: dict[str, np.ndarray] = {}
    for seq in range(8):
        part = renderer.render(rng, defect_prob=1.0 if seq < 5 else 0.0, kinds=CHIP_STAIN)
        verdict = Verdict.FAIL if part.defects else Verdict.PASS
        assert part.labels is not None
        ins = _part(seq, verdict, part_id=f"P{seq}")
        if seq == 4:  # no truth: the model's prediction (chip = 1, stain = 2)
            predicted = np.zeros((SIZE, SIZE), np.uint8)
            predicted[2:6, 2:6] = 2
            archive.submit(ins, part.image, predicted, classes=CHIP_STAIN)
            continue
        archive.submit(
            ins, part.image, part.mask, truth=part.mask, truth_kinds=part.defects,
            classes=CHIP_STAIN, truth_labels=part.labels, truth_classes=DEFECTS,
        )  # fmt: skip
        # The line's stain (4) and chip (5) in the archive's values: chip 1, stain 2.
        truths[f"P{seq}"] = np.array([0, 0, 0, 0, 2, 1], np.uint8)[part.labels]
    archive.stop()
    return root, truths


def test_a_multiclass_archive_becomes_a_class_labelled_training_set(tmp_path: Path) -> None:
    archive, truths = _multiclass_archive(tmp_path / "archive")
    report = dataset_from_archive(archive, out=tmp_path / "ds")
    assert report.by_label == {"truth": 7} and report.classes == list(CHIP_STAIN)
    assert len(report.unlabelled) == 1  # the fail with only the model's prediction
    ds = open_dataset(tmp_path / "ds")
    assert ds.defect_classes() == CHIP_STAIN
    rows = {r["stem"]: r for r in _rows(tmp_path / "ds" / "manifest.csv")}
    for sample in ds.samples():
        labels = ds.load_labels(sample, (SIZE, SIZE), CHIP_STAIN)  # checks index against cls
        index = np.where(labels & 1, 1, np.where(labels & 2, 2, 0))
        assert np.array_equal(index, truths[rows[sample.stem]["part_id"]])


def test_merging_a_class_labelled_set_revalues_its_masks_into_the_archive_classes(
    tmp_path: Path,
) -> None:
    from defectd.data.synth import DEFECTS

    archive, _ = _multiclass_archive(tmp_path / "archive")
    original = tmp_path / "original"
    write_dataset(original, 12, seed=1, height=SIZE, width=SIZE, defect_rate=1.0,
                  class_masks=True)  # fmt: skip
    report = dataset_from_archive(archive, out=tmp_path / "ds", merge=original)
    assert report.original == 12
    out = open_dataset(tmp_path / "ds")
    assert out.label_classes[:2] == CHIP_STAIN  # the archive's values keep their meaning
    assert set(out.label_classes) <= {*CHIP_STAIN, *DEFECTS}
    before = open_dataset(original)
    for sample in before.samples():
        moved = next(s for s in out.samples() if s.stem == sample.stem)
        want = before.load_labels(sample, (SIZE, SIZE), DEFECTS)
        got = out.load_labels(moved, (SIZE, SIZE), DEFECTS)
        assert np.array_equal(want, got), sample.stem


def test_a_coco_review_of_a_multiclass_archive_paints_each_category(tmp_path: Path) -> None:
    archive, _ = _multiclass_archive(tmp_path / "archive")
    stem = next(  # the fail with only the model's prediction
        r["stem"]
        for r in _rows(archive / "manifest.csv")
        if json.loads((archive / "results" / f"{r['stem']}.json").read_text())["seq"] == 4
    )
    coco = {
        "images": [{"id": 0, "file_name": f"{stem}.png", "width": SIZE, "height": SIZE}],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 1, "segmentation": [[2, 2, 9, 2, 9, 9, 2, 9]]},
            {"id": 2, "image_id": 0, "category_id": 2,
             "segmentation": [[20, 20, 27, 20, 27, 27, 20, 27]]},
        ],
        "categories": [{"id": 1, "name": "stain"}, {"id": 2, "name": "scratch"}],
    }  # fmt: skip
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    report = dataset_from_archive(archive, out=tmp_path / "ds", labels=tmp_path / "coco.json")
    assert report.by_label["reviewed"] == 1 and not report.unlabelled
    assert report.classes == [*CHIP_STAIN, "scratch"]  # a category the archive lacked
    ds = open_dataset(tmp_path / "ds")
    sample = next(s for s in ds.samples() if s.stem == stem)
    assert sample.cls == "scratch+stain"
    index = cv2.imread(str(sample.mask_classes), cv2.IMREAD_UNCHANGED)
    assert index[5, 5] == 2 and index[23, 23] == 3 and index[15, 15] == 0
