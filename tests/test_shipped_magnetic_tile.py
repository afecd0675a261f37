"""The shipped magnetic-tile model is whole: its card matches the ONNX file, its calibration file
was made for exactly this file at the precision the station will run it, the INT8 model beside
it names the fp32 file it was quantised from, and the fp32 and INT8 models give the same probability
map for a generated tile (the data set itself lives outside the repository)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from defectd.calibration.file import load_calibration
from defectd.cli import main
from defectd.engines import open_engine
from defectd.model.card import file_sha256, load_card

MODEL = Path(__file__).resolve().parents[1] / "models" / "magnetic_tile" / "model.onnx"
INT8 = MODEL.with_name("model.int8.onnx")


def test_the_card_describes_the_file() -> None:
    card = load_card(MODEL)
    assert list(card.classes) == ["defect"]
    assert card.sha256 == file_sha256(MODEL)
    assert (card.input.channels, card.input.height, card.input.width) == (1, 192, 192)
    assert card.input.resize == "resize"
    # The fast-precision rule reads these: without them the station would run fp32.
    for key in ("val_dice", "val_dice_bf16", "val_dice_int8", "val_auroc"):
        assert 0.0 < card.metrics[key] <= 1.0, key
    assert main(["card", "check", str(MODEL)]) == 0


def test_the_calibration_was_made_for_this_file_at_fp32() -> None:
    section = load_calibration(MODEL.with_name("calibration.json")).threshold
    assert section is not None
    assert section.model_sha256 == file_sha256(MODEL)
    assert section.precision == "fp32"
    assert 0.0 < section.pixel_threshold < 1.0


def test_the_int8_model_names_its_fp32_source() -> None:
    card = json.loads(INT8.with_name("model.int8.card.json").read_text())
    assert card["precision"] == "int8"
    assert card["sha256"] == file_sha256(INT8)
    assert file_sha256(MODEL)[:12] in card["notes"]


def test_fp32_and_int8_give_the_same_map() -> None:
    rng = np.random.default_rng(0)
    tile = rng.normal(110, 12, (1, 1, 192, 192)).clip(0, 255).astype(np.uint8)
    tile[0, 0, 60:64, 30:160] = 15  # a dark line across the tile
    batch = load_card(MODEL).normalisation.apply(tile)
    maps = []
    for path, precision in ((MODEL, "fp32"), (INT8, "int8")):
        engine = open_engine(path, backend="ort", precision=precision, max_batch=1)
        try:
            maps.append(engine.infer(batch))
        finally:
            engine.close()
    fp32, int8 = maps
    assert fp32.shape == int8.shape == (1, 1, 192, 192)
    assert np.isfinite(fp32).all() and fp32.min() >= 0.0 and fp32.max() <= 1.0
    assert float(np.abs(fp32 - int8).mean()) < 0.02
    assert float(np.corrcoef(fp32.ravel(), int8.ravel())[0, 1]) > 0.9
