"""`defectd calibrate threshold`: rates with intervals, the operating-point choice, the file."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import blob_batch
from dataset_support import keep_manifest_rows
from defectd.calibration.file import load_calibration
from defectd.calibration.threshold import (
    SweepCollector,
    check_split,
    choose,
    pareto_front,
    wilson_interval,
)
from defectd.cli import main
from defectd.errors import CalibrationError
from defectd.model import load_card


def threshold_cli(model: Path, data: Path, out: Path) -> list[str]:
    """The command line of ``defectd calibrate threshold`` of ``model`` on ``data`` into ``out``."""
    return ["calibrate", "threshold", "-m", str(model), "-d", str(data), "-o", str(out)]


def write_blob_set(root: Path, *, per_split: int = 12, seed: int = 3) -> Path:
    """64x64 grey parts in val/test/train; every other one has bright discs (its mask)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("train", "val", "test"):
        images, masks = blob_batch(rng, per_split)
        for i in range(per_split):
            defective = i % 2 == 1
            image = images[i, 0]
            mask = masks[i, 0]
            if not defective:  # a good part: the same texture, no disc
                image = np.clip(rng.normal(0.45, 0.08, image.shape), 0, 1) * 255
                mask = np.zeros_like(mask)
            stem = f"{split}{i:02d}"
            cv2.imwrite(str(root / "images" / f"{stem}.png"), image.astype(np.uint8))
            cv2.imwrite(str(root / "masks" / f"{stem}.png"), (mask * 255).astype(np.uint8))
            cls = "disc" if defective else "free"
            rows.append(
                [stem, cls, f"images/{stem}.png", f"masks/{stem}.png", split, int(defective)]
            )
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "cls", "image", "mask", "split", "has_defect"])
        writer.writerows(rows)
    return root


def test_wilson_interval_matches_known_values() -> None:
    low, high = wilson_interval(0, 51)
    assert low == 0.0 and high == pytest.approx(0.0700, abs=5e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=5e-4), pytest.approx(0.7634, abs=5e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _toy_sweep() -> SweepCollector:
    """Defective parts: a 6x6 blob at 0.9. Good parts: a 2x2 speck at 0.6."""
    col = SweepCollector(thresholds=(0.3, 0.5, 0.7), min_areas=(0, 5), min_scores=(0.0,))
    for i in range(6):
        prob = np.full((20, 20), 0.05, np.float32)
        mask = np.zeros((20, 20), np.uint8)
        if i % 2:
            prob[4:10, 4:10] = 0.9
            mask[4:10, 4:10] = 1
        else:
            prob[12:14, 12:14] = 0.6
        col.add(prob, mask, stem=f"p{i}")
    return col


def test_choice_meets_the_escape_target_with_fewest_false_rejects() -> None:
    sweep = _toy_sweep().result()
    chosen = choose(sweep.points(), "escape", 0.0)
    assert chosen.escape.k == 0 and chosen.false_reject.k == 0
    # Threshold 0.3 without a min area rejects every good part's speck.
    low = sweep.point(0.3, 0, 0.0)
    assert low.false_reject.k == 3 and low.escape.k == 0


def test_choice_meets_a_false_reject_target_with_fewest_escapes() -> None:
    sweep = _toy_sweep().result()
    chosen = choose(sweep.points(), "false_reject", 0.0)
    assert chosen.false_reject.k == 0 and chosen.escape.k == 0


def test_unreachable_target_names_the_best_rate() -> None:
    col = SweepCollector(thresholds=(0.5,), min_areas=(0,), min_scores=(0.0,))
    for _ in range(4):  # defective parts the model never sees
        mask = np.zeros((8, 8), np.uint8)
        mask[2:4, 2:4] = 1
        col.add(np.zeros((8, 8), np.float32), mask)
    col.add(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))
    with pytest.raises(CalibrationError, match=r"lowest is 1\.0000"):
        choose(col.result().points(), "escape", 0.01)


def test_unseen_escapes_are_the_passed_defects_the_model_gave_nothing_inside() -> None:
    col = SweepCollector(thresholds=(0.5,), min_areas=(0,), min_scores=(0.0,))
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 1
    unseen = np.full((8, 8), 0.001, np.float32)
    unseen[6, 6] = 0.3  # something away from the defect, under the threshold
    faint = np.zeros((8, 8), np.float32)
    faint[2:4, 2:4] = 0.2
    caught = mask.astype(np.float32)
    for prob in (unseen, faint, caught):
        col.add(prob, mask)
    col.add(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))
    sweep = col.result()
    assert sweep.truth_peaks.tolist() == pytest.approx([0.001, 0.2, 1.0, 0.0])
    assert sweep.point(0.5, 0, 0.0).escape.k == 2
    assert sweep.unseen_escapes(0.5, 0, 0.0) == 1  # the faint one is seen, just below 0.5
    low = SweepCollector(thresholds=(0.01,), min_areas=(0,), min_scores=(0.0,))
    for value in (0.005, 0.0005):  # at 0.01 the cut-off is 0.001: 0.005 is seen
        low.add(np.where(mask > 0, value, 0.0).astype(np.float32), mask)
    low.add(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))
    assert low.result().unseen_escapes(0.01, 0, 0.0) == 1


