"""A camera's calibration file feeds the pipeline: flat-field, undistortion, scale, threshold."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from defectd.calibration.file import (
    Calibration,
    CameraSection,
    FlatFieldSection,
    PatternInfo,
    ThresholdSection,
    ThresholdTarget,
)
from defectd.calibration.flatfield import FlatField
from defectd.model.card import ModelCard
from defectd.pipeline.cameras import camera_setup_from_calibration
from defectd.pipeline.config import PipelineConfig, RulesConfig
from defectd.pipeline.inspection import Verdict
from defectd.pipeline.runner import Pipeline, PipelineResult
from pipeline_support import OrtTestEngine, brightness_model, dark_frame

W, H = 128, 64


def write_calibration(folder: Path, card: ModelCard, *, model_sha256: str) -> Path:
    gain = np.ones((H, W), np.float32)
    gain[:, W // 2 :] = 2.0  # the right half of the field is lit half as bright
    FlatField(gain).save(folder / "gain.npy")
    camera = CameraSection(
        image_size=(W, H),
        camera_matrix=((200.0, 0.0, W / 2), (0.0, 200.0, H / 2), (0.0, 0.0, 1.0)),
        dist_coeffs=(0.0, 0.0, 0.0, 0.0, 0.0),
        reprojection_error_px=0.1,
        mm_per_px=0.1,
        pattern=PatternInfo(kind="checkerboard", cols=9, rows=6, spacing_mm=5.0),
    )
    flat = FlatFieldSection(
        gain_file="gain.npy",
        image_size=(W, H),
        frames=8,
        reference_mean=100.0,
        gain_min=1.0,
        gain_max=2.0,
        uniformity_before=0.6,
        uniformity_after=0.01,
    )
    threshold = ThresholdSection(
        pixel_threshold=0.9,
        min_area_px=4,
        target=ThresholdTarget(escape_rate=0.01),
        model_sha256=model_sha256,
    )
    path = folder / "calibration.json"
    Calibration(camera=camera, flatfield=flat, threshold=threshold).save(path)
    return path


def inspect(
    path: Path, card: ModelCard, cal: Path, spots: list[tuple[int, int, int, int]], value: int
) -> PipelineResult:
    results: list[PipelineResult] = []
    done = threading.Event()

    def sink(r: PipelineResult) -> None:
        results.append(r)
        done.set()

    rules = RulesConfig.model_validate({"rules": [{"kind": "area", "min_area_mm2": 0.1}]})
    setup = camera_setup_from_calibration(cal)
    pipe = Pipeline(
        OrtTestEngine(path, card),
        card,
        PipelineConfig(),
        on_result=sink,
        rules=rules,
        cameras={"cam0": setup},
    )
    pipe.start()
    try:
        pipe.submit(dark_frame(H, W, spots=spots, value=value))
        assert done.wait(10)
    finally:
        pipe.stop()
    return results[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    path = tmp_path_factory.mktemp("cal") / "model.onnx"
    return path, brightness_model(path, size=64, level=0.5)


def test_flat_field_scale_and_threshold_come_from_the_calibration_file(model, tmp_path) -> None:
    path, card = model
    cal = write_calibration(tmp_path, card, model_sha256=card.sha256)
    # 100 grey: too dark on its own, 200 after the right half's gain of 2.
    right = inspect(path, card, cal, [(90, 20, 6, 6)], value=100).inspection
    assert (right.verdict, right.rule) == (Verdict.FAIL, "area>=0.1mm2")
    assert right.defects[0].area_mm2 == pytest.approx(right.defects[0].area_px * 0.01)
    left = inspect(path, card, cal, [(20, 20, 6, 6)], value=100).inspection
    assert left.verdict is Verdict.PASS and left.defects == ()


@pytest.mark.parametrize(("calibrated_for", "verdict"), [("this", "pass"), ("other", "fail")])
def test_the_calibrated_threshold_applies_only_to_its_own_model(
    model, tmp_path, calibrated_for, verdict
) -> None:
    path, card = model
    sha = card.sha256 if calibrated_for == "this" else "0" * 64
    cal = write_calibration(tmp_path, card, model_sha256=sha)
    setup = camera_setup_from_calibration(cal)
    assert (setup.threshold, setup.min_area_px, setup.mm_per_px) == (0.9, 4, pytest.approx(0.1))
    assert setup.undistort is not None and setup.flatfield is not None
    # 67 grey doubled by the gain to 134: peak probability ~0.7, above the card's 0.5 and
    # below the calibrated 0.9, which holds only for the model it was calibrated with.
    result = inspect(path, card, cal, [(90, 20, 8, 8)], value=67).inspection
    assert result.verdict.value == verdict
