"""The shipped NEU-Seg model (three classes: inclusion, patches, scratches) is whole: its card
matches the ONNX file and lists the classes, its calibration file holds one operating point
per class for exactly this file, and the model runs on a steel-like image (generated here; the
data set itself lives outside the repository) returning one probability map per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectd.calibration.file import load_calibration
from defectd.cli import main
from defectd.engines import open_engine
from defectd.model.card import file_sha256, load_card

MODEL = Path(__file__).resolve().parents[1] / "models" / "neu_seg" / "model.onnx"
CLASSES = ["inclusion", "patches", "scratches"]


def test_the_card_describes_the_file_and_its_classes() -> None:
    card = load_card(MODEL)
    assert list(card.classes) == CLASSES
    assert card.sha256 == file_sha256(MODEL)
    assert (card.input.channels, card.input.height, card.input.width) == (1, 208, 208)
    assert card.input.resize == "pad"
    assert main(["card", "check", str(MODEL)]) == 0


def test_the_calibration_holds_a_point_per_class_for_this_file() -> None:
    section = load_calibration(MODEL.with_name("calibration.json")).threshold
    assert section is not None
    assert section.model_sha256 == file_sha256(MODEL)
    assert sorted(section.classes) == CLASSES
    for point in section.classes.values():
        assert 0.0 < point.pixel_threshold < 1.0
        assert point.min_area_px > 0


def test_the_model_returns_a_probability_map_per_class() -> None:
    rng = np.random.default_rng(0)
    steel = rng.normal(112, 20, (1, 1, 208, 208)).clip(0, 255).astype(np.uint8)
    steel[0, 0, 100:104, 20:180] = 25  # a dark scratch-like line
    batch = load_card(MODEL).normalisation.apply(steel)
    engine = open_engine(MODEL, backend="ort", precision="fp32", max_batch=1)
    try:
        out = engine.infer(batch)
    finally:
        engine.close()
    assert out.shape == (1, 3, 208, 208)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
