"""The image archive: what it keeps, its dataset layout, the disk quota and back-pressure."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectd.daemon.archive import Archive, ArchiveConfig, sampled, split_for
from defectd.pipeline.inspection import Defect, Inspection, Verdict

SHAPE = (64, 80)


def _inspection(seq: int, verdict: Verdict, t: float = 1_700_000_000.0) -> Inspection:
    defects = (
        (
            Defect(
                area_px=36,
                bbox=(10, 12, 6, 6),
                centroid=(13.0, 15.0),
                score_max=0.9,
                score_mean=0.7,
            ),
        )
        if verdict is Verdict.FAIL
        else ()
    )
    return Inspection(
        station="s1", camera="cam0", seq=seq, verdict=verdict, defects=defects,
        model_name="tiny", t_grab_wall=t + seq * 0.01,
    )  # fmt: skip


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, SHAPE, dtype=np.uint8)


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[12:18, 10:16] = 1
    return mask


def _manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _wait_written(archive: Archive, n: int) -> None:
    deadline = time.monotonic() + 10
    while archive.stats().written + archive.stats().failed < n:
        assert time.monotonic() < deadline, archive.stats()
        time.sleep(0.01)


def test_fail_part_is_written_as_a_manifest_dataset_row(tmp_path: Path) -> None:
    archive = Archive(ArchiveConfig(dir=tmp_path, pass_sample=0.0))
    archive.start()
    ins = _inspection(1, Verdict.FAIL)
    assert archive.submit(ins, _image(1), _mask())
    archive.stop()
    (row,) = _manifest(tmp_path)
    stem = row["stem"]
    assert row["has_defect"] == "1" and row["split"] in ("train", "val", "test")
    assert (row["width"], row["height"]) == ("80", "64")
    image = cv2.imread(str(tmp_path / row["image"]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(image, _image(1))
    mask = cv2.imread(str(tmp_path / row["mask"]), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mask)) == {0, 255} and int((mask > 0).sum()) == 36
    assert (tmp_path / "overlays" / f"{stem}.png").is_file()
    result = json.loads((tmp_path / "results" / f"{stem}.json").read_text())
    assert result["result_id"] == ins.result_id
    assert result["label_source"] == "prediction"


def test_truth_mask_is_preferred_as_label(tmp_path: Path) -> None:
    archive = Archive(ArchiveConfig(dir=tmp_path))
    archive.start()
    truth = np.zeros(SHAPE, np.uint8)
    truth[0:2, 0:2] = 1
    archive.submit(
        _inspection(1, Verdict.FAIL), _image(1), _mask(), truth=truth, truth_kinds=["pit"]
    )
    archive.stop()
    (row,) = _manifest(tmp_path)
    assert row["cls"] == "pit"
    assert int((cv2.imread(str(tmp_path / row["mask"]), 0) > 0).sum()) == 4


def test_error_part_has_no_mask_and_class_error(tmp_path: Path) -> None:
    archive = Archive(ArchiveConfig(dir=tmp_path))
    archive.start()
    archive.submit(_inspection(1, Verdict.ERROR), _image(1))
    archive.stop()
    (row,) = _manifest(tmp_path)
    assert (row["cls"], row["mask"], row["has_defect"]) == ("error", "", "0")
    assert row["split"] == "review"  # unlabelled: kept out of train/val/test


def test_passes_are_sampled_by_result_id(tmp_path: Path) -> None:
    ids = [f"{i:08x}" + "0" * 24 for i in range(0, 2**32, 2**22)]  # evenly spread ids
    kept = sum(sampled(i, 0.25) for i in ids)
    assert kept == len(ids) // 4
    assert not Archive(ArchiveConfig(dir=tmp_path, pass_sample=0.0)).wants(
        _inspection(1, Verdict.PASS)
    )


def test_full_queue_skips_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    archive = Archive(ArchiveConfig(dir=tmp_path, queue_size=2))  # writer not started
    results = [archive.submit(_inspection(i, Verdict.FAIL), _image(i), _mask()) for i in range(3)]
    assert results == [True, True, False]
    assert archive.stats().skipped_queue_full == 1


def test_quota_prunes_oldest_parts_first(tmp_path: Path) -> None:
    # each part is ~15 KB of noise PNGs; a 0.1 MB quota holds about six of them
    archive = Archive(ArchiveConfig(dir=tmp_path, quota_mb=0.1, overlays=False))
    archive.start()
    for seq in range(20):
        archive.submit(_inspection(seq, Verdict.FAIL), _image(seq), _mask())
        _wait_written(archive, seq + 1)
    archive.stop()
    stats = archive.stats()
    assert stats.bytes <= stats.quota_bytes
    assert stats.pruned > 0
    rows = _manifest(tmp_path)
    seqs = [int(r["stem"].split("-")[2]) for r in rows]
    assert seqs == list(range(20 - len(rows), 20))  # the newest survive, in order
    on_disk = sorted(p.stem for p in (tmp_path / "images").iterdir())
    assert on_disk == sorted(r["stem"] for r in rows)


def test_restart_keeps_parts_and_removes_files_without_manifest_row(tmp_path: Path) -> None:
    archive = Archive(ArchiveConfig(dir=tmp_path))
    archive.start()
    archive.submit(_inspection(1, Verdict.FAIL), _image(1), _mask())
    archive.stop()
    (tmp_path / "images" / "stray.png").write_bytes(b"half written")
    again = Archive(ArchiveConfig(dir=tmp_path))
    again.start()
    again.stop()
    assert again.stats().parts == 1
    assert not (tmp_path / "images" / "stray.png").exists()


def test_split_is_deterministic_and_roughly_proportional() -> None:
    splits = [split_for(f"part-{i}", (0.7, 0.15, 0.15)) for i in range(2000)]
    assert splits == [split_for(f"part-{i}", (0.7, 0.15, 0.15)) for i in range(2000)]
    assert 0.65 < splits.count("train") / 2000 < 0.75


def test_splits_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        ArchiveConfig(splits=(0.5, 0.2, 0.2))


def test_archive_opens_as_a_training_dataset(tmp_path: Path) -> None:
    from defectd.data.datasets import open_dataset

    archive = Archive(ArchiveConfig(dir=tmp_path, pass_sample=1.0))
    archive.start()
    for seq, verdict in enumerate([Verdict.FAIL, Verdict.PASS, Verdict.ERROR] * 4):
        mask = _mask() if verdict is Verdict.FAIL else None
        archive.submit(_inspection(seq, verdict), _image(seq), mask)
    archive.stop()
    dataset = open_dataset(tmp_path)
    samples = dataset.samples()
    assert len(samples) == 12
    fail = next(s for s in samples if s.has_defect)
    assert int(dataset.load_mask(fail, SHAPE).sum()) == 36
    assert np.array_equal(dataset.load_image(fail, channels=1).shape, SHAPE)
    assert {s.split for s in samples if s.cls == "error"} == {"review"}


def test_stop_out_of_time_drops_the_queue_and_leaves_no_writer_behind(tmp_path: Path) -> None:
    # A writer still encoding PNGs while the process exits can abort it; stop() keeps the last
    # part of its time for the part in hand, drops (and counts) the rest, and ends the thread.
    archive = Archive(ArchiveConfig(dir=tmp_path, queue_size=64))
    archive.start()
    # Noise compresses badly: ~0.1 s a part on a quiet core, 0.4 s on a loaded one; 60 of them
    # cannot be written in the 1 s given, whatever the load.
    big = np.random.default_rng(0).integers(0, 255, (768, 768), dtype=np.uint8)
    for seq in range(60):
        assert archive.submit(_inspection(seq, Verdict.FAIL), big, _mask_of(big.shape))
    thread = archive._thread
    started = time.monotonic()
    archive.stop(timeout=1.0)
    # stop() returns by its deadline (the margin is for a loaded scheduler, not a second wait).
    assert time.monotonic() - started < 2.0
    assert thread is not None and not thread.is_alive()
    stats = archive.stats()
    assert stats.dropped_at_stop > 0
    assert stats.written + stats.failed + stats.dropped_at_stop == 60
    if stats.written:  # a slow machine may have written none in 1 s
        assert len(_manifest(tmp_path)) == stats.written


def _mask_of(shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    mask[12:18, 10:16] = 1
    return mask


CHIP_STAIN = ("chip", "stain")


def _class_mask() -> np.ndarray:
    """A multi-class model's mask: class index k + 1 (chip 1, stain 2)."""
    mask = np.zeros(SHAPE, np.uint8)
    mask[12:18, 10:16] = 1
    mask[40:44, 60:70] = 2
    return mask


