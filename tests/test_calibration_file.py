"""The calibration file: validated sections, atomic writes, section-by-section updates."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from defectd.calibration.file import (
    Calibration,
    CameraSection,
    FlatFieldSection,
    PatternInfo,
    RateEstimate,
    ThresholdSection,
    ThresholdTarget,
    load_calibration,
    update_calibration,
)
from defectd.errors import ConfigError


def _camera(size: tuple[int, int] = (640, 480), mm_per_px: float = 0.125) -> CameraSection:
    return CameraSection(
        image_size=size,
        camera_matrix=((800.0, 0.0, 320.0), (0.0, 800.0, 240.0), (0.0, 0.0, 1.0)),
        dist_coeffs=(-0.2, 0.05, 0.0, 0.0, 0.0),
        reprojection_error_px=0.08,
        mm_per_px=mm_per_px,
        pattern=PatternInfo(kind="checkerboard", cols=9, rows=6, spacing_mm=5.0),
    )


def _threshold() -> ThresholdSection:
    return ThresholdSection(
        pixel_threshold=0.42,
        min_area_px=12,
        target=ThresholdTarget(escape_rate=0.01),
        escape=RateEstimate(rate=0.008, low=0.002, high=0.03, n=120),
    )


def _flatfield(size: tuple[int, int] = (640, 480)) -> FlatFieldSection:
    return FlatFieldSection(
        gain_file="calibration.flatfield.npy",
        image_size=size,
        frames=8,
        reference_mean=140.0,
        gain_min=0.9,
        gain_max=1.6,
        uniformity_before=0.45,
        uniformity_after=0.01,
    )


def test_saved_calibration_loads_back_equal(tmp_path: Path) -> None:
    cal = Calibration(station="s1", camera_id="top", camera=_camera(), threshold=_threshold())
    path = tmp_path / "calibration.json"
    cal.save(path)
    assert load_calibration(path) == cal


def test_unset_sections_are_absent_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    Calibration(camera=_camera()).save(path)
    data = json.loads(path.read_text())
    assert "camera" in data
    assert "threshold" not in data
    assert "flatfield" not in data


def test_update_replaces_one_section_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    update_calibration(path, threshold=_threshold())
    update_calibration(path, camera=_camera(mm_per_px=0.2))
    update_calibration(path, camera=_camera(mm_per_px=0.1))
    cal = load_calibration(path)
    assert cal.threshold == _threshold()
    assert cal.camera is not None
    assert cal.camera.mm_per_px == 0.1


def test_concurrent_updates_of_different_sections_both_survive(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    errors: list[BaseException] = []

    def write(**section: object) -> None:
        try:
            for _ in range(20):
                update_calibration(path, **section)  # type: ignore[arg-type]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=write, kwargs={"camera": _camera()}, name="cal-writer-camera"),
        threading.Thread(target=write, kwargs={"threshold": _threshold()}, name="cal-writer-thr"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    cal = load_calibration(path)
    assert cal.camera is not None
    assert cal.threshold is not None


def test_no_temporary_or_lock_files_are_left_behind(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    Calibration(camera=_camera()).save(path)
    update_calibration(path, threshold=_threshold())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]


def test_missing_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"nope\.json: calibration file not found"):
        load_calibration(path)


def test_invalid_json_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text('{\n  "camera": {,\n}')
    with pytest.raises(ConfigError, match=r"calibration\.json: not valid JSON \(line 2"):
        load_calibration(path)


def test_bad_value_error_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    data = json.loads(Calibration(camera=_camera()).to_json())
    data["camera"]["mm_per_px"] = -1.0
    path.write_text(json.dumps(data))
    with pytest.raises(
        ConfigError, match=r"calibration\.json: invalid calibration: camera\.mm_per_px"
    ):
        load_calibration(path)


def test_unknown_key_is_rejected_by_name(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    data = json.loads(Calibration(threshold=_threshold()).to_json())
    data["threshold"]["pixel_treshold"] = 0.5
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"threshold\.pixel_treshold: Extra inputs"):
        load_calibration(path)


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ConfigError, match="newer than this defectd reads"):
        load_calibration(path)


def test_wrong_distortion_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="dist_coeffs has 3 values"):
        CameraSection.model_validate({**_camera().model_dump(), "dist_coeffs": (0.1, 0.2, 0.3)})


def test_target_needs_exactly_one_rate() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ThresholdTarget(escape_rate=0.01, false_reject_rate=0.02)
    with pytest.raises(ValueError, match="exactly one"):
        ThresholdTarget()


def test_flatfield_and_camera_sizes_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    update_calibration(path, camera=_camera(size=(640, 480)))
    with pytest.raises(ConfigError, match=r"calibration\.json: .*flatfield\.image_size"):
        update_calibration(path, flatfield=_flatfield(size=(800, 600)))
    assert load_calibration(path).flatfield is None


def test_unknown_section_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown calibration section"):
        update_calibration(tmp_path / "c.json", lens=_camera())


def test_digest_changes_with_content_only() -> None:
    a = Calibration(camera=_camera())
    assert a.digest() == Calibration(camera=_camera()).digest()
    assert a.digest() != Calibration(camera=_camera(mm_per_px=0.2)).digest()
