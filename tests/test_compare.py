"""``defectd compare``: agreement, IoU between two models, truth where masks exist, the gallery."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectd.cli import main
from defectd.data.datasets import open_dataset
from defectd.training.compare import compare_models, operating_point
from defectd.training.evaluate import evaluate, open_model

SIZE = 64


def write_parts(root: Path, count: int = 12) -> Path:
    """Grey parts with a bright disc on every other one (what the tiny model finds); the last
    defective part has no mask file (not labelled)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(4)
    rows = []
    for i in range(count):
        image = rng.integers(40, 90, (SIZE, SIZE), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        defective = i % 2 == 1
        if defective:
            cv2.circle(mask, (16 + 3 * i, 30), 4 + i // 3, 1, -1)
            image[mask > 0] = 235
        cv2.imwrite(str(root / "images" / f"p{i}.png"), image)
        mask_col = f"masks/p{i}.png"
        if defective and i == count - 1:
            mask_col = ""
        else:
            cv2.imwrite(str(root / mask_col), mask * 255)
        rows.append(
            [
                f"p{i}",
                "disc" if defective else "free",
                f"images/p{i}.png",
                mask_col,
                "test",
                int(defective),
            ]
        )
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "cls", "image", "mask", "split", "has_defect"])
        writer.writerows(rows)
    return root


def write_calibration(path: Path, threshold: float, min_area: int = 0, sha: str = "") -> Path:
    section = {
        "pixel_threshold": threshold,
        "min_area_px": min_area,
        "target": {"escape_rate": 0.01},
        "model_sha256": sha,
    }
    path.write_text(json.dumps({"schema_version": 1, "threshold": section}))
    return path


def _compare(model_a: Path, model_b: Path, data: Path) -> list[str]:
    """The command line of ``defectd compare`` of two models on ``data``."""
    return ["compare", str(model_a), str(model_b), "--data", str(data)]


def test_a_model_against_itself_agrees_everywhere(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_parts(tmp_path / "parts")
    gallery = tmp_path / "gallery"
    args = [*_compare(tiny_model, tiny_model, data), "--backend", "ort"]
    args += ["--gallery", str(gallery), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["images"] == 12 and out["verdict_agreement"] == 1.0 and out["disagreements"] == []
    assert out["pixel_iou_ab"] in (1.0, None)
    assert out["truth"]["images"] == 11  # the unlabelled defective part is left out
    assert out["truth"]["a"] == out["truth"]["b"]
    assert "compare test: 12/12" in captured.err  # progress on stderr
    assert (gallery / "index.html").is_file() and not list(gallery.glob("*.png"))


def test_verdicts_and_truth_are_those_of_eval_at_the_same_operating_point(
    tmp_path: Path, tiny_model: Path
) -> None:
    dataset = open_dataset(write_parts(tmp_path / "parts", count=11))  # every part labelled
    model = open_model(tiny_model, backend="ort")
    try:
        point = operating_point(model.card)
        samples = dataset.samples("test")
        result = compare_models(dataset, samples, model, model, point_a=point, point_b=point)
        ev = evaluate(dataset, "test", model.predictor, model.card)
    finally:
        model.close()
    assert [p.fail_a for p in result.parts] == [s.predicted_defect for s in ev.stats]
    truth = result.truth_a.as_dict()
    assert truth["tp"] + truth["fn"] == 5 and truth["fp"] + truth["tn"] == 6
    assert truth["pixel_iou"] == pytest.approx(ev.report.overall.iou, abs=1e-6)
    assert truth["accuracy"] == pytest.approx(ev.report.overall.accuracy, abs=1e-6)


def test_a_stricter_threshold_for_b_shows_as_disagreements_in_the_gallery(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_parts(tmp_path / "parts")
    strict = write_calibration(tmp_path / "strict.json", 0.999, 10_000)
    gallery = tmp_path / "gallery"
    args = [*_compare(tiny_model, tiny_model, data), "--backend", "ort"]
    args += ["--calibration-b", str(strict), "--gallery", str(gallery), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    v = out["verdicts"]
    assert v["a_pass_b_fail"] == 0 and v["both_fail"] == 0  # B never fails
    assert v["a_fail_b_pass"] == out["disagree"] > 0
    assert out["truth"]["b"]["fn"] == 5 and out["truth"]["b"]["escape_rate"] == 1.0
    assert out["operating_points"]["b"]["threshold"] == 0.999
    pngs = sorted(gallery.glob("*.png"))
    assert len(pngs) == out["disagree"]
    index = (gallery / "index.html").read_text()
    for d in out["disagreements"]:
        assert d["stem"] in index and d["a"] == "fail" and d["b"] == "pass"
    panel = cv2.imread(str(pngs[0]))
    assert panel is not None and panel.shape[1] > 3 * SIZE


def test_a_calibration_for_another_model_is_named_in_a_warning(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_parts(tmp_path / "parts")
    foreign = write_calibration(tmp_path / "c.json", 0.5, 0, sha="ab" * 32)
    assert (
        main(
            [
                *_compare(tiny_model, tiny_model, data),
                *("--backend", "ort", "--calibration", str(foreign), "--json"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "c.json was calibrated for model abababababab" in out["operating_points"]["a"]["warning"]
    assert "warning: model A:" in captured.err


def test_bad_inputs_give_one_error_line(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_parts(tmp_path / "parts")
    cal = write_calibration(tmp_path / "c.json", 0.5)
    assert main([*_compare(tiny_model, tiny_model, data), "--split", "val"]) == 2
    assert "split 'val' has no samples" in capsys.readouterr().err
    assert main(_compare(tiny_model, tmp_path / "gone.onnx", data)) == 2
    assert "gone.onnx" in capsys.readouterr().err
    args = [*_compare(tiny_model, tiny_model, data), "--calibration", str(cal)]
    args += ["--calibration-a", str(cal)]
    assert main(args) == 2
    assert "--calibration" in capsys.readouterr().err


def test_each_model_runs_at_the_precision_its_card_declares_unless_told(
    tmp_path: Path, tiny_model: Path, tiny_int8_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_parts(tmp_path / "parts")
    base = _compare(tiny_model, tiny_int8_model, data)
    assert main([*base, "--backend", "ort", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model_a"]["engine"], out["model_b"]["engine"]) == ("ort-fp32", "ort-int8")
    assert main([*base, "--backend", "ort", "--precision-a", "int8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_a"]["engine"] == "ort-int8" and out["verdict_agreement"] == 1.0