def _read_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_multiclass_prediction_keeps_its_class_index_mask(tmp_path: Path) -> None:
    from defectd.data.datasets import open_dataset

    archive = Archive(ArchiveConfig(dir=tmp_path, pass_sample=0.0))
    archive.start()
    archive.submit(_inspection(1, Verdict.FAIL), _image(1), _class_mask(), classes=CHIP_STAIN)
    archive.stop()
    (row,) = _manifest(tmp_path)
    assert (tmp_path / "classes.txt").read_text().split() == list(CHIP_STAIN)
    assert row["cls"] == "chip+stain"
    assert np.array_equal(_read_png(tmp_path / row["mask_classes"]), _class_mask())
    assert int((_read_png(tmp_path / row["mask"]) > 0).sum()) == 36 + 40
    ds = open_dataset(tmp_path)
    (sample,) = ds.samples()
    labels = ds.load_labels(sample, SHAPE, CHIP_STAIN)  # bit k = class k
    assert int((labels == 1).sum()) == 36 and int((labels == 2).sum()) == 40


def test_truth_classes_take_the_archive_values_and_extend_them(tmp_path: Path) -> None:
    truth_names = ("scratch", "crack", "pit", "stain", "chip")  # the synthetic line's values
    labels = np.zeros(SHAPE, np.uint8)
    labels[0:2, 0:4] = 1  # scratch: not a class of the model
    labels[30:33, 30:33] = 4  # stain
    archive = Archive(ArchiveConfig(dir=tmp_path, pass_sample=0.0))
    archive.start()
    archive.submit(
        _inspection(1, Verdict.FAIL), _image(1), _class_mask(), truth=(labels > 0).astype(np.uint8),
        truth_kinds=["scratch", "stain"], classes=CHIP_STAIN, truth_labels=labels,
        truth_classes=truth_names,
    )  # fmt: skip
    archive.stop()
    (row,) = _manifest(tmp_path)
    # The model's classes first, then the truth's other class the part holds; no unseen kind.
    assert (tmp_path / "classes.txt").read_text().split() == ["chip", "stain", "scratch"]
    index = _read_png(tmp_path / row["mask_classes"])
    assert int((index == 3).sum()) == 8 and int((index == 2).sum()) == 9 and index.max() == 3
    assert row["cls"] == "scratch+stain"