def test_pixel_metrics_per_threshold_count_the_blob() -> None:
    rows = _toy_sweep().result().pixel_metrics()
    # At 0.7 only the defect blobs remain: perfect pixels; at 0.5 the specks are false positives.
    assert rows[2]["iou"] == 1.0 and rows[2]["dice"] == 1.0
    assert rows[1]["precision"] == pytest.approx(108 / (108 + 12))


def test_pareto_front_is_monotone() -> None:
    front = pareto_front(_toy_sweep().result().points())
    assert [p.escape.k for p in front] == sorted(p.escape.k for p in front)
    assert all(a.false_reject.k > b.false_reject.k for a, b in itertools.pairwise(front))


def test_split_without_good_images_is_refused() -> None:
    col = SweepCollector(thresholds=(0.5,), min_areas=(0,), min_scores=(0.0,))
    mask = np.ones((4, 4), np.uint8)
    col.add(np.ones((4, 4), np.float32) * 0.9, mask)
    with pytest.raises(CalibrationError, match="no good images"):
        check_split(col.result(), "escape", "val")


def test_min_score_rejects_only_confident_components() -> None:
    col = SweepCollector(thresholds=(0.3,), min_areas=(0,), min_scores=(0.0, 0.8))
    prob = np.zeros((10, 10), np.float32)
    prob[1:4, 1:4] = 0.5  # area 9, peak 0.5
    prob[6, 6] = 0.95  # area 1, peak 0.95
    col.add(prob, np.zeros((10, 10), np.uint8))
    assert col.result().largest[0].tolist() == [[9, 1]]


def test_cli_writes_threshold_section_json_and_plots(tiny_model: Path, tmp_path: Path) -> None:
    data = write_blob_set(tmp_path / "data", per_split=8)
    out = tmp_path / "cal" / "calibration.json"
    report = tmp_path / "report"
    code = main(
        [
            *threshold_cli(tiny_model, data, out),
            "--target-escape", "0.2", "--eval-split", "test", "--report", str(report), "--json",
        ]
    )  # fmt: skip
    assert code == 0
    section = load_calibration(out).threshold
    assert section is not None
    assert section.target.escape_rate == 0.2 and section.split == "val"
    assert section.model_sha256 == load_card(tiny_model).sha256
    assert section.escape is not None and section.escape.rate <= 0.2
    assert section.escape.n == 4 and section.false_reject is not None
    assert len(section.data_hash) == 64
    assert sorted(p.name for p in report.glob("*.png")) == [
        "false_reject_vs_escape.png",
        "pixel_iou_dice.png",
        "precision_recall.png",
    ]


