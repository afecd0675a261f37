"""`defectd calibrate int8`: a QDQ model from a dataset split, compared with fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defectd.calibration.int8 import calibration_batches, compare_predictions
from defectd.cli import main
from defectd.data.datasets import Sample, open_dataset
from defectd.errors import CalibrationError
from defectd.model import load_card
from defectd.model.card import card_path
from defectd.training.evaluate import Prediction
from station_support import copy_model
from test_calibration_threshold import write_blob_set


@pytest.fixture
def fp32_model(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model, so int8 files written beside it stay in this test."""
    return copy_model(tiny_model, tmp_path / "model")


def _pred(stem: str, prob: np.ndarray, mask: np.ndarray) -> Prediction:
    sample = Sample(stem, "disc", Path(stem), None, "val", bool(mask.any()), stem)
    return Prediction(sample, np.zeros(mask.shape, np.uint8), mask, prob.astype(np.float32))


def test_agreement_counts_images_whose_verdict_differs() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    prob = mask.astype(np.float32) * 0.9
    reference = [_pred("a", prob, mask), _pred("b", np.zeros((8, 8)), np.zeros_like(mask))]
    speck = np.zeros((8, 8))
    speck[7, 7] = 0.8  # int8 finds a defect on the good part
    candidate = [_pred("a", prob, mask), _pred("b", speck, np.zeros_like(mask))]
    got = compare_predictions(
        reference, candidate, method="minmax", split="val", threshold=0.5, min_area_px=0
    )
    assert got.verdict_agreement == 0.5 and got.disagreements == ("b",)
    assert got.fp32_iou == 1.0 and got.int8_iou == pytest.approx(9 / 10)
    assert got.max_abs_diff == pytest.approx(0.8)


def test_calibration_batches_spread_over_the_split(tiny_model: Path, tmp_path: Path) -> None:
    data = open_dataset(write_blob_set(tmp_path / "data", per_split=6))
    batches = calibration_batches(data, "train", load_card(tiny_model), samples=5, batch_size=4)
    assert [b.shape for b in batches] == [(4, 1, 64, 64), (1, 1, 64, 64)]
    assert all(b.dtype == np.float32 for b in batches)
    with pytest.raises(CalibrationError, match="--samples 0"):
        calibration_batches(data, "train", load_card(tiny_model), samples=0)


def test_cli_writes_int8_model_with_card_and_reports_agreement(
    fp32_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=8)
    code = main(
        ["calibrate", "int8", "-m", str(fp32_model), "-d", str(data), "--samples", "8", "--json"]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    out = fp32_model.with_name("model.int8.onnx")
    assert payload["out"] == str(out) and out.is_file()
    assert load_card(out).precision == "int8"
    chosen = payload["chosen"]
    assert chosen["split"] == "val" and chosen["images"] == 8
    assert abs(chosen["iou_delta"]) <= 0.05 and chosen["verdict_agreement"] >= 0.75


def test_cli_method_all_compares_every_method(
    fp32_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=4)
    out = tmp_path / "q" / "best.int8.onnx"
    args = ["calibrate", "int8", "-m", str(fp32_model), "-d", str(data), "--samples", "4"]
    assert main([*args, "--method", "all", "--eval-split", "test", "-o", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [m["method"] for m in payload["methods"]] == ["minmax", "entropy", "percentile"]
    assert payload["method"] in ("minmax", "entropy", "percentile")
    assert out.is_file() and card_path(out).is_file()


def test_cli_unknown_eval_split_is_an_error(
    fp32_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=2)
    code = main(["calibrate", "int8", "-m", str(fp32_model), "-d", str(data), "--eval-split", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "split 'x' has no samples" in err


def test_keep_float_first_leaves_the_input_convolution_unquantised(
    fp32_model: Path, tmp_path: Path
) -> None:
    import onnx

    from defectd.calibration.int8 import float_nodes, quantize_qdq

    card = load_card(fp32_model)
    batches = [card.normalisation.apply(np.full((2, 1, 64, 64), 120, np.uint8))]
    out = tmp_path / "first.int8.onnx"
    quantize_qdq(fp32_model, out, batches, keep_float=("first",))
    graph = onnx.load(str(out)).graph
    first = float_nodes(onnx.load(str(fp32_model)), ["first"])[0]
    feeding = {n.output[0]: n.op_type for n in graph.node}
    conv = next(n for n in graph.node if n.name == first)
    assert feeding.get(conv.input[1]) != "DequantizeLinear"  # float weights
    assert "float convolutions: first" in load_card(out).notes
    with pytest.raises(CalibrationError, match="'nope'"):
        quantize_qdq(fp32_model, tmp_path / "x.onnx", batches, keep_float=("nope",))
