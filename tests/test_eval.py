"""`defectd eval`: JSON shape, overlays, and one clear error line for each bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataset_support import keep_manifest_rows
from defectd.cli import main
from defectd.data.metrics import image_stats, tolerant_scores
from defectd.model.card import ModelCard
from defectd.model.checkpoint import save_checkpoint
from defectd.model.export import export_onnx
from defectd.model.unet import UNet, UNetConfig
from defectd.training.evaluate import Prediction
from defectd.training.overlays import FN_BGR, FP_BGR, TP_BGR, overlay, pick_cases

KEYS = {
    "dice",
    "iou",
    "precision",
    "recall",
    "mean_image_iou",
    "auroc",
    "accuracy",
    "per_class",
    "images",
    "threshold",
    "model",
    "split",
}


def write_set(root: Path, *, count: int = 8, sizes: tuple[int, int] = (40, 56)) -> Path:
    """Grey parts of two sizes with a bright square defect on every other one; split test."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        h, w = (sizes[0], sizes[1]) if i % 2 else (sizes[1], sizes[0])
        image = rng.integers(60, 110, (h, w), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        if i % 2:
            mask[10:18, 12:20] = 1
            image[mask > 0] = 230
        cls = "square" if i % 2 else "free"
        cv2.imwrite(str(root / "images" / f"p{i}.png"), image)
        cv2.imwrite(str(root / "masks" / f"p{i}.png"), mask * 255)
        rows.append([f"p{i}", cls, f"images/p{i}.png", f"masks/p{i}.png", "test", i % 2])
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "cls", "image", "mask", "split", "has_defect"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untrained small U-Net as ``best.pt`` and as ``model.onnx`` with its card."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(base=4, depth=2)).eval()
    card = ModelCard(name="small", input={"height": 32, "width": 32}, threshold=0.5)
    folder = tmp_path_factory.mktemp("model")
    save_checkpoint(folder / "best.pt", net, card)
    onnx = folder / "model.onnx"
    export_onnx(net, card, onnx)
    return folder / "best.pt", onnx


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_set(tmp_path / "data")


def run_eval(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["eval", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
def test_eval_json_is_one_object_with_every_metric(
    kind: str,
    model_files: tuple[Path, Path],
    data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = model_files[0] if kind == "checkpoint" else model_files[1]
    rc, out, _ = run_eval(capsys, "--model", str(model), "--data", str(data), "--json")
    assert rc == 0
    result = json.loads(out)
    assert result.keys() >= KEYS
    assert result["images"] == 8
    assert result["split"] == "test"
    assert result["model"] == str(model)
    assert set(result["per_class"]) == {"free", "square"}
    for key in ("dice", "iou", "precision", "recall", "accuracy", "auroc"):
        assert 0.0 <= result[key] <= 1.0
    assert result["image_score"] == "max"
    assert result["auroc_by_score"]["max"] == result["auroc"]
    assert set(result["auroc_by_score"]) == {"max", "area"}
    assert set(result["auroc_costs"]) == {"defective", "good"}
    escapes = result["escapes"]  # defective images passed: a part of the misjudged images
    assert escapes["count"] == len(escapes["images"])
    assert escapes["count"] <= round((1 - result["accuracy"]) * result["images"])
    for row in escapes["images"]:
        assert row["cls"] == "square" and 0.0 <= row["peak_in_defect"] <= row["peak"] <= 1.0
    assert escapes["count"] == sum(
        escapes[k] for k in ("unseen", "below_threshold", "under_min_area", "below_class_point")
    )


def test_eval_image_score_decision_ranks_by_the_stations_decision(
    model_files: tuple[Path, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run_eval(
        capsys, "--model", str(model_files[1]), "--data", str(data), "--json",
        "--image-score", "decision", "--min-area", "1",
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out)
    assert result["image_score"] == "decision"
    scores = result["auroc_by_score"]
    assert scores["decision"] == result["auroc"]
    assert scores["decision"] == scores["max"]  # at a 1 px min area the two are one score
    rc, _, err = run_eval(
        capsys, "--model", str(model_files[1]), "--data", str(data), "--image-score", "peak"
    )
    assert rc != 0
    assert "--image-score 'peak'" in err and "decision" in err


def test_checkpoint_and_onnx_give_the_same_metrics(
    model_files: tuple[Path, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = []
    for model in model_files:
        rc, out, _ = run_eval(
            capsys, "--model", str(model), "--data", str(data), "--json", "--backend", "auto"
        )
        assert rc == 0
        results.append(json.loads(out))
    for key in ("dice", "iou", "auroc", "accuracy"):
        assert results[0][key] == pytest.approx(results[1][key], abs=1e-3)


def test_overlays_are_written_for_worst_and_best_cases(
    model_files: tuple[Path, Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "overlays"
    args = ["--model", str(model_files[0]), "--data", str(data), "--overlays", str(folder)]
    rc, _, _ = run_eval(capsys, *args, "--overlay-count", "2", "--json")
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert rc == 0
    assert any(n.startswith("worst_") for n in pngs)
    img = cv2.imread(str(folder / pngs[0]))
    assert img is not None and img.shape[0] >= 40


def test_overlay_colours_found_false_and_missed_pixels() -> None:
    image = np.full((8, 8), 100, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:4] = 1
    prob = np.zeros((8, 8), np.float32)
    prob[0:2, 2:6] = 0.9  # columns 2-3 found, 4-5 false alarm, 0-1 missed
    sample = None
    pred = Prediction(sample, image, mask, prob)  # type: ignore[arg-type]
    panel = overlay(pred, 0.5, scale_to=8)
    coded = panel[:, 2 * (8 + 4) :].astype(int)
    base = 100

    def leans(px: np.ndarray, bgr: tuple[int, int, int]) -> bool:
        return int(np.argmax(px - base)) == int(np.argmax(bgr))

    assert leans(coded[0, 2], TP_BGR)
    assert leans(coded[0, 4], FP_BGR)
    assert leans(coded[0, 0], FN_BGR)
    assert (coded[5, 5] == base).all()


def test_worst_cases_are_missed_defects_and_false_alarms() -> None:
    truth = np.zeros((4, 4), np.uint8)
    truth[0, 0] = 1
    hit = truth.astype(np.float32)
    stats = [
        image_stats(hit, truth, threshold=0.5, stem="good_hit"),
        image_stats(np.zeros((4, 4), np.float32), truth, threshold=0.5, stem="missed"),
        image_stats(
            np.ones((4, 4), np.float32), np.zeros((4, 4), np.uint8), threshold=0.5, stem="alarm"
        ),
    ]
    worst, best = pick_cases(stats, 2)
    assert worst == ["missed", "alarm"]
    assert best == ["good_hit"]


def strict_json(text: str) -> dict[str, object]:
    """Parse JSON refusing NaN and Infinity (which ``json.loads`` accepts by default)."""

    def refuse(token: str) -> None:
        raise AssertionError(f"JSON holds {token}")

    result: dict[str, object] = json.loads(text, parse_constant=refuse)
    return result


def test_masks_folder_gets_every_predicted_mask_at_native_size(
    model_files: tuple[Path, Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pred"
    args = ["--model", str(model_files[0]), "--data", str(data), "--threshold", "0.3"]
    rc, out, _ = run_eval(capsys, *args, "--masks", str(folder), "--json")
    assert rc == 0
    assert strict_json(out)["mask_files"] == 8
    for i in range(8):
        written = cv2.imread(str(folder / f"p{i}.png"), cv2.IMREAD_GRAYSCALE)
        source = cv2.imread(str(data / "images" / f"p{i}.png"), cv2.IMREAD_GRAYSCALE)
        assert written is not None and source is not None
        assert written.shape == source.shape
        assert set(np.unique(written)) <= {0, 255}


def test_tolerant_scores_forgive_a_one_pixel_offset() -> None:
    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 10] = 1  # a thin vertical crack
    prob = np.zeros((20, 20), np.float32)
    prob[5:15, 11] = 0.9  # found one pixel to the right
    strict = image_stats(prob, truth, threshold=0.5)
    tolerant = image_stats(prob, truth, threshold=0.5, tolerance_px=1)
    assert strict.tp == 0
    assert (tolerant.tol_pred_hit, tolerant.tol_truth_hit) == (10, 10)
    scores = tolerant_scores([tolerant], 1)
    assert scores["precision"] == scores["recall"] == scores["f1"] == 1.0
    far = image_stats(prob, truth, threshold=0.5, tolerance_px=0)
    assert tolerant_scores([far], 0)["f1"] == 0.0


def test_tolerance_adds_tolerant_metrics_at_least_the_strict_ones(
    model_files: tuple[Path, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", str(model_files[0]), "--data", str(data), "--threshold", "0.3"]
    rc, out, _ = run_eval(capsys, *args, "--tolerance", "2", "--json")
    result = strict_json(out)
    assert rc == 0
    assert result["tolerance_px"] == 2
    assert result["tolerant_precision"] >= result["precision"]  # type: ignore[operator]
    assert result["tolerant_recall"] >= result["recall"]  # type: ignore[operator]


def test_escapes_list_every_defective_image_passed_with_its_peak_in_the_defect(
    model_files: tuple[Path, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # At a threshold no probability of the untrained network reaches, every defective
    # image passes: four escapes, each with the highest probability inside its square.
    args = ["--model", str(model_files[1]), "--data", str(data), "--threshold", "0.999"]
    rc, out, _ = run_eval(capsys, *args, "--json")
    assert rc == 0
    result = strict_json(out)
    escapes = result["escapes"]
    assert isinstance(escapes, dict)
    assert escapes["count"] == result["defective"] == 4
    assert escapes["under_min_area"] == 0
    assert escapes["unseen"] + escapes["below_threshold"] == 4
    assert sorted(r["stem"] for r in escapes["images"]) == ["p1", "p3", "p5", "p7"]
    peaks = [r["peak_in_defect"] for r in escapes["images"]]
    assert peaks == sorted(peaks, reverse=True)  # the nearest to being caught first
    assert all(0.0 < p <= 0.999 for p in peaks)
    rc, out, _ = run_eval(capsys, *args)
    assert rc == 0
    assert "defective images passed: 4" in out
    assert "p7" in out


def test_json_of_an_all_defective_split_has_no_nan_and_says_why(
    model_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_set(tmp_path / "data")
    keep_manifest_rows(data, lambda row: row.endswith(",1"))
    rc, out, _ = run_eval(capsys, "--model", str(model_files[0]), "--data", str(data), "--json")
    result = strict_json(out)
    assert rc == 0
    assert result["images"] == result["defective"] == 4
    assert result["auroc"] is None
    assert "no good image" in result["undefined"]["auroc"]  # type: ignore[index]


# ------------------------------------------------------------------- bad inputs: one line


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


def test_data_folder_without_masks_names_a_missing_mask(
    model_files: tuple[Path, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for mask in (data / "masks").iterdir():
        mask.unlink()
    rc, _, err = run_eval(capsys, "--model", str(model_files[0]), "--data", str(data))
    assert_one_line_error(rc, err, str(data / "masks" / "p1.png"))


def test_mask_of_the_wrong_size_names_the_mask(
    model_files: tuple[Path, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cv2.imwrite(str(data / "masks" / "p3.png"), np.zeros((5, 5), np.uint8))
    rc, _, err = run_eval(capsys, "--model", str(model_files[0]), "--data", str(data))
    assert_one_line_error(rc, err, str(data / "masks" / "p3.png"))


def test_empty_split_names_the_split(
    model_files: tuple[Path, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", str(model_files[0]), "--data", str(data), "--split", "val"]
    rc, _, err = run_eval(capsys, *args)
    assert_one_line_error(rc, err, "'val'", "test")


def test_unreadable_image_names_the_file(
    model_files: tuple[Path, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (data / "images" / "p2.png").write_bytes(b"\x89PNG broken")
    rc, _, err = run_eval(capsys, "--model", str(model_files[0]), "--data", str(data))
    assert_one_line_error(rc, err, str(data / "images" / "p2.png"))


def test_onnx_without_card_names_the_card(
    model_files: tuple[Path, Path], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(model_files[1].read_bytes())
    rc, _, err = run_eval(capsys, "--model", str(lone), "--data", str(data))
    assert_one_line_error(rc, err, str(tmp_path / "lone.card.json"))


def test_missing_model_names_the_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.onnx"
    rc, _, err = run_eval(capsys, "--model", str(missing), "--data", str(data))
    assert_one_line_error(rc, err, str(missing))