def test_cli_json_is_one_object_with_chosen_point(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=6)
    out = tmp_path / "calibration.json"
    args = threshold_cli(tiny_model, data, out)
    assert main([*args, "--target-false-reject", "0.34", "--eval-split", "test", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["target"] == {"kind": "false_reject", "rate": 0.34, "upper_bound": False}
    assert payload["chosen"]["false_reject"]["rate"] <= 0.34
    assert payload["eval"]["split"] == "test" and payload["eval"]["escape"]["n"] == 3
    unseen = payload["escapes_unseen"]
    assert set(unseen["split"]) == {"defect"}
    assert unseen["unseen_below"]["defect"] == min(0.01, payload["chosen"]["pixel_threshold"] / 10)
    assert 0 <= unseen["split"]["defect"] <= payload["chosen"]["escape"]["k"]
    assert 0 <= unseen["eval"]["defect"] <= payload["eval"]["escape"]["k"]


def test_cli_labels_without_masks_name_the_file(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=4)
    (data / "masks" / "val01.png").unlink()
    out = tmp_path / "c.json"
    code = main(threshold_cli(tiny_model, data, out))
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "val01.png" in err


def test_cli_empty_data_set_is_an_error(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.csv").write_text("stem,cls,image,mask,split,has_defect\n")
    out = tmp_path / "c.json"
    code = main(threshold_cli(tiny_model, empty, out))
    assert code == 2 and "error:" in capsys.readouterr().err


def test_cli_split_without_defects_is_refused(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=4)
    keep_manifest_rows(data, lambda row: not (",val," in row and row.endswith(",1")))
    out = tmp_path / "c.json"
    code = main(threshold_cli(tiny_model, data, out))
    err = capsys.readouterr().err
    assert code == 2 and "no defective images" in err and "'val'" in err


# ------------------------------------------------ negatives from defect-free regions


def test_defect_free_tiles_keep_their_distance_from_every_defect() -> None:
    from defectd.calibration.threshold import TilePlan

    truth = np.zeros((64, 64), np.uint8)
    truth[4:8, 4:8] = 1  # a defect in the top-left tile
    tiles = TilePlan(tile_px=16, margin_px=10).tiles(truth)
    assert (0, 0, 16) not in tiles and (16, 0, 16) not in tiles  # within 10 px of it
    assert (32, 32, 16) in tiles and len(tiles) == 16 - 4
    for y, x, size in tiles:
        assert not truth[max(0, y - 10) : y + size + 10, max(0, x - 10) : x + size + 10].any()
    assert TilePlan().size_for((200, 120)) == 30  # a quarter of the shorter side


def test_all_defective_split_is_calibrated_on_defect_free_tiles_and_says_so(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=8)
    keep_manifest_rows(data, lambda row: row.endswith(",1"))
    out = tmp_path / "calibration.json"
    args = ["calibrate", "threshold", "-m", str(tiny_model), "-d", str(data), "-o", str(out)]
    assert main([*args, "--target-escape", "0.25", "--negative-tile", "16", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    negatives = payload["negatives"]
    assert negatives["kind"] == "tiles" and negatives["tiles"] > 0
    assert "no good image" in negatives["note"] and "16 px" in negatives["note"]
    assert payload["images"] == {"defective": 4, "good": negatives["tiles"]}
    section = load_calibration(out).threshold
    assert section is not None
    assert section.negatives == "tiles" and section.negatives_note == negatives["note"]
    # Asked for good parts explicitly, the same split is refused as before.
    rc = main([*args, "--negatives", "parts", "--force"])
    assert rc == 2 and "no good images" in capsys.readouterr().err


def test_one_class_calibration_file_reads_as_before(tiny_model: Path, tmp_path: Path) -> None:
    data = write_blob_set(tmp_path / "data", per_split=6)
    out = tmp_path / "calibration.json"
    args = ["calibrate", "threshold", "-m", str(tiny_model), "-d", str(data), "-o", str(out)]
    assert main([*args, "--target-escape", "0.34"]) == 0
    stored = json.loads(out.read_text())["threshold"]
    assert not {"classes", "negatives", "negatives_note"} & stored.keys()


def _trained_on_train_and_val(model: Path, data: Path, folder: Path) -> Path:
    """A copy of ``model`` whose card says it was trained on ``data``'s train+val (a refit)."""
    import shutil

    from defectd.data.datasets import open_dataset
    from defectd.model.card import card_path

    folder.mkdir()
    copy = folder / "model.onnx"
    shutil.copy(model, copy)
    card = load_card(model)
    training = card.training.model_copy(
        update={"split": "train+val", "data_hash": open_dataset(data).fingerprint("train+val")}
    )
    card.model_copy(update={"training": training}).save(card_path(copy))
    return copy


def test_calibrating_on_images_the_model_was_trained_on_says_so(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=6)
    refit = _trained_on_train_and_val(tiny_model, data, tmp_path / "refit")
    out = tmp_path / "calibration.json"
    args = [*threshold_cli(refit, data, out), "--target-false-reject", "0.34"]
    assert main([*args, "--eval-split", "test", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["trained_on"] == {"val": 6, "test": 0}
    assert "warning: 6 images of split 'val' were trained on" in captured.err
    assert "'test'" not in captured.err

    # The same model on another data set (another training-data hash): nothing was seen.
    other = write_blob_set(tmp_path / "other", per_split=6, seed=9)
    assert main([*threshold_cli(refit, other, out), "--target-false-reject", "0.34", "--json",
                 "--force"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert json.loads(captured.out)["trained_on"] == {"val": 0}
    assert "warning" not in captured.err


def test_eval_counts_the_images_of_its_split_the_model_was_trained_on(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=6)
    refit = _trained_on_train_and_val(tiny_model, data, tmp_path / "refit")
    for split, seen in (("val", 6), ("test", 0), ("train+val", 12)):
        assert main(["eval", "-m", str(refit), "-d", str(data), "--split", split, "--json"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["trained_on"] == seen
        assert ("were trained on" in captured.err) == bool(seen)
    assert main(["eval", "-m", str(tiny_model), "-d", str(data), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trained_on"] == 0  # its card names no data