def test_binary_model_archive_has_no_class_files_even_with_truth_labels(tmp_path: Path) -> None:
    from defectd.data.datasets import MANIFEST_COLUMNS

    archive = Archive(ArchiveConfig(dir=tmp_path, pass_sample=0.0))
    archive.start()
    labels = _mask() * np.uint8(3)
    archive.submit(
        _inspection(1, Verdict.FAIL), _image(1), _mask(), truth=_mask(), truth_kinds=["pit"],
        truth_labels=labels, truth_classes=("scratch", "crack", "pit"),
    )  # fmt: skip
    archive.stop()
    header = (tmp_path / "manifest.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == MANIFEST_COLUMNS
    assert not (tmp_path / "classes.txt").exists() and not (tmp_path / "masks_cls").exists()


def test_archive_gains_the_class_column_and_keeps_it_across_restarts(tmp_path: Path) -> None:
    config = ArchiveConfig(dir=tmp_path, pass_sample=0.0, overlays=False)
    archive = Archive(config)
    archive.start()
    archive.submit(_inspection(1, Verdict.FAIL), _image(1), _mask())  # a binary model first
    archive.stop()
    archive = Archive(config)
    archive.start()
    archive.submit(_inspection(2, Verdict.FAIL), _image(2), _class_mask(), classes=CHIP_STAIN)
    archive.stop()
    archive = Archive(config)
    archive.start()
    # A later model with the classes in another order and one more: values keep their meaning.
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:7, 5:7], mask[50:52, 5:7] = 1, 3  # stain, pit
    archive.submit(_inspection(3, Verdict.FAIL), _image(3), mask, classes=("stain", "chip", "pit"))
    archive.stop()
    binary, first, later = _manifest(tmp_path)
    assert binary["mask_classes"] == "" and binary["cls"] == "defect"
    assert first["cls"] == "chip+stain"
    assert (tmp_path / "classes.txt").read_text().split() == ["chip", "stain", "pit"]
    index = _read_png(tmp_path / later["mask_classes"])
    assert set(np.unique(index)) == {0, 2, 3} and index[5, 5] == 2 and index[50, 5] == 3
    assert later["cls"] == "pit+stain"
