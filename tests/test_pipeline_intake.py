"""Intake checks: every submitted frame gets exactly one verdict, whatever its fields, and
frames that differ from the camera's configured size or format are not inspected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defectd.daemon.config import load_station_config
from defectd.daemon.station import camera_setup
from defectd.model.card import ModelCard
from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.inspection import Verdict
from defectd.pipeline.runner import Pipeline, PipelineResult
from pipeline_support import OrtTestEngine, brightness_model, dark_frame


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    path = tmp_path_factory.mktemp("intake") / "model.onnx"
    return path, brightness_model(path, size=64)


@pytest.fixture
def pipeline(small: tuple[Path, ModelCard]) -> Iterator[tuple[Pipeline, list[PipelineResult]]]:
    path, card = small
    results: list[PipelineResult] = []
    setup = CameraSetup(frame_size=(64, 64), channels=1)
    pipe = Pipeline(
        OrtTestEngine(path, card), card, None, on_result=results.append, cameras={"cam0": setup}
    )
    pipe.start()
    yield pipe, results
    pipe.stop(timeout=2.0)


def _one(pipe: Pipeline, results: list[PipelineResult]) -> PipelineResult:
    assert pipe.wait_idle(10)
    assert len(results) == 1
    return results[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("t_host_ns", None),
        ("t_host_ns", 1.5),
        ("seq", None),
        ("seq", True),
        ("camera", None),
        ("station", 7),
        ("t_wall", "now"),
        ("part_id", 12),
        ("meta", None),
        ("image", None),
        ("image", b"\x00" * 4096),
    ],
)
def test_a_frame_with_a_malformed_field_gets_an_error_verdict_with_the_reason(
    pipeline: tuple[Pipeline, list[PipelineResult]], field: str, value: Any
) -> None:
    pipe, results = pipeline
    frame = dark_frame(64, 64, seq=3)
    setattr(frame, field, value)
    pipe.submit(frame)  # never raises
    ins = _one(pipe, results).inspection
    assert ins.verdict is Verdict.ERROR and ins.rule == "error:corrupt_frame"
    assert field in str(ins.reason) or field == "image"
    assert pipe.stats().errors == {"corrupt_frame": 1}


def test_a_one_pixel_frame_is_not_passed(pipeline: tuple[Pipeline, list[PipelineResult]]) -> None:
    pipe, results = pipeline
    frame = dark_frame(64, 64)
    frame.image = np.zeros((1, 1), np.uint8)
    pipe.submit(frame)
    ins = _one(pipe, results).inspection
    assert ins.verdict is Verdict.ERROR and ins.rule == "error:corrupt_frame"
    assert "1x1 (HxW), the camera is configured for 64x64" in str(ins.reason)


def test_a_colour_frame_from_a_gray_camera_is_not_inspected(
    pipeline: tuple[Pipeline, list[PipelineResult]],
) -> None:
    pipe, results = pipeline
    pipe.submit(dark_frame(64, 64, channels=3))
    ins = _one(pipe, results).inspection
    assert ins.verdict is Verdict.ERROR and "3 channels" in str(ins.reason)


def test_a_frame_of_the_configured_format_is_inspected(
    pipeline: tuple[Pipeline, list[PipelineResult]],
) -> None:
    pipe, results = pipeline
    pipe.submit(dark_frame(64, 64, spots=[(10, 10, 8, 8)]))
    assert _one(pipe, results).inspection.verdict is Verdict.FAIL


def test_the_station_config_gives_each_camera_its_expected_format(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"")
    path = tmp_path / "station.toml"
    path.write_text(
        'station = "s1"\n[model]\npath = "m.onnx"\n'
        '[[cameras]]\ntype = "synthetic"\ncamera = "a"\nheight = 48\nwidth = 80\nchannels = 3\n'
        '[[cameras]]\ntype = "replay"\ncamera = "b"\npath = "."\n'
        '[[cameras]]\ntype = "genicam"\ncamera = "c"\ndevice = {serial = "0"}\n'
        'nodes = {Width = 320, Height = 240, PixelFormat = "Mono8"}\n'
    )
    cams = load_station_config(path).cameras
    formats = [(s.frame_size, s.channels) for s in map(camera_setup, cams)]
    assert formats == [((48, 80), 3), (None, 1), ((240, 320), 1)]
